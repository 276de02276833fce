"""Per-label evidence on the calibration split, the rule that decides which labels may be called, and display that
never contradicts the call.

A label is called (positive or negative) only when the calibration split (patients that neither fitted the weights
nor chose the epoch) shows that the model separates it and that its operating point is informative:

- at least MIN_POSITIVE_PATIENTS patients with a positive image (patients, not images: NIH has up to 184 images of
  one patient, and they are not independent);
- the lower bound of the AUROC's patient-bootstrap 95 % CI above MIN_AUROC_CI_LOW (chance);
- at the label's threshold, the Wilson 95 % lower bounds of sensitivity above MIN_SENSITIVITY_LOW and of
  specificity above MIN_SPECIFICITY_LOW. Together they make the worst-case positive likelihood ratio
  sensitivity / (1 - specificity) at least 1: a positive call is no likelier in a healthy patient than in a sick one.

Otherwise the product shows its probability as "not validated - no call" and never as POSITIVE. Why: a threshold
chosen on two positives, or on a label whose AUROC is below chance, or one that calls half the healthy patients
positive, calls noise. The sensitivity and specificity are proportions of images; their Wilson interval takes the
number of patients behind them as its sample size (the proportion is kept, k = round(proportion x patients)), so a
patient with many images counts once, as in the bootstrap.

The AUROC and its interval come from chestxray.metrics (sklearn AUROC, bootstrap over patients), as in test.py;
Wilson intervals from scipy.stats.binomtest (chestxray.decisions.wilson).
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from ..calls import NEGATIVE, POSITIVE
from ..metrics import auroc_summary

MIN_POSITIVE_PATIENTS = 10
MIN_AUROC_CI_LOW = 0.5
MIN_SENSITIVITY_LOW = 0.3
MIN_SPECIFICITY_LOW = 0.7
EVIDENCE_SPLIT = "calibration"
RULE = (f"called only when the calibration split (patients not used to fit the weights or choose the epoch) has at "
        f"least {MIN_POSITIVE_PATIENTS} positive patients, the lower bound of the AUROC's patient-bootstrap 95 % CI "
        f"is above {MIN_AUROC_CI_LOW}, and at the label's threshold the Wilson 95 % lower bounds of sensitivity and "
        f"specificity are above {MIN_SENSITIVITY_LOW} and {MIN_SPECIFICITY_LOW}")


def _patient_proportion(hits: np.ndarray, patients: np.ndarray) -> dict:
    """Proportion of True in hits (images) with a Wilson interval whose sample size is the number of patients."""
    from ..decisions import wilson

    n_images, n_patients = int(hits.size), int(len(np.unique(patients)))
    if n_images == 0:
        return {"value": None, "ci": None, "images": 0, "patients": 0}
    value = float(hits.mean())
    ci = wilson(round(value * n_patients), n_patients)["ci"]
    return {"value": value, "ci": ci, "images": n_images, "patients": n_patients}


def label_evidence(
    y_true: np.ndarray,
    y_prob: np.ndarray,
    labels: Sequence[str],
    patients: Sequence | np.ndarray,
    thresholds: Sequence[float],
    threshold_rule: str,
    n_boot: int = 1000,
    seed: int = 0,
    split: str = EVIDENCE_SPLIT,
) -> dict[str, dict]:
    """Evidence per label, plain data: {label: {"split", "positives", "negatives", "positive_patients",
    "negative_patients", "auroc", "auroc_ci", "auroc_ci_replicates", "auroc_ci_note", "threshold", "threshold_rule",
    "sensitivity", "sensitivity_ci", "specificity", "specificity_ci", "validated", "reason"}}.

    y_true/y_prob are (N, L) on `split`; patients (N,); thresholds (L,). "positives"/"negatives" count images. The
    AUROC is rank-based, so calibrated and raw probabilities give the same AUROC evidence; sensitivity and
    specificity are taken at the thresholds on y_prob's scale.
    """
    y_true, y_prob = np.asarray(y_true), np.asarray(y_prob, dtype=np.float64)
    patients = np.asarray(patients)
    summary = auroc_summary(y_true, y_prob, labels, patients, n_boot=n_boot, seed=seed)
    out = {}
    for j, name in enumerate(labels):
        s = summary["per_label"][name]
        pos = y_true[:, j] > 0.5
        called = y_prob[:, j] >= float(thresholds[j])
        sensitivity = _patient_proportion(called[pos], patients[pos])
        specificity = _patient_proportion(~called[~pos], patients[~pos])
        ev = {
            "split": split,
            "positives": int(pos.sum()),
            "negatives": int((~pos).sum()),
            "positive_patients": sensitivity["patients"],
            "negative_patients": specificity["patients"],
            "auroc": s["auroc"],
            "auroc_ci": s["auroc_ci"],
            "auroc_ci_replicates": s.get("auroc_ci_replicates"),
            "auroc_ci_note": s.get("auroc_ci_note"),
            "threshold": float(thresholds[j]),
            "threshold_rule": threshold_rule,
            "sensitivity": sensitivity["value"],
            "sensitivity_ci": sensitivity["ci"],
            "specificity": specificity["value"],
            "specificity_ci": specificity["ci"],
        }
        ev["validated"], ev["reason"] = _decide(ev)
        out[name] = ev
    return out


def _low(ev: Mapping, key: str) -> float | None:
    ci = ev.get(key)
    if not isinstance(ci, (list, tuple)) or len(ci) != 2 or ci[0] is None:
        return None
    try:
        low = float(ci[0])
    except (TypeError, ValueError):
        return None
    return low if math.isfinite(low) else None


def _decide(ev: Mapping) -> tuple[bool, str]:
    """(validated, reason) from one label's numbers; evidence recorded under an older rule lacks patient counts and
    operating-point intervals, so it is not validated (refit it)."""
    patients = ev.get("positive_patients")
    if patients is None:
        return False, "evidence without patient counts (an older rule); refit it with Model_Training/fit_trust.py"
    if int(patients) < MIN_POSITIVE_PATIENTS:
        return False, f"{int(patients)} positive patient(s) on the calibration split, fewer than " \
            f"{MIN_POSITIVE_PATIENTS}"
    low = _low(ev, "auroc_ci")
    if low is None:
        return False, "no AUROC confidence interval" + (f" ({ev['auroc_ci_note']})" if ev.get("auroc_ci_note") else "")
    if low <= MIN_AUROC_CI_LOW:
        return False, f"AUROC 95 % CI lower bound {low:.2f} is not above {MIN_AUROC_CI_LOW}"
    for key, minimum in (("sensitivity", MIN_SENSITIVITY_LOW), ("specificity", MIN_SPECIFICITY_LOW)):
        low = _low(ev, f"{key}_ci")
        if low is None:
            return False, f"no {key} confidence interval at the threshold"
        if low <= minimum:
            return False, (f"{key} at the threshold {float(ev.get(key) or 0):.2f}, Wilson 95 % lower bound "
                           f"{low:.2f} is not above {minimum}")
    return True, RULE


def is_validated(evidence: Mapping | None) -> bool:
    """True when one label's evidence meets the rule (recomputed from its numbers, not trusted from a flag)."""
    return bool(evidence) and _decide(evidence)[0]


def format_call(probability: float, threshold: float, decimals: int = 1, call: str | None = None) -> tuple[str, str]:
    """(probability text, threshold text) as percentages that never contradict probability >= threshold.

    Both are rounded down to the same number of decimals (rounding down is monotone, so a positive call always
    reads p >= t); when a negative call would read equal, decimals are added until the text shows p < t.
    E.g. (0.90645, 0.90647) -> ("90.645 %", "90.647 %"), where one decimal would show 90.6 % for both.

    call: the core's call for this label, when known. "not validated" and "out of scope" claim no side of the
    threshold, so there is nothing for the texts to contradict and both keep `decimals` (a demo model's calibrated
    probabilities can sit within 1e-6 of their thresholds, and "7.317072 %" helps no reader).
    """
    p, t = float(probability), float(threshold)
    claims_a_side = call is None or call in (POSITIVE, NEGATIVE)
    for d in range(decimals, decimals + 10):
        scale = 10 ** (d + 2)
        fp, ft = math.floor(p * scale) / scale, math.floor(t * scale) / scale
        if not claims_a_side or (p >= t) == (fp >= ft):
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
