"""Calibration: ECE by hand, Platt against scikit-learn, recovery of a known miscalibration, plain-data storage."""
from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.special import expit
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from chestxray.trust.calibration import (
    MIN_SLOPE,
    PLATT_C,
    Calibration,
    CalibrationError,
    calibration_report,
    expected_calibration_error,
    fit_calibration,
)


@pytest.mark.parametrize("y, p, expected", [
    # one image per bin: (0.1 + 0.3 + 0.4 + 0.1) / 4
    ([0, 0, 1, 1], [0.1, 0.3, 0.6, 0.9], 0.225),
    # two bins of two: |0.5 - 0.25| * 2/4 + |1.0 - 0.75| * 2/4
    ([0, 1, 1, 1], [0.25, 0.25, 0.75, 0.75], 0.25),
    # perfectly calibrated bins
    ([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5], 0.0),
])
def test_ece_hand_worked(y, p, expected):
    assert expected_calibration_error(np.array(y), np.array(p)) == pytest.approx(expected)


def test_platt_equals_sklearn_logistic_regression_on_the_logit():
    rng = np.random.default_rng(1)
    z = rng.normal(0, 2, (300, 2))
    y = (rng.random((300, 2)) < expit(0.5 * z - 0.7)).astype(int)
    cal = fit_calibration(z, y, ["Atelectasis", "Cardiomegaly"])
    for j in range(2):
        lr = LogisticRegression(C=PLATT_C).fit(z[:, [j]], y[:, j])
        np.testing.assert_allclose(cal.apply(z)[:, j], lr.predict_proba(z[:, [j]])[:, 1], rtol=1e-6)


def test_platt_recovers_a_known_miscalibration_and_lowers_ece_and_brier():
    rng = np.random.default_rng(2)
    z = rng.normal(1.0, 3.0, (20000, 1))  # an overconfident, positively biased model
    y = (rng.random((20000, 1)) < expit(z / 3 - 1)).astype(int)
    cal = fit_calibration(z, y, ["Effusion"])
    assert cal.slope[0] == pytest.approx(1 / 3, abs=0.03)
    assert cal.intercept[0] == pytest.approx(-1.0, abs=0.08)
    before = calibration_report(y, expit(z), ["Effusion"])["Effusion"]
    after = calibration_report(y, cal.apply(z), ["Effusion"])["Effusion"]
    assert after["ece"] < 0.02 < before["ece"]
    assert after["brier"] < before["brier"]
    assert before["brier"] == pytest.approx(np.mean((expit(z[:, 0]) - y[:, 0]) ** 2))


def test_label_without_both_classes_keeps_the_sigmoid():
    z = np.linspace(-2, 2, 40).reshape(-1, 1)
    cal = fit_calibration(z, np.zeros((40, 1)), ["Hernia"])
    assert cal.fitted == (False,)
    np.testing.assert_allclose(cal.apply(z), expit(z))


def test_reversed_label_gets_its_prevalence_not_a_flipped_ranking():
    z = np.linspace(-3, 3, 100).reshape(-1, 1)
    y = (z[:, 0] < -1.5).astype(int).reshape(-1, 1)  # positives have the LOWEST logits
    cal = fit_calibration(z, y, ["Mass"])
    assert cal.slope[0] == MIN_SLOPE
    p = cal.apply(z)
    np.testing.assert_allclose(p, y.mean(), atol=1e-5)
    # Still increasing in the logit: the model's own ranking (and AUROC) survives calibration, never reversed.
    assert np.all(np.diff(p[:, 0]) > 0)
    assert roc_auc_score(y[:, 0], p[:, 0]) == roc_auc_score(y[:, 0], z[:, 0])


def test_plain_data_round_trip_and_shape_errors():
    rng = np.random.default_rng(3)
    z = rng.normal(size=(50, 2))
    y = (rng.random((50, 2)) < 0.3).astype(int)
    cal = fit_calibration(z, y, ["Mass", "Nodule"])
    again = Calibration.from_dict(json.loads(json.dumps(cal.to_dict())))
    np.testing.assert_array_equal(again.apply(z), cal.apply(z))
    with pytest.raises(CalibrationError, match="labels"):
        cal.apply(np.zeros((3, 5)))
    with pytest.raises(CalibrationError, match="must both be"):
        fit_calibration(z, y[:, :1], ["Mass", "Nodule"])
    with pytest.raises(CalibrationError, match="lacks"):
        Calibration.from_dict({"format": 1, "labels": ["Mass"]})


def test_evaluation_reports_ece_and_brier_before_and_after():
    import pandas as pd

    from Model_Training.test import calibration_before_after

    rng = np.random.default_rng(4)
    z = rng.normal(1.0, 3.0, 500)
    y = (rng.random(500) < expit(z / 3 - 1)).astype(int)
    frame = pd.DataFrame({"Effusion_logit": z, "Effusion_true": y})
    cal = fit_calibration(z[:, None], y[:, None], ["Effusion"])
    report = calibration_before_after(frame, ["Effusion"], cal)
    before, after = report["before"]["Effusion"], report["after"]["Effusion"]
    assert before["ece"] == pytest.approx(expected_calibration_error(y, expit(z)))
    assert after["brier"] == pytest.approx(np.mean((cal.apply(z[:, None])[:, 0] - y) ** 2))
    assert after["ece"] < before["ece"] and after["brier"] < before["brier"]
    assert calibration_before_after(frame, ["Effusion"], None)["after"] is None
