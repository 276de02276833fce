"""Evaluate a checkpoint on NIH ChestX-ray14: honest metrics with confidence intervals, plots, subgroups, and
heatmap localization against NIH's boxes.

    python Model_Training/test.py --checkpoint CKPT --data-dir DIR [--split test|val|train|all] [--out DIR]
        [--limit N] [--bbox-csv BBox_List_2017.csv] [--bootstrap 1000] [--device auto|cpu|cuda]

The split is rebuilt exactly as training made it (official lists when present; the checkpoint's validation
fraction, seed and image limit). --out receives predictions.csv (so metrics can be recomputed without the model),
metrics.json, per_label.csv, roc.png, pr.png, confusion.png, reliability.png, report.md, args.json and, with
--bbox-csv, localization.csv. The per-label table is printed. Exit code 0 done, 2 bad input or data.
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from torch.utils.data import DataLoader

from chestxray.checkpoint import DEFAULT_CHECKPOINT, CheckpointError, Meta, load_checkpoint
from chestxray.data import (
    DataError,
    MissingImages,
    XrayDataset,
    collate_batch,
    has_official_lists,
    load_index,
    rebuild_splits,
    subsample,
    trained_images,
)
from chestxray.device import DeviceUnavailable, resolve_device
from chestxray.engine import predict_probabilities
from chestxray.fileio import write_json
from chestxray.localization import (
    BBoxError,
    evaluate_localization,
    localization_summary,
    read_bbox_csv,
)
from chestxray.meta import SplitSpec
from chestxray.metrics import evaluate_predictions
from chestxray.report import (
    per_label_frame,
    per_label_rows,
    text_table,
    write_plots,
    write_report,
)
from chestxray.transforms import build_normalize, build_transform
from Model_Training.cli import UsageError

SPLIT_CHOICES = ("test", "val", "train", "all")
SUBGROUPS = (("view", "PA"), ("view", "AP"), ("sex", "F"), ("sex", "M"))
PREDICTION_COLUMNS = ("image", "patient", "view", "sex", "age")


def get_args_parser() -> argparse.ArgumentParser:
    """The command line; every flag has a default except --data-dir."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--checkpoint", default=os.environ.get("CXR_CHECKPOINT", DEFAULT_CHECKPOINT),
        help="checkpoint to evaluate (default: $CXR_CHECKPOINT, else %(default)s)")
    add("--data-dir", required=True, help="NIH data folder: Data_Entry CSV (or labels.csv), images below it, "
        "optionally train_val_list.txt / test_list.txt (required)")
    add("--split", default="test", choices=SPLIT_CHOICES, help="test = the official test list (else the seeded "
        "patient-wise test split); val / train = the checkpoint's own validation / training split; all = every "
        "labelled image (default: %(default)s)")
    add("--out", default=None, help="output folder (default: eval/<checkpoint name>-<split>)")
    add("--limit", type=int, default=None, help="evaluate at most N images of the split, a seeded sample "
        "(smoke runs; default: all)")
    add("--bbox-csv", default=None, help="NIH's BBox_List_2017.csv: also score the heatmaps of the boxed images "
        "found under --data-dir (default: no localization)")
    add("--bootstrap", type=int, default=1000, help="patient-bootstrap replicates for the 95%% confidence "
        "intervals; 0 = none (default: %(default)s)")
    add("--seed", type=int, default=0, help="seed of the bootstrap and of --limit's sample (default: %(default)s)")
    add("--device", default="auto", choices=("auto", "cpu", "cuda"), help="auto = CUDA when available "
        "(default: %(default)s)")
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
    ]
    for ok, message in checks:
        if not ok:
            raise UsageError(message)


# ----------------------------------------------------------------------------------------------------------------
# Split


