"""A clinic's own labelled images in the formats people have, read into the project's index form.

Four label-file formats (`read_local_labels(..., fmt="auto")` tells them apart by their header):

- **nih**: the NIH Data_Entry CSV (data.read_data_entry): every one of the 14 labels is informed.
- **chexpert**: CheXpert / MIMIC-CXR (`*-chexpert.csv`): one column per finding holding 1 (positive), 0 (negative),
  -1 (uncertain) or blank (not mentioned, read as negative, as both data sets' authors do). An image column (`Path`,
  `path`, `image`, `dicom_id`) and, when present, a patient column (`Patient ID`, `patient`, `subject_id`; else the
  `patientNNNNN` folder of a CheXpert path). Only the labels of CHEXPERT_TO_NIH are informed.
- **list**: a plain `image,label1|label2` list (optional header `image,labels[,patient]`; `No Finding` or an empty
  cell for a normal image): every label is informed.
- **feedback**: the monitoring export of the web app (`GET /api/results.csv?reviewed=1`, monitoring.export_csv): one
  row per analysis with `result_id` and, per label, `<label> truth` = present, absent or "not assessed". Its images
  are the results folder's `<result_id>/image.png` (the app's RESULTS_DIR is the data folder; no search by file
  name: every result's image has the same name). A label is informed when some exported analysis assessed it;
  "not assessed" is an unknown truth: it never trains the model (listed in `uncertain`, as --uncertain ignore does)
  and counts as absent where one truth per image is needed (calibration, the report), as a blank CheXpert cell
  does. Refused analyses and analyses with no true label are left out. The export holds no patient identity (the
  app never stores one), so each analysis is its own patient unless the file has a patient column.

Uncertain labels (-1) follow `uncertain` (Irvin et al. 2019, CheXpert): "zeros" reads them as negative, "ones" as
positive, "ignore" leaves them out of the fine-tuning loss (the `uncertain` column lists them per image). A report
or a calibration needs one 0/1 truth per image, so there an ignored uncertain label counts as negative; the
adaptation report says how many there were.

Patient IDs are hashed (`hash_patient`) before anything else sees them: the index, the splits and the checkpoint's
provenance hold only the hash. The result has the columns of data.load_index (image, findings, patient, age, sex,
view, follow_up, path) plus `uncertain`, so XrayDataset, the splits and the reports read it unchanged.
"""
from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from .data import DataError, _assign_by_patient, check_patient_disjoint, index_images, read_data_entry
from .imaging import IMAGE_SUFFIXES
from .labels import LABELS, NO_FINDING, LabelError, parse_findings
from .results import RESULT_ID

FORMATS = ("auto", "nih", "chexpert", "list", "feedback")
UNCERTAIN_POLICIES = ("ignore", "zeros", "ones")

# CheXpert / MIMIC-CXR finding -> NIH label. Only findings that name the same radiological sign are mapped:
# "Lung Opacity" is wider than Infiltration, "Pleural Other" wider than Pleural_Thickening, and "Lung Lesion" is
# a mass or a nodule by size (LESION_CHOICES: mapped only when the user says which). "Enlarged Cardiomediastinum",
# "Fracture", "Support Devices" and "No Finding" have no NIH label. The NIH labels no CheXpert finding maps to
# (Infiltration, Mass, Nodule, Emphysema, Fibrosis, Pleural_Thickening, Hernia) are not informed by such data and
# keep the base checkpoint's calibration, thresholds and evidence.
CHEXPERT_TO_NIH: dict[str, str] = {
    "Atelectasis": "Atelectasis",
    "Cardiomegaly": "Cardiomegaly",
    "Pleural Effusion": "Effusion",
    "Pneumonia": "Pneumonia",
    "Pneumothorax": "Pneumothorax",
    "Consolidation": "Consolidation",
    "Edema": "Edema",
}
CHEXPERT_UNMAPPED = ("Enlarged Cardiomediastinum", "Lung Opacity", "Lung Lesion", "Pleural Other", "Fracture",
                     "Support Devices", "No Finding")
