"""Fit the trust parts (in-scope check, calibration, thresholds, evidence, orientation check) into an existing
checkpoint, on the checkpoint's own training and calibration splits: what Model_Training/fit_trust.py runs, and
train.py at the end of training.

The split is rebuilt from the SplitSpec the checkpoint records (seed, fractions, image limit). The validation
split, which chose the epoch, is not used; a checkpoint trained before the calibration split existed has none, and
its validation split stands in, with a warning.
"""
from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from pathlib import Path

from torch.utils.data import DataLoader

from chestxray.checkpoint import CheckpointError, Meta, checkpoint_from_obj, safe_torch_load, write_checkpoint
from chestxray.data import DataError, XrayDataset, collate_batch, load_index, rebuild_splits, subsample, with_roles
from chestxray.device import resolve_device
from chestxray.transforms import build_normalize, build_transform
from chestxray.trust import TRUST_KEY, Trust, fit_trust
from chestxray.trust.orientation import DEFAULT_IMAGES
from chestxray.trust.scope import DEFAULT_METHOD, DEFAULT_PERCENTILE

DEFAULT_BOOTSTRAP = 1000  # patient-bootstrap replicates for the evidence's AUROC intervals


def training_splits(meta: Meta, data_dir: str | os.PathLike) -> dict:
    """The train / val / calibration DataFrames of the checkpoint, from the SplitSpec it recorded (a checkpoint
    without a calibration split gets its validation frame as "calibration", marked attrs["same_as"] = "val").
    Raises CheckpointError when the checkpoint records no split."""
    if meta.split is None:
        raise CheckpointError("the checkpoint records no training split (seed, val_fraction); retrain it with "
                              "Model_Training/train.py, which records them")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the split notices were shown at training time
        index = load_index(data_dir, allow_missing=True)
        splits = rebuild_splits(meta, index, data_dir)
    return {name: splits[name] for name in ("train", "val", "calibration")}


def _check_splits(meta: Meta, splits: dict, log: Callable[[str], object]) -> None:
    """Warn about a rebuilt split that differs from the recorded one or a missing calibration split; DataError when
    the training or the held split is empty."""
    expected = (meta.training.get("n_train"), meta.training.get("n_val"))
    got = (len(splits["train"]), len(splits["val"]))
    legacy = bool(splits["calibration"].attrs.get("same_as"))
    if expected[0] is not None and got != expected:
        log(f"warning: the rebuilt split has {got[0]} train / {got[1]} val images; the checkpoint was trained on "
            f"{expected[0]} / {expected[1]} (is --data-dir the training folder?)")
    if legacy:
        log("warning: this checkpoint was trained without a calibration split: calibration, thresholds, evidence and "
            "the scope limit are fitted on its validation split, the images that chose its epoch (retrain with "
            "Model_Training/train.py for a separate calibration split)")
    if not len(splits["train"]) or not len(splits["calibration"]):
        raise DataError(f"the rebuilt split has {got[0]} train / {len(splits['calibration'])} "
                        f"{'val' if legacy else 'calibration'} images; both must be non-empty")


def _summary(trust: Trust, meta: Meta, splits: dict, held: str, out: Path) -> str:
    validated = [name for name, ev in trust.evidence.items() if ev["validated"]]
    orientation = (f"orientation check fitted on {trust.orientation.n_fit} training images x "
                   f"{len(trust.orientation.classes)} orientations" if trust.orientation is not None
                   else "no orientation check")
    return (f"fitted on {len(splits['train'])} train / {len(splits['calibration'])} {held} images: scope limit "
            f"{trust.scope.limit:.2f} ({trust.scope.method}, {trust.scope.percentile:g}th percentile of {held}); "
            f"{len(validated)}/{len(meta.labels)} labels validated for calls"
            f"{' (' + ', '.join(validated) + ')' if validated else ''}; {orientation} -> {out}")


def fit_checkpoint(checkpoint: str | os.PathLike, data_dir: str | os.PathLike, *, out: str | os.PathLike | None = None,
                   threshold_rule: str | None = None, scope_method: str = DEFAULT_METHOD,
                   percentile: float = DEFAULT_PERCENTILE, orientation_images: int = DEFAULT_IMAGES,
                   n_boot: int = DEFAULT_BOOTSTRAP, batch_size: int = 32, workers: int = 0,
                   cache_dir: str | os.PathLike | None = None, device: str = "auto", progress: bool = False,
                   log: Callable[[str], object] = print) -> dict:
    """Load `checkpoint`, fit its trust parts on its rebuilt splits and write it (atomically) to `out` (default:
    in place) -> the checkpoint dict written. Thresholds use `threshold_rule`, else the one it was trained with,
    else f1. Raises CheckpointError, DataError or ScopeError (scope.py) for a bad checkpoint or data."""
    obj = safe_torch_load(checkpoint)  # kept whole: the upgraded file keeps every entry it had
    model, meta, _ = checkpoint_from_obj(obj, checkpoint)
    splits = training_splits(meta, data_dir)
    _check_splits(meta, splits, log)
    legacy = bool(splits["calibration"].attrs.get("same_as"))
    torch_device = resolve_device(device)
    tf, normalize = build_transform(meta, train=False), build_normalize(meta)
    frames = {"train": splits["train"], "calibration": splits["calibration"]}
    if orientation_images > 0:
        frames["orientation"] = subsample(splits["train"], orientation_images, seed=meta.split.seed)
    loaders = {name: DataLoader(XrayDataset(df, meta.labels, tf, cache_dir, skip_unreadable=True),
                                batch_size=batch_size, num_workers=workers, collate_fn=collate_batch)
               for name, df in frames.items()}
    rule = threshold_rule or meta.training.get("threshold_rule") or "f1"
    trust, thresholds = fit_trust(model.to(torch_device), meta.labels, loaders["train"], loaders["calibration"],
                                  splits["calibration"]["patient"].to_numpy(), torch_device, normalize, rule,
                                  scope_method, percentile, n_boot, progress=progress,
                                  orientation_loader=loaders.get("orientation"),
                                  split_name="validation" if legacy else "calibration")
    training = {**meta.training, "split": with_roles(meta.split, splits)}
    obj["meta"] = meta.replace(thresholds=tuple(float(t) for t in thresholds), training=training).to_dict()
    obj[TRUST_KEY] = trust.to_dict()
    path = Path(out or checkpoint)
    write_checkpoint(path, obj)
    log(_summary(trust, meta, splits, "val" if legacy else "calibration", path))
    return obj
