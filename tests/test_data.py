"""The NIH index, splits, dataset and resized cache, on the real sample and the full metadata files."""
from __future__ import annotations

import gzip
import multiprocessing
import shutil
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from support.data import DATA_ENTRY_CSV, shared, shared_path

from chestxray import data
from chestxray.data import (
    DataError,
    MissingImages,
    ResizedCache,
    Unreadable,
    XrayDataset,
    check_patient_disjoint,
    collate_batch,
    find_data_entry,
    find_unreadable,
    index_images,
    load_index,
    make_splits,
    read_data_entry,
    resized_uint8,
    subsample,
    targets,
)
from chestxray.imaging import read_xray
from chestxray.labels import CHESTXRAY8_LABELS, LABELS
from chestxray.meta import Meta
from chestxray.transforms import build_transform


def write_data_dir(root: Path, nih_dir: Path, names: list[str], layout: str = "flat") -> Path:
    """A data folder with the labels.csv rows of `names` and links to their real images in the given layout."""
    root.mkdir(parents=True, exist_ok=True)
    lines = (nih_dir / "labels.csv").read_text().splitlines()
    (root / "labels.csv").write_text("\n".join([lines[0]] + [ln for ln in lines[1:] if ln.split(",")[0] in names]))
    index = index_images(nih_dir)
    for k, name in enumerate(names):
        if layout == "flat":
            folder = root
        elif layout == "kaggle":
            folder = root / f"images_{k % 3 + 1:03d}" / "images"
        else:  # nested, several levels
            folder = root / "a" / f"b{k % 2}" / "c"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / name).symlink_to(index[name])
    return root


@pytest.fixture(scope="module")
def sample_names(nih_dir) -> list[str]:
    """Six real images: four 64 px and two full-resolution ones."""
    small = sorted(p.name for p in (nih_dir / "images_64").iterdir())[:4]
    full = sorted(p.name for p in (nih_dir / "images").iterdir())[:2]
    return small + full


# ---------------------------------------------------------------------------------------------------------------
# Index


def test_read_data_entry_sample(nih_dir):
    df = read_data_entry(nih_dir / "labels.csv")
    assert len(df) == 283
    assert list(df.columns) == ["image", "findings", "patient", "age", "sex", "view", "follow_up"]
    first = df.iloc[0]
    assert (first["image"], first["findings"], first["patient"], first["age"], first["sex"], first["view"],
            first["follow_up"]) == ("00000001_000.png", "Cardiomegaly", 1, 57, "M", "PA", 0)
    assert set(df["sex"]) == {"M", "F"} and set(df["view"]) == {"PA", "AP"}
    assert df["patient"].nunique() == 252  # samples/README.md's count


def test_read_data_entry_2017_trailing_column_and_age_suffix(nih_dir, tmp_path):
    lines = (nih_dir / "labels.csv").read_text().splitlines()[:4]
    # The 2017 file ends the header and every row with a comma; some copies write ages as "057Y".
    quirky = [lines[0] + ","] + [line.replace(",57,", ",057Y,") + "," for line in lines[1:]]
    (tmp_path / "Data_Entry_2017.csv").write_text("\n".join(quirky) + "\n")
    df = read_data_entry(tmp_path / "Data_Entry_2017.csv")
    expected = read_data_entry(nih_dir / "labels.csv").iloc[:3]
    pd.testing.assert_frame_equal(df, expected)


def test_v2020_data_entry_is_found_first_and_parsed_like_the_sample(nih_dir, tmp_path):
    # The real v2020 file's first rows (its header has commas inside brackets) beside a labels.csv that disagrees:
    # the v2020 file wins, and its rows parse to the same values as the sample's labels.csv rows.
    sample = set(read_data_entry(nih_dir / "labels.csv")["image"])
    full = gzip.decompress(DATA_ENTRY_CSV.read_bytes()).decode().splitlines()
    lines = [full[0]] + [line for line in full[1:200] if line.split(",")[0] in sample][:5]
    (tmp_path / "Data_Entry_2017_v2020.csv").write_text("\n".join(lines) + "\n")
    (tmp_path / "labels.csv").write_text(lines[0] + "\n")
    assert find_data_entry(tmp_path).name == "Data_Entry_2017_v2020.csv"
    df = read_data_entry(find_data_entry(tmp_path))
    expected = read_data_entry(nih_dir / "labels.csv").set_index("image").loc[df["image"]].reset_index()
    assert len(df) == 5 and df["image"].tolist() == [line.split(",")[0] for line in lines[1:]]
    pd.testing.assert_frame_equal(df, expected[df.columns], check_dtype=False)


