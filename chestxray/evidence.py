"""Per-label validation evidence, the rule that decides which labels may be called, and display that never
contradicts the call.

A label is called (positive or negative) only when its validation split gave enough evidence that the model ranks
it better than chance: at least MIN_VAL_POSITIVES positives and a patient-bootstrap 95 % CI of the AUROC whose
lower bound is above 0.5. Otherwise the product shows its probability as "not validated - no call" and never as
POSITIVE. Why: a threshold chosen on two positives, or on a label whose AUROC is below chance, calls noise.

The AUROC and its interval come from chestxray.metrics (sklearn AUROC, bootstrap over patients), as in test.py.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from .metrics import auroc_summary

MIN_VAL_POSITIVES = 10
MIN_CI_LOW = 0.5
RULE = (f"called only when the validation split has at least {MIN_VAL_POSITIVES} positives and the lower bound "
        f"of the AUROC's patient-bootstrap 95 % CI is above {MIN_CI_LOW}")


def label_evidence(
    y_true: np.ndarray,
    y_prob: np.ndarray,
    labels: Sequence[str],
    patients: Sequence | np.ndarray,
    thresholds: Sequence[float],
    threshold_rule: str,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, dict]:
    """Validation evidence per label, plain data: {label: {"positives", "negatives", "auroc", "auroc_ci",
    "threshold", "threshold_rule", "validated", "reason"}}. y_true/y_prob are (N, L); thresholds (L,).

    The AUROC is rank-based, so calibrated and raw probabilities give the same evidence.
    """
    y_true = np.asarray(y_true)
    summary = auroc_summary(y_true, y_prob, labels, patients, n_boot=n_boot, seed=seed)
    out = {}
    for j, name in enumerate(labels):
        s = summary["per_label"][name]
        ev = {
            "positives": int(s["positives"]),
            "negatives": int(len(y_true) - s["positives"]),
            "auroc": s["auroc"],
            "auroc_ci": s["auroc_ci"],
            "threshold": float(thresholds[j]),
            "threshold_rule": threshold_rule,
        }
        ev["validated"], ev["reason"] = _decide(ev)
        out[name] = ev
    return out


def _decide(ev: Mapping) -> tuple[bool, str]:
    positives = int(ev.get("positives") or 0)
    ci = ev.get("auroc_ci")
    if positives < MIN_VAL_POSITIVES:
        return False, f"{positives} validation positive(s), fewer than {MIN_VAL_POSITIVES}"
    if not ci or ci[0] is None or not math.isfinite(float(ci[0])):
        return False, "no AUROC confidence interval"
    if float(ci[0]) <= MIN_CI_LOW:
        return False, f"AUROC 95 % CI lower bound {float(ci[0]):.2f} is not above {MIN_CI_LOW}"
    return True, RULE


def is_validated(evidence: Mapping | None) -> bool:
    """True when one label's evidence meets the rule (recomputed from its numbers, not trusted from a flag)."""
    return bool(evidence) and _decide(evidence)[0]


def format_call(probability: float, threshold: float, decimals: int = 1) -> tuple[str, str]:
    """(probability text, threshold text) as percentages that never contradict probability >= threshold.

    Both are rounded down to the same number of decimals (rounding down is monotone, so a positive call always
    reads p >= t); when a negative call would read equal, decimals are added until the text shows p < t.
    E.g. (0.90645, 0.90647) -> ("90.645 %", "90.647 %"), where one decimal would show 90.6 % for both.
    """
    p, t = float(probability), float(threshold)
    for d in range(decimals, decimals + 10):
        scale = 10 ** (d + 2)
        fp, ft = math.floor(p * scale) / scale, math.floor(t * scale) / scale
        if (p >= t) == (fp >= ft):
            return f"{fp * 100:.{d}f} %", f"{ft * 100:.{d}f} %"
    # Differ below 1e-12: not printable; say so rather than print two equal numbers with opposite calls.
    return f"{math.floor(p * 1e4) / 100:.2f} % (just below)", f"{math.floor(t * 1e4) / 100:.2f} %"


def format_scope(score: float, limit: float) -> tuple[str, str]:
    """(score text, limit text) that compare as the numbers do: rounding is monotone, and digits are added until two
    different numbers read differently. E.g. (1.004, 1.0) -> ("1.004", "1.000"), not ("1.00", "1.00")."""
    s, lim = float(score), float(limit)
    for d in range(2, 9):
        a, b = f"{s:.{d}f}", f"{lim:.{d}f}"
        if (a == b) == (s == lim):
            return a, b
    return f"{s:.9g}", f"{lim:.9g}"
