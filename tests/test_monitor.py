"""The monitor's figures (chestxray.monitor) against independent computations: PSI from its formula, the KS statistic
from the two empirical CDFs, Wilson intervals from their closed form; the reference fitted at training reads an
image's brightness and contrast exactly as the app measures them; alerts fire on a shift and not on the reference's
own distribution."""
from __future__ import annotations

import math
from datetime import UTC, datetime

import numpy as np
import pytest
import torch

from chestxray.monitor import (
    CALLED,
    MEAN_LABEL_RANK,
    OUT_OF_SCOPE,
    AlertLimits,
    Reference,
    agreement,
    called_key,
    check_ends,
    check_span,
    checked_drift,
    drift,
    effective_truth,
    fit_reference,
    input_statistics,
    period_start,
    psi,
    psi_chance,
    quantities,
    wilson,
)
from chestxray.transforms import build_normalize
from chestxray.trust.scope import image_statistics

LABELS = ("A", "B")


def test_psi_matches_its_formula_over_the_reference_deciles():
    rng = np.random.default_rng(0)
    ref, sample = rng.normal(size=5000), rng.normal(0.5, 1.2, size=300)
    edges = np.quantile(ref, np.arange(1, 10) / 10)
    p = np.array([np.sum(np.digitize(ref, edges) == k) for k in range(10)]) + 0.5
    q = np.array([np.sum(np.digitize(sample, edges) == k) for k in range(10)]) + 0.5
    p, q = p / p.sum(), q / q.sum()
    assert psi(ref, sample) == pytest.approx(float(np.sum((q - p) * np.log(q / p))), rel=1e-9)
    assert psi(ref, ref) < 1e-3 < psi(ref, sample)


def test_drift_ks_is_the_largest_gap_between_the_empirical_cdfs():
    rng = np.random.default_rng(1)
    ref = Reference("validation", 2000, {"scope_score": np.sort(rng.normal(size=2000))})
    window = rng.normal(0.3, 1, size=250)
    row = drift(ref, {"scope_score": window})[0]
    grid = np.concatenate([ref.samples["scope_score"], window])
    gap = np.max(np.abs(np.searchsorted(np.sort(window), grid, side="right") / len(window)
                        - np.searchsorted(ref.samples["scope_score"], grid, side="right") / 2000))
    assert row.ks == pytest.approx(gap)


@pytest.mark.parametrize("k, n", [(0, 10), (7, 9), (30, 100), (1, 1)])
def test_wilson_interval_matches_its_closed_form(k, n):
    z = 1.959963984540054
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    assert wilson(k, n) == pytest.approx((max(0.0, centre - half), min(1.0, centre + half)), abs=1e-9)
    assert wilson(0, 0) is None


def test_the_reference_reads_inputs_as_the_app_does():
    """fit_reference takes brightness/contrast from scope.image_statistics of the normalised batch; the app takes
    them from the transformed image (input_statistics): the same numbers."""
    from chestxray.meta import Meta

    meta = Meta.new(arch="resnet18", labels=("Effusion", "Mass"), image_size=64)
    normalize = build_normalize(meta)
    inputs = torch.randint(0, 256, (5, 1, 64, 64), dtype=torch.uint8)
    stats = image_statistics(normalize(inputs), normalize.mean[0], normalize.std[0])
    ref = fit_reference(np.full((5, 2), 0.5), LABELS, image_stats=stats, mean=normalize.mean[0],
                        std=normalize.std[0])
    mine = np.array([input_statistics(x) for x in inputs])
    assert np.allclose(ref.samples["brightness"], np.sort(mine[:, 0]), atol=1e-5)
    assert np.allclose(ref.samples["contrast"], np.sort(mine[:, 1]), atol=1e-5)


def test_the_reference_round_trips_and_keeps_its_rates():
    rng = np.random.default_rng(2)
    probs = rng.uniform(size=(3000, 2))
    y = (rng.uniform(size=(3000, 2)) < [0.1, 0.3]).astype(float)
    scores = rng.normal(size=3000)
    ref = fit_reference(probs, LABELS, y, [0.5, 0.9], scores, 1.0)
    assert len(ref.samples["probability:A"]) == 2000  # a large split is kept as quantiles
    assert ref.prevalence["A"] == pytest.approx(y[:, 0].mean()) and ref.positive_rate["B"] == pytest.approx(
        np.mean(probs[:, 1] >= 0.9))
    assert ref.out_of_scope_rate == pytest.approx(np.mean(scores > 1.0))
    back = Reference.from_dict(ref.to_dict())
    assert back.prevalence == ref.prevalence and np.array_equal(back.samples["scope_score"], ref.samples["scope_score"])
    assert back.thresholds == {"A": 0.5, "B": 0.9} == ref.thresholds
    old = ref.to_dict()
    del old["thresholds"]  # a reference written before thresholds were kept: no called-positive test, still loads
    assert Reference.from_dict(old).thresholds == {} and not any(q.startswith(CALLED) for q in quantities(
        Reference.from_dict(old)))
    with pytest.raises(ValueError):
        Reference.from_dict({"format": 1, "split": "x"})


