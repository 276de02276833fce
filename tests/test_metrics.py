"""Metrics against scikit-learn and hand-worked values; the patient bootstrap; strict JSON for undefined values."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from sklearn.calibration import calibration_curve
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    confusion_matrix,
    f1_score,
    hamming_loss,
    precision_score,
    recall_score,
    roc_auc_score,
)

from chestxray import metrics
from chestxray.fileio import write_json

LABELS4 = ["Atelectasis", "Cardiomegaly", "Effusion", "Hernia"]


def _strict_json(text: str):
    def refuse(token):
        raise AssertionError(f"non-standard JSON token {token}")

    return json.loads(text, parse_constant=refuse)


@pytest.fixture()
def synthetic():
    """200 images of 60 patients, 4 labels (the last, Hernia, without positives); probabilities correlated with
    the truth so the metrics are non-trivial; the third label's probabilities have ties."""
    rng = np.random.default_rng(7)
    n = 200
    patients = rng.integers(0, 60, n)
    y = (rng.random((n, 4)) < [0.3, 0.1, 0.5, 0.0]).astype(float)
    p = np.clip(0.35 * y + rng.random((n, 4)) * 0.7, 0, 1)
    p[:, 2] = np.round(p[:, 2], 1)  # ties, which AUROC counts as half
    return y, p, patients


def test_hand_worked_label():
    y = np.array([1, 1, 0, 0, 0])
    p = np.array([0.9, 0.4, 0.6, 0.2, 0.1])
    m = metrics.threshold_metrics(y, p, 0.5)  # calls 1,0,1,0,0 -> TP 1, FN 1, FP 1, TN 2
    assert (m["tp"], m["fn"], m["fp"], m["tn"]) == (1, 1, 1, 2)
    assert m["confusion_matrix"] == confusion_matrix(y, p >= 0.5).tolist() == [[2, 1], [1, 1]]
    assert m["precision"] == pytest.approx(0.5)
    assert m["recall"] == pytest.approx(0.5)
    assert m["f1"] == pytest.approx(0.5)
    assert m["specificity"] == pytest.approx(2 / 3)
    assert m["accuracy"] == pytest.approx(3 / 5)
    # AUROC: 0.9 beats all 3 negatives, 0.4 beats 2 of 3 -> 5/6. AP: ranks P,N,P -> 0.5*1 + 0.5*(2/3).
    assert metrics.per_label_auroc(y[:, None], p[:, None])[0] == pytest.approx(5 / 6)
    assert metrics.per_label_average_precision(y[:, None], p[:, None])[0] == pytest.approx(0.5 + 0.5 * 2 / 3)
    # Threshold 0.4 is inclusive (p >= t): now both positives are called.
    assert metrics.threshold_metrics(y, p, 0.4)["tp"] == 2


def test_every_metric_matches_sklearn(synthetic):
    y, p, patients = synthetic
    thresholds = [0.45, 0.6, 0.5, 0.5]
    result = metrics.evaluate_predictions(y, p, LABELS4, thresholds, patients, n_boot=0)
    for j, name in enumerate(LABELS4[:3]):
        m = result["per_label"][name]
        pred = (p[:, j] >= thresholds[j]).astype(int)
        assert m["auroc"] == pytest.approx(roc_auc_score(y[:, j], p[:, j]))
        assert m["average_precision"] == pytest.approx(average_precision_score(y[:, j], p[:, j]))
        assert m["precision"] == pytest.approx(precision_score(y[:, j], pred))
        assert m["recall"] == pytest.approx(recall_score(y[:, j], pred))
        assert m["f1"] == pytest.approx(f1_score(y[:, j], pred))
        assert m["specificity"] == pytest.approx(recall_score(y[:, j], pred, pos_label=0))
        assert m["accuracy"] == pytest.approx(accuracy_score(y[:, j], pred))
        tp = int(((pred == 1) & (y[:, j] == 1)).sum())
        fp = int(((pred == 1) & (y[:, j] == 0)).sum())
        assert (m["tp"], m["fp"], m["tp"] + m["fn"], m["tn"] + m["fp"]) == (
            tp, fp, int(y[:, j].sum()), int((y[:, j] == 0).sum()))
        half = (p[:, j] >= 0.5).astype(int)
        assert m["at_0.5"]["f1"] == pytest.approx(f1_score(y[:, j], half))
        assert m["positives"] == int(y[:, j].sum())
    defined = [roc_auc_score(y[:, j], p[:, j]) for j in range(3)]
    assert result["mean_auroc"] == pytest.approx(np.mean(defined))
    assert result["mean_auroc_labels"] == 3
    pred_all = (p >= np.array(thresholds)).astype(int)
    acc = result["accuracy"]
    assert acc["per_label_mean"] == pytest.approx(1 - hamming_loss(y, pred_all))
    assert acc["exact_match"] == pytest.approx(accuracy_score(y, pred_all))
    assert acc["all_negative_baseline"] == pytest.approx((y == 0).mean())
    assert acc["exact_match_all_negative_baseline"] == pytest.approx((y.sum(axis=1) == 0).mean())


