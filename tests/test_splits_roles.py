"""The three-way patient-wise split of the non-test data (train / validation / calibration), the roles recorded with
it, and checkpoints from before the calibration split, which still load and rebuild the split they were trained on."""
from __future__ import annotations

import warnings

import pandas as pd
import pytest

from chestxray import data
from chestxray.data import (
    LEGACY_VAL_ROLE,
    ROLES,
    DataError,
    check_patient_disjoint,
    make_splits,
    read_data_entry,
    rebuild_splits,
    split_roles,
    split_spec,
    with_roles,
)
from chestxray.meta import CheckpointError, Meta, SplitSpec


@pytest.fixture(scope="module")
def full_index(metadata_dir) -> pd.DataFrame:
    return read_data_entry(metadata_dir / "Data_Entry_2017_v2020.csv.gz")


def _meta(split: dict | None) -> Meta:
    return Meta.new(arch="resnet18", image_size=64, training={} if split is None else {"split": split})


def test_official_split_carves_validation_and_calibration_from_train_val_by_patient(full_index, official_lists_dir):
    splits = make_splits(full_index, official_lists_dir, val_fraction=0.1, seed=0, calibration_fraction=0.15)
    assert list(splits) == ["train", "val", "calibration", "test"]
    check_patient_disjoint(splits)
    train_val = data.read_list(official_lists_dir / "train_val_list.txt")
    assert set().union(*(set(splits[k]["image"]) for k in ("train", "val", "calibration"))) == train_val
    patients = {k: splits[k]["patient"].nunique() for k in splits}
    total = patients["train"] + patients["val"] + patients["calibration"]
    assert patients["calibration"] / total == pytest.approx(0.15, abs=0.01)
    assert patients["val"] / total == pytest.approx(0.10, abs=0.01)
    # Validation is the same patients whatever the calibration fraction: calibration comes out of train.
    two_way = make_splits(full_index, official_lists_dir, val_fraction=0.1, seed=0, calibration_fraction=0.0)
    assert two_way["val"]["image"].tolist() == splits["val"]["image"].tolist() and two_way["calibration"].empty
    assert set(two_way["train"]["image"]) == set(splits["train"]["image"]) | set(splits["calibration"]["image"])


def test_roles_record_each_split_with_image_and_patient_counts(full_index, official_lists_dir):
    splits = make_splits(full_index, official_lists_dir, calibration_fraction=0.2)
    spec = SplitSpec(official=True, calibration_fraction=0.2)
    roles = split_roles(splits, spec)
    for name in ("train", "val", "calibration", "test"):
        assert roles[name] == {"role": ROLES[name], "images": len(splits[name]),
                               "patients": splits[name]["patient"].nunique()}
    assert roles["val"]["role"] == "epoch selection"
    assert roles["calibration"]["role"] == "calibration, thresholds, evidence, scope limit"
    # The recorded dict (spec + roles) is what meta.training["split"] holds; the roles do not disturb the spec.
    recorded = with_roles(spec, splits)
    assert SplitSpec.from_dict(recorded) == spec
    assert _meta(recorded).split == spec


def test_a_checkpoint_from_before_the_calibration_split_rebuilds_its_own_split(nih_dir):
    index = data.load_index(nih_dir)
    old = {"val_fraction": 0.1, "seed": 0, "official": True, "limit": None}  # as such checkpoints recorded it
    meta = _meta(old)
    assert meta.split.calibration_fraction == 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rebuilt = rebuild_splits(meta, index, nih_dir)
        two_way = make_splits(index, nih_dir, 0.1, 0, calibration_fraction=0.0)
    assert rebuilt["train"]["image"].tolist() == two_way["train"]["image"].tolist()  # trained on exactly these
    # Its trust statistics were fitted on validation: "calibration" is that same frame, marked, not a fresh split.
    assert rebuilt["calibration"]["image"].tolist() == rebuilt["val"]["image"].tolist()
    assert rebuilt["calibration"].attrs["same_as"] == "val"
    check_patient_disjoint(rebuilt)  # the marked copy is not counted as a leak
    roles = split_roles(rebuilt, meta.split)
    assert "calibration" not in roles and roles["val"]["role"] == LEGACY_VAL_ROLE


def test_new_training_spec_is_three_way_and_rebuilds_non_empty_calibration(nih_dir):
    index = data.load_index(nih_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        spec = split_spec(index, nih_dir, 0.1, 0, limit=None)
        rebuilt = rebuild_splits(_meta(spec.to_dict()), index, nih_dir)
    assert spec.calibration_fraction == 0.15 and len(rebuilt["calibration"]) > 0
    assert not rebuilt["calibration"].attrs.get("same_as")
    check_patient_disjoint(rebuilt)


@pytest.mark.parametrize("fractions, message", [
    ({"val_fraction": 0.5, "calibration_fraction": 0.5}, "calibration fraction"),
    ({"val_fraction": 0.1, "calibration_fraction": -0.1}, "calibration fraction"),
])
def test_fractions_that_leave_no_training_data_are_refused(full_index, official_lists_dir, fractions, message):
    with pytest.raises(DataError, match=message):
        make_splits(full_index, official_lists_dir, **fractions)
    with pytest.raises(CheckpointError, match="calibration_fraction"):
        SplitSpec(official=True, **fractions)


def test_without_lists_test_val_and_calibration_must_leave_training_data(full_index, tmp_path, monkeypatch):
    monkeypatch.setattr(data, "BUNDLED_METADATA", tmp_path / "not-bundled")
    with pytest.raises(DataError, match="leave no training data"):
        make_splits(full_index, tmp_path, val_fraction=0.3, test_fraction=0.4, calibration_fraction=0.3)
