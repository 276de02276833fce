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
torch.load(weights_only=True); an ONNX export carries the same values as JSON lists. Scoring is NumPy (the ONNX
server never imports torch); only collect_outputs, which runs the PyTorch model to fit the statistics, needs torch.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ..fileio import check_record, float32_array, float32_tensor

if TYPE_CHECKING:
    import torch

    Array = torch.Tensor | np.ndarray

# scikit-learn is imported inside fit_scope's helper only: it costs ~1 s at every start of the app and CLI.

SCOPE_FORMAT = 1
REFIT = "fit them again with Model_Training/fit_trust.py"
DEFAULT_PERCENTILE = 99.0
# "mahalanobis": the distance on the pooled features as they are (Lee et al. 2018).
# "mahalanobis-l2": the features are first divided by their L2 norm, so the distance measures the pattern of
# activations rather than their overall strength (tried in benchmarks/bench_scope.py; see BENCHMARKS.md).
# "mahalanobis+image": the larger of two ratios, each a Mahalanobis distance over its own validation percentile:
# the pooled features', and the input's cheap statistics' (image_statistics: an 8x8 thumbnail, a histogram and the
# contrast; a frontal chest film has dark lungs either side of a bright mediastinum and a wide range of grey), all
# computed from the input already in memory.
# "mahalanobis+layout": the same, with the input part replaced by statistics that do not change with brightness,
# contrast or orientation (layout_statistics), in two parts of their own: the layout (how mirror-symmetric the 8x8
# thumbnail is, and how much of the image's contrast is coarse layout rather than texture) and the shape of the
# grey-level histogram after a robust contrast stretch. A film from another hospital (washed out, tightly
# collimated) keeps them; a photo, a texture, a document or a fundus image does not. Three parts in all, each over
# its own validation percentile.
METHODS = ("mahalanobis", "mahalanobis-l2", "mahalanobis+image", "mahalanobis+layout")
THUMBNAIL = 8
HISTOGRAM_BINS = 16
IMAGE_PART = THUMBNAIL**2 + HISTOGRAM_BINS + 1  # the columns of image_statistics that mahalanobis+image reads
CONTRAST = IMAGE_PART - 1  # the column holding the input's standard deviation in [0, 1]
# Quantiles of the grey levels after stretching the 1st-99th percentile range to [0, 1]: the histogram's shape
# whatever the exposure.
QUANTILES = (0.02, 0.1, 0.18, 0.26, 0.34, 0.42, 0.5, 0.58, 0.66, 0.74, 0.82, 0.9, 0.98)
IMAGE_STATS = IMAGE_PART + len(QUANTILES)
LAYOUT_BLOCKS = ((0, 2), (2, 2 + len(QUANTILES)))  # layout_statistics' parts: [symmetry, coarse], [quantiles]
LAYOUT_STATS = LAYOUT_BLOCKS[-1][1]
MAX_LIMIT_RATIO = 10.0  # a loaded limit above 10x a typical in-distribution score is refused (measured: 1.2x)
# Measured in benchmarks/results/demo_scope.md: on the demo model it accepts every genuine external chest X-ray where
# mahalanobis+image refused the washed-out and tightly collimated ones (BENCHMARKS.md, "demo model: what it accepts").
DEFAULT_METHOD = "mahalanobis+layout"
INPUT_PART = {"mahalanobis+image": IMAGE_PART, "mahalanobis+layout": LAYOUT_STATS}  # method -> its input part's size


class ScopeError(ValueError):
    """Scope statistics that are missing, malformed, or do not fit the features given; the message says which."""


def pooled_features(features: torch.Tensor) -> torch.Tensor:
    """Transition output A (N, C, h, w) tensor -> global-average-pooled features (N, C) float32 (in the graph)."""
    if features.ndim != 4:
        raise ScopeError(f"expected transition features (N, C, h, w), got shape {tuple(features.shape)}")
    return features.float().mean(dim=(2, 3))