def test_accuracy_summary_hand_worked():
    y = np.array([[1, 0], [0, 0], [0, 1]])
    pred = np.array([[1, 0], [0, 1], [0, 0]])
    acc = metrics.accuracy_summary(y, pred)
    assert acc == pytest.approx({"per_label_mean": 4 / 6, "all_negative_baseline": 4 / 6, "exact_match": 1 / 3,
                                 "exact_match_all_negative_baseline": 1 / 3})


def test_label_without_positives_is_reported_not_crashed(synthetic, tmp_path):
    y, p, patients = synthetic
    result = metrics.evaluate_predictions(y, p, LABELS4, [0.5] * 4, patients, n_boot=20)
    hernia = result["per_label"]["Hernia"]
    assert hernia["positives"] == 0
    assert hernia["auroc"] is None and hernia["auroc_ci"] is None and hernia["average_precision"] is None
    assert hernia["recall"] is None
    assert "no positives" in hernia["note"]
    assert hernia["specificity"] == pytest.approx((p[:, 3] < 0.5).mean())
    text = write_json(tmp_path / "m.json", result).read_text()
    assert _strict_json(text)["per_label"]["Hernia"]["auroc"] is None


def test_label_without_negatives_and_empty_input():
    y = np.ones((6, 1))
    p = np.linspace(0.1, 0.9, 6)[:, None]
    result = metrics.evaluate_predictions(y, p, ["Edema"], [0.5], np.arange(6), n_boot=10)
    assert result["per_label"]["Edema"]["auroc"] is None
    assert result["per_label"]["Edema"]["specificity"] is None
    assert result["per_label"]["Edema"]["average_precision"] == pytest.approx(1.0)
    assert result["mean_auroc"] is None and result["mean_auroc_ci"] is None
    with pytest.raises(ValueError, match="thresholds"):
        metrics.evaluate_predictions(y, p, ["Edema"], [0.5, 0.5], np.arange(6))


@pytest.mark.parametrize("seed", [0, 1])
def test_weighted_auroc_equals_sklearn_on_resampled_rows(seed):
    rng = np.random.default_rng(seed)
    n = 80
    y = rng.integers(0, 2, n)
    p = np.round(rng.random(n), 1)  # many ties
    weights = rng.integers(0, 4, size=(5, n))
    ours = metrics.weighted_auroc(y, p, weights)
    for row, w in zip(ours, weights, strict=True):
        rows = np.repeat(np.arange(n), w)
        assert row == pytest.approx(roc_auc_score(y[rows], p[rows]))
        assert row == pytest.approx(roc_auc_score(y, p, sample_weight=w))
    assert math.isnan(metrics.weighted_auroc(np.ones(4), np.arange(4.0), np.ones((1, 4)))[0])


