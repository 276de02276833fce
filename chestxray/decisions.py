"""What the user gets, scored: the product's calls (chestxray.calls) against the labels, the in-scope acceptance rate,
and per-label calibration (ECE, Brier) with patient-bootstrap intervals.

The calls come from `Prediction.call` (the same Predictor the app uses), never from re-thresholding probabilities.
Each image gets one call per label: "positive", "negative", or no call ("not validated", "out of scope"). Scored as
the user reads the answer, a no-call is "not flagged":

- sensitivity = positive calls among the truly positive images (a positive image without a call is missed);
- specificity = images not called positive among the truly negative ones;
- PPV = truly positive among the positive calls; NPV = truly negative among the negative calls (no-calls left out);
- accuracy = images whose answer is not wrong: positive calls on positives, negative calls and no-calls on negatives.

A proportion carries its Wilson 95 % interval (scipy.stats.binomtest(k, n).proportion_ci(method="wilson")), which
stays inside [0, 1] and is honest for k = 0 or k = n; None where n = 0. Plain data out (NaN -> None).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .calls import CALLS, NEGATIVE, NOT_VALIDATED, OUT_OF_SCOPE, POSITIVE
from .metrics import CI_LEVEL, patient_bootstrap_weights, percentile_interval

ECE_BINS = 10  # as chestxray.trust.calibration.expected_calibration_error and metrics.calibration


def wilson(k: int, n: int, level: float = CI_LEVEL) -> dict:
    """k of n -> {"k", "n", "value", "ci": [low, high]} (Wilson score interval); value and ci None when n is 0."""
    from scipy.stats import binomtest

    k, n = int(k), int(n)
    if n == 0:
        return {"k": k, "n": 0, "value": None, "ci": None}
    ci = binomtest(k, n).proportion_ci(confidence_level=level, method="wilson")
    return {"k": k, "n": n, "value": k / n, "ci": [float(ci.low), float(ci.high)]}


def label_decision(y_true: np.ndarray, calls: Sequence[str]) -> dict:
    """One label's calls (N,) against its 0/1 truth (N,) -> counts and the proportions of the module docstring.

    Returns {"n_images", "positives", "prevalence", "calls": {call word: count}, "tp", "fp", "fn", "tn",
    "no_call_positive", "no_call_negative", "called_positive_rate", "sensitivity", "specificity", "ppv", "npv",
    "accuracy"}, each proportion a wilson() dict. Raises ValueError for an unknown call word or unequal lengths.
    """
    y = np.asarray(y_true).astype(bool).ravel()
    c = np.asarray(calls, dtype=object).ravel()
    if y.shape != c.shape:
        raise ValueError(f"{y.size} truths and {c.size} calls")
    unknown = sorted(set(c.tolist()) - set(CALLS))
    if unknown:
        raise ValueError(f"unknown call(s) {unknown}; the vocabulary is {list(CALLS)}")
    pos, neg = c == POSITIVE, c == NEGATIVE
    none = ~(pos | neg)
    tp, fp = int((pos & y).sum()), int((pos & ~y).sum())
    fn, tn = int((neg & y).sum()), int((neg & ~y).sum())
    nc_pos, nc_neg = int((none & y).sum()), int((none & ~y).sum())
    n, positives = int(y.size), int(y.sum())
    return {
        "n_images": n,
        "positives": positives,
        "prevalence": wilson(positives, n),
        "calls": {word: int((c == word).sum()) for word in CALLS},
        "tp": tp, "fp": fp, "fn": fn, "tn": tn, "no_call_positive": nc_pos, "no_call_negative": nc_neg,
        "called_positive_rate": wilson(tp + fp, n),
        "sensitivity": wilson(tp, positives),
        "specificity": wilson(tn + nc_neg, n - positives),
        "ppv": wilson(tp, tp + fp),
        "npv": wilson(tn, tn + fn),
        "accuracy": wilson(tp + tn + nc_neg, n),
    }


def decision_report(y_true: np.ndarray, calls: np.ndarray, labels: Sequence[str], accepted: np.ndarray | None,
                    validated: dict[str, bool | None] | None = None, reasons: dict[str, str] | None = None) -> dict:
    """Per label {"validated", "reason", "all": label_decision over every image, "accepted": over the images the
    in-scope check accepted (None without a scope check)}. y_true (N, L) 0/1, calls (N, L) call words,
    accepted (N,) bool or None."""
    y_true, calls = np.asarray(y_true), np.asarray(calls, dtype=object)
    out = {}
    for j, name in enumerate(labels):
        out[name] = {
            "validated": (validated or {}).get(name),
            "reason": (reasons or {}).get(name),
            "all": label_decision(y_true[:, j], calls[:, j]),
            "accepted": label_decision(y_true[accepted, j], calls[accepted, j]) if accepted is not None else None,
        }
    return out


def not_validated(calls: np.ndarray, labels: Sequence[str]) -> list[str]:
    """Labels that never got a call on an in-scope image because they are not validated: (N, L) call words."""
    calls = np.asarray(calls, dtype=object)
    return [name for j, name in enumerate(labels)
            if len(calls) and (calls[:, j] == NOT_VALIDATED).any()
            and not np.isin(calls[:, j], [POSITIVE, NEGATIVE]).any()]


def scope_report(in_scope: Sequence[bool | None], calls: np.ndarray | None = None) -> dict:
    """The folder's in-scope acceptance: {"available", "total", "accepted", "rejected", "acceptance": wilson(),
    "out_of_scope_calls"}. in_scope (N,) holds None where the checkpoint has no scope statistics (then accepted is
    None: nothing was checked)."""
    flags = list(in_scope)
    total = len(flags)
    available = total > 0 and all(f is not None for f in flags)
    accepted = sum(bool(f) for f in flags) if available else None
    return {
        "available": available,
        "total": total,
        "accepted": accepted,
        "rejected": total - accepted if available else None,
        "acceptance": wilson(accepted, total) if available else None,
        "out_of_scope_calls": int((np.asarray(calls, dtype=object) == OUT_OF_SCOPE).sum()) if calls is not None
        else None,
    }


# --- calibration: ECE and Brier with patient-bootstrap intervals ---------------------------------------------------


def weighted_ece(y_true: np.ndarray, y_prob: np.ndarray, weights: np.ndarray, n_bins: int = ECE_BINS) -> np.ndarray:
    """Expected calibration error of one label under each row of weights (B, N) -> (B,); NaN for a zero-weight row.

    ECE = sum over uniform bins of (bin weight / total) * |observed - predicted| = sum |Σw·y - Σw·p| / Σw, with the
    bins of metrics.calibration (sklearn's calibration_curve: bin i holds edges[i] < p <= edges[i+1]). Unit weights
    give chestxray.trust.calibration.expected_calibration_error (tested), and integer weights equal repeating the rows.
    """
    y = np.asarray(y_true, dtype=np.float64).ravel()
    p = np.clip(np.asarray(y_prob, dtype=np.float64).ravel(), 0.0, 1.0)
    w = np.atleast_2d(np.asarray(weights, dtype=np.float64))
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    onehot = np.eye(n_bins)[np.searchsorted(edges[1:-1], p)]  # (N, bins)
    gap = np.abs(w @ (onehot * y[:, None]) - w @ (onehot * p[:, None])).sum(axis=1)
    total = w.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, gap / total, np.nan)


def weighted_brier(y_true: np.ndarray, y_prob: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Brier score (mean squared error of the probability) of one label under each row of weights (B, N) -> (B,)."""
    y = np.asarray(y_true, dtype=np.float64).ravel()
    p = np.asarray(y_prob, dtype=np.float64).ravel()
    w = np.atleast_2d(np.asarray(weights, dtype=np.float64))
    total = w.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, (w @ (p - y) ** 2) / total, np.nan)


