"""Evaluate a checkpoint on NIH ChestX-ray14 or another labelled folder, as the user gets it: the product's calls
(positive / negative / not validated / out of scope, from the same Predictor the app uses) scored against the labels,
the in-scope acceptance rate, calibration, trivial baselines, and AUROCs with confidence intervals, plots, subgroups
and heatmap localization against NIH's boxes.

    python Model_Training/test.py --checkpoint CKPT --data-dir DIR [--split test|calibration|val|train|all]
        [--external] [--in-sample] [--train-data-dir DIR] [--out DIR] [--limit N] [--bbox-csv BBox_List_2017.csv]
        [--bootstrap 1000] [--device auto|cpu|cuda] [--backend torch|onnx]

The split is rebuilt exactly as training made it (official lists when present; the checkpoint's fractions, seed and
image limit). Splits that fitted the model or its trust statistics (train, val, calibration, or --split all over
them) are in-sample: they are refused unless --in-sample is given, and then the report says so in its title.
--external evaluates every labelled image of a folder from another source (a Data_Entry-style labels CSV) under the
heading "external validation", scope acceptance first. --out receives predictions.csv (probabilities, calls and
the in-scope verdict per image, so metrics can be recomputed without the model), metrics.json, per_label.csv,
roc.png, pr.png, confusion.png, reliability.png, report.md, args.json and, with --bbox-csv, localization.csv.
Exit code 0 done, 2 bad input or data.
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from chestxray.baselines import metadata_baseline, prevalence_baseline
from chestxray.checkpoint import DEFAULT_CHECKPOINT, CheckpointError, Meta
from chestxray.data import (
    DataError,
    MissingImages,
    bundled_metadata,
    has_official_lists,
    load_index,
    rebuild_splits,
    subsample,
    targets,
    trained_images,
)
from chestxray.device import DeviceUnavailable
from chestxray.evaluation import (
    evaluate_frame,
    frame_arrays,
    predict_frame,
    user_metrics,
    write_outputs,
)
from chestxray.fileio import write_json
from chestxray.localization import (
    BBoxError,
    evaluate_localization,
    localization_summary,
    read_bbox_csv,
)
from chestxray.messages import UsageError
from chestxray.meta import SplitSpec
from chestxray.metrics import calibration
from chestxray.predictor import Predictor
from chestxray.reporting.metrics_report import (
    baseline_lines,
    decision_rows,
    per_label_rows,
    plot_reliability,
    scope_lines,
    text_table,
)
from chestxray.trust.calibration import Calibration, calibration_report

SPLIT_CHOICES = ("test", "calibration", "val", "train", "all")
# The splits whose images chose something about the checkpoint: its weights, its epoch, its calibration, thresholds,
# evidence or scope limit. Scores on them are in-sample.
FITTING_SPLITS = ("train", "val", "calibration")

BBOX_LIST = "BBox_List_2017.csv"  # looked for in --data-dir, else the bundled copy, when --bbox-csv is not given


def get_args_parser() -> argparse.ArgumentParser:
    """The command line; every flag has a default except --data-dir."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--checkpoint", default=os.environ.get("CXR_CHECKPOINT", DEFAULT_CHECKPOINT),
        help="checkpoint to evaluate (default: $CXR_CHECKPOINT, else %(default)s)")
    add("--data-dir", required=True, help="NIH data folder: Data_Entry CSV (or labels.csv), images below it, "
        "optionally train_val_list.txt / test_list.txt (required)")
    add("--split", default=None, choices=SPLIT_CHOICES, help="test = the official test list (else the seeded "
        "patient-wise test split); calibration / val / train = the checkpoint's own calibration, validation or "
        "training split (in-sample: needs --in-sample); all = every labelled image (default: test, or all with "
        "--external)")
    add("--external", action="store_true", help="the data folder is from another source than the training data "
        "(another NIH subset, or any folder with a Data_Entry-style labels.csv): evaluate all its labelled images as "
        "an external validation; refused when it is the checkpoint's training data (default: off)")
    add("--in-sample", action="store_true", help="allow evaluating images that fitted the checkpoint (its train, "
        "val or calibration split); the report is then titled in-sample, not an independent estimate "
        "(default: refused)")
    add("--train-data-dir", default=None, help="the data folder the checkpoint was trained on, for the metadata "
        "baseline (fitted on its training split) and the overlap check of --external / --split all (default: "
        "--data-dir, except with --external: none, and the baseline is reported as not available)")
    add("--out", default=None, help="output folder (default: eval/<checkpoint name>-<split>)")
    add("--limit", type=int, default=None, help="evaluate at most N images of the split, a seeded sample "
        "(smoke runs; default: all)")
    add("--bbox-csv", default=None, help="NIH's BBox_List_2017.csv: also score the heatmaps of the boxed images "
        "found under --data-dir (default: --data-dir's BBox_List_2017.csv, else the copy bundled in "
        "samples/nih-metadata, when it boxes any image there; else no localization)")
    add("--bootstrap", type=int, default=1000, help="patient-bootstrap replicates for the 95%% confidence "
        "intervals; 0 = none (default: %(default)s)")
    add("--seed", type=int, default=0, help="seed of the bootstrap and of --limit's sample (default: %(default)s)")
    add("--device", default="auto", choices=("auto", "cpu", "cuda"), help="auto = CUDA when available "
        "(default: %(default)s)")
    add("--backend", choices=("torch", "onnx"), default="torch", help="torch, or onnx: ONNX Runtime on the export "
        "of --checkpoint (a .onnx file, or the .onnx beside the checkpoint) (default: %(default)s)")
    add("--batch-size", type=int, default=32, help="images per forward pass (default: %(default)s)")
    add("--workers", type=int, default=min(4, os.cpu_count() or 1), help="data-loading processes "
        "(default: %(default)s)")
    add("--cache-dir", default=None, help="resized-image cache folder shared with training (default: none, "
        "read the original files)")
    add("--allow-missing", action="store_true", help="skip labelled images whose file is missing, and report "
        "them (default: stop with a count and examples)")
    add("--amp", action="store_true", help="float16 autocast on CUDA (default: off)")
    add("--no-progress", action="store_true", help="no progress bars (default: bars on stderr)")
    return parser