def test_find_data_entry_order_and_error(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "BUNDLED_METADATA", tmp_path / "not-bundled")  # tests/test_bundled_metadata.py
    with pytest.raises(DataError, match="expected one of Data_Entry_2017_v2020.csv, Data_Entry_2017.csv, labels.csv"):
        find_data_entry(tmp_path)
    (tmp_path / "labels.csv").write_text("x")
    assert find_data_entry(tmp_path).name == "labels.csv"
    (tmp_path / "Data_Entry_2017.csv").write_text("x")
    assert find_data_entry(tmp_path).name == "Data_Entry_2017.csv"
    (tmp_path / "Data_Entry_2017_v2020.csv").write_text("x")
    assert find_data_entry(tmp_path).name == "Data_Entry_2017_v2020.csv"
    with pytest.raises(DataError, match="data folder not found"):
        find_data_entry(tmp_path / "nope")


HEADER = "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position\n"


@pytest.mark.parametrize("body, message", [
    ("a.png,Cardiomegaly,0,1,50,M,PA\na.png,No Finding,1,1,51,M,PA\n", "listed more than once, e.g. a.png"),
    ("a.png,Cardiomegaly,0,x,50,M,PA\n", "Patient ID is not an integer.*a.png"),
    ("a.png,Cardiomegally,0,1,50,M,PA\n", "Finding Labels of a.png.*'Cardiomegally'"),
])
def test_read_data_entry_rejects_bad_rows(tmp_path, body, message):
    (tmp_path / "labels.csv").write_text(HEADER + body)
    with pytest.raises(DataError, match=message):
        read_data_entry(tmp_path / "labels.csv")


def test_read_data_entry_missing_column(tmp_path):
    (tmp_path / "labels.csv").write_text("Image Index,Finding Labels\na.png,Mass\n")
    with pytest.raises(DataError, match="lacks column.*Patient ID"):
        read_data_entry(tmp_path / "labels.csv")


@pytest.mark.parametrize("layout", ["flat", "kaggle", "nested"])
def test_load_index_finds_images_in_any_layout(nih_dir, tmp_path, sample_names, layout):
    root = write_data_dir(tmp_path / layout, nih_dir, sample_names, layout)
    df = load_index(root)
    assert sorted(df["image"]) == sorted(sample_names)
    assert all(Path(p).name == name and Path(p).is_file() for name, p in zip(df["image"], df["path"]))


def test_index_covers_the_whole_sample(nih_dir):
    df = load_index(nih_dir)
    assert len(df) == 283 and df["path"].notna().all()


@shared
def test_index_covers_the_whole_shared_sample():
    df = load_index(shared_path("nih"))
    assert len(df) == 937 and df["path"].notna().all() and df["patient"].nunique() == 498


def test_missing_images_stop_with_count_or_are_skipped(nih_dir, tmp_path, sample_names):
    root = write_data_dir(tmp_path / "d", nih_dir, sample_names)
    gone = sorted(sample_names)[:2]
    for name in gone:
        (root / name).unlink()
    with pytest.raises(MissingImages, match=rf"2 of the 6 images .* missing .*{gone[0]}.*allow_missing=True") as err:
        load_index(root)
    assert isinstance(err.value, DataError) and err.value.missing == gone and "--" not in str(err.value)
    with pytest.warns(UserWarning, match="skipping 2 of the 6"):
        df = load_index(root, allow_missing=True)
    assert len(df) == 4 and not set(gone) & set(df["image"])
    assert df.attrs["missing"] == gone


def test_duplicate_file_names_warn_and_pick_first(nih_dir, tmp_path, sample_names):
    root = write_data_dir(tmp_path / "d", nih_dir, sample_names[:2])
    (root / "zz").mkdir()
    (root / "zz" / sample_names[0]).symlink_to(root / sample_names[0])
    with pytest.warns(UserWarning, match="several folders"):
        files = index_images(root)
    assert files[sample_names[0]] == root / sample_names[0]


def test_targets_parse_findings_in_label_order():
    df = pd.DataFrame({"findings": ["Cardiomegaly|Emphysema", "No Finding", "Hernia|Atelectasis"]})
    y = targets(df, LABELS)
    assert y.dtype == np.float32 and y.shape == (3, 14)
    assert np.flatnonzero(y[0]).tolist() == [1, 10]
    assert y[1].sum() == 0
    assert np.flatnonzero(y[2]).tolist() == [0, 13]
    assert targets(df, CHESTXRAY8_LABELS)[0].tolist() == [0, 1, 0, 0, 0, 0, 0, 0]  # Emphysema is not in the 8


# ---------------------------------------------------------------------------------------------------------------
# Splits


@pytest.fixture(scope="module")
def full_index() -> pd.DataFrame:
    return read_data_entry(DATA_ENTRY_CSV)