def test_alerts_fire_on_a_shift_only_once_the_window_is_full():
    rng = np.random.default_rng(3)
    ref = Reference("validation", 5000, {"scope_score": np.sort(rng.normal(size=5000))}, out_of_scope_rate=0.01)
    limits = AlertLimits(window=200)
    same = {"scope_score": rng.normal(size=200), OUT_OF_SCOPE: (rng.uniform(size=200) < 0.01).astype(float)}
    assert not any(row.alert for row in drift(ref, same, limits))
    shifted = {"scope_score": rng.normal(1.0, 1, size=200), OUT_OF_SCOPE: np.zeros(200)}
    assert [row.quantity for row in drift(ref, shifted, limits) if row.alert] == ["scope_score"]
    assert not any(row.alert for row in drift(ref, {k: v[:150] for k, v in shifted.items()}, limits))
    many_out = {"scope_score": rng.normal(size=200), OUT_OF_SCOPE: (np.arange(200) < 12).astype(float)}
    assert [row.quantity for row in drift(ref, many_out, limits) if row.alert] == [OUT_OF_SCOPE]
    with pytest.raises(ValueError):
        AlertLimits(window=5)


def test_a_prevalence_shift_alerts_on_the_called_positive_rate_at_the_reference_threshold():
    """Probabilities that depend on the label: a window with the reference's prevalence does not alert, one with
    twice the positives alerts on the called-positive rate (Fisher's exact test, against an independent count)
    although PSI stays under its limit."""
    from scipy.stats import fisher_exact

    rng = np.random.default_rng(5)

    def split(n: int, prevalence: float) -> tuple[np.ndarray, np.ndarray]:
        y = rng.uniform(size=n) < prevalence
        return np.where(y, rng.beta(5, 2, n), rng.beta(2, 5, n)), y

    p_ref, y_ref = split(3000, 0.1)
    ref = fit_reference(p_ref[:, None], ("A",), y_ref[:, None].astype(float), [0.6])
    assert quantities(ref) == ["probability:A", called_key("A")]
    limits = AlertLimits(window=200)
    same, _ = split(200, 0.1)
    assert not any(row.alert for row in drift(ref, {"probability:A": same, called_key("A"): (same >= 0.6) * 1.0},
                                              limits))
    shifted, _ = split(200, 0.35)
    values = {"probability:A": shifted, called_key("A"): (shifted >= 0.6) * 1.0}
    rows = {row.quantity: row for row in drift(ref, values, limits)}
    k, k_ref = int(np.sum(shifted >= 0.6)), int(np.sum(p_ref >= 0.6))
    assert rows[called_key("A")].p_value == pytest.approx(fisher_exact([[k, 200 - k], [k_ref, 3000 - k_ref]]).pvalue)
    assert rows[called_key("A")].alert and rows[called_key("A")].observed == k / 200
    assert rows["probability:A"].psi < limits.psi and not rows["probability:A"].alert
    assert rows[called_key("A")].expected == pytest.approx(k_ref / 3000)
    half = {key: v[:150] for key, v in values.items()}
    assert not any(row.alert for row in drift(ref, half, limits)), "no alert before the window is full"


def test_psi_beyond_chance_decides_the_alert_not_raw_psi():
    """Windows drawn from the reference's own distribution often pass a raw PSI of 0.15 by chance (a window of 200
    against a split of 248 shows 0.08 on average); the alert subtracts that chance first, so they rarely alert on it,
    while a real shift still does."""
    rng = np.random.default_rng(7)
    ref = Reference("calibration", 248, {"scope_score": np.sort(rng.normal(size=248))})
    limits = AlertLimits(window=200, psi=0.15, alpha=0.9)  # alpha this loose: PSI alone decides
    rows = [drift(ref, {"scope_score": rng.normal(size=200)}, limits)[0] for _ in range(200)]
    chance = psi_chance(248, 200, 10)
    assert chance == pytest.approx(9 * (1 / 248 + 1 / 200))
    assert all(row.psi_chance == pytest.approx(chance) for row in rows)
    assert np.mean([row.psi > limits.psi for row in rows]) > 0.15
    assert np.mean([row.alert for row in rows]) < 0.05
    assert all(row.alert == (row.psi - chance > limits.psi and row.p_value < limits.alpha) for row in rows)
    assert drift(ref, {"scope_score": rng.normal(0.8, 1, size=200)}, limits)[0].alert
    # The chance term is the mean of PSI between two samples of one distribution, measured here independently.
    same = [psi(np.sort(rng.normal(size=248)), rng.normal(size=200)) for _ in range(400)]
    assert np.mean(same) == pytest.approx(chance, rel=0.15)


