"""Metrics: a thin layer over scikit-learn. Arrays are y_true (N, L) in {0, 1} and y_prob (N, L) in [0, 1]."""
from __future__ import annotations

import math

import numpy as np
from sklearn.metrics import precision_recall_curve, roc_auc_score, roc_curve

THRESHOLD_RULES = ("f1", "youden")


def has_both_classes(y_true: np.ndarray) -> bool:
    """True when a label column holds positives and negatives (AUROC is defined)."""
    y = np.asarray(y_true)
    return bool(y.min() != y.max()) if y.size else False


def per_label_auroc(y_true: np.ndarray, y_prob: np.ndarray) -> np.ndarray:
    """(L,) ROC-AUC per label via sklearn; NaN where a label lacks positives or negatives."""
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
