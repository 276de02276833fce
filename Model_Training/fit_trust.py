"""Fit the in-scope check, calibration, evidence and the orientation check into an existing checkpoint, without
retraining.

    python Model_Training/fit_trust.py --checkpoint chestxray_model_resnet50.pth --data-dir /path/to/nih

Rebuilds the checkpoint's own train / validation / calibration split (the seed, fractions and image limit it was
trained with), runs the model once over the training and calibration splits, and writes into the checkpoint
(atomically; --out for another file): scope statistics (training split) and their limit (calibration split),
per-label Platt calibration, thresholds chosen on the calibrated scale and per-label evidence (calibration split),
the orientation check (mirrored and rotated copies of --orientation-images training images), and which split served
which role (meta.training["split"]["roles"]). The validation split, which chose the epoch, is not used. A checkpoint
trained before the calibration split existed has none: its validation split is used, with a warning (see
chestxray/trust.py).
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

from torch.utils.data import DataLoader

from chestxray.checkpoint import CheckpointError, Meta, checkpoint_from_obj, safe_torch_load, write_checkpoint
from chestxray.data import DataError, XrayDataset, collate_batch, load_index, rebuild_splits, subsample, with_roles
from chestxray.device import resolve_device
from chestxray.metrics import THRESHOLD_RULES
from chestxray.transforms import build_normalize, build_transform
from chestxray.trust import TRUST_KEY, fit_trust
from chestxray.trust.orientation import DEFAULT_IMAGES
from chestxray.trust.scope import DEFAULT_METHOD, DEFAULT_PERCENTILE, METHODS, ScopeError


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--checkpoint", required=True, help="checkpoint to upgrade (written by Model_Training/train.py)")
    add("--data-dir", required=True, help="the NIH data folder the checkpoint was trained on (Data_Entry CSV + "
        "images)")
    add("--out", default=None, help="where to write the upgraded checkpoint (default: replace --checkpoint)")
    add("--threshold-rule", default=None, choices=THRESHOLD_RULES, help="rule for thresholds on the calibrated "
        "scale (default: the one the checkpoint was trained with, else f1)")
    add("--scope-method", default=DEFAULT_METHOD, choices=METHODS, help="in-scope score (default: %(default)s)")
    add("--percentile", type=float, default=DEFAULT_PERCENTILE, help="scope limit = this percentile of the "
        "calibration split's scores (default: %(default)s)")
    add("--orientation-images", type=int, default=DEFAULT_IMAGES, help="training images whose upright, mirrored "
        "and rotated copies fit the orientation check; 0 = no orientation check (default: %(default)s)")
    add("--n-boot", type=int, default=1000, help="patient-bootstrap replicates for the AUROC CIs "
        "(default: %(default)s)")
    add("--batch-size", type=int, default=32, help="images per batch (default: %(default)s)")
    add("--workers", type=int, default=0, help="data-loading processes (default: %(default)s)")
    add("--cache-dir", default=None, help="resized-image cache folder, as in training (default: none)")
    add("--device", default="auto", choices=("auto", "cpu", "cuda"), help="default: %(default)s")
    add("--progress", action="store_true", help="show progress bars (default: off)")
    return parser


def training_splits(meta: Meta, data_dir: str | os.PathLike) -> dict:
    """The train / val / calibration DataFrames of the checkpoint, from the SplitSpec it recorded (a checkpoint
    without a calibration split gets its validation frame as "calibration", marked attrs["same_as"] = "val")."""
    if meta.split is None:
        raise CheckpointError("the checkpoint records no training split (seed, val_fraction); retrain it with "
                              "Model_Training/train.py, which records them")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the split notices were shown at training time
        index = load_index(data_dir, allow_missing=True)
        splits = rebuild_splits(meta, index, data_dir)
    return {name: splits[name] for name in ("train", "val", "calibration")}


def fit_checkpoint(args: argparse.Namespace, log=print) -> dict:
    """Load, fit, and write the upgraded checkpoint; returns the checkpoint dict written."""
    obj = safe_torch_load(args.checkpoint)  # kept whole: the upgraded file keeps every entry it had
    model, meta, _ = checkpoint_from_obj(obj, args.checkpoint)
    splits = training_splits(meta, args.data_dir)
    legacy = bool(splits["calibration"].attrs.get("same_as"))
    held = "val" if legacy else "calibration"
    expected = (meta.training.get("n_train"), meta.training.get("n_val"))
    got = (len(splits["train"]), len(splits["val"]))
    if expected[0] is not None and got != expected:
        log(f"warning: the rebuilt split has {got[0]} train / {got[1]} val images; the checkpoint was trained on "
            f"{expected[0]} / {expected[1]} (is --data-dir the training folder?)")
    if legacy:
        log("warning: this checkpoint was trained without a calibration split: calibration, thresholds, evidence and "
            "the scope limit are fitted on its validation split, the images that chose its epoch (retrain with "
            "Model_Training/train.py for a separate calibration split)")
    if not len(splits["train"]) or not len(splits["calibration"]):
        raise DataError(f"the rebuilt split has {got[0]} train / {len(splits['calibration'])} {held} images; both "
                        "must be non-empty")
    device = resolve_device(args.device)
    tf, normalize = build_transform(meta, train=False), build_normalize(meta)
    frames = {"train": splits["train"], "calibration": splits["calibration"]}
    if args.orientation_images > 0:
        frames["orientation"] = subsample(splits["train"], args.orientation_images, seed=meta.split.seed)
    loaders = {name: DataLoader(XrayDataset(df, meta.labels, tf, args.cache_dir, skip_unreadable=True),
                                batch_size=args.batch_size, num_workers=args.workers, collate_fn=collate_batch)
               for name, df in frames.items()}
    rule = args.threshold_rule or meta.training.get("threshold_rule") or "f1"
    trust, thresholds = fit_trust(model.to(device), meta.labels, loaders["train"], loaders["calibration"],
                                  splits["calibration"]["patient"].to_numpy(), device, normalize, rule,
                                  args.scope_method, args.percentile, args.n_boot, progress=args.progress,
                                  orientation_loader=loaders.get("orientation"),
                                  split_name="validation" if legacy else "calibration")
    training = {**meta.training, "split": with_roles(meta.split, splits)}
    obj["meta"] = meta.replace(thresholds=tuple(float(t) for t in thresholds), training=training).to_dict()
    obj[TRUST_KEY] = trust.to_dict()
    out = Path(args.out or args.checkpoint)
    write_checkpoint(out, obj)
    validated = [name for name, ev in trust.evidence.items() if ev["validated"]]
    orientation = (f"orientation check fitted on {trust.orientation.n_fit} training images x "
                   f"{len(trust.orientation.classes)} orientations" if trust.orientation is not None
                   else "no orientation check")
    log(f"fitted on {got[0]} train / {len(splits['calibration'])} {held} images: scope limit "
        f"{trust.scope.limit:.2f} ({trust.scope.method}, {trust.scope.percentile:g}th percentile of {held}); "
        f"{len(validated)}/{len(meta.labels)} labels validated for calls"
        f"{' (' + ', '.join(validated) + ')' if validated else ''}; {orientation} -> {out}")
    return obj


def main(args: argparse.Namespace) -> int:
    """Returns 0 when written, 2 for a bad checkpoint or data (message on stderr)."""
    try:
        fit_checkpoint(args)
    except (CheckpointError, DataError, ScopeError) as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