CHEXPERT_FINDINGS = tuple(CHEXPERT_TO_NIH) + CHEXPERT_UNMAPPED
LESION_CHOICES = ("none", "Mass", "Nodule")

IMAGE_COLUMNS = ("Path", "path", "image", "Image Index", "dicom_id")
PATIENT_COLUMNS = ("Patient ID", "patient", "subject_id", "patient_id")
VIEW_COLUMNS = ("View Position", "AP/PA", "ViewPosition", "view")
# The monitoring export (monitoring.export_csv): "<label> truth" holds a reader's true label (store.models.TRUTHS) or
# NOT_ASSESSED; the stored image of a result is RESULT_IMAGE in its folder (chestxray/results.py).
TRUTH_SUFFIX = " truth"
NOT_ASSESSED = "not assessed"
RESULT_IMAGE = "image.png"


def hash_patient(value: object) -> int:
    """A patient ID (any text) -> a stable non-negative int64 from its BLAKE2b hash; the ID itself is not kept."""
    digest = hashlib.blake2b(str(value).strip().encode(), digest_size=8, person=b"cxr-local").digest()
    return int.from_bytes(digest, "little") >> 1


def chexpert_mapping(lesion: str = "none") -> dict[str, str]:
    """CHEXPERT_TO_NIH, plus "Lung Lesion" -> Mass or Nodule when `lesion` names one (LESION_CHOICES)."""
    if lesion not in LESION_CHOICES:
        raise DataError(f"--lesion-as must be one of {list(LESION_CHOICES)}, got {lesion!r}")
    return {**CHEXPERT_TO_NIH, **({"Lung Lesion": lesion} if lesion != "none" else {})}


def detect_format(columns: Sequence[str]) -> str:
    """The format of a label file from its header: nih, chexpert, list or feedback. Raises DataError when none
    fits."""
    columns = [str(c).strip() for c in columns]
    if "result_id" in columns and any(c.endswith(TRUTH_SUFFIX) for c in columns):
        return "feedback"
    if "Finding Labels" in columns and "Image Index" in columns:
        return "nih"
    if columns and columns[0].lower().endswith(IMAGE_SUFFIXES):  # a header-less list: its first row is data
        return "list"
    if any(c in CHEXPERT_FINDINGS for c in columns):
        return "chexpert"
    if len(columns) in (2, 3):
        return "list"
    raise DataError(f"cannot tell the label format from the header {columns[:8]}: expected the NIH Data_Entry "
                    "columns, CheXpert/MIMIC finding columns, a plain image,labels list, or the web app's feedback "
                    "export (result_id, '<label> truth')")


def read_local_labels(csv_path: str | os.PathLike, data_dir: str | os.PathLike, fmt: str = "auto",
                      uncertain: str = "zeros", lesion: str = "none",
                      labels: Sequence[str] = LABELS) -> pd.DataFrame:
    """A clinic's label file + image folder -> index DataFrame (data.load_index's columns + `uncertain`).

    df.attrs: "format", "informed" (the labels this data can inform, in `labels` order), "uncertain_policy",
    "uncertain_counts" ({label: uncertain entries; for the feedback export, "not assessed" entries}), "missing"
    (listed images without a file, dropped). Raises
    DataError for an unreadable file, an unknown format or label name, or when no listed image is found."""
    if fmt not in FORMATS:
        raise DataError(f"unknown label format {fmt!r}; choose one of {list(FORMATS)}")
    if uncertain not in UNCERTAIN_POLICIES:
        raise DataError(f"unknown uncertain-label policy {uncertain!r}; choose one of {list(UNCERTAIN_POLICIES)}")
    csv_path, data_dir = Path(csv_path), Path(data_dir)
    try:
        raw = pd.read_csv(csv_path, dtype=str, keep_default_na=False, index_col=False)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read {csv_path} as a CSV file: {exc}") from None
    raw.columns = [str(c).strip() for c in raw.columns]
    fmt = detect_format(raw.columns) if fmt == "auto" else fmt
    if fmt == "nih":
        df = read_data_entry(csv_path).assign(uncertain="")
        informed, counts = tuple(labels), {}
    elif fmt == "chexpert":
        df, informed, counts = _read_chexpert(raw, csv_path, uncertain, chexpert_mapping(lesion), labels)
    elif fmt == "feedback":
        df, informed = _read_feedback(raw, csv_path, labels)
        uncertain = "ignore (not assessed)"  # an unknown truth: out of the loss, absent where one truth is needed
    else:
        df = _read_list(csv_path)
        informed, counts = tuple(labels), {}
    df = _attach_paths(df, data_dir, csv_path, search=fmt != "feedback")
    if fmt == "feedback":  # "not assessed" entries of the analyses whose image is there
        counts = {name: int(sum(name in text.split("|") for text in df["uncertain"])) for name in informed}
    df.attrs.update({"format": fmt, "informed": list(informed), "uncertain_policy": uncertain,
                     "uncertain_counts": counts, "data_entry": str(csv_path)})
    return df