def _check_args(args: argparse.Namespace) -> None:
    checks = [
        (args.limit is None or args.limit >= 1, f"--limit must be at least 1, got {args.limit}"),
        (args.bootstrap >= 0, f"--bootstrap must be 0 (no intervals) or more, got {args.bootstrap}"),
        (args.batch_size >= 1, f"--batch-size must be at least 1, got {args.batch_size}"),
        (args.workers >= 0, f"--workers must be non-negative, got {args.workers}"),
        (args.bbox_csv is None or Path(args.bbox_csv).is_file(), f"--bbox-csv: no such file {args.bbox_csv}"),
        (not args.external or args.split in (None, "all"), f"--external evaluates every labelled image of the "
         f"folder (--split all); drop --split {args.split}"),
        (args.train_data_dir is None or Path(args.train_data_dir).is_dir(),
         f"--train-data-dir: no such folder {args.train_data_dir}"),
    ]
    for ok, message in checks:
        if not ok:
            raise UsageError(message)
    if args.split is None:
        args.split = "all" if args.external else "test"


# ----------------------------------------------------------------------------------------------------------------
# Split


@dataclass
class Selection:
    """The images to evaluate and how to word them. in_sample: why the scores are not an independent estimate
    (None when they are); overlap: the images and patients they share with the splits that fitted the checkpoint."""

    rows: pd.DataFrame
    description: str
    notes: list[str]
    in_sample: str | None
    overlap: dict


def training_label_file(meta: Meta, index: pd.DataFrame) -> bool | None:
    """True when `index` was read from the label file the checkpoint was trained on (same SHA-256), False when from
    another, None when the checkpoint records none."""
    spec, entry = meta.split, index.attrs.get("data_entry")
    if spec is None or spec.data_entry_sha256 is None or not entry:
        return None
    return hashlib.sha256(Path(entry).read_bytes()).hexdigest() == spec.data_entry_sha256


