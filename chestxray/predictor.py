"""Inference API: load a checkpoint once, predict one image -> probabilities, positive calls and all-label heatmaps.

`Prediction.to_dict()` is the one JSON shape of a result: the CLI prints it (adding the image path and heatmap
files), the web API answers it and `result.json` stores it (adding the result id, time and URLs).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .cam import overlay, predict_with_maps
from .checkpoint import Meta, load_checkpoint
from .device import resolve_device
from .fileio import to_json_data
from .imaging import Source, _read_bytes, read_xray, sniff  # _read_bytes: read_xray's own reader and messages
from .metrics import binarize
from .model import ChestXrayNet
from .transforms import preprocess


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
    """A loaded model with its preprocessing. Stateless per call, so one instance serves many threads."""

    def __init__(self, model: ChestXrayNet, meta: Meta, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.meta = meta
        self.labels = meta.labels
        self.model = model.to(self.device).eval()
        self.thresholds = np.asarray(meta.thresholds, dtype=np.float64)

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, device: str = "auto") -> Predictor:
        """Load once (CUDA when available for 'auto'). Raises CheckpointError for a bad file, RuntimeError for a
        device that is not there."""
        dev = resolve_device(device)
        model, meta, _ = load_checkpoint(path, map_location="cpu")
        return cls(model, meta, dev)

    def preprocess(self, image: np.ndarray) -> torch.Tensor:
        """(H, W) image in [0, 1] -> (1, 3, S, S) float32 on the model's device, as in evaluation (transforms.py)."""
        return preprocess(self.meta, image, self.device)

    def predict(self, image: Source | np.ndarray, heatmaps: bool = True, filename: str = "") -> Prediction:
        """Path/bytes/file/array -> Prediction. One forward pass gives probabilities and every label's heatmap.

        The format is decided from the content by imaging.sniff (with `filename`, default a path's name), so the CLI
        and the web app refuse the same files with the same message. Raises InvalidImage (UnsupportedFormat for
        another file type) for unreadable input.
        """
        image_format = None
        if not isinstance(image, np.ndarray):
            data = _read_bytes(image)
            if not filename and isinstance(image, (str, os.PathLike)):
                filename = Path(image).name
            image_format = sniff(data, filename)
            image = read_xray(data)
        x = self.preprocess(image)
        with torch.inference_mode():
            if heatmaps:
                logits, maps = predict_with_maps(self.model, x)
                maps = maps[0].float().cpu().numpy()
            else:
                logits, maps = self.model(x), None
            probs = torch.sigmoid(logits.float())[0].cpu().numpy().astype(np.float64)
        calls = binarize(probs, self.thresholds)
        return Prediction(
            labels=self.labels,
            probabilities={name: float(p) for name, p in zip(self.labels, probs)},
            positive=[name for name, call in zip(self.labels, calls) if call],
            thresholds={name: float(t) for name, t in zip(self.labels, self.thresholds)},
            image=image,
            heatmaps=maps,
            format=image_format,
            model=self.model_card(),
        )

    def model_card(self) -> dict:
        """Plain-data description of the loaded model (arch, input, labels, thresholds, training summary)."""
        return {
            "arch": self.meta.arch,
            "image_size": self.meta.image_size,
            "labels": list(self.labels),
            "thresholds": dict(zip(self.labels, map(float, self.thresholds))),
            "lse_r": self.meta.lse_r,
            "training": self.meta.training,
            "device": str(self.device),
        }

