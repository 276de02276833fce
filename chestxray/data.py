"""NIH ChestX-ray14 data: the Data_Entry index, official and patient-wise splits, the Dataset, the resized cache.

Layout accepted under a data folder DIR: `Data_Entry_2017_v2020.csv`, `Data_Entry_2017.csv` or `labels.csv` at the
top, the images anywhere below (the NIH/Kaggle `images_001/images/*.png` ... layout, one flat folder, or nested
folders), and optionally the official `train_val_list.txt` / `test_list.txt` at the top. Every data problem raises
`DataError` with a message that names the file and says what to do.
"""
from __future__ import annotations

import functools
import gzip
import hashlib
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset, default_collate

from .fileio import atomic_write
from .imaging import IMAGE_SUFFIXES, InvalidImage, read_xray
from .labels import LABELS, NO_FINDING, LabelError, parse_findings
from .meta import DEFAULT_CALIBRATION_FRACTION, DEFAULT_TEST_FRACTION, SPLIT_ROLES_KEY, Meta, SplitSpec
from .transforms import resized_uint8  # the per-image stage before augmentation, for the cache

DATA_ENTRY_NAMES = ("Data_Entry_2017_v2020.csv", "Data_Entry_2017.csv", "labels.csv")
TRAIN_VAL_LIST = "train_val_list.txt"
TEST_LIST = "test_list.txt"
SPLITS = ("train", "val", "calibration", "test")
MAX_STRATIFIED_FOLDS = 100  # a stratified split's fractions are whole multiples of 1/n for some n up to this
# What each split is used for; recorded in the checkpoint (meta.training["split"]["roles"], split_roles) so that a
# report can tell which images the model, its epoch and its trust statistics were chosen on.
ROLES = {
    "train": "fit weights",
    "val": "epoch selection",
    "calibration": "calibration, thresholds, evidence, scope limit",
    "test": "evaluation only (Model_Training/test.py); never used in training",
}
# Checkpoints trained before the calibration split (SplitSpec.calibration_fraction 0): validation served both.
LEGACY_VAL_ROLE = "epoch selection, calibration, thresholds, evidence, scope limit"
# The official NIH metadata bundled with the repository, gzipped: used (with a warning) when a data folder lacks its
# own Data_Entry CSV or split lists, so that the official split is reproducible from the repository alone.
BUNDLED_METADATA = Path(__file__).resolve().parents[1] / "samples" / "nih-metadata"
# Data_Entry header -> our column name. The header's bracketed names hold commas ("OriginalImage[Width,Height]"),
# so they split into several CSV fields; we only use the columns before them, which parse cleanly.
COLUMNS = {
    "Image Index": "image",
    "Finding Labels": "findings",
    "Patient ID": "patient",
    "Patient Age": "age",
    "Patient Gender": "sex",
    "View Position": "view",
    "Follow-up #": "follow_up",
}


class DataError(ValueError):
    """A data-set problem (missing file, bad CSV, overlapping splits, unreadable image); the message says which."""


class MissingImages(DataError):
    """Labelled images whose file is not under the data folder; `missing` lists their names."""

    def __init__(self, message: str, missing: list[str]) -> None:
        super().__init__(message)
        self.missing = missing


def _examples(items: Sequence, n: int = 5) -> str:
    items = list(items)
    shown = ", ".join(str(x) for x in items[:n])
    return shown + (f", ... ({len(items) - n} more)" if len(items) > n else "")


# ----------------------------------------------------------------------------------------------------------------
# Index


def bundled_metadata(name: str) -> Path | None:
    """The gzipped copy of NIH metadata file `name` in BUNDLED_METADATA (e.g. 'test_list.txt'), or None if absent."""
    path = BUNDLED_METADATA / f"{name}.gz"
    return path if path.is_file() else None


