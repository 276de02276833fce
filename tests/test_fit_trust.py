"""fit_trust.py upgrades an existing checkpoint in place: the result still loads weights_only, and holds scope
statistics, calibration, calibrated-scale thresholds and evidence for every label."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from chestxray.checkpoint import load_checkpoint, safe_torch_load
from chestxray.evidence import is_validated
from chestxray.labels import LABELS
from chestxray.trust import TRUST_KEY, Trust, TrustError
from Model_Training import fit_trust


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, nih_dir, tiny_checkpoint):
    """The tiny checkpoint, recording a small split of the sample, upgraded by fit_trust.main."""
    obj = safe_torch_load(tiny_checkpoint)
    obj["meta"]["training"] = {**obj["meta"]["training"],
                               "split": {"val_fraction": 0.3, "seed": 0, "official": True, "limit": 24}}
    path = tmp_path_factory.mktemp("fit") / "model.pth"
    torch.save(obj, path)
    args = fit_trust.get_args_parser().parse_args(
        ["--checkpoint", str(path), "--data-dir", str(nih_dir), "--n-boot", "50", "--device", "cpu"])
    assert fit_trust.main(args) == 0
    return path


def test_upgraded_checkpoint_loads_weights_only_with_every_part(fitted):
    raw = torch.load(fitted, weights_only=True)  # the contract: plain data and tensors only
    assert set(raw) >= {"format", "model", "meta", "train", TRUST_KEY}
    model, meta, _ = load_checkpoint(fitted)
    trust = Trust.from_checkpoint(raw, meta.labels)
    assert trust.scope is not None and np.isfinite(trust.scope.limit) and trust.scope.n_fit == 24
    assert trust.scope.n_limit == 24 and trust.scope.channels == model.classifier.in_features
    assert trust.calibration is not None and trust.calibration.labels == LABELS
    assert set(trust.evidence) == set(LABELS)
    assert all(0.0 <= t <= 1.0 for t in meta.thresholds)
    # 24 validation images cannot give 10 positives of any label: nothing may be called.
    assert not any(is_validated(ev) for ev in trust.evidence.values())
    assert set(trust.report["before"]) == set(LABELS) and trust.report["n_images"] == 24


def test_checkpoint_without_trust_gives_nothing_available(tiny_checkpoint):
    trust = Trust.from_checkpoint(safe_torch_load(tiny_checkpoint), LABELS)
    assert trust.scope is None and trust.calibration is None and trust.evidence is None


def test_malformed_trust_entry_is_refused_with_a_fix(fitted):
    raw = torch.load(fitted, weights_only=True)
    raw[TRUST_KEY]["evidence"].pop("Hernia")
    with pytest.raises(TrustError, match="fit_trust.py"):
        Trust.from_checkpoint(raw, LABELS)


def test_checkpoint_without_a_recorded_split_is_refused(tmp_path, nih_dir, tiny_checkpoint, capsys):
    args = fit_trust.get_args_parser().parse_args(
        ["--checkpoint", str(tiny_checkpoint), "--data-dir", str(nih_dir), "--out", str(tmp_path / "x.pth")])
    assert fit_trust.main(args) == 2
    assert "records no training split" in capsys.readouterr().err
    assert not (tmp_path / "x.pth").exists()