@pytest.mark.parametrize("answered, step, consecutive, ends", [
    (199, 25, 1, []), (200, 25, 1, [200]), (224, 25, 1, [200]), (225, 25, 1, [225]),
    (260, 25, 3, [200, 225, 250]), (230, 25, 3, [200, 225]), (210, 20, 2, [200])])
def test_checks_fall_on_every_step_th_analysis_once_the_window_is_full(answered, step, consecutive, ends):
    limits = AlertLimits(window=200, step=step, consecutive=consecutive)
    assert check_ends(answered, limits) == ends
    assert check_span(answered, limits) == (answered - ends[0] + 200 if ends else min(answered, 200))


def test_the_default_step_is_an_eighth_of_the_window_and_bad_steps_are_refused():
    assert AlertLimits().step == 25 and AlertLimits(window=20).step == 2
    for bad in ({"step": 0}, {"step": 201}, {"consecutive": 0}):
        with pytest.raises(ValueError, match="step"):
            AlertLimits(window=200, **bad)


def scope_columns(scores: np.ndarray) -> dict:
    """A stream's columns as AnalysisStore.columns gives them: answered, in scope, only the scope score measured."""
    n = len(scores)
    return {"outcome": np.full(n, "answered", dtype=object), "labels": [], "probability": np.empty((n, 0)),
            "in_scope": np.full(n, True, dtype=object), "scope_score": np.asarray(scores, dtype=float),
            "brightness": np.full(n, np.nan), "contrast": np.full(n, np.nan)}


def alert_states(ref: Reference, scores: np.ndarray, limits: AlertLimits) -> dict[int, list[str]]:
    """The alerting quantities at every check of the stream, as the app computes them from the newest rows."""
    columns = scope_columns(scores)
    states = {}
    for answered in range(limits.step, len(scores) + 1, limits.step):
        newest = {k: (v[answered - check_span(answered, limits):answered] if k != "labels" else v)
                  for k, v in columns.items()}
        rows, _ = checked_drift(ref, newest, answered, limits)
        states[answered] = [row.quantity for row in rows if row.alert]
    return states


@pytest.fixture
def scope_reference():
    return Reference("calibration", 1000, {"scope_score": np.sort(np.random.default_rng(11).normal(size=1000))})


def test_a_stream_from_the_reference_distribution_raises_no_alert_at_any_check(scope_reference):
    rng = np.random.default_rng(12)
    states = alert_states(scope_reference, rng.normal(size=4000), AlertLimits())
    assert len(states) == 160 and not any(states.values())
    # the same stream checked with a limit that chance passes does alert: the check can fail
    loose = alert_states(scope_reference, rng.normal(size=4000), AlertLimits(psi=0.001, alpha=0.5))
    assert any(loose.values())


def test_a_shifted_stream_alerts_within_the_window(scope_reference):
    rng = np.random.default_rng(13)
    limits = AlertLimits()
    scores = np.concatenate([rng.normal(size=200 + 10), rng.normal(1.0, 1, size=400)])  # shift after 210
    states = alert_states(scope_reference, scores, limits)
    first = min(answered for answered, quantities_ in states.items() if quantities_)
    assert 210 < first <= 210 + limits.window and states[first] == ["scope_score"]
    assert first % limits.step == 0  # only at a check


def test_a_single_check_blip_does_not_alert_when_alerts_must_persist(scope_reference):
    """Non-overlapping windows of 100: one shifted window alerts at one check; asking for two checks in a row
    ignores it, and still alerts on a shift that lasts."""
    rng = np.random.default_rng(14)
    blip = np.concatenate([rng.normal(size=100), rng.normal(1.5, 1, size=100), rng.normal(size=200)])
    once, twice = (AlertLimits(window=100, step=100, consecutive=k) for k in (1, 2))
    assert [a for a, q in alert_states(scope_reference, blip, once).items() if q] == [200]
    assert not any(alert_states(scope_reference, blip, twice).values())
    lasting = np.concatenate([rng.normal(size=100), rng.normal(1.5, 1, size=300)])
    assert [a for a, q in alert_states(scope_reference, lasting, twice).items() if q] == [300, 400]


