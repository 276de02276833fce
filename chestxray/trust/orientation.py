"""Orientation check: does an image look mirrored left-right or rotated by 90/180/270 degrees?

A chest film shown mirrored puts the heart on the wrong side, and a rotated one is read against the wrong anatomy;
the model was trained on neither. The check flags such an image ("appears mirrored", "appears rotated") without
refusing it: dextrocardia and situs inversus exist, so a film that looks mirrored may be a correct film of a rare
patient, and the reader decides.

It needs no labels: the training images themselves, upright, and their mirrored and rotated copies are the classes.
A multinomial logistic regression (scikit-learn) is fitted on features of the model's own forward pass, the pooled
transition features (the vector the in-scope check reads) beside a small thumbnail of the normalised input (its
gross layout: where the bright mediastinum and the dark lungs lie). Both are at hand in Predictor.predict_batch on
either backend, so the check costs one small matrix product per image.

Stored in the checkpoint's trust entry as plain data (float32 tensors, numbers, strings), so torch.load
(weights_only=True) reads it and the ONNX export embeds it as JSON lists (from_dict accepts either). Judging is
NumPy; only the fitting (collect_orientation, transformed) runs the PyTorch model.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ..fileio import check_record, float32_array, float32_tensor
from .scope import thumbnails

if TYPE_CHECKING:
    import torch

ORIENTATION_FORMAT = 1
REFIT = "fit it again with Model_Training/fit_trust.py"
THUMBNAIL = 16  # thumbnail side in pixels: enough to place the heart and mediastinum, small beside 1024 features
# The classes the head tells apart: the image as given, and the copies the check must flag. Rotations are by k * 90
# degrees counter-clockwise (torch.rot90 with k = 1, 2, 3).
CLASSES = ("upright", "mirrored", "rotated 90", "rotated 180", "rotated 270")
UPRIGHT = "upright"
MIRRORED = "appears mirrored"
ROTATED = "appears rotated"
DEFAULT_IMAGES = 1000  # training images whose five copies fit the head (5,000 forward passes)
DEFAULT_C = 0.1  # inverse L2 strength of the logistic regression on standardised features


class OrientationError(ValueError):
    """Orientation data that are missing, malformed, or do not fit the features given; the message says which."""


def transformed(x: torch.Tensor, name: str) -> torch.Tensor:
    """The copy of a square batch (N, C, S, S) that class `name` of CLASSES describes."""
    if name == "upright":
        return x
    if name == "mirrored":
        return x.flip(-1)
    if name.startswith("rotated "):
        import torch

        return torch.rot90(x, int(name.split()[1]) // 90, dims=(-2, -1))
    raise OrientationError(f"unknown orientation class {name!r}; known: {list(CLASSES)}")


def orientation_features(pooled: np.ndarray | torch.Tensor, x: np.ndarray | torch.Tensor) -> np.ndarray:
    """Pooled transition features (N, C) and the normalised input (N, C', S, S; only channel 0 is read), NumPy
    arrays or CPU tensors -> (N, C + THUMBNAIL**2) float32."""
    pooled, x = np.asarray(pooled, dtype=np.float32), np.asarray(x)
    if pooled.ndim != 2 or x.ndim != 4 or pooled.shape[0] != x.shape[0]:
        raise OrientationError(f"expected pooled features (N, C) and inputs (N, 3, S, S), got {tuple(pooled.shape)} "
                               f"and {tuple(x.shape)}")
    return np.concatenate([pooled, thumbnails(x, THUMBNAIL)], axis=1)


@dataclass(frozen=True)
class Orientation:
    """A fitted orientation head: standardisation (D,) and multinomial logistic weights (K, D), (K,) over CLASSES,
    float32 NumPy arrays (tensors or lists are converted)."""

    classes: tuple[str, ...]
    mean: np.ndarray
    scale: np.ndarray
    coef: np.ndarray
    intercept: np.ndarray
    n_fit: int = 0

    def __post_init__(self) -> None:
        classes = tuple(self.classes)
        if not classes or classes[0] != UPRIGHT or not set(classes) <= set(CLASSES):
            raise OrientationError(f"orientation classes {list(classes)} must start with {UPRIGHT!r} and come from "
                                   f"{list(CLASSES)}; {REFIT}")
        tensors = {k: float32_array(getattr(self, k), f"orientation {k}", OrientationError)
                   for k in ("mean", "scale", "coef", "intercept")}
        d = tensors["mean"].shape[0] if tensors["mean"].ndim == 1 else -1
        if (tensors["scale"].shape != (d,) or tensors["coef"].shape != (len(classes), d)
                or tensors["intercept"].shape != (len(classes),)):
            raise OrientationError(f"orientation weights have inconsistent shapes; {REFIT}")
        if not all(np.isfinite(t).all() for t in tensors.values()) or not (tensors["scale"] > 0).all():
            raise OrientationError(f"orientation weights hold NaN, infinite or non-positive scales; {REFIT}")
        object.__setattr__(self, "classes", classes)
        for key, value in tensors.items():
            object.__setattr__(self, key, value)

    @property
    def dims(self) -> int:
        return int(self.mean.shape[0])

    def probabilities(self, features: np.ndarray) -> np.ndarray:
        """(N, D) orientation_features -> (N, K) class probabilities (softmax), in `classes` order."""
        f = np.asarray(features, dtype=np.float64)
        if f.ndim != 2 or f.shape[1] != self.dims:
            raise OrientationError(f"orientation features have shape {f.shape}; the head was fitted on {self.dims} "
                                   f"values per image; {REFIT}")
        z = (f - self.mean.astype(np.float64)) / self.scale.astype(np.float64)
        logits = z @ self.coef.astype(np.float64).T + self.intercept.astype(np.float64)
        logits -= logits.max(axis=1, keepdims=True)
        e = np.exp(logits)
        return e / e.sum(axis=1, keepdims=True)

    def judge(self, features: np.ndarray) -> list[str]:
        """(N, D) features -> one of UPRIGHT, MIRRORED, ROTATED per image: the most probable of the three groups
        (the rotations pooled)."""
        p = self.probabilities(features)
        groups = np.stack([p[:, [i for i, c in enumerate(self.classes) if _group(c) == g]].sum(axis=1)
                           for g in (UPRIGHT, MIRRORED, ROTATED)], axis=1)
        return [(UPRIGHT, MIRRORED, ROTATED)[int(k)] for k in groups.argmax(axis=1)]

    def to_dict(self) -> dict:
        """Plain data for a checkpoint (tensors, numbers, strings)."""
        return {"format": ORIENTATION_FORMAT, "classes": list(self.classes), "mean": float32_tensor(self.mean),
                "scale": float32_tensor(self.scale), "coef": float32_tensor(self.coef),
                "intercept": float32_tensor(self.intercept),
                "thumbnail": THUMBNAIL, "n_fit": int(self.n_fit)}

    @classmethod
    def from_dict(cls, d: Mapping) -> Orientation:
        """Rebuild from to_dict() output, tensors or (from an ONNX file's JSON) lists. Raises OrientationError."""
        check_record(d, "orientation data", ORIENTATION_FORMAT, ("classes", "mean", "scale", "coef", "intercept"),
                     OrientationError, REFIT)
        if int(d.get("thumbnail", THUMBNAIL)) != THUMBNAIL:
            raise OrientationError(f"orientation data use a {d.get('thumbnail')} px thumbnail; this version uses "
                                   f"{THUMBNAIL}; {REFIT}")
        try:
            return cls(tuple(d["classes"]), d["mean"], d["scale"], d["coef"], d["intercept"], int(d.get("n_fit", 0)))
        except (TypeError, ValueError, RuntimeError) as exc:
            if isinstance(exc, OrientationError):
                raise
            raise OrientationError(f"orientation data are malformed ({exc}); {REFIT}") from None

    def summary(self) -> dict:
        """JSON-ready description without the weights (model card)."""
        return {"classes": list(self.classes), "n_fit": self.n_fit, "dims": self.dims}


def _group(name: str) -> str:
    return UPRIGHT if name == UPRIGHT else MIRRORED if name == "mirrored" else ROTATED


def fit_orientation(features: np.ndarray, classes: Sequence[int], c: float = DEFAULT_C,
                    n_images: int | None = None) -> Orientation:
    """Fit the head on (M, D) orientation_features of labelled copies (class index into CLASSES per row).

    Raises OrientationError when fewer than two classes are present or the features are not finite.
    """
    from sklearn.linear_model import LogisticRegression

    f = np.asarray(features, dtype=np.float64)
    y = np.asarray(classes)
    if f.ndim != 2 or len(f) != len(y):
        raise OrientationError(f"features {f.shape} and {len(y)} classes do not match")
    present = sorted(set(y.tolist()))
    if len(present) < 2 or present[0] != 0:
        raise OrientationError("fitting the orientation check needs upright images and at least one other class")
    if not np.isfinite(f).all():
        raise OrientationError("orientation features hold NaN or infinite values")
    mean, scale = f.mean(axis=0), np.maximum(f.std(axis=0), 1e-6)
    head = LogisticRegression(C=c, max_iter=2000).fit((f - mean) / scale, y)
    coef, intercept = head.coef_, head.intercept_
    if len(present) == 2:  # sklearn gives one row for two classes: logit of the second against the first
        coef = np.stack([np.zeros_like(coef[0]), coef[0]])
        intercept = np.array([0.0, intercept[0]])
    return Orientation(tuple(CLASSES[k] for k in head.classes_), mean, scale, coef, intercept,
                       int(n_images if n_images is not None else len(f)))


def collect_orientation(model: torch.nn.Module, loader, device: torch.device | str, normalize,
                        classes: Sequence[str] = CLASSES, progress: bool = False) -> tuple[np.ndarray, np.ndarray, int]:
    """Each image of `loader` (data.collate_batch batches) and its copies -> (features (M, D), class index (M,),
    images). One forward pass per class and batch, in eval mode."""
    import torch
    from tqdm import tqdm

    from .scope import pooled_features

    model = model.eval()
    feats, ys, images = [], [], 0
    with torch.inference_mode():
        for batch in tqdm(loader, desc="orientation", unit="batch", disable=not progress, leave=False):
            inputs = batch[0]
            if inputs.numel() == 0:
                continue
            x = normalize(inputs.to(device))
            images += x.shape[0]
            for name in classes:
                xt = transformed(x, name)
                feats.append(orientation_features(pooled_features(model.features(xt)).cpu(),
                                                  xt[:, :1].float().cpu()))
                ys.append(np.full(x.shape[0], CLASSES.index(name)))
    if not feats:
        raise OrientationError("no readable images to fit the orientation check on")
    return np.concatenate(feats), np.concatenate(ys), images