def _rebuild(meta: Meta, index: pd.DataFrame, data_dir: Path) -> tuple[dict[str, pd.DataFrame], list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        splits = rebuild_splits(meta, index, data_dir)
    return splits, [str(w.message) for w in caught]


def fitting_splits(splits: dict[str, pd.DataFrame]) -> dict[str, pd.DataFrame]:
    """The splits that fitted the checkpoint, each once: a legacy checkpoint's calibration split is its validation
    split (attrs["same_as"]) and is not counted twice."""
    return {name: splits[name] for name in FITTING_SPLITS if name in splits and not splits[name].attrs.get("same_as")}


def training_overlap(meta: Meta, index: pd.DataFrame, data_dir: Path, train_dir: Path | None) -> dict:
    """How many of index's images and patients are in the checkpoint's fitting splits -> {"checked", "images",
    "patients", "by_split": {split: images}, "how": sentence}; images/patients None when it cannot be checked.

    The fitting splits are rebuilt from the folder whose label file is the one training read (this one, else
    train_dir). Raises DataError when train_dir is not that folder."""
    same = training_label_file(meta, index)
    source = None
    if same:
        source, src_index, src_dir = "this folder's own split, as the checkpoint records it", index, data_dir
    elif train_dir is not None and Path(train_dir).resolve() != Path(data_dir).resolve():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            src_index = load_index(train_dir, allow_missing=True)
        if training_label_file(meta, src_index) is False:
            raise DataError(f"--train-data-dir {train_dir} is not the data this checkpoint was trained on (its label "
                            "file differs from the one recorded in the checkpoint)")
        source, src_dir = f"the checkpoint's split of {train_dir}", Path(train_dir)
    if source is None:
        how = ("the checkpoint does not record its training data, so overlap with it cannot be checked" if same is None
               else "its label file is not the one the checkpoint was trained on; images or patients shared with the "
                    "training data are not checked without --train-data-dir")
        return {"checked": False, "images": None, "patients": None, "by_split": None, "how": how}
    fitting = fitting_splits(_rebuild(meta, src_index, src_dir)[0])
    names, patients = set(index["image"]), set(index["patient"].tolist())
    fit_names = set().union(*(set(df["image"]) for df in fitting.values()))
    fit_patients = set().union(*(set(df["patient"].tolist()) for df in fitting.values()))
    return {"checked": True, "images": len(names & fit_names), "patients": len(patients & fit_patients),
            "by_split": {name: int(df["image"].isin(names).sum()) for name, df in fitting.items()},
            "how": f"checked against {source}"}


def _role(meta: Meta, split: str, legacy: bool) -> str:
    recorded = ((meta.training.get("split") or {}).get("roles") or {}).get(split) or {}
    if recorded.get("role"):
        return recorded["role"]
    if split == "train":
        return "fit weights"
    if split == "val" and legacy:
        return "epoch selection, calibration, thresholds, evidence, scope limit"
    return "epoch selection" if split == "val" else "calibration, thresholds, evidence, scope limit"


def select_split(index: pd.DataFrame, data_dir: Path, args: argparse.Namespace, meta: Meta) -> Selection:
    """The rows to evaluate, their description, notes and whether they are in-sample. Raises UsageError for
    in-sample images without --in-sample and for an --external folder that is (or holds) the training data, and
    DataError when the split is empty."""
    split = args.split
    train_dir = Path(args.train_data_dir) if args.train_data_dir else None
    if split == "all":
        if args.external and training_label_file(meta, index):
            raise UsageError(f"--external: {data_dir} is the data this checkpoint was trained on (its label file is "
                             "the recorded one); evaluate its --split test instead")
        return _select_all(index, data_dir, args, training_overlap(meta, index, data_dir, train_dir))
    splits, notes = _rebuild(meta, index, data_dir)
    official = has_official_lists(data_dir, index)
    spec = meta.split or SplitSpec(official=official)
    legacy = "calibration" not in splits or splits["calibration"].attrs.get("same_as") == "val"
    df = splits["val" if split == "calibration" and "calibration" not in splits else split]
    in_sample = None
    if split == "test":
        description = ("the official NIH test list (test_list.txt), patient-disjoint from training" if official
                       else "a seeded patient-wise test split (no official lists in the data folder; "
                            "not comparable with the official split)")
        overlap = {"checked": True, "images": 0, "patients": 0, "by_split": None,
                   "how": "patient-disjoint from the fitting splits by construction"}
    else:
        role = _role(meta, split, legacy)
        limit = f", each split limited to {spec.limit} images" if spec.limit else ""
        description = f"the checkpoint's {'validation' if split == 'val' else split} split{limit} (its role: {role})"
        if split == "calibration" and legacy:
            description = ("the checkpoint's validation split: this checkpoint has no calibration split of its own, "
                           f"its validation split served as one{limit} (its role: {role})")
        in_sample = (f"these images are the checkpoint's {split} split, used for: {role}; figures on them are "
                     "in-sample and optimistic, not an independent estimate")
        overlap = {"checked": True, "images": len(df), "patients": int(df["patient"].nunique()),
                   "by_split": {split: len(df)}, "how": "the split itself"}
    if in_sample and not args.in_sample:
        raise UsageError(f"refusing to report --split {split} as an evaluation: {in_sample}. Evaluate --split test "
                         "or an --external folder for independent figures, or pass --in-sample to report these "
                         "figures titled as in-sample")
    if len(df) == 0:
        if split == "test" and official:
            raise DataError(
                f"the test split is empty: none of the {len(index)} labelled images under {data_dir} is in "
                "test_list.txt (they are all train_val images); point --data-dir at data that includes the official "
                "test images, evaluate another folder with --external, or (in-sample) --split val --in-sample")
        raise DataError(f"the {split} split is empty ({len(index)} labelled images under {data_dir}); "
                        "choose another --split")
    return Selection(df.reset_index(drop=True), description, notes, in_sample, overlap)


def _select_all(index: pd.DataFrame, data_dir: Path, args: argparse.Namespace, overlap: dict) -> Selection:
    what = "every labelled image of an external folder" if args.external else \
        "every labelled image under the data folder"
    in_sample = None
    if not overlap["checked"]:
        description = f"{what}; {overlap['how']}"
    elif overlap["images"]:
        parts = ", ".join(f"{n} in {name}" for name, n in overlap["by_split"].items() if n)
        if args.external:
            raise UsageError(f"--external: {overlap['images']} of the images under {data_dir} fitted this "
                             f"checkpoint ({parts}; {overlap['how']}); an external validation needs data the "
                             "model never saw")
        description = f"{what}, including {overlap['images']} images that fitted the checkpoint ({parts})"
        in_sample = (f"{overlap['images']} of these {len(index)} images fitted the checkpoint ({parts}); figures "
                     "on them are in-sample and optimistic, not an independent estimate")
    else:
        description = f"{what}; none of them fitted the checkpoint ({overlap['how']})"
        if overlap["patients"]:
            description += (f"; {overlap['patients']} of its patients also have images in the fitting splits, so "
                            "those images are not independent of training")
    if in_sample and not args.in_sample:
        raise UsageError(f"refusing to report --split all as an evaluation: {in_sample}. Evaluate --split test for "
                         "independent figures, or pass --in-sample to report these figures titled as in-sample")
    return Selection(index.reset_index(drop=True), description, [], in_sample, overlap)


# ----------------------------------------------------------------------------------------------------------------
# Main


def main(args: argparse.Namespace) -> int:
    """Evaluate; returns the exit code (0 done, 2 bad input or data)."""
    try:
        return _evaluate(args)
    except (UsageError, DataError, CheckpointError, BBoxError, DeviceUnavailable) as exc:
        advice = {MissingImages: " (on the command line: --allow-missing)",
                  DeviceUnavailable: " (pass --device cpu or auto)"}.get(type(exc), "")
        print(f"error: {exc}{advice}", file=sys.stderr, flush=True)
        return 2


def _log(*parts) -> None:
    print(*parts, flush=True)


def _evaluate(args: argparse.Namespace) -> int:
    _check_args(args)
    if args.backend == "onnx" and args.bbox_csv:
        raise UsageError("--bbox-csv (heatmap localization) runs on --backend torch; drop one of them")
    # The product's own inference path: the calls scored here are the ones the app would show for these images.
    predictor = Predictor.from_checkpoint(args.checkpoint, device=args.device, backend=args.backend)
    meta = predictor.meta
    data_dir = Path(args.data_dir)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        index = load_index(data_dir, allow_missing=args.allow_missing)
    selection = select_split(index, data_dir, args, meta)
    rows = selection.rows
    notes = [str(w.message) for w in caught] + selection.notes
    if args.limit:
        rows = subsample(rows, args.limit, args.seed)
    out = Path(args.out or Path("eval") / f"{Path(args.checkpoint).stem}-{'external' if args.external else args.split}")
    out.mkdir(parents=True, exist_ok=True)
    args.bbox_csv = args.bbox_csv or (find_bbox_csv(index, data_dir) if args.backend == "torch" else None)
    write_json(out / "args.json", vars(args))
    if args.external and not selection.overlap["checked"]:
        notes.append(f"--external: overlap with the training data not checked: {selection.overlap['how']}")
    for note in notes:  # e.g. the bundled official metadata standing in for the data folder's own
        print(f"warning: {note}", file=sys.stderr, flush=True)
    heading = "external validation" if args.external else ("in-sample evaluation" if selection.in_sample else "")
    _log(f"{heading + ' of ' if heading else 'evaluating '}{args.checkpoint} ({meta.arch}, {meta.image_size} px, "
         f"{len(meta.labels)} labels) on {len(rows)} images of {rows['patient'].nunique()} patients: {args.split} "
         f"split, {selection.description}")

    frame, unreadable = predict_frame(predictor, rows, batch_size=args.batch_size, workers=args.workers,
                                      cache_dir=args.cache_dir, amp=args.amp, progress=not args.no_progress,
                                      split=args.split, log=_log)
    metrics = evaluate_frame(frame, meta.labels, meta.thresholds, args.bootstrap, args.seed)
    metrics.update(user_metrics(frame, predictor, args.bootstrap, args.seed))
    # Beside the pooled reliability (metrics.calibration): each label's ECE and Brier with their intervals.
    metrics["calibration"]["per_label"] = metrics.pop("calibration_errors")
    metrics["baselines"] = baseline_metrics(args, meta, index, data_dir, frame)
    # Full float precision (pandas writes the shortest repr that reads back exactly): metrics recomputed from
    # predictions.csv equal metrics.json's; %.6g created ties that moved AUROCs by up to 3e-5.
    frame.to_csv(out / "predictions.csv", index=False)
    rule = meta.training.get("threshold_rule")
    context = {
        "checkpoint": str(args.checkpoint), "arch": meta.arch, "image_size": meta.image_size,
        "data_dir": str(data_dir), "split": args.split, "split_description": selection.description,
        "limit": args.limit, "external": bool(args.external), "in_sample": selection.in_sample,
        "training_overlap": selection.overlap,
        "threshold_source": (f"max {'F1' if rule == 'f1' else rule} on the checkpoint's fitting split" if rule
                             else "as stored in the checkpoint"),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": str(predictor.device) if args.backend == "torch" else f"onnxruntime {predictor.onnx.providers[0]}",
        "backend": args.backend, "unreadable": unreadable, "notes": notes,
        "training": {k: meta.training.get(k) for k in ("data", "epochs", "val_mean_auroc", "date", "commit")},
    }
    metrics["run"] = context
    metrics["calibration_per_label"] = calibration_before_after(frame, meta.labels, predictor.trust.calibration)
    if args.bbox_csv:
        metrics["localization"] = localize(args, predictor.model, meta, index, data_dir, predictor.device, out)
    plots = write_outputs(out, frame, metrics, meta, context)
    plots.append(plot_uncalibrated(out, frame, meta.labels))
    _print_summary(metrics, out, args, plots)
    _print_calibration(metrics["calibration_per_label"])
    return 0


def training_rows(args: argparse.Namespace, meta: Meta, index: pd.DataFrame, data_dir: Path
                  ) -> tuple[pd.DataFrame | None, str]:
    """The checkpoint's training split (for the metadata baseline) and a sentence on where it came from; None and
    the reason when it is not at hand (an --external folder without --train-data-dir, another data set)."""
    if meta.split is None:
        return None, "the checkpoint does not record its training split"
    train_dir = Path(args.train_data_dir) if args.train_data_dir else (None if args.external else data_dir)
    if train_dir is None:
        return None, ("an external folder holds no training data; pass --train-data-dir (the folder the checkpoint "
                      "was trained on) to fit it on the checkpoint's training split")
    if train_dir.resolve() == data_dir.resolve():
        source = index
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            source = load_index(train_dir, allow_missing=True)
    same = training_label_file(meta, source)
    if same is False:
        return None, (f"{train_dir} is not the data this checkpoint was trained on (its label file differs from the "
                      "recorded one); pass --train-data-dir with the folder it was trained on")
    rows = _rebuild(meta, source, train_dir)[0]["train"]
    if not len(rows):
        return None, f"the checkpoint's training split of {train_dir} holds no image"
    return rows, (f"fitted on the checkpoint's training split of {train_dir} ({len(rows)} images)"
                  + ("" if same else "; the checkpoint does not record its label file, so the split is rebuilt from "
                                     "that folder as its recorded fractions and seed say"))


def baseline_metrics(args: argparse.Namespace, meta: Meta, index: pd.DataFrame, data_dir: Path,
                     frame: pd.DataFrame) -> dict:
    """{"prevalence": baselines.prevalence_baseline, "metadata": baselines.metadata_baseline plus "available" and
    "source" (or {"available": False, "reason"})}; adds <label>_metadata_prob columns to frame."""
    labels = meta.labels
    y_true, y_prob, _, _ = frame_arrays(frame, labels)
    patients = frame["patient"].to_numpy()
    train, source = training_rows(args, meta, index, data_dir)
    y_train = targets(train, labels) if train is not None else None
    prevalence = prevalence_baseline(y_true, labels, patients, y_train.mean(axis=0) if y_train is not None else None,
                                     args.bootstrap, args.seed)
    if train is None:
        return {"prevalence": prevalence, "metadata": {"available": False, "reason": source}}
    metadata, prob = metadata_baseline(train, y_train, frame, y_true, labels, patients, y_prob, args.bootstrap,
                                       args.seed)
    for j, name in enumerate(labels):
        frame[f"{name}_metadata_prob"] = prob[:, j]
    return {"prevalence": prevalence, "metadata": {"available": True, "source": source, **metadata}}


def calibration_before_after(frame: pd.DataFrame, labels, cal: Calibration | None) -> dict:
    """ECE (10 bins) and Brier per label of sigmoid(logit) ("before") and of the calibrated probability ("after";
    None when the checkpoint has no calibration)."""
    y = frame[[f"{n}_true" for n in labels]].to_numpy()
    logits = frame[[f"{n}_logit" for n in labels]].to_numpy()
    return {"before": calibration_report(y, Calibration.identity(labels).apply(logits), labels),
            "after": calibration_report(y, cal.apply(logits), labels) if cal is not None else None}


def plot_uncalibrated(out: Path, frame: pd.DataFrame, labels) -> str:
    """reliability_uncalibrated.png: the reliability diagram of sigmoid(logit), beside the calibrated one."""
    y = frame[[f"{n}_true" for n in labels]].to_numpy()
    raw = Calibration.identity(labels).apply(frame[[f"{n}_logit" for n in labels]].to_numpy())
    return plot_reliability(calibration(y, raw), out / "reliability_uncalibrated.png").name


def _print_calibration(report: dict) -> None:
    after = report["after"]
    _log("\ncalibration per label: ECE / Brier " + ("before -> after Platt scaling" if after else
                                                   "(the checkpoint has no calibration)"))
    for name, b in report["before"].items():
        if b["ece"] is None:
            continue
        line = f"  {name:<20} ECE {_pct(b['ece'])}  Brier {b['brier']:.4f}"
        if after:
            a = after[name]
            line += f"  ->  ECE {_pct(a['ece'])}  Brier {a['brier']:.4f}"
        _log(line)


def find_bbox_csv(index: pd.DataFrame, data_dir: Path) -> str | None:
    """Without --bbox-csv: data_dir's BBox_List_2017.csv, else the bundled copy (saying so on stderr), when it boxes
    any image of the index; None otherwise (no localization)."""
    own = data_dir / BBOX_LIST
    path = own if own.is_file() else bundled_metadata(BBOX_LIST)
    if path is None or not index["image"].isin(set(read_bbox_csv(path)["image"])).any():
        return None
    if path != own:
        print(f"warning: no --bbox-csv and no {BBOX_LIST} in {data_dir}: scoring the heatmaps with the copy "
              f"bundled in {path.parent}", file=sys.stderr, flush=True)
    return str(path)


def localize(args: argparse.Namespace, model, meta: Meta, index: pd.DataFrame, data_dir: Path, device,
             out: Path) -> dict:
    """Score the heatmaps of every boxed image under the data folder (whatever --split says) -> the summary."""
    boxes = read_bbox_csv(args.bbox_csv)
    boxed = index[index["image"].isin(set(boxes["image"]))]
    paths = dict(zip(boxed["image"], boxed["path"], strict=True))
    _log(f"localization: {len(boxes)} boxes on {boxes['image'].nunique()} images in {args.bbox_csv}; "
         f"{len(paths)} of those images are under {data_dir}")
    details = evaluate_localization(model, meta, boxes, paths, device, progress=not args.no_progress)
    details.to_csv(out / "localization.csv", index=False, float_format="%.6g")
    # Training membership comes from the split the checkpoint recorded (its SplitSpec and label-file hash), not
    # from a new split of whatever folder is evaluated.
    trained = trained_images(meta, index, data_dir)
    trained_on = sorted(set(details["image"]) & trained) if trained is not None else []
    if trained is None:
        _log("notice: the checkpoint does not record its training data, so boxed images cannot be checked against "
             "its training split")
    elif trained_on:
        _log(f"warning: {len(trained_on)} boxed image(s) are in this checkpoint's training split")
    return {"bbox_csv": str(args.bbox_csv), **localization_summary(details, boxes, meta.labels),
            "images_in_training_split": len(trained_on) if trained is not None else None}


def _print_summary(metrics: dict, out: Path, args: argparse.Namespace, plots: list[str]) -> None:
    _log("")
    _log(text_table(*per_label_rows(metrics)))
    _log("\nthe product's calls (" + " ".join(scope_lines(metrics)) + ")")
    _log(text_table(*decision_rows(metrics, "all")))
    if metrics["not_validated"]:
        _log(f"not validated (never called): {', '.join(metrics['not_validated'])}")
    _log(" ".join(baseline_lines(metrics)).replace("**", ""))
    acc = metrics["accuracy"]
    _log(f"\naccuracy per (image, label) {_pct(acc['per_label_mean'])} (all-negative baseline "
         f"{_pct(acc['all_negative_baseline'])}); exact match of whole label sets {_pct(acc['exact_match'])} "
         f"(all-negative baseline {_pct(acc['exact_match_all_negative_baseline'])})")
    if "localization" in metrics:
        loc = metrics["localization"]["overall"]
        if loc["boxes"]:
            _log(f"localization on {loc['boxes']} boxes: accuracy at T(IoBB)=0.5 {_pct(loc['accuracy']['0.5'])}, "
                 f"pointing game {_pct(loc['pointing_game'])} (centre baseline {_pct(loc['centre_baseline'])})")
        else:
            _log("localization: no boxed image under the data folder, nothing to score")
    _log(f"wrote {out}/: predictions.csv metrics.json per_label.csv report.md "
         + " ".join(plots) + (" localization.csv" if args.bbox_csv else ""))


def _pct(value) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
