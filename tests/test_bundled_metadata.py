"""The official NIH metadata bundled in samples/nih-metadata: the fallback when a data folder lacks its own."""
from __future__ import annotations

import gzip
import shutil
import warnings
from pathlib import Path

import pandas as pd
import pytest
from support.data import METADATA_DIR, NIH_DIR

from chestxray import data
from chestxray.data import DataError, find_data_entry, load_index, make_splits, official_lists, read_list


def linked_copy(root: Path, names: list[str] | None = None, rename=lambda name: name, csv: bool = True) -> Path:
    """A data folder of symlinks to sample images (all, or `names`), with their labels.csv rows (renamed)."""
    lines = (NIH_DIR / "labels.csv").read_text().splitlines()
    files = {p.name: p for p in NIH_DIR.rglob("*.png")}
    names = names or sorted(files)
    (root / "images").mkdir(parents=True)
    rows = [lines[0]]
    for line in lines[1:]:
        name = line.split(",", 1)[0]
        if name in names:
            (root / "images" / rename(name)).symlink_to(files[name])
            rows.append(rename(name) + line[len(name):])
    if csv:
        (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return root


def test_bundled_lists_are_the_official_files():
    train_val, test = read_list(METADATA_DIR / "train_val_list.txt.gz"), read_list(METADATA_DIR / "test_list.txt.gz")
    assert (len(train_val), len(test)) == (86_524, 25_596) and not train_val & test
    entry = pd.read_csv(METADATA_DIR / "Data_Entry_2017_v2020.csv.gz", usecols=[0])
    assert set(entry["Image Index"]) == train_val | test


def test_nih_images_without_lists_get_the_official_split_from_the_bundle(tmp_path):
    index = load_index(NIH_DIR)
    with pytest.warns(UserWarning, match="official NIH split lists bundled in"):
        bundled = make_splits(index, NIH_DIR, val_fraction=0.1, seed=0)
    # the same split as a folder holding the official lists itself
    own = linked_copy(tmp_path / "own")
    for name in (data.TRAIN_VAL_LIST, data.TEST_LIST):
        (own / name).write_bytes(gzip.decompress((METADATA_DIR / f"{name}.gz").read_bytes()))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # its own lists: no notice
        reference = make_splits(load_index(own), own, val_fraction=0.1, seed=0)
    for name in data.SPLITS:
        assert list(bundled[name]["image"]) == list(reference[name]["image"])
    assert len(bundled["test"]) == 0
    assert len(bundled["train"]) + len(bundled["val"]) + len(bundled["calibration"]) == len(index)


def test_other_images_keep_the_seeded_patient_wise_split(tmp_path):
    root = linked_copy(tmp_path / "d", rename=lambda name: "site2_" + name)
    index = load_index(root)
    assert official_lists(root, index) is None
    with pytest.warns(UserWarning, match="seeded patient-wise split"):
        splits = make_splits(index, root)
    assert len(splits["test"]) > 0


def test_images_without_a_label_file_use_the_bundled_data_entry(tmp_path):
    names = sorted(p.name for p in (NIH_DIR / "images_64").glob("*.png"))[:10]
    root = linked_copy(tmp_path / "d", names, csv=False)
    with pytest.warns(UserWarning, match="using the NIH Data_Entry_2017_v2020.csv bundled in"):
        assert find_data_entry(root) == METADATA_DIR / "Data_Entry_2017_v2020.csv.gz"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        index = load_index(root, allow_missing=True)
    assert sorted(index["image"]) == names
    assert len(index.attrs["missing"]) == 112_120 - 10
    expected = data.read_data_entry(NIH_DIR / "labels.csv").set_index("image").loc[names]
    assert list(index.set_index("image").loc[names, "findings"]) == list(expected["findings"])
    with warnings.catch_warnings(), pytest.raises(DataError, match="112110 of the 112120 images"):
        warnings.simplefilter("ignore")
        load_index(root)


def test_an_empty_folder_says_where_the_images_should_be(tmp_path):
    with warnings.catch_warnings(), pytest.raises(DataError, match="download_nih.py"):
        warnings.simplefilter("ignore")
        load_index(tmp_path)


def test_without_the_bundle_the_folder_must_hold_its_own(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "BUNDLED_METADATA", tmp_path / "not-bundled")
    with pytest.raises(DataError, match="no label file in"):
        find_data_entry(tmp_path)
    assert official_lists(NIH_DIR, load_index(NIH_DIR)) is None


def test_one_list_alone_is_refused_even_with_the_bundle(tmp_path):
    root = linked_copy(tmp_path / "d", sorted(p.name for p in (NIH_DIR / "images_64").glob("*.png"))[:5])
    shutil.copy(METADATA_DIR / "test_list.txt.gz", root / "x.gz")
    (root / data.TEST_LIST).write_bytes(gzip.decompress((root / "x.gz").read_bytes()))
    with pytest.raises(DataError, match="provide both official lists or neither"):
        official_lists(root, load_index(root))


def test_a_list_is_read_again_once_it_changes(tmp_path):
    path = tmp_path / "train_val_list.txt"
    path.write_text("00000001_000.png\n00000002_000.png")
    assert read_list(path) == {"00000001_000.png", "00000002_000.png"}
    path.write_text("00000001_000.png\n00000002_000.png\n00000003_000.png\n")
    assert read_list(path) == {"00000001_000.png", "00000002_000.png", "00000003_000.png"}
    path.unlink()
    with pytest.raises(DataError, match="cannot read split list"):
        read_list(path)
