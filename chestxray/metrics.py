"""Metrics: a thin layer over scikit-learn. Arrays are y_true (N, L) in {0, 1} and y_prob (N, L) in [0, 1].

Undefined values (an AUROC without positives, a precision without positive calls) are NaN here and null in JSON;
nothing raises because a label is absent from a split. Confidence intervals come from a bootstrap over patients:
all images of a patient are resampled together, because a patient's images are not independent (NIH has up to
184 follow-ups of one patient; an image-level bootstrap would give intervals that are too narrow).
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from .fileio import to_json_data

# scikit-learn is imported inside the functions that use it: importing it costs ~1 s (it pulls in SciPy), which
# every start of the web app and the CLI paid though they only call binarize().

THRESHOLD_RULES = ("f1", "youden")
CI_LEVEL = 0.95
# A bootstrap interval needs the AUROC to exist (both classes drawn) in at least this fraction of the replicates:
# 1 - (1 - CI_LEVEL) / 2. A replicate without both classes is counted as the worst case on either side, so with more
# than 2.5 % of them undefined a tail of the interval lies wholly in replicates where there is no AUROC; the interval
# is then reported as not estimable (None, with the count), never computed from the lucky replicates alone.
MIN_DEFINED_FRACTION = 0.975


def has_both_classes(y_true: np.ndarray) -> bool:
    """True when a label column holds positives and negatives (AUROC is defined)."""
    y = np.asarray(y_true)
    return bool(y.min() != y.max()) if y.size else False


def per_label_auroc(y_true: np.ndarray, y_prob: np.ndarray) -> np.ndarray:
    """(L,) ROC-AUC per label via sklearn; NaN where a label lacks positives or negatives."""
    from sklearn.metrics import roc_auc_score
    y_true, y_prob = np.asarray(y_true), np.asarray(y_prob)
    out = np.full(y_true.shape[1], np.nan)
    for j in range(y_true.shape[1]):
        if has_both_classes(y_true[:, j]):
            out[j] = roc_auc_score(y_true[:, j], y_prob[:, j])
    return out


def mean_auroc(y_true: np.ndarray, y_prob: np.ndarray) -> float:
    """Mean ROC-AUC over labels where it is defined; NaN if none is."""
    aurocs = per_label_auroc(y_true, y_prob)
    return float(np.nanmean(aurocs)) if np.isfinite(aurocs).any() else math.nan


def choose_threshold(y_true: np.ndarray, y_prob: np.ndarray, rule: str = "f1") -> float:
    """One label's decision threshold: max F1 ("f1") or max TPR - FPR ("youden"); 0.5 if undefined."""
    from sklearn.metrics import precision_recall_curve, roc_curve
    if rule not in THRESHOLD_RULES:
        raise ValueError(f"unknown threshold rule {rule!r}; choose one of {THRESHOLD_RULES}")
    y_true, y_prob = np.asarray(y_true), np.asarray(y_prob)
    if not has_both_classes(y_true):
        return 0.5
    if rule == "youden":
        fpr, tpr, thr = roc_curve(y_true, y_prob)
        best = int(np.argmax(tpr - fpr))
        return float(np.clip(thr[best], 0.0, 1.0))
    precision, recall, thr = precision_recall_curve(y_true, y_prob)
    p, r = precision[:-1], recall[:-1]  # the last point has no threshold
    f1 = np.divide(2 * p * r, p + r, out=np.zeros_like(p), where=(p + r) > 0)
    return float(np.clip(thr[int(np.argmax(f1))], 0.0, 1.0))


def choose_thresholds(y_true: np.ndarray, y_prob: np.ndarray, rule: str = "f1") -> np.ndarray:
    """(L,) per-label thresholds by `rule` (see choose_threshold)."""
    y_true, y_prob = np.asarray(y_true), np.asarray(y_prob)
    return np.array([choose_threshold(y_true[:, j], y_prob[:, j], rule) for j in range(y_true.shape[1])])


# --- threshold-free and thresholded metrics -------------------------------------------------------------------


def per_label_average_precision(y_true: np.ndarray, y_prob: np.ndarray) -> np.ndarray:
    """(L,) average precision per label via sklearn; NaN where a label has no positives (AP is undefined)."""
    from sklearn.metrics import average_precision_score
    y_true, y_prob = np.asarray(y_true), np.asarray(y_prob)
    out = np.full(y_true.shape[1], np.nan)
    for j in range(y_true.shape[1]):
        if y_true[:, j].any():
            out[j] = average_precision_score(y_true[:, j], y_prob[:, j])
    return out


