"""Inference API: load a checkpoint once, predict one image -> probabilities, positive calls and all-label heatmaps.

Two backends give the same Prediction: "torch" (the checkpoint's model) and "onnx" (the graph that
Model_Training/export.py writes, run by ONNX Runtime; chestxray/onnx_backend.py). predict_batch scores many decoded
images in one forward pass; predict is predict_batch of one.

`Prediction.to_dict()` is the one JSON shape of a result: the CLI prints it (adding the image path and heatmap
files), the web API answers it and `result.json` stores it (adding the result id, time and URLs).
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .cam import class_activation_maps, overlay
from .checkpoint import CheckpointError, Meta, load_checkpoint, safe_torch_load
from .device import resolve_device
from .fileio import to_json_data
from .imaging import Source, read_bytes, read_xray, sniff
from .metrics import binarize
from .model import ChestXrayNet
from .onnx_backend import OnnxModel
from .transforms import build_normalize, build_transform, preprocess

BACKENDS = ("torch", "onnx")


@dataclass
class Prediction:
    """One image's result. heatmaps: raw class activation maps (L, h, w), in `labels` order."""

    labels: tuple[str, ...]
    probabilities: dict[str, float]
    positive: list[str]
    thresholds: dict[str, float]
    image: np.ndarray = field(repr=False)  # (H, W) float32 in [0, 1], as read
    heatmaps: np.ndarray | None = field(default=None, repr=False)
    format: str | None = None  # "PNG", "JPEG" or "DICOM" from the file's content; None for an array
    model: dict = field(default_factory=dict, repr=False)  # Predictor.model_card() of the model that made it

    def ranked(self) -> list[str]:
        """Labels sorted by probability, highest first."""
        return sorted(self.labels, key=lambda name: -self.probabilities[name])

    def overlay(self, label: str, alpha: float = 0.45):
        """The heatmap of `label` blended over the X-ray, as an RGB PIL image of the original size."""
        if self.heatmaps is None:
            raise ValueError("this prediction was made without heatmaps")
        if label not in self.labels:
            raise KeyError(f"unknown label {label!r}; this model's labels are {list(self.labels)}")
        return overlay(self.image, self.heatmaps[self.labels.index(label)], alpha=alpha)

    def to_dict(self) -> dict:
        """The one JSON shape (plain data, NaN -> None): every label in model order, the positive calls, the model.

        {"labels": [{"label", "probability", "threshold", "positive"}, ...], "positive": [label, ...],
         "format": "PNG"|"JPEG"|"DICOM"|None, "original_size": [width, height], "model": {model card}}
        """
        positive = set(self.positive)
        return to_json_data({
            "labels": [
                {"label": label, "probability": self.probabilities[label], "threshold": self.thresholds[label],
                 "positive": label in positive}
                for label in self.labels
            ],
            "positive": list(self.positive),
            "format": self.format,
            "original_size": [int(self.image.shape[1]), int(self.image.shape[0])],
            "model": self.model,
        })


