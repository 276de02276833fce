"""What test.py reports about the user's answers, checked against independent computations: the calls' statistics
against scikit-learn's confusion matrix and a hand-written Wilson interval, ECE and Brier against scikit-learn,
the patient bootstrap, and the metadata baseline against a separately built logistic regression."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy.stats import norm
from sklearn.calibration import calibration_curve
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import brier_score_loss, confusion_matrix, precision_score, roc_auc_score
from support.data import shared, shared_path

from chestxray.baselines import MetadataModel, metadata_baseline, paired_mean_auroc_difference, prevalence_baseline
from chestxray.calls import CALLS, NEGATIVE, NOT_VALIDATED, OUT_OF_SCOPE, POSITIVE
from chestxray.decisions import (
    calibration_errors,
    decision_report,
    label_decision,
    not_validated,
    scope_report,
    weighted_brier,
    weighted_ece,
    wilson,
)
from chestxray.trust.calibration import expected_calibration_error


def wilson_by_hand(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """The Wilson score interval from its closed form (Wilson 1927), written independently of scipy."""
    z = norm.ppf(0.5 + level / 2)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return centre - half, centre + half


@pytest.mark.parametrize("k, n", [(0, 7), (3, 7), (7, 7), (15, 100), (1, 1)])
def test_wilson_interval_matches_the_closed_form(k, n):
    share = wilson(k, n)
    assert share["value"] == k / n
    assert share["ci"] == pytest.approx(wilson_by_hand(k, n), abs=1e-9)
    assert 0.0 <= share["ci"][0] <= share["value"] <= share["ci"][1] <= 1.0
    assert wilson(0, 0) == {"k": 0, "n": 0, "value": None, "ci": None}


def random_calls(seed: int, n: int = 400) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.3).astype(int)
    # Calls that depend on the truth, so every cell of the table is filled.
    calls = np.where(rng.random(n) < 0.2, rng.choice([NOT_VALIDATED, OUT_OF_SCOPE], n),
                     np.where(rng.random(n) < np.where(y == 1, 0.7, 0.2), POSITIVE, NEGATIVE))
    return y, calls


@pytest.mark.parametrize("seed", [0, 1])
def test_call_statistics_equal_an_independent_confusion_matrix(seed):
    y, calls = random_calls(seed)
    d = label_decision(y, calls)
    flagged = (calls == POSITIVE).astype(int)
    # As the user reads it: a no-call is "not flagged".
    tn_user, fp, fn_user, tp = confusion_matrix(y, flagged, labels=[0, 1]).ravel()
    said_negative = calls == NEGATIVE
    tn_neg, _, fn_neg, _ = confusion_matrix(y[said_negative], np.zeros(said_negative.sum()), labels=[0, 1]).ravel()
    assert (d["tp"], d["fp"], d["fn"], d["tn"]) == (tp, fp, fn_neg, tn_neg)
    assert d["no_call_positive"] + d["fn"] == fn_user and d["no_call_negative"] + d["tn"] == tn_user
    assert d["calls"] == {word: int((calls == word).sum()) for word in CALLS}
    expected = {
        "sensitivity": (tp, tp + fn_user), "specificity": (tn_user, tn_user + fp), "ppv": (tp, tp + fp),
        "npv": (tn_neg, tn_neg + fn_neg), "called_positive_rate": (tp + fp, len(y)),
        "prevalence": (y.sum(), len(y)), "accuracy": (tp + tn_user, len(y)),
    }
    for key, (k, n) in expected.items():
        assert (d[key]["k"], d[key]["n"]) == (k, n), key
        assert d[key]["ci"] == pytest.approx(wilson_by_hand(k, n), abs=1e-9), key
    assert d["ppv"]["value"] == pytest.approx(precision_score(y, flagged))


def test_decision_report_on_accepted_images_and_bad_words():
    y, calls = random_calls(2)
    accepted = calls != OUT_OF_SCOPE
    report = decision_report(np.c_[y, 1 - y], np.c_[calls, calls], ["Atelectasis", "Effusion"], accepted,
                             {"Atelectasis": True, "Effusion": False}, {"Effusion": "too few positives"})
    assert report["Atelectasis"]["all"] == label_decision(y, calls)
    assert report["Atelectasis"]["accepted"] == label_decision(y[accepted], calls[accepted])
    assert report["Atelectasis"]["accepted"]["calls"][OUT_OF_SCOPE] == 0
    assert report["Effusion"]["validated"] is False and report["Effusion"]["reason"] == "too few positives"
    assert decision_report(np.c_[y], np.c_[calls], ["Atelectasis"], None)["Atelectasis"]["accepted"] is None
    with pytest.raises(ValueError, match="unknown call"):
        label_decision([0, 1], ["positive", "POSITIVE"])
    with pytest.raises(ValueError, match="2 truths and 1 calls"):
        label_decision([0, 1], ["positive"])


def test_not_validated_labels_and_scope_acceptance():
    calls = np.array([[NOT_VALIDATED, POSITIVE, OUT_OF_SCOPE], [NOT_VALIDATED, NEGATIVE, OUT_OF_SCOPE],
                      [OUT_OF_SCOPE, OUT_OF_SCOPE, OUT_OF_SCOPE]], dtype=object)
    assert not_validated(calls, ["A", "B", "C"]) == ["A"]
    scope = scope_report([True, True, False], calls)
    assert (scope["available"], scope["accepted"], scope["rejected"], scope["total"]) == (True, 2, 1, 3)
    assert scope["acceptance"]["ci"] == pytest.approx(wilson_by_hand(2, 3))
    assert scope["out_of_scope_calls"] == 5
    missing = scope_report([None, None])
    assert (missing["available"], missing["accepted"], missing["acceptance"]) == (False, None, None)


def ece_by_sklearn(y: np.ndarray, p: np.ndarray, n_bins: int = 10) -> float:
    """ECE from scikit-learn's calibration_curve, with the bin counts it leaves out counted the same way."""
    prob_true, prob_pred = calibration_curve(y, p, n_bins=n_bins, strategy="uniform")
    edges = np.linspace(0, 1, n_bins + 1)
    which = np.searchsorted(edges[1:-1], p)  # calibration_curve's binning
    counts = np.bincount(which, minlength=n_bins)
    counts = counts[counts > 0]
    return float(np.sum(counts / len(y) * np.abs(prob_true - prob_pred)))