def _column(raw: pd.DataFrame, names: Sequence[str]) -> str | None:
    return next((c for c in names if c in raw.columns), None)


def _read_chexpert(raw: pd.DataFrame, csv_path: Path, policy: str, mapping: dict[str, str],
                   labels: Sequence[str]) -> tuple[pd.DataFrame, tuple[str, ...], dict]:
    image_col = _column(raw, IMAGE_COLUMNS)
    if image_col is None:
        raise DataError(f"{csv_path}: no image column; expected one of {list(IMAGE_COLUMNS)}")
    mapped = {src: dst for src, dst in mapping.items() if src in raw.columns and dst in labels}
    informed = tuple(name for name in labels if name in mapped.values())
    findings, uncertain = [[] for _ in range(len(raw))], [[] for _ in range(len(raw))]
    counts = {}
    for src, dst in mapped.items():
        values = raw[src].str.strip()
        bad = sorted(set(values) - {"1", "0", "-1", "1.0", "0.0", "-1.0", ""})
        if bad:
            raise DataError(f"{csv_path}: column {src!r} holds {bad[:5]}; expected 1, 0, -1 or blank")
        number = pd.to_numeric(values.replace("", "0")).astype(int).to_numpy()
        counts[dst] = int((number == -1).sum())
        for i in np.flatnonzero((number == 1) | ((number == -1) & (policy == "ones"))):
            findings[i].append(dst)
        if policy == "ignore":
            for i in np.flatnonzero(number == -1):
                uncertain[i].append(dst)
    order = {name: k for k, name in enumerate(LABELS)}
    image = raw[image_col].str.strip()
    patient_col = _column(raw, PATIENT_COLUMNS)
    if patient_col is not None:
        patient = raw[patient_col].str.strip()
    else:
        # CheXpert paths read .../patient00001/study1/view1_frontal.jpg; without that, each image is its own patient.
        patient = image.map(lambda p: (re.search(r"patient\d+", p) or re.search(r".*", p)).group(0))
    view_col = _column(raw, VIEW_COLUMNS)
    df = pd.DataFrame({
        "image": image,
        "findings": ["|".join(sorted(f, key=order.get)) or NO_FINDING for f in findings],
        "patient": patient.map(hash_patient).astype(np.int64),
        "age": pd.to_numeric(raw["Age"], errors="coerce").astype("Int64") if "Age" in raw else pd.NA,
        "sex": (raw["Sex"].str.strip().str[:1].str.upper() if "Sex" in raw else ""),
        "view": raw[view_col].str.strip().str.upper() if view_col else "",
        "follow_up": pd.NA,
        "uncertain": ["|".join(sorted(u, key=order.get)) for u in uncertain],
    })
    return df, informed, counts