def select_split(index: pd.DataFrame, data_dir: Path, split: str, meta: Meta) -> tuple[pd.DataFrame, str, list]:
    """The rows to evaluate, a one-line description of them, and notes. Raises DataError when the split is empty."""
    if split == "all":
        return index, "every labelled image under the data folder (mixes training and held-out images)", []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        df = rebuild_splits(meta, index, data_dir)[split]
    notes = [str(w.message) for w in caught]
    official = has_official_lists(data_dir)
    spec = meta.split or SplitSpec(official=official)
    if split == "test":
        description = ("the official NIH test list (test_list.txt), patient-disjoint from training" if official
                       else "a seeded patient-wise test split (no official lists in the data folder; "
                            "not comparable with the official split)")
    elif split == "val":
        description = (f"the checkpoint's validation split ({spec.val_fraction:.0%} of the training "
                       f"patients, seed {spec.seed}"
                       + (f", limited to {spec.limit} images" if spec.limit else "")
                       + "); its thresholds were chosen on it, so thresholded metrics are optimistic")
    else:
        description = "the checkpoint's training split: the model has seen these images; scores are optimistic"
    if len(df) == 0:
        if split == "test" and official:
            raise DataError(
                f"the test split is empty: none of the {len(index)} labelled images under {data_dir} is in "
                "test_list.txt (they are all train_val images); evaluate another split with --split val, or point "
                "--data-dir at data that includes the official test images")
        raise DataError(f"the {split} split is empty ({len(index)} labelled images under {data_dir}); "
                        "choose another --split")
    return df.reset_index(drop=True), description, notes


# ----------------------------------------------------------------------------------------------------------------
# Predictions


def predictions_frame(rows: pd.DataFrame, labels, y_true: np.ndarray, y_prob: np.ndarray) -> pd.DataFrame:
    """predictions.csv content: image, patient, view, sex, age, then <label>_prob and <label>_true per label."""
    out = rows[[c for c in PREDICTION_COLUMNS if c in rows.columns]].reset_index(drop=True).copy()
    for j, name in enumerate(labels):
        out[f"{name}_prob"] = y_prob[:, j].astype(np.float64)  # written at full precision; metrics read these
        out[f"{name}_true"] = y_true[:, j].astype(int)
    return out


def read_predictions(path: str | os.PathLike, labels) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """Read predictions.csv back -> (frame, y_true (N, L), y_prob (N, L)) for recomputing metrics without a model."""
    df = pd.read_csv(path, dtype={"image": str, "view": str, "sex": str})
    y_true = df[[f"{name}_true" for name in labels]].to_numpy(dtype=np.float64)
    y_prob = df[[f"{name}_prob" for name in labels]].to_numpy(dtype=np.float64)
    return df, y_true, y_prob


def subgroup_masks(df: pd.DataFrame) -> dict[str, np.ndarray]:
    """{"view=PA", "view=AP", "sex=F", "sex=M"} -> boolean masks over df's rows."""
    return {f"{column}={value}": (df[column].astype(str).str.upper() == value).to_numpy()
            for column, value in SUBGROUPS if column in df.columns}