def test_ece_and_brier_against_sklearn_and_repeated_rows():
    rng = np.random.default_rng(3)
    # Probabilities on the bin edges too (0, 0.1, ..., 1), where the two conventions of a bin's boundary differ.
    p = np.r_[rng.random(445), np.repeat(np.linspace(0, 1, 11), 5)]
    y = (rng.random(500) < p ** 1.5).astype(int)
    unit = np.ones((1, 500))
    assert weighted_ece(y, p, unit)[0] == pytest.approx(ece_by_sklearn(y, p), abs=1e-12)
    assert weighted_ece(y, p, unit)[0] == pytest.approx(expected_calibration_error(y, p), abs=1e-12)
    assert weighted_brier(y, p, unit)[0] == pytest.approx(brier_score_loss(y, p), abs=1e-12)
    w = rng.integers(0, 4, size=(3, 500))
    for row in w:
        repeated_y, repeated_p = np.repeat(y, row), np.repeat(p, row)
        assert weighted_ece(y, p, row[None])[0] == pytest.approx(ece_by_sklearn(repeated_y, repeated_p), abs=1e-12)
        assert weighted_brier(y, p, row[None])[0] == pytest.approx(brier_score_loss(repeated_y, repeated_p))
    assert np.isnan(weighted_ece(y, p, np.zeros((1, 500)))[0])


def test_calibration_intervals_resample_patients_not_images():
    rng = np.random.default_rng(4)
    p = rng.random((60, 2))
    y = (rng.random((60, 2)) < p).astype(int)
    patients = np.arange(60)
    once = calibration_errors(y, p, ["A", "B"], patients, n_boot=200, seed=5)
    # Every patient twice with the same image: a patient bootstrap draws the same patients, so nothing changes; an
    # image bootstrap would treat the copies as independent and narrow the intervals.
    twice = calibration_errors(np.r_[y, y], np.r_[p, p], ["A", "B"], np.r_[patients, patients], n_boot=200, seed=5)
    for name in ("A", "B"):
        for key in ("ece", "ece_ci", "brier", "brier_ci"):
            assert twice[name][key] == pytest.approx(once[name][key]), (name, key)
        low, high = once[name]["ece_ci"]
        assert low < high
        assert once[name]["brier"] == pytest.approx(brier_score_loss(y[:, list("AB").index(name)],
                                                                     p[:, list("AB").index(name)]))
    assert calibration_errors(y, p, ["A", "B"], patients, n_boot=0)["A"]["ece_ci"] is None