def test_bootstrap_weights_keep_patients_together():
    patients = np.array([5, 5, 5, 9, 2, 2, 7, 7, 7, 7])
    weights = metrics.patient_bootstrap_weights(patients, n_boot=200, seed=3)
    assert weights.shape == (200, 10)
    for pid in np.unique(patients):
        cols = weights[:, patients == pid]
        assert (cols == cols[:, :1]).all()  # every image of a patient drawn equally often
    # Each replicate draws as many patients as there are (4), counted once per patient.
    per_patient = np.stack([weights[:, np.flatnonzero(patients == pid)[0]] for pid in np.unique(patients)], axis=1)
    assert (per_patient.sum(axis=1) == 4).all()
    assert (weights == 0).any() and (weights >= 2).any()
    assert np.array_equal(weights, metrics.patient_bootstrap_weights(patients, 200, seed=3))


def _clustered_data():
    """Patient 0 owns 60 images (all positive, scored high); 40 other patients own one image each."""
    rng = np.random.default_rng(0)
    y = np.r_[np.ones(60), np.ones(20), np.zeros(20)]
    p = np.r_[rng.uniform(0.6, 1.0, 60), rng.uniform(0.2, 0.8, 20), rng.uniform(0.0, 0.7, 20)]
    patients = np.r_[np.zeros(60, int), np.arange(1, 41)]
    return y[:, None], p[:, None], patients


def test_ci_widens_when_one_patient_owns_many_images():
    y, p, patients = _clustered_data()
    by_patient = metrics.bootstrap_auroc(y, p, patients, n_boot=400, seed=0)
    by_image = metrics.bootstrap_auroc(y, p, np.arange(len(y)), n_boot=400, seed=0)
    point = roc_auc_score(y[:, 0], p[:, 0])
    for ci in (by_patient["per_label"][0], by_image["per_label"][0]):
        assert ci[0] <= point <= ci[1]
    width_patient = np.diff(by_patient["per_label"][0])[0]
    width_image = np.diff(by_image["per_label"][0])[0]
    # Whether patient 0's 60 images are in or out moves the AUROC a lot; an image bootstrap never sees that.
    assert width_patient > 2 * width_image
    assert by_patient["mean"] == pytest.approx(tuple(by_patient["per_label"][0]))


def test_ci_of_a_single_patient_is_the_point_estimate():
    y, p, _ = _clustered_data()
    boot = metrics.bootstrap_auroc(y, p, np.zeros(len(y)), n_boot=50, seed=0)
    point = roc_auc_score(y[:, 0], p[:, 0])
    assert boot["per_label"][0] == pytest.approx([point, point])


def test_bootstrap_is_seeded_and_mean_ci_covers_mean(synthetic):
    y, p, patients = synthetic
    a = metrics.bootstrap_auroc(y, p, patients, n_boot=100, seed=1)
    b = metrics.bootstrap_auroc(y, p, patients, n_boot=100, seed=1)
    c = metrics.bootstrap_auroc(y, p, patients, n_boot=100, seed=2)
    assert np.array_equal(a["per_label"], b["per_label"], equal_nan=True) and a["mean"] == b["mean"]
    assert not np.array_equal(a["per_label"][:3], c["per_label"][:3])
    assert np.isnan(a["per_label"][3]).all() and a["valid"][3] == 0
    assert a["mean"][0] < metrics.mean_auroc(y, p) < a["mean"][1]


def test_subgroups_match_sklearn_on_the_subset(synthetic):
    y, p, patients = synthetic
    views = np.where(np.arange(len(y)) % 3 == 0, "AP", "PA")
    groups = {"view=PA": views == "PA", "view=AP": views == "AP"}
    result = metrics.evaluate_predictions(y, p, LABELS4, [0.5] * 4, patients, subgroups=groups, n_boot=30)
    for name, mask in groups.items():
        sub = result["subgroups"][name]
        assert sub["n_images"] == int(mask.sum())
        assert sub["per_label"]["Effusion"]["auroc"] == pytest.approx(roc_auc_score(y[mask, 2], p[mask, 2]))
        assert sub["per_label"]["Hernia"]["auroc"] is None
        low, high = sub["mean_auroc_ci"]
        assert low <= high