class Predictor:
    """A loaded model with its preprocessing. Stateless per call, so one instance serves many threads.

    `model` is the PyTorch model (backend "torch") or an OnnxModel (backend "onnx"; its inputs are prepared on the
    CPU and ONNX Runtime moves them to its execution provider).
    """

    def __init__(self, model: ChestXrayNet | OnnxModel, meta: Meta, device: torch.device | str = "cpu") -> None:
        self.meta = meta
        self.labels = meta.labels
        self.thresholds = np.asarray(meta.thresholds, dtype=np.float64)
        self.transform = build_transform(meta, train=False)  # per image (loader workers may apply it)
        self.normalize = build_normalize(meta)  # per batch, on self.device
        if isinstance(model, OnnxModel):
            self.backend = "onnx"
            self.onnx = model
            self.model = None
            self.device = torch.device("cpu")
        else:
            self.backend = "torch"
            self.onnx = None
            self.device = torch.device(device)
            self.model = model.to(self.device).eval()

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, device: str = "auto", backend: str = "torch") -> Predictor:
        """Load once (CUDA when available for 'auto'). Raises CheckpointError for a bad file, RuntimeError for a
        device that is not there.

        backend "onnx": `path` is an exported .onnx file, or a checkpoint with its export beside it (same name,
        .onnx), which must have been exported from that checkpoint (its metadata is compared).
        """
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if backend == "onnx":
            path = Path(path)
            if path.suffix.lower() == ".onnx":
                onnx_model = OnnxModel(path, device=device)
            else:
                beside = path.with_suffix(".onnx")
                if not beside.is_file():
                    raise CheckpointError(f"--backend onnx needs the ONNX export of {path}: there is none at "
                                          f"{beside}. Export it with: python Model_Training/export.py --checkpoint "
                                          f"{path} --out {beside}")
                # Only the metadata is needed to check that the export belongs to this checkpoint.
                obj = safe_torch_load(path)
                expected = Meta.from_dict(obj.get("meta") if isinstance(obj, dict) else None)
                onnx_model = OnnxModel(beside, device=device, expected_meta=expected)
            return cls(onnx_model, onnx_model.meta)
        dev = resolve_device(device)
        model, meta, _ = load_checkpoint(path, map_location="cpu")
        return cls(model, meta, dev)

    def preprocess(self, image: np.ndarray) -> torch.Tensor:
        """(H, W) image in [0, 1] -> (1, 3, S, S) float32 on the model's device, as in evaluation (transforms.py)."""
        return preprocess(self.meta, image, self.device)

    def forward(self, x: torch.Tensor, heatmaps: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
        """Normalised (B, 3, S, S) -> (logits (B, L) float32, raw maps (B, L, h, w) float32 or None), numpy."""
        if self.onnx is not None:
            logits, maps, _ = self.onnx.run(x)
            return logits, maps if heatmaps else None
        with torch.inference_mode():
            features = self.model.features(x.to(self.device))
            logits = self.model.head(features).float().cpu().numpy()
            maps = class_activation_maps(self.model, features).cpu().numpy() if heatmaps else None
        return logits, maps

    def predict(self, image: Source | np.ndarray, heatmaps: bool = True, filename: str = "") -> Prediction:
        """Path/bytes/file/array -> Prediction. One forward pass gives probabilities and every label's heatmap.

        The format is decided from the content by imaging.sniff (with `filename`, default a path's name), so the CLI
        and the web app refuse the same files with the same message. Raises InvalidImage (UnsupportedFormat for
        another file type) for unreadable input.
        """
        image_format = None
        if not isinstance(image, np.ndarray):
            data = read_bytes(image)
            if not filename and isinstance(image, (str, os.PathLike)):
                filename = Path(image).name
            image_format = sniff(data, filename)
            image = read_xray(data)
        return self.predict_batch([image], heatmaps, [image_format])[0]

    def predict_batch(self, images: Sequence[np.ndarray], heatmaps: bool = True,
                      formats: Sequence[str | None] | None = None, inputs: torch.Tensor | None = None
                      ) -> list[Prediction]:
        """(H, W) images in [0, 1] -> one Prediction each, from one forward pass over the batch.

        inputs: the images after the per-image stage, (B, 1, S, S) uint8 (e.g. made in DataLoader workers by
        self.transform); computed here when None. Raises ValueError when the counts differ.
        """
        if inputs is None:
            inputs = torch.stack([self.transform(image) for image in images])
        formats = list(formats) if formats is not None else [None] * len(images)
        if not (len(images) == len(formats) == inputs.shape[0]):
            raise ValueError(f"{len(images)} images, {len(formats)} formats and {inputs.shape[0]} inputs differ")
        logits, maps = self.forward(self.normalize(inputs.to(self.device)), heatmaps)
        probs = torch.sigmoid(torch.from_numpy(logits).float()).numpy().astype(np.float64)
        card = self.model_card()
        thresholds = {name: float(t) for name, t in zip(self.labels, self.thresholds)}
        predictions = []
        for i, image in enumerate(images):
            calls = binarize(probs[i], self.thresholds)
            predictions.append(Prediction(
                labels=self.labels,
                probabilities={name: float(p) for name, p in zip(self.labels, probs[i])},
                positive=[name for name, call in zip(self.labels, calls) if call],
                thresholds=dict(thresholds),
                image=image,
                heatmaps=maps[i] if maps is not None else None,
                format=formats[i],
                model=card,
            ))
        return predictions

    def model_card(self) -> dict:
        """Plain-data description of the loaded model (arch, input, labels, thresholds, training summary)."""
        return {
            "arch": self.meta.arch,
            "image_size": self.meta.image_size,
            "labels": list(self.labels),
            "thresholds": dict(zip(self.labels, map(float, self.thresholds))),
            "lse_r": self.meta.lse_r,
            "training": self.meta.training,
            "device": str(self.device) if self.onnx is None else self.onnx.device,
            "demo": "demo" in self.meta.training,  # Model_Training/demo.py's model: its answers are meaningless
            "backend": self.backend if self.onnx is None else f"onnx ({self.onnx.precision})",
        }