def metadata_rows(n: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame({"age": rng.integers(20, 90, n).astype(float), "sex": rng.choice(["M", "F"], n),
                         "view": rng.choice(["PA", "AP"], n), "patient": np.arange(n)})


def test_metadata_baseline_finds_signal_planted_in_the_view_and_a_blind_model_does_not_beat_it():
    train, test = metadata_rows(300, 0), metadata_rows(200, 1)

    def truth(rows):  # label 0: the bedside (AP) films; label 1: noise
        rng = np.random.default_rng(len(rows))
        return np.c_[(rows["view"] == "AP") & (rng.random(len(rows)) < 0.8), rng.random(len(rows)) < 0.3]

    y_train, y_test = truth(train).astype(int), truth(test).astype(int)
    blind = np.random.default_rng(2).random((200, 2))
    summary, prob = metadata_baseline(train, y_train, test, y_test, ["A", "B"], test["patient"], blind, n_boot=200)
    assert summary["per_label"]["A"]["auroc"] == pytest.approx(roc_auc_score(y_test[:, 0], prob[:, 0]))
    assert summary["per_label"]["A"]["auroc"] > 0.85
    assert summary["model_beats"] is False and summary["per_label"]["A"]["model_better"] is False
    diff = summary["model_minus_metadata"]
    assert diff["ci"][0] <= diff["difference"] <= diff["ci"][1] < 0
    assert summary["n_train"] == 300
    # The truth itself beats it.
    perfect, _ = metadata_baseline(train, y_train, test, y_test, ["A", "B"], test["patient"],
                                   y_test + 0.01 * blind, n_boot=200)
    assert perfect["model_beats"] is True


def test_paired_difference_of_a_model_with_itself_is_exactly_zero():
    rng = np.random.default_rng(6)
    y = (rng.random((80, 3)) < 0.4).astype(int)
    p = rng.random((80, 3))
    diff = paired_mean_auroc_difference(y, p, p, np.arange(80) // 2, n_boot=100)
    assert diff["difference"] == 0.0 and diff["ci"] == [0.0, 0.0] and diff["replicates"] == 100


def test_prevalence_baseline_is_the_constant_forecast():
    rng = np.random.default_rng(7)
    y = (rng.random((100, 2)) < [0.1, 0.0]).astype(int)
    base = prevalence_baseline(y, ["A", "B"], np.arange(100), np.array([0.2, 0.05]), n_boot=100)
    assert base["prevalence_from"] == "training split"
    assert base["per_label"]["A"]["brier"] == pytest.approx(brier_score_loss(y[:, 0], np.full(100, 0.2)))
    assert base["per_label"]["A"]["auroc"] == 0.5 and base["per_label"]["B"]["auroc"] is None
    assert base["per_label"]["A"]["all_negative_accuracy"]["value"] == 1 - y[:, 0].mean()
    assert prevalence_baseline(y, ["A", "B"], np.arange(100), n_boot=0)["prevalence_from"] == "evaluated images"


@shared
def test_metadata_baseline_on_the_real_sample_equals_a_separately_built_regression():
    import warnings

    from chestxray.data import load_index, make_splits, targets
    from chestxray.labels import LABELS

    data_dir = shared_path("nih")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        index = load_index(data_dir, allow_missing=True)
        splits = make_splits(index, data_dir)
    train, held = splits["train"], splits["val"]
    y_train, y_held = targets(train, LABELS), targets(held, LABELS)
    prob = MetadataModel(LABELS).fit(train, y_train).predict_proba(held)

    def design(rows: pd.DataFrame) -> np.ndarray:  # by hand: median-imputed standardised age, one-hot sex and view
        age = pd.to_numeric(rows["age"], errors="coerce").astype(float)
        train_age = pd.to_numeric(train["age"], errors="coerce").astype(float)
        age = age.fillna(train_age.median())
        z = (age - train_age.fillna(train_age.median()).mean()) / train_age.fillna(train_age.median()).std(ddof=0)
        return np.c_[z, rows["sex"] == "F", rows["sex"] == "M", rows["view"] == "AP", rows["view"] == "PA"]

    checked = 0
    for j, name in enumerate(LABELS):
        if y_train[:, j].min() == y_train[:, j].max():
            continue
        ours = LogisticRegression(max_iter=1000).fit(design(train), y_train[:, j]).predict_proba(design(held))[:, 1]
        assert prob[:, j] == pytest.approx(ours, abs=1e-3), name
        if 0 < y_held[:, j].sum() < len(held):
            assert roc_auc_score(y_held[:, j], prob[:, j]) == pytest.approx(roc_auc_score(y_held[:, j], ours),
                                                                            abs=2e-3)
            checked += 1
    assert checked >= 8
    # The real metadata: every training view is PA or AP and every sex M or F, so no feature is dropped.
    assert set(train["view"]) == {"PA", "AP"} and set(train["sex"]) == {"M", "F"}