def test_checked_drift_refuses_too_few_rows_and_waits_for_the_first_check(scope_reference):
    limits = AlertLimits()
    scores = np.random.default_rng(15).normal(3, 1, size=260)  # far off: alerts once checked
    with pytest.raises(ValueError, match="newest 210"):
        checked_drift(scope_reference, scope_columns(scores[-100:]), 260, limits)
    rows, n = checked_drift(scope_reference, scope_columns(scores[:150]), 150, limits)
    assert n == 150 and not any(row.alert for row in rows)
    rows, n = checked_drift(scope_reference, scope_columns(scores[-210:]), 260, limits)
    assert n == 200 and [row.quantity for row in rows if row.alert] == ["scope_score"]
    assert rows[0].n == 200


def test_agreement_turns_reviews_into_ppv_and_sensitivity():
    reviews = [("A", "positive", True, None), ("A", "positive", False, None), ("A", "positive", None, "present"),
               ("A", "negative", False, None), ("A", "negative", True, None), ("A", "not validated", True, None),
               ("B", "negative", None, None)]
    a, b = agreement(reviews, LABELS)
    # TP: agree-positive, truth-present-positive; FP: disagree-positive; FN: disagree-negative
    assert (a.reviews, a.agree, a.disagree) == (6, 3, 2)
    assert (a.ppv, a.ppv_n) == (pytest.approx(2 / 3), 3) and (a.sensitivity, a.sensitivity_n) == (
        pytest.approx(2 / 3), 3)
    assert a.ppv_ci == wilson(2, 3) and b.ppv is None and b.ppv_ci is None
    assert effective_truth("negative", True, None) is False and effective_truth("positive", None, "absent") is False


def test_periods_start_on_the_day_and_on_monday():
    when = datetime(2026, 12, 5, 17, 3, tzinfo=UTC)  # a Saturday
    assert period_start(when, "day") == datetime(2026, 12, 5, tzinfo=UTC)
    assert period_start(when, "week") == datetime(2026, 11, 30, tzinfo=UTC)


def test_fit_trust_stores_the_reference_of_its_calibration_split(tiny_checkpoint, nih_dir):
    """The reference comes from the same pass as the calibration: its probabilities are the calibrated ones, its
    brightness and contrast those the app measures; a checkpoint without one still loads."""
    from chestxray.checkpoint import load_checkpoint
    from chestxray.data import XrayDataset, collate_batch, load_index
    from chestxray.transforms import build_transform
    from chestxray.trust import Trust, fit_trust

    model, meta, _ = load_checkpoint(tiny_checkpoint)
    index = load_index(nih_dir, allow_missing=True)
    small = index[index["path"].astype(str).str.contains(r"[/\\]images_64[/\\]")].iloc[:40].reset_index(drop=True)
    dataset = XrayDataset(small, meta.labels, build_transform(meta))
    loader = torch.utils.data.DataLoader(dataset, batch_size=20, collate_fn=collate_batch)
    trust, _ = fit_trust(model, meta.labels, loader, loader, small["patient"].to_numpy(), "cpu",
                         build_normalize(meta), n_boot=10)
    ref = trust.reference
    assert ref.n_images == 40 and set(ref.samples) == {*(f"probability:{n}" for n in meta.labels), "scope_score",
                                                       "brightness", "contrast", MEAN_LABEL_RANK}
    inputs = [dataset[i][0] for i in range(len(dataset))]
    assert np.allclose(ref.samples["brightness"], np.sort([input_statistics(x)[0] for x in inputs]), atol=1e-5)
    targets = np.stack([dataset[i][1].numpy() for i in range(len(dataset))])
    assert ref.prevalence == pytest.approx(dict(zip(meta.labels, targets.mean(axis=0))))
    assert ref.out_of_scope_rate == pytest.approx(np.mean(ref.samples["scope_score"] > trust.scope.limit))
    stored = trust.to_dict()
    assert Trust.from_checkpoint({"trust": stored}, meta.labels).reference.prevalence == ref.prevalence
    del stored["reference"]  # a checkpoint fitted before the monitor existed
    assert Trust.from_checkpoint({"trust": stored}, meta.labels).reference is None
