"""The pooled drift quantity, the mean label rank (chestxray.monitor): computed as its definition says (against
scipy's percentileofscore), kept in the checkpoint's reference, skipped for a reference written before it, and
alerting on a stream where every label's probability moves a little, too little for any label alone, while an
unshifted stream does not."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import percentileofscore

from chestxray.monitor import (
    MEAN_LABEL_RANK,
    AlertLimits,
    Reference,
    check_span,
    checked_drift,
    drift,
    fit_reference,
    mean_label_rank,
    probability_key,
    quantities,
    window_values,
)

LABELS = tuple(f"L{j}" for j in range(10))


def draw(rng: np.random.Generator, n: int, burden: float = 0.0) -> np.ndarray:
    """(n, 10) probabilities that share a per-image disease burden (mean `burden`) under much label-own noise: a
    shift of the burden moves every label's distribution a little and the mean label rank more."""
    z = rng.normal(burden, 1.0, size=(n, 1))
    return 1 / (1 + np.exp(-(-1.5 + 0.5 * z + rng.normal(size=(n, len(LABELS))))))


def columns(probabilities: np.ndarray, labels=LABELS) -> dict:
    """A stream's columns as AnalysisStore.columns gives them: answered, label probabilities, no input statistics."""
    n = len(probabilities)
    return {"outcome": np.full(n, "answered", dtype=object), "labels": list(labels),
            "probability": np.asarray(probabilities, dtype=float), "in_scope": np.full(n, True, dtype=object),
            "scope_score": np.full(n, np.nan), "brightness": np.full(n, np.nan), "contrast": np.full(n, np.nan)}


def test_the_mean_label_rank_matches_its_definition():
    rng = np.random.default_rng(0)
    ref_probs = np.round(rng.uniform(size=(300, 3)), 2)  # rounded: ties, which count half
    ref_probs[:, 2] = 0.1  # a label the calibration made constant: every image at its middle rank
    window = np.round(rng.uniform(size=(40, 3)), 2)
    window[0, 1] = np.nan  # a label the row has no probability for
    samples = [np.sort(ref_probs[:, j]) for j in range(3)]
    ranks = mean_label_rank(window, samples)
    independent = [np.mean([percentileofscore(ref_probs[:, j], row[j], kind="mean") / 100 for j in range(3)])
                   for row in window[1:]]
    assert ranks[1:] == pytest.approx(independent, abs=1e-12)
    assert np.isnan(ranks[0])
    assert mean_label_rank(np.array([[0.1, 0.1, 0.1]]), samples)[0] == pytest.approx(
        np.mean([np.mean(ref_probs[:, j] < 0.1) + np.mean(ref_probs[:, j] == 0.1) / 2 for j in range(3)]))


def test_the_reference_keeps_the_mean_label_rank_of_its_split():
    rng = np.random.default_rng(1)
    probs = draw(rng, 500)
    ref = fit_reference(probs, LABELS)
    within = [[percentileofscore(probs[:, j], p, kind="mean") / 100 for j, p in enumerate(row)] for row in probs]
    assert np.allclose(ref.samples[MEAN_LABEL_RANK], np.sort(np.mean(within, axis=1)))
    assert MEAN_LABEL_RANK in quantities(ref)


def test_the_mean_label_rank_round_trips_through_the_checkpoint(tmp_path):
    from chestxray.trust import Trust

    ref = fit_reference(draw(np.random.default_rng(2), 400), LABELS)
    torch.save({"trust": Trust(reference=ref).to_dict()}, tmp_path / "trust.pth")
    back = Trust.from_checkpoint(torch.load(tmp_path / "trust.pth", weights_only=True), LABELS).reference
    assert np.array_equal(back.samples[MEAN_LABEL_RANK], ref.samples[MEAN_LABEL_RANK])
    assert quantities(back) == quantities(ref)


def test_a_reference_written_before_the_mean_label_rank_is_still_monitored():
    rng = np.random.default_rng(3)
    new = fit_reference(draw(rng, 400), LABELS)
    old = new.to_dict()
    del old["samples"][MEAN_LABEL_RANK]
    ref = Reference.from_dict(old)
    assert MEAN_LABEL_RANK not in quantities(ref)
    values = window_values(columns(draw(rng, 200, burden=3.0)), ref)
    assert MEAN_LABEL_RANK not in values
    rows = drift(ref, values)
    assert [row.quantity for row in rows] == [probability_key(label) for label in LABELS]
    assert any(row.alert for row in rows), "a far shift still alerts on the label probabilities"


def test_the_mean_label_rank_needs_every_label_of_the_reference():
    ref = fit_reference(draw(np.random.default_rng(4), 400), LABELS)
    values = window_values(columns(draw(np.random.default_rng(5), 50)[:, :9], LABELS[:9]), ref)
    assert MEAN_LABEL_RANK not in values and probability_key("L0") in values


def alert_states(ref: Reference, probabilities: np.ndarray, limits: AlertLimits) -> dict[int, dict]:
    """The drift rows at every check of the stream, as the app computes them from the newest rows."""
    stream = columns(probabilities)
    states = {}
    for answered in range(limits.step, len(probabilities) + 1, limits.step):
        newest = {k: (v[answered - check_span(answered, limits):answered] if k != "labels" else v)
                  for k, v in stream.items()}
        states[answered] = {row.quantity: row for row in checked_drift(ref, newest, answered, limits)[0]}
    return states


def test_a_small_shift_of_every_label_alerts_on_the_mean_label_rank_only():
    """Every label's probability moves a little (each alone under the alert limit at every check), the mean label
    rank moves enough to alert within one window of the shift; the same stream unshifted never alerts."""
    rng = np.random.default_rng(7)
    ref = fit_reference(draw(rng, 3000), LABELS)
    limits = AlertLimits()
    start = 210
    shifted = alert_states(ref, np.concatenate([draw(rng, start), draw(rng, 400, burden=0.7)]), limits)
    alerting = {answered: [q for q, row in rows.items() if row.alert] for answered, rows in shifted.items()}
    first = min(answered for answered, names in alerting.items() if names)
    assert start < first <= start + limits.window
    assert alerting[first] == [MEAN_LABEL_RANK]
    for rows in shifted.values():
        assert not any(rows[probability_key(label)].alert for label in LABELS)
        assert all(rows[probability_key(label)].psi - rows[probability_key(label)].psi_chance < limits.psi
                   for label in LABELS), "each label alone stays under the PSI limit"
    same = alert_states(ref, draw(rng, 2000), limits)
    assert len(same) == 80 and not any(row.alert for rows in same.values() for row in rows.values())