def test_official_split_of_the_full_metadata(full_index, official_lists_dir):
    splits = make_splits(full_index, official_lists_dir, val_fraction=0.1, seed=0, calibration_fraction=0.15)
    assert len(splits["train"]) + len(splits["val"]) + len(splits["calibration"]) == 86_524
    assert len(splits["test"]) == 25_596
    check_patient_disjoint(splits)
    patients = {name: set(df["patient"]) for name, df in splits.items()}
    n_patients = len(patients["train"] | patients["val"] | patients["calibration"])
    assert abs(len(patients["val"]) / n_patients - 0.1) < 0.01
    assert abs(len(patients["calibration"]) / n_patients - 0.15) < 0.01
    # deterministic given (index, data_dir, val_fraction, seed); another seed gives another validation set
    again = make_splits(full_index, official_lists_dir, val_fraction=0.1, seed=0)
    assert again["val"]["image"].tolist() == splits["val"]["image"].tolist()
    other = make_splits(full_index, official_lists_dir, val_fraction=0.1, seed=1)
    assert set(other["val"]["image"]) != set(splits["val"]["image"])


def test_validation_split_is_stable_under_a_subset_of_the_index(full_index, official_lists_dir):
    full = make_splits(full_index, official_lists_dir, seed=3)
    subset = full_index.sample(frac=0.3, random_state=0)
    part = make_splits(subset, official_lists_dir, seed=3)
    assert set(part["val"]["image"]) == set(full["val"]["image"]) & set(subset["image"])


def test_patient_wise_split_without_lists_warns(full_index, tmp_path, monkeypatch):
    monkeypatch.setattr(data, "BUNDLED_METADATA", tmp_path / "not-bundled")  # else the bundled lists apply
    with pytest.warns(UserWarning, match="patient-wise split"):
        splits = make_splits(full_index, tmp_path, val_fraction=0.1, seed=0)
    assert sum(len(df) for df in splits.values()) == len(full_index)
    n_patients = full_index["patient"].nunique()
    assert abs(splits["test"]["patient"].nunique() / n_patients - 0.2) < 0.01
    assert abs(splits["val"]["patient"].nunique() / n_patients - 0.1) < 0.01
    assert abs(splits["calibration"]["patient"].nunique() / n_patients - 0.15) < 0.01
    check_patient_disjoint(splits)


def test_forced_patient_overlap_is_caught(full_index, official_lists_dir):
    splits = make_splits(full_index, official_lists_dir)
    leaked = splits["test"].iloc[[0]]
    forced = dict(splits, train=pd.concat([splits["train"], leaked]))
    patient = int(leaked["patient"].iloc[0])
    with pytest.raises(DataError, match=rf"1 patient\(s\) in both train and test, e.g. {patient}"):
        check_patient_disjoint(forced)


def test_official_lists_that_split_a_patient_are_refused(nih_dir, tmp_path):
    index = read_data_entry(nih_dir / "labels.csv")
    patient = index["patient"].value_counts().index[0]  # a patient with several images
    own = index[index["patient"] == patient]["image"].tolist()
    others = index[index["patient"] != patient]["image"].tolist()
    (tmp_path / "train_val_list.txt").write_text("\n".join(others + own[:1]))
    (tmp_path / "test_list.txt").write_text("\n".join(own[1:]))
    with pytest.raises(DataError, match=rf"patient\(s\) in both .* e.g. {patient}"):
        make_splits(index, tmp_path)


def test_bad_official_lists(nih_dir, tmp_path):
    index = read_data_entry(nih_dir / "labels.csv")
    (tmp_path / "train_val_list.txt").write_text("\n".join(index["image"]))
    with pytest.raises(DataError, match="has train_val_list.txt but not test_list.txt"):
        make_splits(index, tmp_path)
    (tmp_path / "test_list.txt").write_text(index["image"].iloc[0])
    with pytest.raises(DataError, match=f"in both train_val_list.txt and test_list.txt: {index['image'].iloc[0]}"):
        make_splits(index, tmp_path)
    with pytest.raises(DataError, match="strictly between 0 and 1"):
        make_splits(index, nih_dir, val_fraction=0.0)


def test_sample_split_has_empty_test(nih_dir):
    index = load_index(nih_dir)
    with pytest.warns(UserWarning, match="official NIH split lists bundled in"):  # samples/nih has no lists
        splits = make_splits(index, nih_dir)
    assert len(splits["test"]) == 0
    assert len(splits["train"]) + len(splits["val"]) + len(splits["calibration"]) == 283


def test_subsample_is_seeded_and_bounded(nih_dir):
    df = read_data_entry(nih_dir / "labels.csv")
    a, b = subsample(df, 50, seed=1), subsample(df, 50, seed=1)
    assert len(a) == 50 and a["image"].tolist() == b["image"].tolist()
    assert a["image"].tolist() == sorted(a["image"].tolist())  # keeps the index order
    assert subsample(df, None) is df and len(subsample(df, 10_000)) == 283
    with pytest.raises(DataError, match="at least 1"):
        subsample(df, 0)


