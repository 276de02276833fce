"""Per-label probability calibration (Platt scaling on the logit) and calibration metrics (ECE, Brier).

Why: the model is trained with Wang et al.'s weighted cross-entropy, which up-weights the rare positive class, so
sigmoid(logit) overstates how often a finding is present. Platt scaling (Platt 1999) fits p = sigmoid(a z + b) per
label on the validation split's logits z; the calibrated probability is what the product shows, and thresholds are
chosen on that scale. scikit-learn's LogisticRegression does the fit; the result is two plain numbers per label.

A label whose validation split lacks positives or negatives cannot be fitted and keeps sigmoid(z) (fitted False).
The slope is kept >= 0: a negative slope would reverse the model's ranking on the strength of one small validation
split; such a label gets an intercept-only fit (its validation prevalence) with a vanishing positive slope
(MIN_SLOPE), so the calibrated value is that prevalence to many digits while the model's ranking, and so every
AUROC computed from calibrated probabilities, is kept. With an AUROC below chance it is not validated for calls
anyway (evidence.py).
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from ..fileio import check_record
from ..metrics import calibration as reliability

# scikit-learn is imported inside the fitting functions only: it costs ~1 s at every start of the app and CLI.

CALIBRATION_FORMAT = 1
REFIT = "fit it again with Model_Training/fit_trust.py"
# L2 strength of the Platt fit (scikit-learn's default C): keeps the slope finite when a label's few validation
# positives are perfectly separated, where an unpenalised fit diverges.
PLATT_C = 1.0
ECE_BINS = 10


def sigmoid(z: np.ndarray) -> np.ndarray:
    """1 / (1 + e^-z) without overflow for large |z| (scipy.special.expit's values to float64 rounding; NumPy only,
    so a server does not import scipy to answer)."""
    return np.exp(-np.logaddexp(0.0, -np.asarray(z, dtype=np.float64)))


class CalibrationError(ValueError):
    """Calibration parameters that are malformed or do not fit the labels given; the message says which."""


@dataclass(frozen=True)
class Calibration:
    """Per-label Platt parameters: calibrated p = sigmoid(slope * logit + intercept). Identity = (1, 0)."""

    labels: tuple[str, ...]
    slope: tuple[float, ...]
    intercept: tuple[float, ...]
    fitted: tuple[bool, ...]
    method: str = "platt"

    def __post_init__(self) -> None:
        n = len(self.labels)
        if not (len(self.slope) == len(self.intercept) == len(self.fitted) == n):
            raise CalibrationError(f"calibration has {len(self.slope)} slopes, {len(self.intercept)} intercepts and "
                                   f"{len(self.fitted)} flags for {n} labels")
        object.__setattr__(self, "labels", tuple(str(x) for x in self.labels))
        object.__setattr__(self, "slope", tuple(float(x) for x in self.slope))
        object.__setattr__(self, "intercept", tuple(float(x) for x in self.intercept))
        object.__setattr__(self, "fitted", tuple(bool(x) for x in self.fitted))
        if not all(math.isfinite(v) for v in self.slope + self.intercept):
            raise CalibrationError("calibration parameters must be finite numbers")
        if self.method != "platt":
            raise CalibrationError(f"unknown calibration method {self.method!r}; this version knows 'platt'")

    @classmethod
    def identity(cls, labels: Sequence[str]) -> Calibration:
        """p = sigmoid(logit) for every label (what an uncalibrated checkpoint shows)."""
        n = len(labels)
        return cls(tuple(labels), (1.0,) * n, (0.0,) * n, (False,) * n)

    def apply(self, logits: np.ndarray) -> np.ndarray:
        """Logits (N, L) or (L,) -> calibrated probabilities of the same shape, float64 in [0, 1]."""
        z = np.asarray(logits, dtype=np.float64)
        if z.shape[-1] != len(self.labels):
            raise CalibrationError(f"logits have {z.shape[-1]} labels; the calibration has {len(self.labels)}")
        return sigmoid(z * np.asarray(self.slope) + np.asarray(self.intercept))

    def to_dict(self) -> dict:
        """Plain data (lists of numbers and strings) for the checkpoint and JSON."""
        return {"format": CALIBRATION_FORMAT, "method": self.method, "labels": list(self.labels),
                "slope": list(self.slope), "intercept": list(self.intercept), "fitted": list(self.fitted)}

    @classmethod
    def from_dict(cls, d: Mapping) -> Calibration:
        """Rebuild from to_dict() output. Raises CalibrationError naming what is wrong."""
        check_record(d, "calibration", CALIBRATION_FORMAT, ("labels", "slope", "intercept", "fitted"),
                     CalibrationError, REFIT)
        return cls(tuple(d["labels"]), tuple(d["slope"]), tuple(d["intercept"]), tuple(d["fitted"]),
                   str(d.get("method", "platt")))


MIN_SLOPE = 1e-6  # the smallest Platt slope kept: strictly increasing, so calibration never ties or reverses ranks


def fit_platt_label(logits: np.ndarray, y: np.ndarray) -> tuple[float, float, bool]:
    """One label's Platt fit on validation logits (N,) and 0/1 targets (N,) -> (slope >= 0, intercept, fitted)."""
    from sklearn.linear_model import LogisticRegression
    z = np.asarray(logits, dtype=np.float64).reshape(-1, 1)
    y = np.asarray(y).astype(int).ravel()
    if y.size == 0 or y.min() == y.max():
        return 1.0, 0.0, False
    lr = LogisticRegression(C=PLATT_C).fit(z, y)
    slope, intercept = float(lr.coef_[0, 0]), float(lr.intercept_[0])
    if slope < MIN_SLOPE:
        # Intercept only: the calibrated probability is the validation prevalence, whatever the logit (to ~1e-6 per
        # unit of logit), and still increasing in it, so the ranking (AUROC) stays the model's own.
        prevalence = float(y.mean())
        slope, intercept = MIN_SLOPE, math.log(prevalence / (1 - prevalence))
    return slope, intercept, True