def test_calibration_bins_are_sklearns():
    rng = np.random.default_rng(4)
    p = np.r_[rng.random(300), [0.0, 0.1, 0.2, 1.0]]  # values on bin edges too
    y = (rng.random(p.size) < p).astype(int)
    cal = metrics.calibration(y, p, n_bins=10)
    frac, mean = calibration_curve(y, p, n_bins=10, strategy="uniform")
    ours = [(b["fraction_positive"], b["mean_predicted"]) for b in cal["bins"] if b["count"]]
    assert np.allclose(ours, np.column_stack([frac, mean]))
    assert sum(b["count"] for b in cal["bins"]) == p.size
    # Hand-worked ECE: two bins, [0.1, 0.1] with 0 of 2 positive, [0.9, 0.7] with 2 of 2 -> (2*0.1 + 2*0.2)/4.
    tiny = metrics.calibration(np.array([0, 0, 1, 1]), np.array([0.1, 0.1, 0.9, 0.7]), n_bins=10)
    assert tiny["ece"] == pytest.approx((2 * 0.1 + 2 * 0.2) / 4)


def test_thresholds_unchanged_contract():
    y = np.array([[0, 1], [0, 0], [1, 1], [1, 0], [1, 1]])
    p = np.array([[0.2, 0.8], [0.3, 0.1], [0.7, 0.6], [0.6, 0.5], [0.9, 0.9]])
    t = metrics.choose_thresholds(y, p, rule="f1")
    assert t.shape == (2,)
    for j in range(2):  # the chosen threshold reaches the best F1 over all candidate cut-offs
        best = max(f1_score(y[:, j], p[:, j] >= c) for c in np.unique(p[:, j]))
        assert f1_score(y[:, j], p[:, j] >= t[j]) == pytest.approx(best)
    assert metrics.choose_threshold(np.zeros(3), np.array([0.1, 0.2, 0.3])) == 0.5
    with pytest.raises(ValueError, match="unknown threshold rule"):
        metrics.choose_threshold(y[:, 0], p[:, 0], rule="max")


def _two_positives():
    """2 positive images (two patients) among 58 negatives, one image per patient; the positives score high."""
    rng = np.random.default_rng(5)
    y = np.r_[np.ones(2), np.zeros(58)]
    p = np.r_[0.9, 0.55, rng.uniform(0.0, 0.8, 58)]
    return y[:, None], p[:, None], np.arange(60)


def test_bootstrap_with_two_positives_is_not_estimable_with_its_count():
    y, p, patients = _two_positives()
    boot = metrics.bootstrap_auroc(y, p, patients, n_boot=500, seed=0)
    # With 2 positive patients of 60, about (58/60)^60 = 13 % of the replicates draw no positive: the AUROC exists
    # in fewer than 97.5 % of them, so no interval is given (the defined replicates alone would look narrow).
    defined = int(boot["valid"][0])
    assert 0.80 * 500 < defined < metrics.MIN_DEFINED_FRACTION * 500
    assert np.isnan(boot["per_label"][0]).all() and not boot["estimable"][0]
    summary = metrics.auroc_summary(y, p, ["Hernia"], patients, n_boot=500, seed=0)["per_label"]["Hernia"]
    assert summary["auroc"] == pytest.approx(roc_auc_score(y[:, 0], p[:, 0]))  # the point AUROC is sklearn's
    assert summary["auroc_ci"] is None and summary["auroc_ci_replicates"] == defined
    assert f"defined in {defined} of 500" in summary["auroc_ci_note"]


def test_undefined_replicates_widen_the_interval_instead_of_being_dropped():
    # 1.5 % undefined: estimable, and both bounds are at least as wide as the defined replicates' own interval
    # (an undefined replicate counts at the floor for the low bound and at the ceiling for the high one).
    rng = np.random.default_rng(0)
    values = rng.uniform(0.6, 0.9, 1000)
    values[:15] = np.nan
    low, high = metrics.bootstrap_interval(values)
    dropped = metrics.percentile_interval(values)
    assert low < dropped[0] and high > dropped[1]
    assert low == pytest.approx(np.percentile(np.where(np.isnan(values), 0.0, values), 2.5))
    values[:30] = np.nan  # 3 % undefined: more than the 2.5 % tail, not estimable
    assert all(math.isnan(b) for b in metrics.bootstrap_interval(values))
    assert metrics.bootstrap_interval(np.full(10, 0.7)) == (0.7, 0.7)
