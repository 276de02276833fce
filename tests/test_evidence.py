"""Evidence on the calibration split: the call rule (positive patients, AUROC CI, Wilson bounds at the threshold),
agreement with sklearn, the patient bootstrap and a closed-form Wilson interval; display that never contradicts."""
from __future__ import annotations

import math
import re

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from chestxray.metrics import bootstrap_auroc
from chestxray.trust.evidence import (
    MIN_POSITIVE_PATIENTS,
    MIN_SENSITIVITY_LOW,
    MIN_SPECIFICITY_LOW,
    RULE,
    format_call,
    is_validated,
    label_evidence,
)


def _label(n_pos: int, n_neg: int, separation: float, seed: int = 0):
    rng = np.random.default_rng(seed)
    y = np.r_[np.ones(n_pos), np.zeros(n_neg)]
    p = np.clip(rng.normal(0.5 + separation * (y - 0.5), 0.15), 0, 1)
    return y, p


def _wilson(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """The Wilson score interval in closed form (Wilson 1927), independent of scipy."""
    phat = k / n
    centre = (phat + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(phat * (1 - phat) / n + z * z / (4 * n * n))
    return centre - half, centre + half


def test_rule_needs_enough_positive_patients_a_ci_above_chance_and_an_informative_threshold():
    cases = {"enough, separated": _label(30, 200, 0.6), "too few, perfect": _label(MIN_POSITIVE_PATIENTS - 1, 221, 2.0),
             "below chance": _label(30, 200, -0.6), "chance": _label(30, 200, 0.0, seed=4),
             "separated, calls everyone": _label(30, 200, 0.6)}
    y = np.stack([c[0] for c in cases.values()], 1)
    p = np.stack([c[1] for c in cases.values()], 1)
    patients = np.arange(len(y))
    ev = label_evidence(y, p, list(cases), patients, [0.5, 0.5, 0.5, 0.5, 0.0], "f1", n_boot=300)
    assert [ev[k]["validated"] for k in cases] == [True, False, False, False, False]
    assert [is_validated(ev[k]) for k in cases] == [True, False, False, False, False]
    assert f"fewer than {MIN_POSITIVE_PATIENTS}" in ev["too few, perfect"]["reason"]
    assert ev["too few, perfect"]["positive_patients"] == MIN_POSITIVE_PATIENTS - 1
    assert ev["enough, separated"]["negatives"] == 200 and ev["too few, perfect"]["negatives"] == 221
    assert ev["enough, separated"]["threshold_rule"] == "f1" and ev["enough, separated"]["split"] == "calibration"
    # Threshold 0 calls every image positive: the AUROC is as good as the first label's, the operating point is not.
    everyone = ev["separated, calls everyone"]
    assert everyone["auroc_ci"][0] > 0.5 and everyone["specificity"] == 0.0
    assert "specificity" in everyone["reason"] and str(MIN_SPECIFICITY_LOW) in everyone["reason"]
    assert ev["enough, separated"]["reason"] == RULE


def test_positives_are_counted_in_patients_not_images():
    # 40 positive images, but from 4 patients (10 images each): too few patients, however many images.
    y, p = _label(40, 200, 0.8, seed=2)
    patients = np.r_[np.repeat(np.arange(4), 10), np.arange(100, 300)]
    ev = label_evidence(y[:, None], p[:, None], ["Effusion"], patients, [0.5], "f1", n_boot=200)["Effusion"]
    assert ev["positives"] == 40 and ev["positive_patients"] == 4 and ev["negative_patients"] == 200
    assert not ev["validated"] and "4 positive patient(s)" in ev["reason"]
    # The same images, one patient each: validated.
    one_each = label_evidence(y[:, None], p[:, None], ["Effusion"], np.arange(240), [0.5], "f1", n_boot=200)
    assert one_each["Effusion"]["positive_patients"] == 40 and one_each["Effusion"]["validated"]


def test_sensitivity_and_specificity_carry_wilson_intervals_over_patients():
    y, p = _label(30, 200, 0.6, seed=3)
    threshold = 0.55
    ev = label_evidence(y[:, None], p[:, None], ["Effusion"], np.arange(230), [threshold], "f1", n_boot=100)
    ev = ev["Effusion"]
    tp = int(((p >= threshold) & (y == 1)).sum())
    tn = int(((p < threshold) & (y == 0)).sum())
    assert ev["sensitivity"] == pytest.approx(tp / 30) and ev["specificity"] == pytest.approx(tn / 200)
    assert ev["sensitivity_ci"] == pytest.approx(_wilson(tp, 30), abs=1e-9)
    assert ev["specificity_ci"] == pytest.approx(_wilson(tn, 200), abs=1e-9)
    # Two images per patient: the same proportions, but the interval's sample size is the number of patients.
    doubled = label_evidence(np.r_[y, y][:, None], np.r_[p, p][:, None], ["Effusion"],
                             np.r_[np.arange(230), np.arange(230)], [threshold], "f1", n_boot=0)["Effusion"]
    assert doubled["sensitivity"] == pytest.approx(ev["sensitivity"])
    assert doubled["sensitivity_ci"] == pytest.approx(_wilson(tp, 30), abs=1e-9)


def test_auroc_and_ci_agree_with_sklearn_and_the_patient_bootstrap():
    y, p = _label(25, 120, 0.4, seed=1)
    patients = np.repeat(np.arange(73), 2)[: len(y)]  # two images per patient
    ev = label_evidence(y[:, None], p[:, None], ["Effusion"], patients, [0.4], "youden", n_boot=200, seed=7)
    assert ev["Effusion"]["auroc"] == pytest.approx(roc_auc_score(y, p))
    ci = bootstrap_auroc(y[:, None], p[:, None], patients, n_boot=200, seed=7)["per_label"][0]
    assert ev["Effusion"]["auroc_ci"] == pytest.approx(list(ci))


GOOD = {"positive_patients": MIN_POSITIVE_PATIENTS, "auroc_ci": [0.51, 0.8],
        "sensitivity": 0.6, "sensitivity_ci": [MIN_SENSITIVITY_LOW + 0.01, 0.8],
        "specificity": 0.9, "specificity_ci": [MIN_SPECIFICITY_LOW + 0.01, 0.95]}


@pytest.mark.parametrize("change", [
    {"positive_patients": MIN_POSITIVE_PATIENTS - 1}, {"auroc_ci": [0.5, 0.9]}, {"auroc_ci": None},
    {"sensitivity_ci": [MIN_SENSITIVITY_LOW, 0.9]}, {"specificity_ci": [MIN_SPECIFICITY_LOW, 0.9]},
    {"specificity_ci": None}, {"positive_patients": None},
])
def test_is_validated_recomputes_instead_of_trusting_the_flag(change):
    assert is_validated(GOOD)
    assert not is_validated({**GOOD, **change, "validated": True})


def test_evidence_of_the_older_image_count_rule_is_not_validated():
    assert not is_validated({"positives": 50, "auroc_ci": [0.7, 0.9], "validated": True})
    assert not is_validated(None) and not is_validated({})


def _percent(text: str) -> float:
    return float(re.match(r"[\d.]+", text).group())


def test_the_issue_example_reads_as_not_positive():
    p_text, t_text = format_call(0.90645, 0.90647)
    assert _percent(p_text) < _percent(t_text)


@pytest.mark.parametrize("call", ["not validated", "out of scope"])
def test_no_call_keeps_one_decimal_however_close_the_threshold(call):
    # A demo model's calibrated probabilities sit within 1e-6 of their thresholds; with no call there is no side of
    # the threshold to show, so the texts stay short (the page's findings table fits its panel).
    assert format_call(0.07317072, 0.07317075, call=call) == ("7.3 %", "7.3 %")
    p_text, t_text = format_call(0.07317072, 0.07317075, call="negative")  # a call: digits until p < t shows
    assert _percent(p_text) < _percent(t_text) and len(p_text) > len("7.3 %")
    assert format_call(0.5, 0.25, call=call) == ("50.0 %", "25.0 %")


@pytest.mark.parametrize("seed", range(3))
def test_display_never_contradicts_the_call(seed):
    rng = np.random.default_rng(seed)
    t = rng.random(2000)
    p = np.concatenate([rng.random(500), t[500:1000] + rng.normal(0, 1e-4, 500), t[1000:1500],
                        t[1500:] - 10.0 ** -rng.integers(3, 9, 500)]).clip(0, 1)
    for pi, ti in zip(p, t):
        p_text, t_text = format_call(pi, ti)
        if "just below" in p_text:
            assert pi < ti
            continue
        assert (_percent(p_text) >= _percent(t_text)) == (pi >= ti), (pi, ti, p_text, t_text)
        # shown values are rounded down: never above the true value
        assert _percent(p_text) <= pi * 100 + 1e-9 and _percent(t_text) <= ti * 100 + 1e-9