def binarize(y_prob: np.ndarray, thresholds: float | Sequence[float] | np.ndarray) -> np.ndarray:
    """Positive calls: y_prob >= threshold (per label when a sequence) -> int 0/1 array of y_prob's shape."""
    return (np.asarray(y_prob) >= np.asarray(thresholds, dtype=np.float64)).astype(int)


def threshold_metrics(y_true: np.ndarray, y_prob: np.ndarray, threshold: float) -> dict[str, float | int]:
    """One label at one threshold: precision, recall, f1, specificity, accuracy (sklearn), tn/fp/fn/tp counts and
    the 2x2 confusion_matrix [[tn, fp], [fn, tp]] (sklearn's layout).

    A ratio whose denominator is zero (precision with no positive calls, recall without positives, ...) is NaN.
    """
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_score, recall_score
    y_true = np.asarray(y_true).astype(int)
    y_pred = binarize(y_prob, threshold)
    tn, fp, fn, tp = confusion_matrix(y_true, y_pred, labels=[0, 1]).ravel()
    nan = np.nan
    return {
        "threshold": float(threshold),
        "precision": float(precision_score(y_true, y_pred, zero_division=nan)),
        "recall": float(recall_score(y_true, y_pred, zero_division=nan)),
        "f1": float(f1_score(y_true, y_pred, zero_division=nan)),
        # Specificity is the recall of the negative class.
        "specificity": float(recall_score(y_true, y_pred, pos_label=0, zero_division=nan)),
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "tn": int(tn),
        "fp": int(fp),
        "fn": int(fn),
        "tp": int(tp),
        "confusion_matrix": [[int(tn), int(fp)], [int(fn), int(tp)]],  # rows: truth 0/1; columns: call 0/1
    }


def accuracy_summary(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    """The two accuracies and their trivial baselines for (N, L) 0/1 arrays.

    per_label_mean: fraction of correct (image, label) decisions (= 1 - Hamming loss);
    all_negative_baseline: the same for a model that calls every label negative (= fraction of 0s in y_true);
    exact_match: fraction of images whose whole label set is right (sklearn's multilabel accuracy_score);
    exact_match_all_negative_baseline: the same for the all-negative model (= fraction of "No Finding" images).
    """
    from sklearn.metrics import accuracy_score
    y_true, y_pred = np.asarray(y_true).astype(int), np.asarray(y_pred).astype(int)
    if y_true.size == 0:
        return {k: math.nan for k in ("per_label_mean", "all_negative_baseline", "exact_match",
                                      "exact_match_all_negative_baseline")}
    return {
        "per_label_mean": float(accuracy_score(y_true.ravel(), y_pred.ravel())),
        "all_negative_baseline": float(accuracy_score(y_true.ravel(), np.zeros(y_true.size, dtype=int))),
        "exact_match": float(accuracy_score(y_true, y_pred)),
        "exact_match_all_negative_baseline": float(accuracy_score(y_true, np.zeros_like(y_true))),
    }


def calibration(y_true: np.ndarray, y_prob: np.ndarray, n_bins: int = 10) -> dict:
    """Reliability over all (image, label) pairs pooled: sklearn's calibration_curve in uniform bins plus the ECE.

    ECE (expected calibration error) = sum over bins of (bin size / total) * |mean observed - mean predicted|.
    Bins are sklearn's calibration_curve(strategy="uniform") bins, with counts and empty bins kept (tested equal).
    Returns {"n_bins", "ece", "bins": [{"lower", "upper", "count", "mean_predicted", "fraction_positive"}]}.
    """
    y = np.asarray(y_true, dtype=np.float64).ravel()
    p = np.clip(np.asarray(y_prob, dtype=np.float64).ravel(), 0.0, 1.0)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # calibration_curve's own binning (strategy="uniform"): bin i holds edges[i] < p <= edges[i+1], 0 in the first.
    which = np.searchsorted(edges[1:-1], p)
    bins, ece = [], 0.0
    for i in range(n_bins):
        inside = which == i
        count = int(inside.sum())
        mean_p = float(p[inside].mean()) if count else math.nan
        frac = float(y[inside].mean()) if count else math.nan
        if count:
            ece += count / y.size * abs(frac - mean_p)
        bins.append({"lower": float(edges[i]), "upper": float(edges[i + 1]), "count": count,
                     "mean_predicted": mean_p, "fraction_positive": frac})
    return {"n_bins": n_bins, "ece": float(ece) if y.size else math.nan, "bins": bins}


# --- bootstrap over patients ---------------------------------------------------------------------------------


def patient_bootstrap_weights(
    patients: Sequence | np.ndarray, n_boot: int, seed: int | np.random.Generator = 0
) -> np.ndarray:
    """(n_boot, N) int weights: each replicate draws P patients with replacement out of the P present; an image's
    weight is how often its patient was drawn, so all images of a patient enter (or leave) a replicate together."""
    codes = np.unique(np.asarray(patients), return_inverse=True)[1].ravel()
    n_patients = int(codes.max()) + 1 if codes.size else 0
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, max(n_patients, 1), size=(n_boot, n_patients))
    counts = np.stack([np.bincount(row, minlength=n_patients) for row in draws]) if n_boot else np.zeros((0, 0))
    return counts[:, codes].astype(np.int64) if n_patients else np.zeros((n_boot, 0), dtype=np.int64)