def find_data_entry(data_dir: str | os.PathLike) -> Path:
    """The label CSV of data_dir: its Data_Entry_2017_v2020.csv, Data_Entry_2017.csv or labels.csv (first found),
    else the bundled Data_Entry_2017_v2020.csv.gz with a warning. Raises DataError when there is neither."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"data folder not found: {data_dir}")
    for name in DATA_ENTRY_NAMES:
        if (data_dir / name).is_file():
            return data_dir / name
    fallback = bundled_metadata(DATA_ENTRY_NAMES[0])
    if fallback is not None:
        warnings.warn(f"no label file in {data_dir}: using the NIH {DATA_ENTRY_NAMES[0]} bundled in "
                      f"{fallback.parent}", stacklevel=2)
        return fallback
    raise DataError(
        f"no label file in {data_dir}: expected one of {', '.join(DATA_ENTRY_NAMES)} at its top level "
        "(the NIH ChestX-ray14 Data_Entry CSV)"
    )


def read_data_entry(csv_path: str | os.PathLike) -> pd.DataFrame:
    """Read a Data_Entry CSV -> DataFrame[image, findings, patient, age, sex, view, follow_up], one row per image.

    Handles the bracketed header names with commas and the 2017 file's trailing empty column. Raises DataError
    for missing columns, duplicate or empty image names, non-integer patient IDs and unknown label names.
    """
    csv_path = Path(csv_path)
    try:
        # index_col=False: the 2017 file ends every row with a comma; without it pandas would shift the columns.
        raw = pd.read_csv(csv_path, index_col=False, dtype=str, keep_default_na=False, skipinitialspace=True)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read {csv_path} as a CSV file: {exc}") from None
    raw.columns = [str(c).strip() for c in raw.columns]
    missing = [c for c in COLUMNS if c not in raw.columns]
    if missing:
        raise DataError(
            f"{csv_path} lacks column(s) {missing}; expected the NIH Data_Entry_2017 header "
            f"({', '.join(COLUMNS)}, ...)"
        )
    df = raw[list(COLUMNS)].rename(columns=COLUMNS)
    df = df.apply(lambda col: col.str.strip())
    if (df["image"] == "").any():
        rows = (np.flatnonzero(df["image"] == "") + 2).tolist()
        raise DataError(f"{csv_path}: empty Image Index on line(s) {_examples(rows)}")
    dup = df["image"][df["image"].duplicated()].unique()
    if len(dup):
        raise DataError(f"{csv_path}: {len(dup)} image name(s) listed more than once, e.g. {_examples(dup)}")
    patient = pd.to_numeric(df["patient"], errors="coerce")
    if patient.isna().any():
        bad = df["image"][patient.isna()]
        raise DataError(f"{csv_path}: Patient ID is not an integer for {len(bad)} image(s), e.g. {_examples(bad)}")
    df["patient"] = patient.astype(np.int64)
    # Ages are integers in both releases; some copies write "058Y" (the DICOM age format), so strip a trailing Y.
    df["age"] = pd.to_numeric(df["age"].str.rstrip("Yy"), errors="coerce").astype("Int64")
    df["follow_up"] = pd.to_numeric(df["follow_up"], errors="coerce").astype("Int64")
    df["sex"] = df["sex"].str.upper()
    df["view"] = df["view"].str.upper()
    for text in df["findings"].unique():
        try:
            parse_findings(text, LABELS)
        except LabelError as exc:
            first = df["image"][df["findings"] == text].iloc[0]
            raise DataError(f"{csv_path}: Finding Labels of {first}: {exc}") from None
    return df.reset_index(drop=True)


def index_images(data_dir: str | os.PathLike) -> dict[str, Path]:
    """Walk data_dir once (recursively, following links) -> {file name: path} for PNG/JPEG/DICOM files.

    A name found in several folders keeps the first path in sorted order, with a warning naming examples.
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"data folder not found: {data_dir}")
    found: dict[str, Path] = {}
    duplicates: list[str] = []
    for root, dirs, files in os.walk(data_dir, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if name.startswith(".") or not name.lower().endswith(IMAGE_SUFFIXES):
                continue
            if name in found:
                duplicates.append(name)
                continue
            found[name] = Path(root) / name
    if duplicates:
        warnings.warn(
            f"{len(duplicates)} image name(s) occur in several folders under {data_dir}, e.g. "
            f"{_examples(duplicates, 3)}; using the first path of each in sorted order",
            stacklevel=2,
        )
    return found


def load_index(data_dir: str | os.PathLike, allow_missing: bool = False) -> pd.DataFrame:
    """read_data_entry(find_data_entry(data_dir)) plus a `path` column from index_images(data_dir).

    Labelled images without a file raise DataError with the count and examples; with allow_missing=True they are
    dropped with a warning, and their names are kept in `df.attrs["missing"]`.
    """
    data_dir = Path(data_dir)
    csv_path = find_data_entry(data_dir)
    df = read_data_entry(csv_path)
    files = index_images(data_dir)
    paths = df["image"].map(files)
    missing = df["image"][paths.isna()].tolist()
    if missing and len(missing) == len(df):
        where = ("is this the folder that holds the NIH images? (Model_Training/download_nih.py fetches them)"
                 if csv_path.parent != data_dir else "put the images (any folder layout) below the CSV's folder")
        raise DataError(
            f"none of the {len(df)} images listed in {csv_path.name} was found under {data_dir} "
            f"(e.g. {_examples(missing, 3)}); {where}"
        )
    if missing and not allow_missing:
        raise MissingImages(
            f"{len(missing)} of the {len(df)} images listed in {csv_path.name} are missing under {data_dir}, "
            f"e.g. {_examples(missing)}; add them, or skip them (allow_missing=True)", missing
        )
    df = df.assign(path=paths)
    if missing:
        warnings.warn(
            f"skipping {len(missing)} of the {len(df)} labelled images, missing under {data_dir}: "
            f"{_examples(missing)}",
            stacklevel=2,
        )
        df = df[df["path"].notna()].reset_index(drop=True)
    df.attrs["missing"] = missing
    df.attrs["data_entry"] = str(csv_path)
    return df


def targets(df: pd.DataFrame, labels: Sequence[str] = LABELS) -> np.ndarray:
    """(N, L) float32 0/1 targets from the `findings` column, in `labels` order (parse_findings)."""
    cache = {text: parse_findings(text, labels) for text in pd.unique(df["findings"])}
    if not len(df):
        return np.zeros((0, len(labels)), dtype=np.float32)
    return np.stack([cache[text] for text in df["findings"]]).astype(np.float32)


# ----------------------------------------------------------------------------------------------------------------
# Splits


def has_official_lists(data_dir: str | os.PathLike, index: pd.DataFrame | None = None) -> bool:
    """official_lists(data_dir, index) is not None: an official split applies."""
    return official_lists(data_dir, index) is not None


def official_lists(data_dir: str | os.PathLike, index: pd.DataFrame | None = None) -> tuple[Path, Path] | None:
    """The (train_val, test) official list files for data_dir, or None when no official split applies.

    data_dir's own train_val_list.txt / test_list.txt when it has both (DataError if only one); else, given the
    index, the lists bundled in BUNDLED_METADATA when they name every image of it (NIH data without its lists).
    """
    data_dir = Path(data_dir)
    present = [(data_dir / name).is_file() for name in (TRAIN_VAL_LIST, TEST_LIST)]
    if any(present) and not all(present):
        have, lack = (TRAIN_VAL_LIST, TEST_LIST) if present[0] else (TEST_LIST, TRAIN_VAL_LIST)
        raise DataError(f"{data_dir} has {have} but not {lack}; provide both official lists or neither")
    if all(present):
        return data_dir / TRAIN_VAL_LIST, data_dir / TEST_LIST
    lists = bundled_metadata(TRAIN_VAL_LIST), bundled_metadata(TEST_LIST)
    if index is None or not len(index) or None in lists:
        return None
    listed = read_list(lists[0]) | read_list(lists[1])
    return lists if index["image"].isin(listed).all() else None


def read_list(path: str | os.PathLike) -> frozenset[str]:
    """The image names of an official split list, plain or .gz (one per line; the NIH files lack a final newline).

    Parsed once per file version (path, size, modification time): a data folder's lists are consulted several times
    while its split is made, and the official train_val list holds 86,524 names."""
    path = Path(path)
    try:
        stat = path.stat()
        return _parse_list(str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    except (OSError, EOFError) as exc:
        raise DataError(f"cannot read split list {path}: {getattr(exc, 'strerror', None) or exc}") from None


@functools.lru_cache(maxsize=8)
def _parse_list(path: str, size: int, mtime_ns: int) -> frozenset[str]:
    raw = Path(path).read_bytes()
    text = gzip.decompress(raw).decode() if path.endswith(".gz") else raw.decode()
    return frozenset(name for name in (line.strip() for line in text.splitlines()) if name)


def patient_uniform(patients: Sequence[int] | np.ndarray, seed: int) -> np.ndarray:
    """A fixed number in [0, 1) per (patient ID, seed), from a hash: (P,) float64.

    Assigning splits by thresholding it makes each patient's split independent of which other patients are
    present, so a split re-created from a subset of the index (missing images, another machine) agrees.
    """
    out = np.empty(len(patients), dtype=np.float64)
    for i, patient in enumerate(patients):
        digest = hashlib.blake2b(f"{int(seed)}:{int(patient)}".encode(), digest_size=8).digest()
        out[i] = int.from_bytes(digest, "little") / 2.0**64
    return out


def _assign_by_patient(df: pd.DataFrame, cuts: dict[str, float], seed: int) -> dict[str, pd.DataFrame]:
    """Split df by patient: a patient goes to the first name in `cuts` whose cumulative fraction exceeds its draw."""
    patients = np.unique(df["patient"].to_numpy())
    draws = dict(zip(patients.tolist(), patient_uniform(patients, seed)))
    u = df["patient"].map(draws).to_numpy()
    out, low = {}, 0.0
    for name, fraction in cuts.items():
        high = low + fraction
        out[name] = df[(u >= low) & (u < high)].reset_index(drop=True)
        low = high
    return out


def _assign_stratified(df: pd.DataFrame, cuts: dict[str, float], seed: int) -> dict[str, pd.DataFrame]:
    """Split df by patient with scikit-learn's StratifiedGroupKFold on view position x any finding: n folds of about
    1/n of the images each (n the smallest that makes every fraction in `cuts` a whole number of folds, at most
    MAX_STRATIFIED_FOLDS), given to the names of `cuts` in a seeded order. Raises DataError for other fractions.

    The order is seeded because the library's greedy assignment puts its first, most lopsided patients in fold 0:
    given in order, that fold would always be the validation split (on the shared sample one patient with 22 AP
    views of 26 made it 25% AP against 19%)."""
    from fractions import Fraction

    from sklearn.model_selection import StratifiedGroupKFold

    given = [f for f in cuts.values() if f < 1.0]
    exact = [Fraction(f).limit_denominator(MAX_STRATIFIED_FOLDS) for f in given]
    n = math.lcm(*(q.denominator for q in exact))
    if n > MAX_STRATIFIED_FOLDS or any(abs(float(q) - f) > 1e-9 for q, f in zip(exact, given)):
        raise DataError(f"a stratified split needs fractions that are whole multiples of 1/n for one n up to "
                        f"{MAX_STRATIFIED_FOLDS} (e.g. 0.1 and 0.4), got {', '.join(f'{f:g}' for f in given)}")
    if df["patient"].nunique() < n:
        raise DataError(f"a stratified split into folds of 1/{n} needs at least {n} patients, got "
                        f"{df['patient'].nunique()}")
    strata = df["view"].astype(str) + "|" + (df["findings"] != NO_FINDING).astype(str)
    folds = StratifiedGroupKFold(n_splits=n, shuffle=True, random_state=int(seed) % 2**32)
    fold, order = np.empty(len(df), dtype=np.int64), np.random.default_rng(int(seed) % 2**32).permutation(n)
    for k, (_, rows) in enumerate(folds.split(np.zeros(len(df)), strata.to_numpy(), df["patient"].to_numpy())):
        fold[rows] = order[k]
    out, low = {}, 0
    for name, fraction in cuts.items():
        high = min(n, low + round(fraction * n))
        out[name] = df[(fold >= low) & (fold < high)].reset_index(drop=True)
        low = high
    return out


def make_splits(
    index: pd.DataFrame,
    data_dir: str | os.PathLike,
    val_fraction: float = 0.1,
    seed: int = 0,
    test_fraction: float = DEFAULT_TEST_FRACTION,
    calibration_fraction: float = DEFAULT_CALIBRATION_FRACTION,
    stratify: bool = False,
) -> dict[str, pd.DataFrame]:
    """{'train', 'val', 'calibration', 'test'} DataFrames, patient-disjoint; deterministic given the arguments.

    With official lists (official_lists: data_dir's, else the bundled ones for NIH images, with a warning),
    test = test_list, and val and calibration are seeded `val_fraction` / `calibration_fraction` of train_val's
    patients. Without, a seeded patient-wise split (test_fraction, val_fraction, calibration_fraction of patients)
    with a warning. A patient's split depends only on its own draw, and val takes the lowest draws, so val is the same
    whatever calibration_fraction is (0 gives an empty calibration split: the two-way split of older checkpoints).
    stratify=True assigns the patients instead by scikit-learn's StratifiedGroupKFold on view position x any finding
    (_assign_stratified), so that each split's view mix and finding share are close to the whole's; that split
    depends on the whole index, and on no draw per patient. Index rows in neither official list are dropped with a
    warning. Raises DataError if a patient is in two splits.
    """
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"the validation fraction must lie strictly between 0 and 1, got {val_fraction}")
    if not 0.0 <= calibration_fraction < 1.0 - val_fraction:
        raise DataError(f"the calibration fraction must lie in [0, 1 - validation fraction {val_fraction}), got "
                        f"{calibration_fraction}")
    cuts = {"val": val_fraction, "calibration": calibration_fraction, "train": 1.0}
    assign = _assign_stratified if stratify else _assign_by_patient
    data_dir = Path(data_dir)
    lists = official_lists(data_dir, index)
    if lists is not None:
        if lists[0].parent != data_dir:
            warnings.warn(f"no {TRAIN_VAL_LIST} / {TEST_LIST} in {data_dir}: using the official NIH split lists "
                          f"bundled in {lists[0].parent}", stacklevel=2)
        train_val_names = read_list(lists[0])
        test_names = read_list(lists[1])
        both = sorted(train_val_names & test_names)
        if both:
            raise DataError(f"{len(both)} image(s) are in both {TRAIN_VAL_LIST} and {TEST_LIST}: {_examples(both)}")
        in_train_val = index["image"].isin(train_val_names)
        in_test = index["image"].isin(test_names)
        neither = index["image"][~(in_train_val | in_test)].tolist()
        if neither:
            warnings.warn(
                f"{len(neither)} image(s) of the index are in neither official list and are not used: "
                f"{_examples(neither)}",
                stacklevel=2,
            )
        parts = assign(index[in_train_val], cuts, seed)
        splits = {**{name: parts[name] for name in ("train", "val", "calibration")},
                  "test": index[in_test].reset_index(drop=True)}
    else:
        if not 0.0 < test_fraction < 1.0 - val_fraction - calibration_fraction:
            raise DataError(f"test fraction {test_fraction}, val fraction {val_fraction} and calibration fraction "
                            f"{calibration_fraction} leave no training data")
        warnings.warn(
            f"no {TRAIN_VAL_LIST} / {TEST_LIST} in {data_dir}: using a seeded patient-wise split "
            f"({test_fraction:.0%} test, {val_fraction:.0%} val, {calibration_fraction:.0%} calibration of patients, "
            f"seed {seed}{', stratified' if stratify else ''}); its scores are not comparable with the official "
            "split's",
            stacklevel=2,
        )
        parts = assign(index, {"test": test_fraction, **cuts}, seed)
        splits = {name: parts[name] for name in SPLITS}
    check_patient_disjoint(splits)
    return splits


def split_spec(index: pd.DataFrame, data_dir: str | os.PathLike, val_fraction: float = 0.1, seed: int = 0,
               limit: int | None = None, calibration_fraction: float = DEFAULT_CALIBRATION_FRACTION,
               stratify: bool = False) -> SplitSpec:
    """The SplitSpec that make_splits(index, data_dir, val_fraction, seed, calibration_fraction=..., stratify=...) +
    a per-split `limit` follow."""
    entry = index.attrs.get("data_entry")
    digest = hashlib.sha256(Path(entry).read_bytes()).hexdigest() if entry else None
    return SplitSpec(official=has_official_lists(data_dir, index), val_fraction=float(val_fraction), seed=int(seed),
                     limit=limit, data_entry_sha256=digest, calibration_fraction=float(calibration_fraction),
                     stratify=bool(stratify))


def split_roles(splits: dict[str, pd.DataFrame], spec: SplitSpec) -> dict[str, dict]:
    """{split: {"role", "images", "patients"}} for meta.training["split"]["roles"]: which split served which role.

    For a checkpoint without a calibration split (spec.calibration_fraction 0) validation is listed with both roles
    and calibration is absent.
    """
    legacy = spec.calibration_fraction == 0.0
    roles = {}
    for name in SPLITS:
        if name not in splits or (legacy and name == "calibration"):
            continue
        df = splits[name]
        roles[name] = {"role": LEGACY_VAL_ROLE if legacy and name == "val" else ROLES[name],
                       "images": int(len(df)), "patients": int(df["patient"].nunique())}
    return roles


def with_roles(spec: SplitSpec, splits: dict[str, pd.DataFrame]) -> dict:
    """spec.to_dict() plus its "roles" entry (split_roles): what meta.training["split"] records."""
    return {**spec.to_dict(), SPLIT_ROLES_KEY: split_roles(splits, spec)}


def rebuild_splits(meta: Meta, index: pd.DataFrame, data_dir: str | os.PathLike) -> dict[str, pd.DataFrame]:
    """The checkpoint's {'train', 'val', 'calibration', 'test'} splits of `index`, rebuilt from its SplitSpec.

    train, val and calibration are limited as training limited them; test is whole. A checkpoint trained before the
    calibration split (calibration_fraction 0) fitted its trust statistics on validation: its "calibration" is that
    same validation frame (attrs["same_as"] = "val"), so that no report treats it as independent of the epoch
    choice. Warns (warnings.warn) when the checkpoint records no split (defaults are used) or when data_dir's
    official lists differ from training's. Raises DataError as make_splits does.
    """
    spec = meta.split
    if spec is None:
        warnings.warn("the checkpoint does not record its split; the default validation fraction 0.1 and seed 0 "
                      "are used (no calibration split), which may not be the split it was trained with",
                      stacklevel=2)
        spec = SplitSpec(official=has_official_lists(data_dir, index))
    official = has_official_lists(data_dir, index)
    if spec.official != official:
        warnings.warn(f"the checkpoint was trained {'with' if spec.official else 'without'} the official split "
                      f"lists but {data_dir} has {'them' if official else 'none'}: the split differs", stacklevel=2)
    splits = make_splits(index, data_dir, spec.val_fraction, spec.seed, spec.test_fraction, spec.calibration_fraction,
                         spec.stratify)
    splits = {name: subsample(df, spec.limit, spec.seed) if name != "test" else df for name, df in splits.items()}
    if spec.calibration_fraction == 0.0:
        splits["calibration"] = splits["val"].copy()
        splits["calibration"].attrs["same_as"] = "val"
    return splits


def trained_images(meta: Meta, index: pd.DataFrame, data_dir: str | os.PathLike) -> set[str] | None:
    """Names of the index's images the checkpoint was trained on, or None when that cannot be told.

    Decided from the recorded SplitSpec, not from a new split of whatever folder is evaluated: only when the
    folder's label file is the one training read (same SHA-256) is its training split the model's.
    """
    spec = meta.split
    entry = index.attrs.get("data_entry")
    if spec is None or spec.data_entry_sha256 is None or not entry:
        return None
    if hashlib.sha256(Path(entry).read_bytes()).hexdigest() != spec.data_entry_sha256:
        return set()  # another data set: none of its images is the training data's (names may still coincide)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the caller reports the split's notices once
        return set(rebuild_splits(meta, index, data_dir)["train"]["image"])


def check_patient_disjoint(splits: dict[str, pd.DataFrame]) -> None:
    """Raise DataError naming the patients (and splits) shared by any two splits; return None if disjoint.

    A frame marked attrs["same_as"] (a legacy checkpoint's calibration, which is its validation) is not compared."""
    names = [name for name, df in splits.items() if not df.attrs.get("same_as")]
    problems = []
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            shared = sorted(set(splits[a]["patient"].tolist()) & set(splits[b]["patient"].tolist()))
            if shared:
                problems.append(f"{len(shared)} patient(s) in both {a} and {b}, e.g. {_examples(shared)}")
    if problems:
        raise DataError("splits are not patient-disjoint: " + "; ".join(problems))


def subsample(df: pd.DataFrame, limit: int | None, seed: int = 0) -> pd.DataFrame:
    """At most `limit` rows of df, a seeded random sample kept in df's order (all rows when limit is None)."""
    if limit is not None and limit < 1:
        raise DataError(f"the image limit must be at least 1, got {limit}")
    if limit is None or len(df) <= limit:
        return df
    return df.sample(n=limit, random_state=seed).sort_index().reset_index(drop=True)


# ----------------------------------------------------------------------------------------------------------------
# Resized cache


class ResizedCache:
    """Resized images as uint8 .npy files under root/<size>px/<image name>.npy: decode and resize once.

    Keyed by image size (the folder) and file name. Writes go to a temporary file then os.replace, so any
    number of workers and ranks may build it at once; a damaged or wrong-sized entry is rebuilt.
    """

    def __init__(self, root: str | os.PathLike, image_size: int) -> None:
        if int(image_size) < 1:
            raise ValueError(f"cache image size must be positive, got {image_size}")
        self.image_size = int(image_size)
        self.folder = Path(root) / f"{self.image_size}px"

    def path(self, name: str) -> Path:
        """The cache file of image `name`."""
        return self.folder / f"{name}.npy"

    def get(self, name: str) -> np.ndarray | None:
        """The cached (S, S) uint8 array, or None when absent or damaged."""
        try:
            array = np.load(self.path(name), allow_pickle=False)
        except (OSError, ValueError, EOFError):
            return None
        if array.dtype != np.uint8 or array.shape != (self.image_size, self.image_size):
            return None
        return array

    def put(self, name: str, array: np.ndarray) -> None:
        """Store a (S, S) uint8 array atomically (fileio.atomic_write: temp file + os.replace)."""
        atomic_write(self.path(name), lambda f: np.save(f, array, allow_pickle=False))

    def load(self, name: str, source: str | os.PathLike) -> np.ndarray:
        """The cached image, building it from `source` on a miss -> (S, S) uint8. Raises InvalidImage."""
        array = self.get(name)
        if array is None:
            array = resized_uint8(read_xray(source), self.image_size)
            self.put(name, array)
        return array


# ----------------------------------------------------------------------------------------------------------------
# Dataset


@dataclass(frozen=True)
class Unreadable:
    """Stands in for a dataset item whose image could not be read (skip_unreadable=True)."""

    index: int
    name: str
    reason: str


class XrayDataset(Dataset):
    """Rows of an index -> (image (1, S, S) uint8 from the transform, target (L,) float32, index int).

    With cache_dir, images are read from / written to a ResizedCache at image_size (default: transform.size).
    An unreadable image raises DataError naming the file, or with skip_unreadable=True yields an `Unreadable`
    item that `collate_batch` removes and reports.
    """

    def __init__(
        self,
        df: pd.DataFrame,
        labels: Sequence[str],
        transform,
        cache_dir: str | os.PathLike | None = None,
        image_size: int | None = None,
        skip_unreadable: bool = False,
    ) -> None:
        if "path" not in df.columns:
            raise DataError("the index has no 'path' column; build it with load_index(data_dir)")
        self.names = df["image"].astype(str).tolist()
        self.paths = df["path"].astype(str).tolist()
        self.labels = tuple(labels)
        self.targets = targets(df, self.labels)
        self.transform = transform
        self.skip_unreadable = skip_unreadable
        self.cache = None
        if cache_dir is not None:
            size = image_size if image_size is not None else getattr(transform, "size", None)
            if size is None:
                raise ValueError("a cache needs image_size (or a transform with a .size)")
            self.cache = ResizedCache(cache_dir, size)

    def __len__(self) -> int:
        return len(self.names)

    def load_image(self, i: int) -> np.ndarray:
        """Image i as (H, W) float32 in [0, 1], or (S, S) uint8 from the cache. Raises DataError naming the file."""
        try:
            if self.cache is not None:
                return self.cache.load(self.names[i], self.paths[i])
            return read_xray(self.paths[i])
        except InvalidImage as exc:
            raise DataError(f"cannot read image {self.names[i]} ({self.paths[i]}): {exc}") from None

    def __getitem__(self, i: int):
        try:
            image = self.load_image(i)
        except DataError as exc:
            if self.skip_unreadable:
                return Unreadable(int(i), self.names[i], str(exc))
            raise
        return self.transform(image), torch.from_numpy(self.targets[i]), int(i)


def collate_batch(items: list) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[Unreadable]]:
    """DataLoader collate: -> (images (B, 1, S, S) uint8, targets (B, L), indices (B,), unreadable items removed).

    A batch whose every item is unreadable yields empty tensors.
    """
    good = [item for item in items if not isinstance(item, Unreadable)]
    bad = [item for item in items if isinstance(item, Unreadable)]
    if not good:
        return torch.empty(0), torch.empty(0), torch.empty(0, dtype=torch.long), bad
    images, target, indices = default_collate(good)
    return images, target, indices, bad


def _as_list(items: list) -> list:
    return items


class _ReadCheck(Dataset):
    def __init__(self, dataset: XrayDataset, indices: Sequence[int]) -> None:
        self.dataset, self.indices = dataset, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int):
        i = self.indices[k]
        try:
            self.dataset.load_image(i)
        except DataError as exc:
            return Unreadable(int(i), self.dataset.names[i], str(exc))
        return None


def find_unreadable(
    dataset: XrayDataset, indices: Sequence[int] | None = None, workers: int = 0, progress: bool = False
) -> list[Unreadable]:
    """Read every image (or those at `indices`) once, filling the cache if any -> the unreadable ones."""
    from tqdm import tqdm

    check = _ReadCheck(dataset, range(len(dataset)) if indices is None else indices)
    loader = DataLoader(check, batch_size=16, num_workers=workers, collate_fn=_as_list)
    bad: list[Unreadable] = []
    for items in tqdm(loader, desc="checking images", unit="batch", disable=not progress, leave=False):
        bad.extend(item for item in items if item is not None)
    return bad