def fit_calibration(logits: np.ndarray, y_true: np.ndarray, labels: Sequence[str]) -> Calibration:
    """Per-label Platt scaling on validation logits (N, L) and targets (N, L) -> Calibration."""
    logits, y_true = np.asarray(logits), np.asarray(y_true)
    if logits.shape != y_true.shape or logits.ndim != 2 or logits.shape[1] != len(labels):
        raise CalibrationError(f"logits {logits.shape} and targets {y_true.shape} must both be (N, {len(labels)})")
    fits = [fit_platt_label(logits[:, j], y_true[:, j]) for j in range(len(labels))]
    return Calibration(tuple(labels), *(tuple(col) for col in zip(*fits))) if fits else Calibration.identity(labels)


def expected_calibration_error(y_true: np.ndarray, y_prob: np.ndarray, bins: int = ECE_BINS) -> float:
    """ECE of one label: sum over `bins` uniform bins of (bin size / N) * |fraction positive - mean probability|.

    Inputs (N,) 0/1 and probabilities in [0, 1]; NaN when N is 0. Same bins as sklearn's calibration_curve.
    """
    y, p = np.asarray(y_true).ravel(), np.asarray(y_prob).ravel()
    if y.shape != p.shape:
        raise ValueError(f"y_true {y.shape} and y_prob {p.shape} differ in shape")
    return float(reliability(y, p, n_bins=bins)["ece"])


def calibration_report(y_true: np.ndarray, y_prob: np.ndarray, labels: Sequence[str],
                       bins: int = ECE_BINS) -> dict[str, dict[str, float | None]]:
    """Per label {"ece", "brier", "positives"} for (N, L) targets and probabilities (None where N is 0)."""
    from sklearn.metrics import brier_score_loss
    y_true, y_prob = np.asarray(y_true), np.asarray(y_prob, dtype=np.float64)
    out = {}
    for j, name in enumerate(labels):
        y, p = y_true[:, j].astype(int), np.clip(y_prob[:, j], 0.0, 1.0)
        empty = y.size == 0
        out[name] = {
            "ece": None if empty else expected_calibration_error(y, p, bins),
            # brier_score_loss needs pos_label when only one class is present.
            "brier": None if empty else float(brier_score_loss(y, p, pos_label=1)),
            "positives": int(y.sum()),
        }
    return out