def calibration_errors(y_true: np.ndarray, y_prob: np.ndarray, labels: Sequence[str], patients: Sequence,
                       n_boot: int = 1000, seed: int = 0, n_bins: int = ECE_BINS, chunk: int = 100) -> dict:
    """Per label {"ece", "ece_ci", "brier", "brier_ci", "positives"} for (N, L) truths and probabilities, with
    percentile intervals from a bootstrap over patients (all images of a patient together, as the AUROC intervals);
    intervals None when n_boot is 0, values None when N is 0. `chunk` replicates at a time bound the memory."""
    y_true, y_prob = np.asarray(y_true, dtype=np.float64), np.asarray(y_prob, dtype=np.float64)
    n, n_labels = y_true.shape[0], len(labels)
    unit = np.ones((1, n))
    ece, brier = np.full((n_boot, n_labels), np.nan), np.full((n_boot, n_labels), np.nan)
    rng = np.random.default_rng(seed)
    for start in range(0, n_boot if n else 0, chunk):
        stop = min(start + chunk, n_boot)
        weights = patient_bootstrap_weights(patients, stop - start, rng)
        for j in range(n_labels):
            ece[start:stop, j] = weighted_ece(y_true[:, j], y_prob[:, j], weights, n_bins)
            brier[start:stop, j] = weighted_brier(y_true[:, j], y_prob[:, j], weights)
    out = {}
    for j, name in enumerate(labels):
        y, p = y_true[:, j], y_prob[:, j]
        out[name] = {
            "ece": float(weighted_ece(y, p, unit, n_bins)[0]) if n else None,
            "ece_ci": _interval(ece[:, j]) if n_boot and n else None,
            "brier": float(weighted_brier(y, p, unit)[0]) if n else None,
            "brier_ci": _interval(brier[:, j]) if n_boot and n else None,
            "positives": int(y.sum()),
        }
    return out


def _interval(values: np.ndarray) -> list[float] | None:
    low, high = percentile_interval(values)
    return [low, high] if np.isfinite(low) and np.isfinite(high) else None
