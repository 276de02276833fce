"""train.py --stratify-split: patients assigned to the splits by scikit-learn's StratifiedGroupKFold on view position x
any finding (data.make_splits(stratify=True)); off by default, recorded in the checkpoint's split, rebuilt from it."""
from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from support.data import shared, shared_path
from support.training import run_main, small_run

from chestxray.checkpoint import load_checkpoint
from chestxray.data import DataError, load_index, make_splits, read_data_entry, rebuild_splits, split_spec
from chestxray.labels import NO_FINDING
from chestxray.meta import CheckpointError, Meta, SplitSpec

SHARES = {"AP views": lambda df: (df["view"] == "AP").mean(),
          "with a finding": lambda df: (df["findings"] != NO_FINDING).mean()}


def _meta(split: dict) -> Meta:
    return Meta.new(arch="resnet18", image_size=64, training={"split": split})


def _splits(index, folder, seed: int, stratify: bool) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the bundled official lists standing in for the sample's
        return make_splits(index, folder, val_fraction=0.1, seed=seed, calibration_fraction=0.4, stratify=stratify)


@shared
def test_stratified_split_is_patient_disjoint_and_closer_to_the_whole_in_view_mix_and_finding_share():
    folder = shared_path("nih")
    index = read_data_entry(folder / "labels.csv")  # 937 images of 498 patients, all in the train_val list
    deviation = {}
    for stratify in (False, True):
        per_seed = []
        for seed in range(10):
            splits = _splits(index, folder, seed, stratify)
            parts = [splits[name] for name in ("train", "val", "calibration")]
            patients = [set(df["patient"]) for df in parts]
            assert all(not (a & b) for i, a in enumerate(patients) for b in patients[i + 1:])
            assert sorted(np.concatenate([df["image"] for df in parts])) == sorted(index["image"])
            per_seed.append([abs(share(df) - share(index)) for share in SHARES.values() for df in parts])
        deviation[stratify] = np.mean(per_seed, axis=0)  # (shares x splits,), averaged over the seeds
    # Every split's view mix and finding share, on average over seeds, closer to the whole's than the plain split's.
    assert (deviation[True] < deviation[False]).all(), deviation
    assert deviation[True].max() < 0.02 < deviation[False].max()


def test_stratified_split_keeps_the_fractions_of_patients(nih_dir):
    index = read_data_entry(nih_dir / "labels.csv")
    splits = _splits(index, nih_dir, 0, stratify=True)
    n = index["patient"].nunique()
    assert abs(splits["val"]["patient"].nunique() / n - 0.1) < 0.05
    assert abs(splits["calibration"]["patient"].nunique() / n - 0.4) < 0.05
    again = _splits(index, nih_dir, 0, stratify=True)
    assert all(again[k]["image"].tolist() == splits[k]["image"].tolist() for k in splits)
    other = _splits(index, nih_dir, 1, stratify=True)
    assert set(other["val"]["image"]) != set(splits["val"]["image"])


def test_stratify_is_off_by_default_recorded_and_rebuilt(nih_dir):
    index = read_data_entry(nih_dir / "labels.csv")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = split_spec(index, nih_dir, 0.1, 0, calibration_fraction=0.4)
        stratified = split_spec(index, nih_dir, 0.1, 0, calibration_fraction=0.4, stratify=True)
        assert plain.stratify is False and stratified.to_dict()["stratify"] is True
        # A checkpoint from before the option records no "stratify": it rebuilds today's plain split.
        older = {k: v for k, v in plain.to_dict().items() if k != "stratify"}
        assert SplitSpec.from_dict(older) == plain
        rebuilt_older = rebuild_splits(_meta(older), index, nih_dir)
        rebuilt_stratified = rebuild_splits(_meta(stratified.to_dict()), index, nih_dir)
    for name, df in _splits(index, nih_dir, 0, stratify=False).items():
        assert rebuilt_older[name]["image"].tolist() == df["image"].tolist()
    for name, df in _splits(index, nih_dir, 0, stratify=True).items():
        assert rebuilt_stratified[name]["image"].tolist() == df["image"].tolist()
    assert set(rebuilt_stratified["val"]["image"]) != set(rebuilt_older["val"]["image"])


def test_stratified_split_refuses_fractions_that_are_not_whole_folds(nih_dir):
    index = read_data_entry(nih_dir / "labels.csv")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(DataError, match=r"whole multiples of 1/n .* got 0.123, 0.4"):
            make_splits(index, nih_dir, val_fraction=0.123, calibration_fraction=0.4, stratify=True)
    with pytest.raises(CheckpointError, match="stratify"):
        SplitSpec(official=True, stratify="yes")


@pytest.mark.slow(3)
def test_train_stratify_split_is_recorded_in_the_checkpoint_and_args(nih_dir, tmp_path, capsys):
    argv = small_run(nih_dir, "--run-dir", str(tmp_path / "run"), "--output", str(tmp_path / "x.pth"),
                     "--stratify-split", "--calibration-fraction", "0.4", "--no-trust", limit=16, epochs=1)
    rc, _, err = run_main(argv, capsys)
    assert rc == 0, err
    _, meta, _ = load_checkpoint(tmp_path / "x.pth")
    assert meta.split.stratify is True and meta.split.calibration_fraction == 0.4
    assert json.loads((tmp_path / "run" / "args.json").read_text())["stratify_split"] is True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rebuilt = rebuild_splits(meta, load_index(nih_dir), nih_dir)
    roles = meta.training["split"]["roles"]
    assert {name: roles[name]["images"] for name in ("train", "val", "calibration")} == \
        {name: len(rebuilt[name]) for name in ("train", "val", "calibration")}
