"""fit_trust.py upgrades an existing checkpoint in place: the result still loads weights_only, and holds scope
statistics, calibration, calibrated-scale thresholds, evidence for every label and the orientation check, fitted on
the calibration split (a checkpoint trained before that split existed: on its validation split, with a warning)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from chestxray.checkpoint import load_checkpoint, safe_torch_load
from chestxray.data import ROLES, load_index, rebuild_splits
from chestxray.fitting import fit_checkpoint
from chestxray.labels import LABELS
from chestxray.trust import TRUST_KEY, Trust, TrustError
from chestxray.trust.evidence import is_validated
from Model_Training import fit_trust


def _fit(tmp_path_factory, nih_dir, tiny_checkpoint, split: dict):
    """The tiny checkpoint, recording `split` of the sample, upgraded by fitting.fit_checkpoint with fit_trust.py's
    arguments -> (path, log)."""
    obj = safe_torch_load(tiny_checkpoint)
    obj["meta"]["training"] = {**obj["meta"]["training"], "split": split}
    path = tmp_path_factory.mktemp("fit") / "model.pth"
    torch.save(obj, path)
    args = fit_trust.get_args_parser().parse_args(
        ["--checkpoint", str(path), "--data-dir", str(nih_dir), "--n-boot", "50", "--device", "cpu",
         "--orientation-images", "16"])
    lines = []
    fit_checkpoint(**vars(args), log=lines.append)
    return path, "\n".join(lines)


@pytest.fixture(scope="module")
def fitted_legacy(tmp_path_factory, nih_dir, tiny_checkpoint):
    """A checkpoint from before the calibration split (its split records no calibration_fraction), upgraded."""
    return _fit(tmp_path_factory, nih_dir, tiny_checkpoint,
                {"val_fraction": 0.3, "seed": 0, "official": True, "limit": 24})


@pytest.fixture(scope="module")
def fitted(fitted_legacy):
    return fitted_legacy[0]


@pytest.fixture(scope="module")
def fitted_three_way(tmp_path_factory, nih_dir, tiny_checkpoint):
    return _fit(tmp_path_factory, nih_dir, tiny_checkpoint,
                {"val_fraction": 0.2, "calibration_fraction": 0.3, "seed": 0, "official": True, "limit": 60})


def test_trust_is_fitted_on_the_calibration_split_not_on_validation(fitted_three_way, nih_dir):
    path, log = fitted_three_way
    raw = torch.load(path, weights_only=True)
    _, meta, _ = load_checkpoint(path)
    trust = Trust.from_checkpoint(raw, meta.labels)
    splits = rebuild_splits(meta, load_index(nih_dir, allow_missing=True), nih_dir)
    n_cal, n_val = len(splits["calibration"]), len(splits["val"])
    assert n_cal == 60 and n_val < n_cal  # the limit caps the calibration split; validation is smaller
    assert trust.report["split"] == "calibration" and trust.report["n_images"] == n_cal
    assert trust.scope.n_fit == len(splits["train"]) and trust.scope.n_limit == n_cal
    assert all(ev["split"] == "calibration" for ev in trust.evidence.values())
    y = splits["calibration"]["findings"].str.contains("Effusion")
    assert trust.evidence["Effusion"]["positives"] == int(y.sum())
    assert trust.evidence["Effusion"]["positive_patients"] == splits["calibration"][y]["patient"].nunique()
    roles = meta.training["split"]["roles"]
    for name in ("train", "val", "calibration"):
        assert roles[name] == {"role": ROLES[name], "images": len(splits[name]),
                               "patients": int(splits[name]["patient"].nunique())}
    assert trust.orientation is not None and trust.orientation.n_fit == 16
    assert "60 calibration images" in log and "warning" not in log


def test_a_checkpoint_without_a_calibration_split_is_fitted_on_validation_with_a_warning(fitted_legacy):
    path, log = fitted_legacy
    assert "trained without a calibration split" in log
    _, meta, _ = load_checkpoint(path)
    trust = Trust.from_checkpoint(torch.load(path, weights_only=True), meta.labels)
    assert trust.report["split"] == "validation"
    roles = meta.training["split"]["roles"]
    assert "calibration" not in roles and "calibration" in roles["val"]["role"] and "epoch" in roles["val"]["role"]


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
    # 24 validation images cannot give 10 positive patients of any label: nothing may be called.
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