def weighted_auroc(y_true: np.ndarray, y_prob: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """ROC-AUC of one label under each row of weights (B, N) -> (B,); NaN where a row lacks a class.

    The Mann-Whitney form with ties counted half, which equals roc_auc_score(y, p, sample_weight=w) and
    roc_auc_score on the rows repeated w times (tested). Written by hand so that a bootstrap sorts the scores once
    instead of once per replicate: 1000 replicates x 14 labels of sklearn calls take ~100 s on the 25,596-image
    official test set.
    """
    y = np.asarray(y_true).astype(bool).ravel()
    p = np.asarray(y_prob, dtype=np.float64).ravel()
    w = np.atleast_2d(np.asarray(weights, dtype=np.float64))
    order = np.argsort(p, kind="stable")
    p, y, w = p[order], y[order], w[:, order]
    starts = np.flatnonzero(np.r_[True, p[1:] != p[:-1]]) if p.size else np.zeros(0, dtype=int)
    if not starts.size:
        return np.full(w.shape[0], np.nan)
    pos = np.add.reduceat(w * y, starts, axis=1)  # (B, groups of tied scores)
    neg = np.add.reduceat(w * ~y, starts, axis=1)
    neg_below = np.cumsum(neg, axis=1) - neg
    n_pos, n_neg = pos.sum(axis=1), neg.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = (pos * (neg_below + 0.5 * neg)).sum(axis=1) / (n_pos * n_neg)
    return np.where((n_pos > 0) & (n_neg > 0), auc, np.nan)


def percentile_interval(values: np.ndarray, level: float = CI_LEVEL) -> tuple[float, float]:
    """Percentile interval of the finite values -> (low, high); (NaN, NaN) when there are none."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if not v.size:
        return (math.nan, math.nan)
    tail = (1.0 - level) / 2 * 100
    low, high = np.percentile(v, [tail, 100 - tail])
    return (float(low), float(high))


def bootstrap_interval(values: np.ndarray, level: float = CI_LEVEL, floor: float = 0.0, ceiling: float = 1.0,
                       min_defined: float = MIN_DEFINED_FRACTION) -> tuple[float, float]:
    """Percentile interval of bootstrap replicates where NaN marks a replicate in which the statistic was undefined.

    Undefined replicates are not dropped: each enters the lower percentile at `floor` and the upper at `ceiling`
    (the statistic's range), so the interval is never narrower than the defined replicates alone allow. When fewer than
    `min_defined` of the replicates are defined -> (NaN, NaN): not estimable.
    """
    v = np.asarray(values, dtype=np.float64).ravel()
    defined = np.isfinite(v)
    if not v.size or defined.mean() < min_defined:
        return (math.nan, math.nan)
    tail = (1.0 - level) / 2 * 100
    low = float(np.percentile(np.where(defined, v, floor), tail))
    high = float(np.percentile(np.where(defined, v, ceiling), 100 - tail))
    return (low, high)


def bootstrap_auroc(
    y_true: np.ndarray,
    y_prob: np.ndarray,
    patients: Sequence | np.ndarray,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = CI_LEVEL,
    chunk: int = 100,
) -> dict:
    """Patient-level bootstrap of each label's AUROC and of the mean AUROC (seeded, percentile intervals).

    The mean in a replicate is over the labels defined in the full data that stay defined in that replicate.
    Intervals come from bootstrap_interval: a replicate without both classes counts as the worst case, and a label
    whose AUROC is defined in fewer than MIN_DEFINED_FRACTION of the replicates gets (NaN, NaN), not estimable.
    Returns {"per_label": (L, 2) array of (low, high), "mean": (low, high), "n_boot", "level", "seed",
    "valid": (L,) number of replicates in which each label's AUROC was defined, "estimable": (L,) bool}.
    """
    y_true, y_prob = np.asarray(y_true), np.asarray(y_prob, dtype=np.float64)
    n, n_labels = y_true.shape
    defined = np.array([has_both_classes(y_true[:, j]) for j in range(n_labels)])
    replicates = np.full((n_boot, n_labels), np.nan)
    rng = np.random.default_rng(seed)
    for start in range(0, n_boot, chunk):  # chunks bound the (chunk, N) weight matrices' memory
        stop = min(start + chunk, n_boot)
        weights = patient_bootstrap_weights(patients, stop - start, rng)
        for j in np.flatnonzero(defined):
            replicates[start:stop, j] = weighted_auroc(y_true[:, j], y_prob[:, j], weights)
    means = np.full(n_boot, np.nan)
    if defined.any():
        with np.errstate(invalid="ignore"):
            sub = replicates[:, defined]
            ok = np.isfinite(sub).any(axis=1)
            means[ok] = np.nanmean(sub[ok], axis=1)
    per_label = np.array([bootstrap_interval(replicates[:, j], level) for j in range(n_labels)]).reshape(-1, 2)
    return {
        "per_label": per_label,
        "mean": bootstrap_interval(means, level),
        "n_boot": int(n_boot),
        "level": float(level),
        "seed": int(seed),
        "valid": np.isfinite(replicates).sum(axis=0),
        "estimable": np.isfinite(per_label).all(axis=1),
    }


# --- the whole evaluation --------------------------------------------------------------------------------------


def _nan_to_none(x: float) -> float | None:
    return None if x is None or not math.isfinite(float(x)) else float(x)


def _interval(ci: Sequence[float]) -> list[float] | None:
    low, high = float(ci[0]), float(ci[1])
    return [low, high] if math.isfinite(low) and math.isfinite(high) else None


def auroc_summary(
    y_true: np.ndarray,
    y_prob: np.ndarray,
    labels: Sequence[str],
    patients: Sequence | np.ndarray,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict:
    """AUROC per label and mean with patient-bootstrap CIs, as plain data (None where undefined).

    Returns {"n_images", "n_patients", "mean_auroc", "mean_auroc_ci", "per_label": {label: {"auroc", "auroc_ci",
    "auroc_ci_replicates", "auroc_ci_note", "positives"}}}; CIs are None when n_boot is 0, and when not estimable
    (bootstrap_auroc), with a note giving the count of replicates in which the AUROC was defined.
    """
    y_true, y_prob = np.asarray(y_true), np.asarray(y_prob, dtype=np.float64)
    aurocs = per_label_auroc(y_true, y_prob) if len(y_true) else np.full(len(labels), np.nan)
    boot = bootstrap_auroc(y_true, y_prob, patients, n_boot, seed) if n_boot and len(y_true) else None
    per_label = {}
    for j, name in enumerate(labels):
        per_label[name] = {
            "auroc": _nan_to_none(aurocs[j]),
            "auroc_ci": _interval(boot["per_label"][j]) if boot else None,
            # Replicates in which the label had both classes; the others count as the worst case (bootstrap_interval).
            "auroc_ci_replicates": int(boot["valid"][j]) if boot else 0,
            "auroc_ci_note": _ci_note(boot, j, aurocs[j]),
            "positives": int(y_true[:, j].sum()) if len(y_true) else 0,
        }
    finite = np.isfinite(aurocs)
    return {
        "n_images": int(len(y_true)),
        "n_patients": int(len(np.unique(np.asarray(patients)))),
        "mean_auroc": float(aurocs[finite].mean()) if finite.any() else None,
        "mean_auroc_labels": int(finite.sum()),
        "mean_auroc_ci": _interval(boot["mean"]) if boot else None,
        "per_label": per_label,
    }


def _ci_note(boot: dict | None, j: int, auroc: float) -> str | None:
    """Why a label's AUROC interval is missing (None when it is there, or when the AUROC itself is undefined)."""
    if boot is None or bool(boot["estimable"][j]) or not math.isfinite(auroc):
        return None
    return (f"not estimable: the AUROC is defined in {int(boot['valid'][j])} of {boot['n_boot']} bootstrap replicates, "
            f"fewer than {MIN_DEFINED_FRACTION:.1%}")


def evaluate_predictions(
    y_true: np.ndarray,
    y_prob: np.ndarray,
    labels: Sequence[str],
    thresholds: Sequence[float],
    patients: Sequence | np.ndarray,
    subgroups: Mapping[str, np.ndarray] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict:
    """Every metric of the evaluation report as plain data (NaN -> None), from predictions alone.

    subgroups: name -> boolean mask (N,), e.g. {"view=PA": ...}; each gets auroc_summary on its rows.
    Raises ValueError when the shapes disagree.
    """
    y_true = np.asarray(y_true, dtype=np.float64)
    y_prob = np.asarray(y_prob, dtype=np.float64)
    patients = np.asarray(patients)
    labels = list(labels)
    thresholds = np.asarray(thresholds, dtype=np.float64)
    if y_true.shape != y_prob.shape or y_true.ndim != 2 or y_true.shape[1] != len(labels):
        raise ValueError(f"y_true {y_true.shape} and y_prob {y_prob.shape} must both be (N, {len(labels)})")
    if thresholds.shape != (len(labels),):
        raise ValueError(f"{thresholds.size} thresholds for {len(labels)} labels")
    if patients.shape != (len(y_true),):
        raise ValueError(f"{patients.size} patient ids for {len(y_true)} images")

    summary = auroc_summary(y_true, y_prob, labels, patients, n_boot, seed)
    ap = per_label_average_precision(y_true, y_prob)
    per_label = {}
    for j, name in enumerate(labels):
        at_threshold = threshold_metrics(y_true[:, j], y_prob[:, j], thresholds[j])
        at_half = threshold_metrics(y_true[:, j], y_prob[:, j], 0.5)
        positives = summary["per_label"][name]["positives"]
        per_label[name] = {
            "auroc": summary["per_label"][name]["auroc"],
            "auroc_ci": summary["per_label"][name]["auroc_ci"],
            "auroc_ci_replicates": summary["per_label"][name]["auroc_ci_replicates"],
            "auroc_ci_note": summary["per_label"][name]["auroc_ci_note"],
            "average_precision": _nan_to_none(ap[j]),
            **{k: (_nan_to_none(v) if isinstance(v, float) else v) for k, v in at_threshold.items()},
            "positives": positives,
            "negatives": int(len(y_true) - positives),
            "prevalence": _nan_to_none(positives / len(y_true)) if len(y_true) else None,
            "at_0.5": {k: (_nan_to_none(v) if isinstance(v, float) else v) for k, v in at_half.items()},
            "note": _label_note(positives, len(y_true)),
        }
    accuracy = accuracy_summary(y_true, binarize(y_prob, thresholds))
    accuracy_half = accuracy_summary(y_true, binarize(y_prob, 0.5))
    result = {
        "n_images": summary["n_images"],
        "n_patients": summary["n_patients"],
        "labels": labels,
        "mean_auroc": summary["mean_auroc"],
        "mean_auroc_ci": summary["mean_auroc_ci"],
        "mean_auroc_labels": summary["mean_auroc_labels"],
        "bootstrap": {"n_boot": int(n_boot), "seed": int(seed), "level": CI_LEVEL, "unit": "patient",
                      "interval": "percentile"},
        "per_label": per_label,
        "accuracy": {**{k: _nan_to_none(v) for k, v in accuracy.items()},
                     "at_0.5": {k: _nan_to_none(v) for k, v in accuracy_half.items()}},
        "calibration": to_json_data(calibration(y_true, y_prob)),
        "subgroups": {},
    }
    for name, mask in (subgroups or {}).items():
        mask = np.asarray(mask, dtype=bool)
        result["subgroups"][name] = auroc_summary(y_true[mask], y_prob[mask], labels, patients[mask], n_boot, seed)
    return result


def _label_note(positives: int, n: int) -> str | None:
    if n == 0:
        return "no images"
    if positives == 0:
        return "no positives in this split: AUROC, AP and recall are undefined"
    if positives == n:
        return "no negatives in this split: AUROC and specificity are undefined"
    return None