def evaluate_frame(df: pd.DataFrame, labels, thresholds, n_boot: int, seed: int) -> dict:
    """All metrics (metrics.evaluate_predictions) from a predictions frame, subgroups included."""
    y_true = df[[f"{name}_true" for name in labels]].to_numpy(dtype=np.float64)
    y_prob = df[[f"{name}_prob" for name in labels]].to_numpy(dtype=np.float64)
    return evaluate_predictions(y_true, y_prob, labels, thresholds, df["patient"].to_numpy(),
                                subgroups=subgroup_masks(df), n_boot=n_boot, seed=seed)


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
    device = resolve_device(args.device)
    model, meta, _ = load_checkpoint(args.checkpoint, map_location="cpu")
    model = model.to(device)
    data_dir = Path(args.data_dir)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        index = load_index(data_dir, allow_missing=args.allow_missing)
    rows, description, notes = select_split(index, data_dir, args.split, meta)
    notes = [str(w.message) for w in caught] + notes
    if args.limit:
        rows = subsample(rows, args.limit, args.seed)
    out = Path(args.out or Path("eval") / f"{Path(args.checkpoint).stem}-{args.split}")
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "args.json", vars(args))
    for note in notes:
        _log(f"warning: {note}")
    _log(f"evaluating {args.checkpoint} ({meta.arch}, {meta.image_size} px, {len(meta.labels)} labels) on "
         f"{len(rows)} images of {rows['patient'].nunique()} patients: {args.split} split, {description}")

    frame, unreadable = predict_frame(args, model, meta, rows, device)
    # Full float precision (pandas writes the shortest repr that reads back exactly): metrics recomputed from
    # predictions.csv equal metrics.json's; %.6g created ties that moved AUROCs by up to 3e-5.
    frame.to_csv(out / "predictions.csv", index=False)
    metrics = evaluate_frame(frame, meta.labels, meta.thresholds, args.bootstrap, args.seed)
    rule = meta.training.get("threshold_rule")
    context = {
        "checkpoint": str(args.checkpoint), "arch": meta.arch, "image_size": meta.image_size,
        "data_dir": str(data_dir), "split": args.split, "split_description": description, "limit": args.limit,
        "threshold_source": (f"max {'F1' if rule == 'f1' else rule} on the validation split" if rule
                             else "as stored in the checkpoint"),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": str(device), "unreadable": unreadable, "notes": notes,
        "training": {k: meta.training.get(k) for k in ("data", "epochs", "val_mean_auroc", "date", "commit")},
    }
    metrics["run"] = context
    if args.bbox_csv:
        metrics["localization"] = localize(args, model, meta, index, data_dir, device, out)
    plots = write_outputs(out, frame, metrics, meta, context)
    _print_summary(metrics, out, args, plots)
    return 0


def predict_frame(args: argparse.Namespace, model, meta: Meta, rows: pd.DataFrame, device):
    """The checkpoint's preprocessing and the shared evaluation loop -> (predictions frame, unreadable names)."""
    dataset = XrayDataset(rows, meta.labels, build_transform(meta, train=False), args.cache_dir,
                          skip_unreadable=True)
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=False, num_workers=args.workers,
                        collate_fn=collate_batch, pin_memory=device.type == "cuda")
    y_prob, y_true, indices = predict_probabilities(model, loader, device, build_normalize(meta),
                                                    amp=args.amp and device.type == "cuda",
                                                    progress=not args.no_progress)
    unreadable = sorted(set(rows["image"]) - set(rows["image"].iloc[indices]))
    if unreadable:
        _log(f"warning: {len(unreadable)} unreadable image(s) left out: {', '.join(unreadable[:10])}"
             + (" ..." if len(unreadable) > 10 else ""))
    if len(indices) == 0:
        raise DataError(f"none of the {len(rows)} images of the {args.split} split could be read")
    evaluated = rows.iloc[indices].reset_index(drop=True)
    return predictions_frame(evaluated, meta.labels, y_true, y_prob), unreadable


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


def write_outputs(out: Path, frame: pd.DataFrame, metrics: dict, meta: Meta, context: dict) -> list[str]:
    """metrics.json, per_label.csv, the plots and report.md -> the plots' file names."""
    write_json(out / "metrics.json", metrics)
    per_label_frame(metrics).to_csv(out / "per_label.csv", index=False, float_format="%.6g")
    plots = write_plots(frame[[f"{n}_true" for n in meta.labels]].to_numpy(),
                        frame[[f"{n}_prob" for n in meta.labels]].to_numpy(), meta.labels, metrics, out)
    write_report(out / "report.md", metrics, context, plots)
    return [p.name for p in plots.values()]


def _print_summary(metrics: dict, out: Path, args: argparse.Namespace, plots: list[str]) -> None:
    _log("")
    _log(text_table(*per_label_rows(metrics)))
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
