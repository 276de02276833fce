"""Inference API: load a checkpoint once, predict one image -> probabilities, positive calls and all-label heatmaps.

`Prediction.to_dict()` is the one JSON shape of a result: the CLI prints it (adding the image path and heatmap
files), the web API answers it and `result.json` stores it (adding the result id, time and URLs).

On ONNX Runtime (backend "onnx", or "auto" once its export exists) torch is never imported: the export carries the
checkpoint's meta and trust data, and everything after the forward pass (preprocessing, the in-scope and orientation
checks, calibration, heatmaps) is NumPy. The torch backend imports it when it loads the checkpoint.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .auto_backend import checkpoint_digest, ensure_export, export_path
from .calls import NEGATIVE, NOT_VALIDATED, OUT_OF_SCOPE, POSITIVE, ranked_labels
from .cam import has_support, overlay
from .device import cuda_ruled_out
from .fileio import to_json_data
from .imaging import Source, read_bytes, read_xray, sniff
from .meta import CheckpointError, Meta
from .metrics import binarize
from .monitor import input_statistics
from .onnx_backend import OnnxModel, OnnxModelError
from .transforms import build_normalize, build_transform, preprocess, resized_uint8
from .trust import Trust, TrustError
from .trust.calibration import sigmoid
from .trust.evidence import RULE, format_scope, is_validated
from .trust.orientation import orientation_features
from .trust.scope import image_statistics

if TYPE_CHECKING:
    import torch

    from .model import ChestXrayNet

BACKENDS = ("auto", "torch", "onnx")
BACKEND_HELP = ("auto: PyTorch on CUDA; on a CPU, ONNX Runtime from an export made once beside the checkpoint "
                "(named by its hash) and checked against PyTorch, or PyTorch with a warning when that fails; torch; "
                "or onnx: ONNX Runtime on the export of --checkpoint (a .onnx file, or the .onnx beside the "
                "checkpoint; Model_Training/export.py writes it)")

SCOPE_NOT_AVAILABLE = "in-scope check: not available (this checkpoint has no scope statistics; add them with " \
    "Model_Training/fit_trust.py); no finding is called"
SCOPE_NOT_AVAILABLE_UNTRUSTED = "in-scope check: not available (this checkpoint has no scope statistics); findings " \
    "are called anyway because the operator allowed untrusted answers"
NO_CALL = "not validated \u2014 no call"  # how a "not validated" call reads in sentences and tables
UNTRUSTED_WARNING = ("Warning: untrusted answers allowed by the operator (--allow-untrusted): labels without "
                     "validation evidence, or images without an in-scope check, are called at their raw thresholds. "
                     "These calls have no validation behind them.")
NO_EVIDENCE_REASON = "this checkpoint records no validation evidence; add it with Model_Training/fit_trust.py"
AUTO_ONNX = "auto: ONNX Runtime on the CPU (its export checked against PyTorch)"


def scope_message(in_scope: bool | None, score: float | None, limit: float | None, untrusted: bool = False) -> str:
    """One sentence on the in-scope check for pages, the API, the CLI and the PDF."""
    if in_scope is None:
        return SCOPE_NOT_AVAILABLE_UNTRUSTED if untrusted else SCOPE_NOT_AVAILABLE
    s, lim = format_scope(score, limit)
    if in_scope:
        return (f"in scope: looks like the frontal chest radiographs the model learned from (score {s} \u2264 limit "
                f"{lim})")
    return (f"out of scope: this image does not look like a frontal chest radiograph from the training data (score "
            f"{s} > limit {lim}); no finding is called")


@dataclass
class Prediction:
    """One image's result. heatmaps: raw class activation maps (L, h, w), in `labels` order.

    probabilities are calibrated when the checkpoint holds a calibration (`calibrated`), sigmoid(logit) otherwise;
    `logits` are the raw model outputs. `calls` holds each label's one call word (chestxray.calls), decided once by
    the Predictor: "out of scope" for every label of an out-of-scope image; "not validated" for a label without
    validation evidence, and for every label when the checkpoint has no scope statistics; otherwise "positive" when
    the probability reaches the threshold, else "negative". `untrusted` is True when the operator allowed calls
    without that evidence (the answer then carries UNTRUSTED_WARNING). in_scope is None when the checkpoint has no
    scope statistics. orientation is "upright", "appears mirrored" or "appears rotated" (chestxray.trust.orientation: a
    remark, never a refusal), None when the checkpoint has no orientation check.
    """

    labels: tuple[str, ...]
    probabilities: dict[str, float]
    calls: dict[str, str]
    thresholds: dict[str, float]
    image: np.ndarray = field(repr=False)  # (H, W) float32 in [0, 1], as read
    heatmaps: np.ndarray | None = field(default=None, repr=False)
    format: str | None = None  # "PNG", "JPEG" or "DICOM" from the file's content; None for an array
    model: dict = field(default_factory=dict, repr=False)  # Predictor.model_card() of the model that made it
    logits: dict[str, float] = field(default_factory=dict)
    calibrated: bool = False
    validated: dict[str, bool | None] = field(default_factory=dict)
    evidence: dict[str, dict] = field(default_factory=dict, repr=False)
    in_scope: bool | None = None
    scope_score: float | None = None
    scope_limit: float | None = None
    support: dict[str, bool] = field(default_factory=dict)  # some positive value in the label's map
    untrusted: bool = False
    orientation: str | None = None
    input_stats: tuple[float, float] | None = None  # (brightness, contrast) of the model input, for the monitor

    @property
    def positive(self) -> list[str]:
        """The labels called positive, in model order."""
        return [name for name in self.labels if self.calls[name] == POSITIVE]

    @property
    def warning(self) -> str | None:
        """UNTRUSTED_WARNING when the operator allowed calls without evidence, else None."""
        return UNTRUSTED_WARNING if self.untrusted else None

    def ranked(self) -> list[str]:
        """Called (positive) labels first, then the rest; each group by probability, highest first."""
        return ranked_labels({name: self.probabilities[name] for name in self.labels}, set(self.positive))

    def overlay(self, label: str, alpha: float = 0.45):
        """The heatmap of `label` blended over the X-ray, as an RGB PIL image of the original size."""
        if self.heatmaps is None:
            raise ValueError("this prediction was made without heatmaps")
        if label not in self.labels:
            raise KeyError(f"unknown label {label!r}; this model's labels are {list(self.labels)}")
        return overlay(self.image, self.heatmaps[self.labels.index(label)], alpha=alpha)

    def call(self, label: str) -> str:
        """"positive", "negative", "not validated" or "out of scope" (chestxray.calls), as decided by the Predictor."""
        return self.calls[label]

    def to_dict(self) -> dict:
        """The one JSON shape (plain data, NaN -> None): every label in model order, the calls, the scope, the model.

        {"labels": [{"label", "probability", "logit", "threshold", "positive", "call", "validated", "auroc",
         "auroc_ci", "has_support"}, ...], "positive": [label, ...], "in_scope": bool|None, "scope_score",
         "scope_limit", "scope": sentence, "warning": sentence|None, "calibrated": bool,
         "format": "PNG"|"JPEG"|"DICOM"|None, "original_size": [width, height], "orientation": str|None,
         "model": {model card}}
        """
        positive = set(self.positive)
        rows = []
        for label in self.labels:
            ev = self.evidence.get(label) or {}
            rows.append({
                "label": label, "probability": self.probabilities[label], "logit": self.logits.get(label),
                "threshold": self.thresholds[label], "positive": label in positive, "call": self.call(label),
                "validated": self.validated.get(label), "auroc": ev.get("auroc"), "auroc_ci": ev.get("auroc_ci"),
                "has_support": self.support.get(label),
            })
        return to_json_data({
            "labels": rows,
            "positive": list(self.positive),
            "in_scope": self.in_scope,
            "scope_score": self.scope_score,
            "scope_limit": self.scope_limit,
            "scope": scope_message(self.in_scope, self.scope_score, self.scope_limit, self.untrusted),
            "warning": self.warning,
            "calibrated": self.calibrated,
            "format": self.format,
            "original_size": [int(self.image.shape[1]), int(self.image.shape[0])],
            "orientation": self.orientation,
            "model": self.model,
        })


class Predictor:
    """A loaded model with its preprocessing and trust data. Stateless per call, so one instance serves many threads.

    `model` is the PyTorch model (backend "torch") or an OnnxModel (backend "onnx"; its inputs are prepared on the
    CPU, as NumPy arrays, and ONNX Runtime moves them to its execution provider; `device` is then "cpu").
    """

    def __init__(self, model: ChestXrayNet | OnnxModel, meta: Meta, device: torch.device | str = "cpu",
                 trust: Trust | None = None, allow_untrusted: bool = False) -> None:
        self.meta = meta
        self.labels = meta.labels
        self.thresholds = np.asarray(meta.thresholds, dtype=np.float64)
        self.transform = build_transform(meta, train=False)  # per image (loader workers may apply it)
        self.normalize = build_normalize(meta)  # per batch, on self.device
        if isinstance(model, OnnxModel):
            self.backend = "onnx"
            self.onnx = model
            self.model = None
            self.device = "cpu"
        else:
            import torch

            self.backend = "torch"
            self.onnx = None
            self.device = torch.device(device)
            self.model = model.to(self.device).eval()
        self.trust = trust or Trust()
        self.allow_untrusted = bool(allow_untrusted)
        self.choice: str | None = None  # backend "auto": what it chose and why (from_checkpoint)
        ev = self.trust.evidence
        # Safe by default: a label without evidence (or a checkpoint without any) is not called. None means "no
        # evidence recorded, called anyway": only when the operator explicitly allowed untrusted answers.
        self.validated = {name: (is_validated(ev[name]) if ev is not None else (None if allow_untrusted else False))
                          for name in self.labels}

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, device: str = "auto", backend: str = "torch",
                        allow_untrusted: bool = False, log=None) -> Predictor:
        """Load once (CUDA when available for 'auto'). Raises CheckpointError for a bad file, RuntimeError for a
        device that is not there. allow_untrusted: call labels even without evidence or scope statistics (every
        answer then carries a warning); off by default.

        backend "onnx": `path` is an exported .onnx file, or a checkpoint with its export beside it (same name,
        .onnx), which must have been exported from that checkpoint (its metadata is compared).
        backend "auto": PyTorch on CUDA; on a CPU, ONNX Runtime from the export chestxray.auto_backend makes once per
        checkpoint version and checks against PyTorch; PyTorch, with a one-line warning to `log` (default: stderr),
        when that fails. `choice` says which was taken and why.
        """
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        path = Path(path)
        if backend == "auto" and path.suffix.lower() == ".onnx":
            backend = "onnx"  # an export given directly: nothing to choose
        if backend == "onnx" and path.suffix.lower() == ".onnx":
            onnx_model = OnnxModel(path, device=device)
            return cls(onnx_model, onnx_model.meta, trust=_trust(onnx_model.info.extra, onnx_model.meta, path),
                       allow_untrusted=allow_untrusted)
        if backend == "auto" and (device == "cpu" or (device == "auto" and cuda_ruled_out())):
            # The export of this very file (named by its SHA-256) carries its meta and trust data: no torch.load.
            exported = export_path(path, checkpoint_digest(path)) if path.is_file() else None
            if exported is not None and exported.is_file():
                try:
                    onnx_model = OnnxModel(exported, device="cpu")
                    predictor = cls(onnx_model, onnx_model.meta, trust=_trust(onnx_model.info.extra,
                                                                              onnx_model.meta, path),
                                    allow_untrusted=allow_untrusted)
                    predictor.choice = AUTO_ONNX
                    return predictor
                except OnnxModelError:
                    pass  # an unusable export: the path below loads the checkpoint, says why and serves PyTorch
        from .checkpoint import checkpoint_from_obj, safe_torch_load
        from .device import resolve_device

        obj = safe_torch_load(path, map_location="cpu")
        if backend == "onnx":
            beside = path.with_suffix(".onnx")
            if not beside.is_file():
                raise CheckpointError(f"--backend onnx needs the ONNX export of {path}: there is none at "
                                      f"{beside}. Export it with: python Model_Training/export.py --checkpoint "
                                      f"{path} --out {beside}")
            expected = Meta.from_dict(obj.get("meta") if isinstance(obj, dict) else None)
            onnx_model = OnnxModel(beside, device=device, expected_meta=expected)
            return cls(onnx_model, onnx_model.meta, trust=_trust(obj, onnx_model.meta, path),
                       allow_untrusted=allow_untrusted)
        dev = resolve_device(device)
        model, meta, train = checkpoint_from_obj(obj, path)
        if backend != "auto":
            return cls(model, meta, dev, _trust(obj, meta, path), allow_untrusted=allow_untrusted)
        log = log or (lambda line: print(line, file=sys.stderr, flush=True))
        trust = _trust(obj, meta, path)
        choice = "auto: PyTorch on CUDA"
        if dev.type != "cuda":
            try:
                exported = ensure_export(path, obj, model, meta, train, log)
                onnx_model = OnnxModel(exported, device="cpu", expected_meta=meta)
                predictor = cls(onnx_model, onnx_model.meta, trust=trust, allow_untrusted=allow_untrusted)
                predictor.choice = AUTO_ONNX
                return predictor
            except OnnxModelError as exc:  # CheckpointError too: any failure to use the export
                log(f"warning: {exc}; serving with PyTorch instead")
                choice = f"auto: PyTorch on the CPU (ONNX Runtime not used: {exc})"
        predictor = cls(model, meta, dev, trust, allow_untrusted=allow_untrusted)
        predictor.choice = choice
        return predictor

    def preprocess(self, image: np.ndarray) -> torch.Tensor:
        """(H, W) image in [0, 1] -> (1, 3, S, S) float32 on the model's device, as in evaluation (transforms.py)."""
        return preprocess(self.meta, image, self.device)

    def _outputs(self, inputs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(B, 1, S, S) uint8 inputs -> one forward pass: (logits (B, L), maps (B, L, h, w), pooled transition
        features (B, C), channel 0 of the normalised input (B, 1, S, S)), all NumPy.

        The maps cost one small einsum on the same features, so they are always made: every answer says which
        labels have support, and the in-scope check reads the pooled features of the same pass.
        """
        if self.onnx is not None:
            x = self.normalize(inputs)
            return (*self.onnx.run(x), x[:, :1])
        import torch

        from .cam import class_activation_maps
        from .trust.scope import pooled_features

        with torch.inference_mode():
            x = self.normalize(torch.as_tensor(inputs).to(self.device))  # normalised on the model's device
            features = self.model.features(x)
            logits = self.model.head(features).float().cpu().numpy()
            maps = class_activation_maps(self.model, features).cpu().numpy()
            pooled = pooled_features(features).cpu().numpy()
        return logits, maps, pooled, x[:, :1].cpu().numpy()

    def predict(self, image: Source | np.ndarray, heatmaps: bool = True, filename: str = "") -> Prediction:
        """Path/bytes/array -> Prediction. One forward pass gives probabilities, every label's heatmap and the
        in-scope check.

        The format is decided by content (imaging.sniff) before decoding, so the CLI (which passes paths or bytes)
        and the web app refuse the same files with the same message. Raises InvalidImage (UnsupportedFormat for
        another file type) for unreadable input.
        """
        image, image_format = self.decode(image, filename)
        return self.predict_batch([image], heatmaps, [image_format])[0]

    @staticmethod
    def decode(image: Source | np.ndarray, filename: str = "") -> tuple[np.ndarray, str | None]:
        """Path/bytes/array -> ((H, W) image in [0, 1], its format or None for an array), as predict reads it."""
        if isinstance(image, np.ndarray):
            return image, None
        data = read_bytes(image)
        if not filename and isinstance(image, (str, os.PathLike)):
            filename = Path(image).name
        image_format = sniff(data, filename)
        return read_xray(data), image_format

    def predict_batch(self, images: Sequence[np.ndarray], heatmaps: bool = True,
                      formats: Sequence[str | None] | None = None, inputs: np.ndarray | torch.Tensor | None = None
                      ) -> list[Prediction]:
        """(H, W) images in [0, 1] -> one Prediction each, from one forward pass over the batch.

        inputs: the images after the per-image stage, (B, 1, S, S) uint8, a NumPy array or a CPU tensor (e.g. made
        in DataLoader workers by self.transform); computed here when None. Raises ValueError when the counts differ.
        """
        if inputs is None:
            inputs = np.stack([resized_uint8(image, self.meta.image_size)[None] for image in images])
        inputs = np.asarray(inputs)
        formats = list(formats) if formats is not None else [None] * len(images)
        if not (len(images) == len(formats) == inputs.shape[0]):
            raise ValueError(f"{len(images)} images, {len(formats)} formats and {inputs.shape[0]} inputs differ")
        logits, maps, pooled, x = self._outputs(inputs)
        scope, scores = self.trust.scope, None
        if scope is not None:  # the in-scope check scores the whole batch at once
            stats = image_statistics(x, self.meta.mean[0], self.meta.std[0]) if scope.needs_images else None
            scores = scope.score(pooled, stats)
        # The orientation check reads the same pooled features and the input's thumbnail: no second pass.
        orientation = self.trust.orientation
        judged = orientation.judge(orientation_features(pooled, x)) if orientation is not None else None
        card = self.model_card()  # the same for every image: built once per batch
        predictions = []
        for i, image in enumerate(images):
            prediction = self._prediction(image, logits[i].astype(np.float64), maps[i],
                                          float(scores[i]) if scores is not None else None, formats[i], card)
            if not heatmaps:
                prediction.heatmaps = None
            prediction.orientation = judged[i] if judged is not None else None
            prediction.input_stats = input_statistics(inputs[i])  # the monitor's, from the input already made
            predictions.append(prediction)
        return predictions

    def _prediction(self, image: np.ndarray, logits: np.ndarray, maps: np.ndarray | None, score: float | None,
                    image_format: str | None, card: dict) -> Prediction:
        trust = self.trust
        if trust.calibration is not None:
            probs = trust.calibration.apply(logits)
        else:
            probs = sigmoid(logits)
        in_scope = limit = None
        if score is not None:
            limit = trust.scope.limit
            in_scope = bool(trust.scope.in_scope(score))
        return Prediction(
            labels=self.labels,
            probabilities={name: float(p) for name, p in zip(self.labels, probs)},
            calls=self.decide(probs, in_scope),
            thresholds={name: float(t) for name, t in zip(self.labels, self.thresholds)},
            image=image,
            heatmaps=maps,
            format=image_format,
            model=card,
            logits={name: float(z) for name, z in zip(self.labels, logits)},
            calibrated=trust.calibration is not None,
            validated=dict(self.validated),
            evidence=dict(trust.evidence or {}),
            in_scope=in_scope,
            scope_score=score,
            scope_limit=limit,
            support={name: has_support(m) for name, m in zip(self.labels, maps)},
            untrusted=self.untrusted,
        )

    @property
    def untrusted(self) -> bool:
        """True when some call is made without evidence: allowed by the operator and evidence or scope missing."""
        return self.allow_untrusted and (self.trust.scope is None or self.trust.evidence is None)

    def decide(self, probabilities: np.ndarray, in_scope: bool | None) -> dict[str, str]:
        """(L,) calibrated probabilities and the image's scope verdict -> {label: call word}; the one place calls
        are decided. Without scope statistics nothing is called unless the operator allowed untrusted answers."""
        if in_scope is False:
            return dict.fromkeys(self.labels, OUT_OF_SCOPE)
        unchecked = in_scope is None and not self.allow_untrusted
        over = binarize(np.asarray(probabilities), self.thresholds)
        return {name: NOT_VALIDATED if unchecked or self.validated[name] is False else (POSITIVE if hit else NEGATIVE)
                for name, hit in zip(self.labels, over)}

    def model_card(self) -> dict:
        """Plain-data description of the loaded model (arch, input, labels, thresholds, training summary)."""
        return {
            "arch": self.meta.arch,
            "image_size": self.meta.image_size,
            "heatmap_cells": self.meta.image_size // self.meta.output_stride,  # per side, at output_stride
            "labels": list(self.labels),
            "thresholds": dict(zip(self.labels, map(float, self.thresholds))),
            "lse_r": self.meta.lse_r,
            "training": self.meta.training,
            "device": str(self.device) if self.onnx is None else self.onnx.device,
            "backend": self.backend if self.onnx is None else f"onnx ({self.onnx.precision})",
            "backend_choice": self.choice,
            "demo": "demo" in self.meta.training,  # Model_Training/demo.py's model: its answers are meaningless
            "scope": self.trust.scope.summary() if self.trust.scope is not None else None,
            "calibration": self.trust.calibration.to_dict() if self.trust.calibration is not None else None,
            "evidence": self.trust.evidence,
            "call_rule": RULE if self.trust.evidence is not None else (
                "no validation evidence recorded: every label is called at its threshold (untrusted answers allowed "
                "by the operator)" if self.allow_untrusted else f"no validation evidence recorded: no label is "
                f"called ({NO_EVIDENCE_REASON})"),
            "untrusted": self.untrusted,
            "warning": UNTRUSTED_WARNING if self.untrusted else None,
            "calibration_report": self.trust.report or None,
            "orientation": self.trust.orientation.summary() if self.trust.orientation is not None else None,
        }


def _trust(obj: Mapping, meta: Meta, path: str | os.PathLike) -> Trust:
    """The checkpoint's trust entry (Trust() when it has none). Raises CheckpointError when it is malformed."""
    try:
        return Trust.from_checkpoint(obj, meta.labels)
    except TrustError as exc:
        raise CheckpointError(f"{path}: {exc}") from None