def _read_feedback(raw: pd.DataFrame, csv_path: Path,
                   labels: Sequence[str]) -> tuple[pd.DataFrame, tuple[str, ...]]:
    """The monitoring export -> (index, informed labels) of the answered analyses that hold at least one true label;
    images as `<result_id>/image.png`, "not assessed" informed labels in `uncertain`."""
    truth_cols = {c[:-len(TRUTH_SUFFIX)]: c for c in raw.columns if c.endswith(TRUTH_SUFFIX)}
    if "result_id" not in raw.columns or not truth_cols:
        raise DataError(f"{csv_path}: not the web app's feedback export (a result_id column and '<label> truth' "
                        "columns, from /api/results.csv)")
    columns = {name: truth_cols[name] for name in labels if name in truth_cols}
    if not columns:
        raise DataError(f"{csv_path}: its true labels ({sorted(truth_cols)[:5]}...) name none of the model's labels "
                        f"{list(labels)}")
    raw = raw[raw["result_id"].str.strip() != ""]
    if "outcome" in raw.columns:
        raw = raw[raw["outcome"].str.strip() == "answered"]
    truth = pd.DataFrame({name: raw[col].str.strip() for name, col in columns.items()})
    bad = sorted(set(truth.to_numpy().ravel()) - {"present", "absent", NOT_ASSESSED, ""})
    if bad:
        raise DataError(f"{csv_path}: true labels hold {bad[:5]}; expected present, absent or '{NOT_ASSESSED}'")
    known = truth.isin(["present", "absent"])
    keep = known.any(axis=1).to_numpy()
    if not keep.any():
        raise DataError(f"{csv_path}: no answered analysis in it has a true label (present or absent); readers set "
                        "them in the review form of a result page, then export /api/results.csv?reviewed=1")
    raw, truth, known = raw[keep].reset_index(drop=True), truth[keep].reset_index(drop=True), known[keep]
    informed = tuple(name for name in labels if name in columns and known[name].any())
    order = {name: k for k, name in enumerate(LABELS)}
    findings = ["|".join(sorted((n for n in informed if row[n] == "present"), key=order.get)) or NO_FINDING
                for _, row in truth.iterrows()]
    unknown = ["|".join(sorted((n for n in informed if row[n] in (NOT_ASSESSED, "")), key=order.get))
               for _, row in truth.iterrows()]
    rid = raw["result_id"].str.strip()
    bad_ids = [value for value in rid if not RESULT_ID.fullmatch(value)]
    if bad_ids:  # the id becomes a path under --data-dir: nothing but the app's own ids
        raise DataError(f"{csv_path}: result_id {bad_ids[0][:40]!r} is not a result id of the app (32 hex digits)")
    patient_col = _column(raw, PATIENT_COLUMNS)
    patient = raw[patient_col].str.strip() if patient_col is not None else rid
    df = pd.DataFrame({"image": rid + "/" + RESULT_IMAGE, "findings": findings,
                       "patient": patient.map(hash_patient).astype(np.int64), "age": pd.NA, "sex": "", "view": "",
                       "follow_up": pd.NA, "uncertain": unknown})
    return df, informed


def _read_list(csv_path: Path) -> pd.DataFrame:
    raw = pd.read_csv(csv_path, dtype=str, keep_default_na=False, header=None, index_col=False)
    first = str(raw.iloc[0, 0]).strip().lower() if len(raw) else ""
    if first in ("image", "path", "image index", "file"):
        raw = raw.iloc[1:]
    if raw.shape[1] not in (2, 3):
        raise DataError(f"{csv_path}: a plain label list has 2 or 3 columns (image, labels[, patient]); found "
                        f"{raw.shape[1]}")
    image = raw.iloc[:, 0].str.strip()
    text = raw.iloc[:, 1].str.strip().replace("", NO_FINDING)
    for value in text.unique():
        try:
            parse_findings(value, LABELS)
        except LabelError as exc:
            raise DataError(f"{csv_path}: labels of {image[text == value].iloc[0]}: {exc}") from None
    patient = raw.iloc[:, 2].str.strip() if raw.shape[1] == 3 else image
    return pd.DataFrame({"image": image, "findings": text, "patient": patient.map(hash_patient).astype(np.int64),
                         "age": pd.NA, "sex": "", "view": "", "follow_up": pd.NA,
                         "uncertain": ""}).reset_index(drop=True)


