"""In-scope check: does an image look like the frontal chest radiographs the model was trained on?

The check reads the model's own forward pass, so it needs no second network and no second pass: the transition
layer's output A (N, 1024, h, w) (the same A the class activation maps use, `model.features(x)`) is averaged over
h, w into a pooled feature vector (N, 1024). Its Mahalanobis distance to the training images' features (Lee et al.,
"A simple unified framework for detecting out-of-distribution samples and adversarial attacks", NeurIPS 2018) is
the scope score; an image whose score exceeds a limit chosen on the validation split (its 99th percentile by
default) is out of scope.

Why a shrunk covariance: 1024 feature dimensions are estimated from a few hundred to a few thousand training
images, so the sample covariance is singular or badly conditioned; Ledoit-Wolf shrinkage (scikit-learn) gives a
well-conditioned estimate with no parameter to tune.

Stored as plain data (two float32 tensors and numbers), so a checkpoint holding it still loads with
torch.load(weights_only=True). The ONNX export computes the same distance from the same tensors.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.covariance import LedoitWolf

SCOPE_FORMAT = 1
DEFAULT_PERCENTILE = 99.0
# "mahalanobis": the distance on the pooled features as they are (Lee et al. 2018).
# "mahalanobis-l2": the features are first divided by their L2 norm, so the distance measures the pattern of
# activations rather than their overall strength (tried in benchmarks/bench_scope.py; see BENCHMARKS.md).
METHODS = ("mahalanobis", "mahalanobis-l2")


class ScopeError(ValueError):
    """Scope statistics that are missing, malformed, or do not fit the features given; the message says which."""


def pooled_features(features: torch.Tensor) -> torch.Tensor:
    """Transition output A (N, C, h, w) -> global-average-pooled features (N, C) float32."""
    if features.ndim != 4:
        raise ScopeError(f"expected transition features (N, C, h, w), got shape {tuple(features.shape)}")
    return features.float().mean(dim=(2, 3))


def _prepare(pooled: torch.Tensor | np.ndarray, method: str) -> torch.Tensor:
    x = torch.as_tensor(np.asarray(pooled) if not isinstance(pooled, torch.Tensor) else pooled).float()
    if x.ndim != 2:
        raise ScopeError(f"expected pooled features (N, C), got shape {tuple(x.shape)}")
    if method == "mahalanobis-l2":
        x = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return x


@dataclass(frozen=True)
class ScopeStats:
    """Mean (C,) and precision (C, C) of the training features, float32, and the limit on the distance.

    limit is NaN until `with_limit` chooses it on validation scores. score(): (N, C) -> (N,) float64 >= 0.
    """

    method: str
    mean: torch.Tensor
    precision: torch.Tensor
    limit: float = math.nan
    percentile: float = DEFAULT_PERCENTILE
    n_fit: int = 0
    n_limit: int = 0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ScopeError(f"unknown scope method {self.method!r}; known: {list(METHODS)}")
        mean, precision = torch.as_tensor(self.mean).float().cpu(), torch.as_tensor(self.precision).float().cpu()
        c = mean.shape[0] if mean.ndim == 1 else -1
        if mean.ndim != 1 or precision.shape != (c, c):
            raise ScopeError(f"scope mean {tuple(mean.shape)} and precision {tuple(precision.shape)} must be (C,) "
                             "and (C, C)")
        if not (torch.isfinite(mean).all() and torch.isfinite(precision).all()):
            raise ScopeError("scope statistics hold NaN or infinite values; fit them again")
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "precision", precision)
        object.__setattr__(self, "limit", float(self.limit))

    @property
    def channels(self) -> int:
        return int(self.mean.shape[0])

    def score(self, pooled: torch.Tensor | np.ndarray) -> np.ndarray:
        """Mahalanobis distance of each pooled feature vector (N, C) to the training mean -> (N,) float64."""
        x = _prepare(pooled, self.method)
        if x.shape[1] != self.channels:
            raise ScopeError(f"features have {x.shape[1]} channels; the scope statistics were fitted on "
                             f"{self.channels}")
        d = (x.cpu() - self.mean).double()
        squared = ((d @ self.precision.double()) * d).sum(dim=1).clamp_min(0.0)
        return squared.sqrt().numpy()

    def in_scope(self, scores: np.ndarray | float) -> np.ndarray:
        """scores <= limit, elementwise (bool array). Raises ScopeError when no limit has been chosen."""
        if not math.isfinite(self.limit):
            raise ScopeError("the scope limit has not been chosen; call with_limit on validation scores")
        return np.asarray(scores, dtype=np.float64) <= self.limit

    def with_limit(self, val_scores: np.ndarray, percentile: float = DEFAULT_PERCENTILE) -> ScopeStats:
        """A copy whose limit is the `percentile`-th percentile of validation scores (images the fit never saw)."""
        v = np.asarray(val_scores, dtype=np.float64)
        v = v[np.isfinite(v)]
        if not v.size:
            raise ScopeError("no validation scores to choose the scope limit from")
        if not 0.0 < percentile <= 100.0:
            raise ScopeError(f"the scope percentile must lie in (0, 100], got {percentile}")
        return ScopeStats(self.method, self.mean, self.precision, float(np.percentile(v, percentile)),
                          float(percentile), self.n_fit, int(v.size))

    def to_dict(self) -> dict:
        """Plain data for a checkpoint: tensors, numbers and strings only (torch.load(weights_only=True) reads it)."""
        return {"format": SCOPE_FORMAT, "method": self.method, "mean": self.mean.clone(),
                "precision": self.precision.clone(), "limit": self.limit, "percentile": self.percentile,
                "n_fit": self.n_fit, "n_limit": self.n_limit}

    def summary(self) -> dict:
        """JSON-ready description without the tensors (model card)."""
        limit = self.limit if math.isfinite(self.limit) else None
        return {"method": self.method, "limit": limit, "percentile": self.percentile, "n_fit": self.n_fit,
                "n_limit": self.n_limit, "channels": self.channels}

    @classmethod
    def from_dict(cls, d: Mapping) -> ScopeStats:
        """Rebuild from to_dict() output. Raises ScopeError naming a missing key or a bad value."""
        if not isinstance(d, Mapping):
            raise ScopeError(f"scope statistics must be a dict, got {type(d).__name__}")
        if d.get("format") != SCOPE_FORMAT:
            raise ScopeError(f"scope statistics format {d.get('format')!r}; this version reads {SCOPE_FORMAT}")
        missing = [k for k in ("method", "mean", "precision", "limit") if k not in d]
        if missing:
            raise ScopeError(f"scope statistics lack {missing}; fit them again with Model_Training/fit_trust.py")
        if not isinstance(d["mean"], torch.Tensor) or not isinstance(d["precision"], torch.Tensor):
            raise ScopeError("scope mean and precision must be tensors")
        return cls(str(d["method"]), d["mean"], d["precision"], float(d["limit"]),
                   float(d.get("percentile", DEFAULT_PERCENTILE)), int(d.get("n_fit", 0)), int(d.get("n_limit", 0)))


def fit_scope(train_pooled: torch.Tensor | np.ndarray, method: str = "mahalanobis") -> ScopeStats:
    """Mean and Ledoit-Wolf shrunk precision of training features (N, C) -> ScopeStats without a limit.

    Raises ScopeError for fewer than 2 images or non-finite features.
    """
    if method not in METHODS:
        raise ScopeError(f"unknown scope method {method!r}; known: {list(METHODS)}")
    x = _prepare(train_pooled, method).double().numpy()
    if x.shape[0] < 2:
        raise ScopeError(f"fitting scope statistics needs at least 2 training images, got {x.shape[0]}")
    if not np.isfinite(x).all():
        raise ScopeError("training features hold NaN or infinite values")
    lw = LedoitWolf(assume_centered=False).fit(x)
    return ScopeStats(method, torch.from_numpy(lw.location_).float(), torch.from_numpy(lw.precision_).float(),
                      n_fit=int(x.shape[0]))


@torch.inference_mode()
def collect_outputs(model: torch.nn.Module, loader, device: torch.device | str, normalize,
                    progress: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One eval pass -> (logits (N, L) float32, pooled features (N, C) float32, targets (N, L), indices (N,)).

    `loader` yields data.collate_batch batches ((B, 1, S, S) uint8 images, targets, indices[, unreadable]);
    unreadable items are left out (compare the indices).
    """
    from tqdm import tqdm

    model = model.eval()
    device = torch.device(device)
    logits, pooled, targets, indices = [], [], [], []
    for batch in tqdm(loader, desc="scope", unit="batch", disable=not progress, leave=False):
        images, batch_targets, batch_indices = batch[:3]
        if images.numel() == 0:
            continue
        a = model.features(normalize(images.to(device)))
        logits.append(model.head(a).float().cpu())
        pooled.append(pooled_features(a).cpu())
        targets.append(batch_targets.float())
        indices.append(batch_indices.long())
    if not logits:
        raise ScopeError("no readable images in the loader")
    return (torch.cat(logits).numpy(), torch.cat(pooled).numpy(), torch.cat(targets).numpy(),
            torch.cat(indices).numpy())