def thumbnails(x: Array, side: int) -> np.ndarray:
    """Channel 0 of a batch (N, C, S, S) averaged over a side x side grid -> (N, side * side) float32, the cells as
    torch's adaptive_avg_pool2d draws them (equal cells when side divides S)."""
    g = np.asarray(x)[:, 0].astype(np.float32, copy=False)

    def cells(size: int) -> list[tuple[int, int]]:
        return [(i * size // side, -(-(i + 1) * size // side)) for i in range(side)]

    rows = np.stack([g[:, a:b].mean(axis=1) for a, b in cells(g.shape[1])], axis=1)
    return np.stack([rows[:, :, a:b].mean(axis=2) for a, b in cells(g.shape[2])], axis=2).reshape(len(g), -1)


def image_statistics(x: Array, mean: float, std: float) -> np.ndarray:
    """Cheap statistics of the normalised input (N, C, S, S) -> (N, IMAGE_STATS) float32: its first channel averaged
    to THUMBNAIL x THUMBNAIL (gross layout), a HISTOGRAM_BINS-bin histogram of its values (fractions), their
    standard deviation (contrast: a flat or washed-out image has almost none; column CONTRAST), and the QUANTILES
    of its values after stretching their 1st-99th percentile range to [0, 1].

    x: a NumPy array or a CPU tensor (only channel 0 is read). mean/std: channel 0's normalisation (the checkpoint's
    meta.mean[0], meta.std[0]), to map values back to [0, 1] for the histogram.
    """
    x = np.asarray(x)
    if x.ndim != 4:
        raise ScopeError(f"expected a normalised input batch (N, C, S, S), got shape {tuple(x.shape)}")
    n = x.shape[0]
    v = np.clip(x[:, 0].reshape(n, -1).astype(np.float32) * np.float32(std) + np.float32(mean), 0.0, 1.0)
    bins = np.minimum((v * HISTOGRAM_BINS).astype(np.int64), HISTOGRAM_BINS - 1)
    hist = np.bincount((bins + HISTOGRAM_BINS * np.arange(n)[:, None]).ravel(), minlength=n * HISTOGRAM_BINS)
    low, high = np.quantile(v, [0.01, 0.99], axis=1, keepdims=True).astype(np.float32)
    stretched = np.clip((v - low) / np.maximum(high - low, np.float32(1e-3)), 0.0, 1.0)
    shape = np.quantile(stretched, QUANTILES, axis=1).T
    return np.concatenate([thumbnails(x, THUMBNAIL), hist.reshape(n, HISTOGRAM_BINS) / v.shape[1],
                           v.std(axis=1, ddof=1, keepdims=True), shape], axis=1).astype(np.float32)


def layout_statistics(images: Array) -> np.ndarray:
    """image_statistics (N, IMAGE_STATS) -> (N, LAYOUT_STATS) float64: [symmetry, coarse share, *QUANTILES].

    symmetry: the correlation of the mean-removed thumbnail with its own mirror image, the larger of left-right and
    up-down (so a film rotated by 90 degrees scores as an upright one; the orientation check flags it); a chest film
    is close to symmetric about its spine. coarse share: the thumbnail's spread over the pixels' spread (up to the
    model's fixed normalisation constant); a texture (grass, gravel) or noise has almost none at 8x8. Both are
    unchanged by brightness and contrast, and a flat image scores 0 on both. Then the stretched grey-level quantiles
    as image_statistics holds them.
    """
    s = np.asarray(images, dtype=np.float64)
    if s.ndim != 2 or s.shape[1] != IMAGE_STATS:
        raise ScopeError(f"expected image statistics (N, {IMAGE_STATS}), got shape {tuple(s.shape)}")
    thumb = s[:, :THUMBNAIL**2].reshape(-1, THUMBNAIL, THUMBNAIL)
    thumb = thumb - thumb.mean(axis=(1, 2), keepdims=True)
    energy = (thumb * thumb).sum(axis=(1, 2))
    safe = np.maximum(energy, 1e-12)
    left_right = (thumb * thumb[:, :, ::-1]).sum(axis=(1, 2)) / safe
    up_down = (thumb * thumb[:, ::-1, :]).sum(axis=(1, 2)) / safe
    coarse = np.sqrt(energy / THUMBNAIL**2) / np.maximum(s[:, CONTRAST], 1e-6)
    return np.concatenate([np.stack([np.maximum(left_right, up_down), coarse], axis=1), s[:, IMAGE_PART:]], axis=1)


def _input_part(images: Array, method: str) -> np.ndarray:
    """The input part's statistics for `method`: image_statistics' first IMAGE_PART columns, or layout_statistics."""
    x = np.asarray(images, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] != IMAGE_STATS:
        raise ScopeError(f"expected image statistics (N, {IMAGE_STATS}), got shape {tuple(x.shape)}")
    return layout_statistics(x).astype(np.float32) if method == "mahalanobis+layout" else x[:, :IMAGE_PART]


def _input_distance(part: np.ndarray, mean: np.ndarray, precision: np.ndarray, method: str) -> np.ndarray:
    """The input part's distance; for mahalanobis+layout the larger of its blocks' (each block's precision is stored
    already divided by its squared validation percentile, so each block's distance is in units of it)."""
    if method != "mahalanobis+layout":
        return _distance(part, mean, precision)
    return np.max([_distance(part[:, a:b], mean[a:b], precision[a:b, a:b]) for a, b in LAYOUT_BLOCKS], axis=0)


def _gaussian(x: np.ndarray, standardize: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Ledoit-Wolf mean and precision of x (N, D). standardize: shrink the correlation, not the covariance.

    Why: Ledoit-Wolf shrinks toward a multiple of the identity; with dimensions of very different spread (an 8x8
    thumbnail beside a contrast value 20x smaller) that drowns the small ones. Shrinking the standardised data and
    mapping back (P = D^-1 P' D^-1, D = the training standard deviations) keeps every dimension's own scale.
    """
    from sklearn.covariance import LedoitWolf
    if not standardize:
        lw = LedoitWolf(assume_centered=False).fit(x)
        return lw.location_.astype(np.float32), lw.precision_.astype(np.float32)
    sd = np.maximum(x.std(axis=0), 1e-6)
    lw = LedoitWolf(assume_centered=False).fit(x / sd)
    precision = lw.precision_ / sd[:, None] / sd[None, :]
    return (lw.location_ * sd).astype(np.float32), precision.astype(np.float32)


def _check_precision(precision: np.ndarray, what: str) -> None:
    """Raise ScopeError unless `precision` is symmetric positive definite: otherwise distances can be 0 (or the
    root of a negative number clamped to 0) far from the mean, and every image would look in scope."""
    p = precision.astype(np.float64)
    if not np.allclose(p, p.T, rtol=1e-4, atol=1e-6 * max(float(np.abs(p).max()), 1e-30)):
        raise ScopeError(f"{what} is not symmetric; {REFIT}")
    try:
        np.linalg.cholesky(p)
    except np.linalg.LinAlgError:
        raise ScopeError(f"{what} is not positive definite; {REFIT}") from None


def _distance(x: Array, mean: np.ndarray, precision: np.ndarray) -> np.ndarray:
    d = (np.asarray(x, dtype=np.float32) - mean).astype(np.float64)
    return np.sqrt(np.maximum(((d @ precision.astype(np.float64)) * d).sum(axis=1), 0.0))


def _prepare(pooled: Array, method: str) -> np.ndarray:
    x = np.asarray(pooled, dtype=np.float32)
    if x.ndim != 2:
        raise ScopeError(f"expected pooled features (N, C), got shape {tuple(x.shape)}")
    if method == "mahalanobis-l2":
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), np.float32(1e-12))
    return x


@dataclass(frozen=True)
class ScopeStats:
    """Mean (C,) and precision (C, C) of the training features, float32 NumPy arrays (tensors or lists are
    converted), and the limit on the distance.

    limit is NaN until `with_limit` chooses it on validation scores. score(): (N, C) -> (N,) float64 >= 0.
    """

    method: str
    mean: np.ndarray
    precision: np.ndarray
    limit: float = math.nan
    percentile: float = DEFAULT_PERCENTILE
    n_fit: int = 0
    n_limit: int = 0
    # mahalanobis+image and +layout only: the input part's Gaussian and the two parts' scales (validation
    # percentiles).
    image_mean: np.ndarray | None = None
    image_precision: np.ndarray | None = None
    feature_scale: float = 1.0
    image_scale: float = 1.0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ScopeError(f"unknown scope method {self.method!r}; known: {list(METHODS)}")
        mean = float32_array(self.mean, "scope mean", ScopeError)
        precision = float32_array(self.precision, "scope precision", ScopeError)
        c = mean.shape[0] if mean.ndim == 1 else -1
        if mean.ndim != 1 or precision.shape != (c, c):
            raise ScopeError(f"scope mean {tuple(mean.shape)} and precision {tuple(precision.shape)} must be (C,) "
                             "and (C, C)")
        if not (np.isfinite(mean).all() and np.isfinite(precision).all()):
            raise ScopeError("scope statistics hold NaN or infinite values; fit them again")
        _check_precision(precision, "scope precision")
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "precision", precision)
        object.__setattr__(self, "limit", float(self.limit))
        if self.needs_images:
            if self.image_mean is None or self.image_precision is None:
                raise ScopeError(f"scope method {self.method} needs image_mean and image_precision")
            object.__setattr__(self, "image_mean", float32_array(self.image_mean, "scope image mean", ScopeError))
            object.__setattr__(self, "image_precision", float32_array(self.image_precision, "scope image precision",
                                                                      ScopeError))
            n = INPUT_PART[self.method]
            if self.image_mean.shape != (n,) or self.image_precision.shape != (n, n):
                raise ScopeError(f"scope image statistics have {tuple(self.image_mean.shape)} values; this version "
                                 f"computes {n} for {self.method}: {REFIT}")
            if not (np.isfinite(self.image_mean).all() and np.isfinite(self.image_precision).all()):
                raise ScopeError(f"scope image statistics hold NaN or infinite values; {REFIT}")
            _check_precision(self.image_precision, "scope image precision")
            # An infinite scale divides its part's distance to 0: every image would look in scope.
            if not all(math.isfinite(v) and v > 0 for v in (self.feature_scale, self.image_scale)):
                raise ScopeError(f"scope part scales must be positive finite numbers, got {self.feature_scale} and "
                                 f"{self.image_scale}; {REFIT}")

    @property
    def channels(self) -> int:
        return int(self.mean.shape[0])

    @property
    def needs_images(self) -> bool:
        """True when score() also needs image_statistics() of the input."""
        return self.method in INPUT_PART

    def score(self, pooled: Array, images: Array | None = None) -> np.ndarray:
        """Scope score of each image -> (N,) float64 >= 0; larger = less like the training images.

        pooled: (N, C) pooled transition features; images: (N, IMAGE_STATS) image_statistics, when needs_images.
        """
        x = _prepare(pooled, self.method)
        if x.shape[1] != self.channels:
            raise ScopeError(f"features have {x.shape[1]} channels; the scope statistics were fitted on "
                             f"{self.channels}")
        feature = _distance(x, self.mean, self.precision)
        if not self.needs_images:
            return feature
        if images is None:
            raise ScopeError("this scope method also needs the image statistics (scope.image_statistics(x))")
        image = _input_distance(_input_part(images, self.method), self.image_mean, self.image_precision, self.method)
        return np.maximum(feature / self.feature_scale, image / self.image_scale)

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
        return dataclasses.replace(self, limit=float(np.percentile(v, percentile)), percentile=float(percentile),
                                   n_limit=int(v.size))

    def to_dict(self) -> dict:
        """Plain data for a checkpoint: tensors, numbers and strings only (torch.load(weights_only=True) reads it)."""
        d = {"format": SCOPE_FORMAT, "method": self.method, "mean": float32_tensor(self.mean),
             "precision": float32_tensor(self.precision), "limit": self.limit, "percentile": self.percentile,
             "n_fit": self.n_fit, "n_limit": self.n_limit}
        if self.needs_images:
            d.update(image_mean=float32_tensor(self.image_mean), image_precision=float32_tensor(self.image_precision),
                     feature_scale=self.feature_scale, image_scale=self.image_scale, thumbnail=THUMBNAIL)
        return d

    def summary(self) -> dict:
        """JSON-ready description without the tensors (model card)."""
        limit = self.limit if math.isfinite(self.limit) else None
        return {"method": self.method, "limit": limit, "percentile": self.percentile, "n_fit": self.n_fit,
                "n_limit": self.n_limit, "channels": self.channels}

    def max_limit(self) -> float:
        """The largest believable limit: MAX_LIMIT_RATIO times a typical in-distribution score (about sqrt(C) for a
        Mahalanobis distance over C channels; about 1 for mahalanobis+image and +layout, whose parts are scaled to 1)."""
        return MAX_LIMIT_RATIO * (1.0 if self.needs_images else math.sqrt(self.channels))

    @classmethod
    def from_dict(cls, d: Mapping, channels: int | None = None) -> ScopeStats:
        """Rebuild from to_dict() output, checked: shapes (C = `channels` when given), finite values, positive
        definite precisions, a limit in (0, max_limit()]. Raises ScopeError naming the bad value."""
        check_record(d, "scope statistics", SCOPE_FORMAT, ("method", "mean", "precision", "limit"), ScopeError,
                     REFIT)
        try:
            numbers = (float(d["limit"]), float(d.get("percentile", DEFAULT_PERCENTILE)), int(d.get("n_fit", 0)),
                       int(d.get("n_limit", 0)), float(d.get("feature_scale", 1.0)), float(d.get("image_scale", 1.0)))
        except (TypeError, ValueError, OverflowError):
            raise ScopeError(f"scope statistics hold a value that is not a number; {REFIT}") from None
        limit, percentile, n_fit, n_limit, feature_scale, image_scale = numbers
        stats = cls(str(d["method"]), d["mean"], d["precision"], limit, percentile, n_fit, n_limit,
                    d.get("image_mean"), d.get("image_precision"), feature_scale, image_scale)
        if channels is not None and stats.channels != channels:
            raise ScopeError(f"scope statistics have {stats.channels} channels; this model's features have "
                             f"{channels}: {REFIT}")
        if not 0.0 < limit <= stats.max_limit():
            raise ScopeError(f"the scope limit {limit:g} is outside (0, {stats.max_limit():g}] (a limit that large "
                             f"would call every image in scope); {REFIT}")
        return stats


def fit_scope(train_pooled: Array, method: str = "mahalanobis", train_images: Array | None = None,
              val_pooled: Array | None = None, val_images: Array | None = None,
              percentile: float = DEFAULT_PERCENTILE) -> ScopeStats:
    """Mean and Ledoit-Wolf shrunk precision of training features (N, C) -> ScopeStats without a limit.

    mahalanobis+image and +layout also fit the input part (from train_images: image_statistics (N, IMAGE_STATS)) and
    scale each part by its `percentile`-th validation percentile (val_pooled, val_images). Raises ScopeError for fewer than 2 images,
    non-finite features or missing inputs.
    """
    if method not in METHODS:
        raise ScopeError(f"unknown scope method {method!r}; known: {list(METHODS)}")
    x = _prepare(train_pooled, method).astype(np.float64)
    if x.shape[0] < 2:
        raise ScopeError(f"fitting scope statistics needs at least 2 training images, got {x.shape[0]}")
    if not np.isfinite(x).all():
        raise ScopeError("training features hold NaN or infinite values")
    if method not in INPUT_PART:
        mean, precision = _gaussian(x)
        return ScopeStats(method, mean, precision, n_fit=int(x.shape[0]))
    mean, precision = _gaussian(x, standardize=True)
    if train_images is None or val_pooled is None or val_images is None:
        raise ScopeError(f"{method} needs the training image statistics and the validation features and image "
                         "statistics")
    train_part, val_part = _input_part(train_images, method), _input_part(val_images, method)
    if method == "mahalanobis+layout":
        image_mean, image_precision = _layout_blocks(train_part, val_part, percentile)
    else:
        image_mean, image_precision = _gaussian(train_part.astype(np.float64), standardize=True)
    feature_scale = float(np.percentile(_distance(_prepare(val_pooled, method), mean, precision), percentile))
    image_scale = float(np.percentile(_input_distance(val_part, image_mean, image_precision, method), percentile))
    return ScopeStats(method, mean, precision, n_fit=int(x.shape[0]), image_mean=image_mean,
                      image_precision=image_precision, feature_scale=max(feature_scale, 1e-12),
                      image_scale=max(image_scale, 1e-12))


def _layout_blocks(train_part: np.ndarray, val_part: np.ndarray, percentile: float
                   ) -> tuple[np.ndarray, np.ndarray]:
    """mahalanobis+layout's input part: a Gaussian per LAYOUT_BLOCKS block, each precision divided by the square of
    its block's `percentile`-th validation distance -> (mean (LAYOUT_STATS,), block-diagonal precision)."""
    means, precisions = [], []
    for a, b in LAYOUT_BLOCKS:
        mean, precision = _gaussian(train_part[:, a:b].astype(np.float64), standardize=True)
        scale = max(float(np.percentile(_distance(val_part[:, a:b], mean, precision), percentile)), 1e-6)
        means.append(mean)
        precisions.append(precision / scale**2)
    block_diagonal = np.zeros((LAYOUT_STATS, LAYOUT_STATS), dtype=np.float32)
    for (a, b), precision in zip(LAYOUT_BLOCKS, precisions):
        block_diagonal[a:b, a:b] = precision
    return np.concatenate(means), block_diagonal


def collect_outputs(model: torch.nn.Module, loader, device: torch.device | str, normalize,
                    progress: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One eval pass -> (logits (N, L) float32, pooled features (N, C) float32, targets (N, L), indices (N,),
    image statistics (N, IMAGE_STATS)).

    `loader` yields data.collate_batch batches ((B, 1, S, S) uint8 images, targets, indices[, unreadable]);
    unreadable items are left out (compare the indices).
    """
    import torch
    from tqdm import tqdm

    model = model.eval()
    device = torch.device(device)
    logits, pooled, targets, indices, thumbs = [], [], [], [], []
    with torch.inference_mode():
        for batch in tqdm(loader, desc="scope", unit="batch", disable=not progress, leave=False):
            images, batch_targets, batch_indices = batch[:3]
            if images.numel() == 0:
                continue
            x = normalize(images.to(device))
            a = model.features(x)
            thumbs.append(image_statistics(x[:, :1].float().cpu().numpy(), normalize.mean[0], normalize.std[0]))
            logits.append(model.head(a).float().cpu())
            pooled.append(pooled_features(a).cpu())
            targets.append(batch_targets.float())
            indices.append(batch_indices.long())
    if not logits:
        raise ScopeError("no readable images in the loader")
    return (torch.cat(logits).numpy(), torch.cat(pooled).numpy(), torch.cat(targets).numpy(),
            torch.cat(indices).numpy(), np.concatenate(thumbs))