def _attach_paths(df: pd.DataFrame, data_dir: Path, csv_path: Path, search: bool = True) -> pd.DataFrame:
    """A `path` per row: the image column as a path under data_dir, else (`search`) its file name found anywhere
    below it."""
    if df["image"].duplicated().any():
        dup = df["image"][df["image"].duplicated()].unique()[:5].tolist()
        raise DataError(f"{csv_path}: image(s) listed more than once, e.g. {dup}")
    files = None
    paths = []
    for image in df["image"]:
        direct = data_dir / image
        if direct.is_file():
            paths.append(direct)
            continue
        if not search:
            paths.append(None)
            continue
        files = index_images(data_dir) if files is None else files
        paths.append(files.get(Path(image).name))
    df = df.assign(path=paths)
    missing = df["image"][df["path"].isna()].tolist()
    if len(missing) == len(df):
        raise DataError(f"none of the {len(df)} images listed in {csv_path} was found under {data_dir} "
                        f"(e.g. {missing[:3]})")
    df = df[df["path"].notna()].reset_index(drop=True)
    df.attrs["missing"] = missing
    return df


def loss_mask(df: pd.DataFrame, labels: Sequence[str], informed: Sequence[str]) -> np.ndarray:
    """(N, L) float32: 1 where a label's truth may train the model, 0 for labels the data do not inform and for
    uncertain entries under the "ignore" policy."""
    mask = np.zeros((len(df), len(labels)), dtype=np.float32)
    for j, name in enumerate(labels):
        if name in informed:
            mask[:, j] = 1.0
    column = {name: j for j, name in enumerate(labels)}
    for i, text in enumerate(df["uncertain"].fillna("")):
        for name in filter(None, str(text).split("|")):
            if name in column:
                mask[i, column[name]] = 0.0
    return mask


def write_chexpert(df: pd.DataFrame, path: str | os.PathLike, labels: Sequence[str] = LABELS) -> None:
    """Write an index (NIH findings) as a CheXpert-format CSV: Path, Patient ID, Sex, Age, AP/PA and one column per
    mapped CheXpert finding (1 or 0); for moving NIH-labelled data into CheXpert-style tools and for tests."""
    targets = np.stack([parse_findings(text, labels) for text in df["findings"]]) if len(df) else None
    out = pd.DataFrame({"Path": df["image"], "Patient ID": df["patient"].astype(str),
                        "Sex": df["sex"].map({"M": "Male", "F": "Female"}).fillna(""),
                        "Age": df["age"].astype("string").fillna(""), "AP/PA": df["view"]})
    for src, dst in CHEXPERT_TO_NIH.items():
        out[src] = targets[:, list(labels).index(dst)].astype(int) if targets is not None else []
    out.to_csv(path, index=False)


DEFAULT_FRACTIONS = {"test": 0.3, "val": 0.15, "calibration": 0.3, "train": 0.25}


def local_splits(df: pd.DataFrame, test: float = 0.3, val: float = 0.15, calibration: float = 0.3,
                 seed: int = 0) -> dict[str, pd.DataFrame]:
    """Patient-wise {"test", "val", "calibration", "train"} parts of a local index (fractions of patients; train takes
    the rest), from the hashed patient IDs and the seed (data.patient_uniform), so a patient's part does not depend
    on which other patients are present. Raises DataError for fractions that leave no training part."""
    if min(test, val, calibration) <= 0 or test + val + calibration >= 1:
        raise DataError(f"test {test}, val {val} and calibration {calibration} fractions must be positive and "
                        "leave a training part (sum below 1)")
    splits = _assign_by_patient(df, {"test": test, "val": val, "calibration": calibration, "train": 1.0}, seed)
    check_patient_disjoint(splits)
    return splits
