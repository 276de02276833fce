"""Validation evidence: the call rule, agreement with sklearn / metrics' bootstrap, display that never contradicts."""
from __future__ import annotations

import re

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from chestxray.evidence import MIN_VAL_POSITIVES, format_call, is_validated, label_evidence
from chestxray.metrics import bootstrap_auroc


def _label(n_pos: int, n_neg: int, separation: float, seed: int = 0):
    rng = np.random.default_rng(seed)
    y = np.r_[np.ones(n_pos), np.zeros(n_neg)]
    p = np.clip(rng.normal(0.5 + separation * (y - 0.5), 0.15), 0, 1)
    return y, p


def test_rule_needs_enough_positives_and_a_ci_above_chance():
    cases = {"enough, separated": _label(30, 200, 0.6), "too few, perfect": _label(MIN_VAL_POSITIVES - 1, 221, 2.0),
             "below chance": _label(30, 200, -0.6), "chance": _label(30, 200, 0.0, seed=4)}
    y = np.stack([c[0] for c in cases.values()], 1)
    p = np.stack([c[1] for c in cases.values()], 1)
    patients = np.arange(len(y))
    ev = label_evidence(y, p, list(cases), patients, [0.5] * 4, "f1", n_boot=300)
    assert [ev[k]["validated"] for k in cases] == [True, False, False, False]
    assert [is_validated(ev[k]) for k in cases] == [True, False, False, False]
    assert "fewer than 10" in ev["too few, perfect"]["reason"]
    assert ev["too few, perfect"]["positives"] == MIN_VAL_POSITIVES - 1
    assert ev["enough, separated"]["negatives"] == 200 and ev["too few, perfect"]["negatives"] == 221
    assert ev["enough, separated"]["threshold_rule"] == "f1"


def test_auroc_and_ci_agree_with_sklearn_and_the_patient_bootstrap():
    y, p = _label(25, 120, 0.4, seed=1)
    patients = np.repeat(np.arange(73), 2)[: len(y)]  # two images per patient
    ev = label_evidence(y[:, None], p[:, None], ["Effusion"], patients, [0.4], "youden", n_boot=200, seed=7)
    assert ev["Effusion"]["auroc"] == pytest.approx(roc_auc_score(y, p))
    ci = bootstrap_auroc(y[:, None], p[:, None], patients, n_boot=200, seed=7)["per_label"][0]
    assert ev["Effusion"]["auroc_ci"] == pytest.approx(list(ci))


def test_is_validated_recomputes_instead_of_trusting_the_flag():
    assert not is_validated({"positives": 3, "auroc_ci": [0.9, 1.0], "validated": True})
    assert not is_validated({"positives": 50, "auroc_ci": [0.45, 0.7], "validated": True})
    assert not is_validated({"positives": 50, "auroc_ci": None})
    assert not is_validated(None)
    assert is_validated({"positives": 10, "auroc_ci": [0.51, 0.8]})


def _percent(text: str) -> float:
    return float(re.match(r"[\d.]+", text).group())


def test_the_issue_example_reads_as_not_positive():
    p_text, t_text = format_call(0.90645, 0.90647)
    assert _percent(p_text) < _percent(t_text)


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