# ---------------------------------------------------------------------------------------------------------------
# Cache and dataset


def test_cache_stores_resized_uint8_once(nih_dir, tmp_path):
    source = tmp_path / "00000001_000.png"
    shutil.copy(nih_dir / "images" / "00000001_000.png", source)
    cache = ResizedCache(tmp_path / "cache", 64)
    first = cache.load(source.name, source)
    assert first.dtype == np.uint8 and first.shape == (64, 64)
    np.testing.assert_array_equal(first, resized_uint8(read_xray(source), 64))
    assert cache.path(source.name) == tmp_path / "cache" / "64px" / "00000001_000.png.npy"
    source.unlink()  # a later epoch reads the cache, not the original
    np.testing.assert_array_equal(cache.load(source.name, source), first)
    assert not ResizedCache(tmp_path / "cache", 32).path(source.name).exists()  # keyed by size
    cache.path(source.name).write_bytes(b"damaged")  # a damaged entry is a miss, rebuilt from the source
    assert cache.get(source.name) is None


def _build_entries(args):
    root, items = args
    cache = ResizedCache(root, 48)
    return [cache.load(name, path).sum() for name, path in items]


def test_cache_is_safe_to_build_concurrently(nih_dir, tmp_path, sample_names):
    index = index_images(nih_dir)
    items = [(name, str(index[name])) for name in sample_names]
    # Like DataLoader workers, the writers use one thread each (a forked OpenMP pool would deadlock).
    with multiprocessing.get_context("fork").Pool(4, initializer=torch.set_num_threads, initargs=(1,)) as pool:
        sums = pool.map(_build_entries, [(tmp_path, items)] * 8)
    assert all(s == sums[0] for s in sums)
    files = sorted(p.name for p in (tmp_path / "48px").iterdir())
    assert files == sorted(f"{name}.npy" for name in sample_names)  # no temporary files left behind
    for name, path in items:
        np.testing.assert_array_equal(np.load(tmp_path / "48px" / f"{name}.npy"),
                                      resized_uint8(read_xray(path), 48))


def test_dataset_items_and_cache_agree(nih_dir, tmp_path, sample_names):
    root = write_data_dir(tmp_path / "d", nih_dir, sample_names)
    df = load_index(root)
    meta = Meta.new(arch="resnet18", image_size=64)
    plain = XrayDataset(df, LABELS, build_transform(meta))
    cached = XrayDataset(df, LABELS, build_transform(meta), cache_dir=tmp_path / "cache")
    for i in range(len(df)):
        image, target, index = plain[i]
        assert image.shape == (1, 64, 64) and image.dtype == torch.uint8 and index == i
        np.testing.assert_array_equal(target.numpy(), targets(df.iloc[[i]], LABELS)[0])
        # The cache stores exactly what the per-image stage makes from the original file.
        assert torch.equal(cached[i][0], image)
    assert len(list((tmp_path / "cache" / "64px").glob("*.npy"))) == len(df)


def test_corrupt_image_is_reported_by_name(nih_dir, tmp_path, sample_names):
    root = write_data_dir(tmp_path / "d", nih_dir, sample_names)
    bad = sample_names[0]
    (root / bad).unlink()
    (root / bad).write_bytes((nih_dir / "images_64" / bad).read_bytes()[:200])  # truncated PNG
    df = load_index(root)
    transform = build_transform(Meta.new(arch="resnet18", image_size=64))
    i = df.index[df["image"] == bad][0]
    with pytest.raises(DataError, match=rf"cannot read image {bad}.*truncated or corrupt"):
        XrayDataset(df, LABELS, transform)[i]
    skipping = XrayDataset(df, LABELS, transform, cache_dir=tmp_path / "cache", skip_unreadable=True)
    item = skipping[i]
    assert isinstance(item, Unreadable) and item.name == bad and bad in item.reason
    images, y, indices, unreadable = collate_batch([skipping[k] for k in range(len(df))])
    assert images.shape == (len(df) - 1, 1, 64, 64) and i not in indices.tolist()
    assert [u.name for u in unreadable] == [bad]
    assert [u.name for u in find_unreadable(skipping, workers=2)] == [bad]
    assert not (tmp_path / "cache" / "64px" / f"{bad}.npy").exists()


def test_dataset_requires_paths(nih_dir):
    with pytest.raises(DataError, match="no 'path' column"):
        XrayDataset(read_data_entry(nih_dir / "labels.csv"), LABELS, lambda x: x)


def test_warnings_are_not_raised_for_clean_sample(nih_dir, official_lists_dir):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        make_splits(load_index(nih_dir), official_lists_dir)  # the sample beside its own official lists
