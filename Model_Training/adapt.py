"""Adapt a checkpoint to a clinic's own labelled images, and prove (or refute) that the adapted model is better.

    python Model_Training/adapt.py --checkpoint BASE.pth --data-dir FOLDER --labels CSV \
        --mode recalibrate|finetune --output NEW.pth --report-dir DIR

The labels CSV may be NIH Data_Entry, CheXpert / MIMIC-CXR (1, 0, -1, blank; --uncertain ignore|zeros|ones), a plain
`image,label1|label2` list, or the web app's feedback export (/api/results.csv?reviewed=1 with --data-dir the app's
results folder) (chestxray/local_labels.py, with the CheXpert -> NIH mapping). The local images are split
patient-wise (hashed patient IDs) into train, val, calibration and a held-out test part that the adaptation never
sees.

- recalibrate: the weights stay; scope statistics are refitted on the local train + val parts, the calibration,
  thresholds, evidence and scope limit on the local calibration part (chestxray.trust.fit_trust).
- finetune: the classifier (--trainable head), also the transition layer (transition), or also the trunk's last
  block (last-block) are trained on the local train part with a masked weighted cross-entropy, early stopping on
  the local val part's mean AUROC; then recalibrated as above. Resumable like train.py: every epoch the run folder
  (--run-dir, default REPORT_DIR/finetune-run) gets args.json and a resumable state (last.pth: weights, optimiser,
  RNG and sampler states, history, the best epoch's weights; chestxray/trainstate.py); rerun the same command with
  --resume to continue after the last complete epoch (--epochs may grow).

Labels the local data do not inform (e.g. Mass after CheXpert labels) keep the base checkpoint's calibration,
threshold and evidence when their logits are unchanged (recalibrate, or finetune --trainable head); when fine-tuning
changed the features under them they are marked not validated (never called), and the report says so.

--report-dir gets before/ and after/ (test.py's outputs on the held-out part: metrics.json, report.md, plots,
predictions.csv), metrics.json ({"before", "after", "comparison", "promotion", "adaptation"}) and report.md with the
paired comparison and the promotion verdict. The base checkpoint is never written. Exit code 0 done, 2 bad input.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import hashlib
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader

from chestxray import evaluation, trainstate
from chestxray.baselines import prevalence_baseline
from chestxray.checkpoint import CheckpointError, checkpoint_from_obj, safe_torch_load, write_checkpoint
from chestxray.data import DataError, XrayDataset, collate_batch, subsample, targets
from chestxray.device import DeviceUnavailable, resolve_device
from chestxray.engine import predict_logits
from chestxray.fileio import write_json
from chestxray.local_labels import (
    DEFAULT_FRACTIONS,
    FORMATS,
    LESION_CHOICES,
    UNCERTAIN_POLICIES,
    local_splits,
    loss_mask,
    read_local_labels,
)
from chestxray.losses import pos_weight_from_targets
from chestxray.messages import UsageError
from chestxray.metrics import THRESHOLD_RULES, mean_auroc, patient_bootstrap_weights, weighted_auroc
from chestxray.predictor import Predictor
from chestxray.reporting.metrics_report import fmt, fmt_ci, text_table
from chestxray.transforms import build_normalize, build_transform
from chestxray.trust import TRUST_KEY, Trust, fit_trust
from chestxray.trust.calibration import Calibration
from chestxray.trust.scope import ScopeError

MODES = ("recalibrate", "finetune")
# A held-out label with fewer positive images than this has no usable AUROC interval (a bootstrap over one or two
# positive patients swings between 0 and 1): the promotion rule lists it as not checked instead of deciding on it.
MIN_HELD_OUT_POSITIVES = 5
TRAINABLE = ("head", "transition", "last-block")
RUN_DIR_NAME = "finetune-run"  # the fine-tune's run folder inside --report-dir unless --run-dir names one
# Settings that define a fine-tune run (its local data, its split, what trains and how): a resume takes them from the
# run's args.json and refuses another value (trainstate.merge_config); --epochs, --patience, --output, --report-dir,
# --device and the evaluation settings may change.
LOCKED = ("checkpoint", "data_dir", "labels", "label_format", "uncertain", "lesion_as", "mode", "test_fraction",
          "val_fraction", "calibration_fraction", "seed", "trainable", "lr", "batch_size")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--checkpoint", required=True, help="the base checkpoint (never written)")
    add("--data-dir", required=True, help="folder holding the local images (any layout below it)")
    add("--labels", required=True, help="the local labels CSV (NIH Data_Entry, CheXpert/MIMIC, or image,labels)")
    add("--label-format", default="auto", choices=FORMATS, help="format of --labels (default: %(default)s, from "
        "its header)")
    add("--uncertain", default="zeros", choices=UNCERTAIN_POLICIES, help="CheXpert/MIMIC uncertain (-1) labels: "
        "ignore (left out of the fine-tuning loss), zeros or ones (Irvin et al. 2019) (default: %(default)s)")
    add("--lesion-as", default="none", choices=LESION_CHOICES, help="map CheXpert 'Lung Lesion' to this NIH label "
        "(default: %(default)s: not mapped)")
    add("--mode", required=True, choices=MODES, help="recalibrate (weights unchanged) or finetune")
    add("--output", required=True, help="the adapted checkpoint to write (must not be --checkpoint)")
    add("--report-dir", required=True, help="folder for the before/after report")
    add("--test-fraction", type=float, default=DEFAULT_FRACTIONS["test"], help="fraction of local patients held "
        "out for the before/after report (default: %(default)s)")
    add("--val-fraction", type=float, default=DEFAULT_FRACTIONS["val"], help="fraction of local patients for early "
        "stopping (default: %(default)s)")
    add("--calibration-fraction", type=float, default=DEFAULT_FRACTIONS["calibration"], help="fraction of local "
        "patients for calibration, thresholds, evidence and the scope limit (default: %(default)s)")
    add("--seed", type=int, default=0, help="seed of the patient-wise split and of training (default: %(default)s)")
    add("--trainable", default="head", choices=TRAINABLE, help="finetune: what trains (default: %(default)s)")
    add("--epochs", type=int, default=10, help="finetune: most epochs (default: %(default)s; on --resume the saved "
        "run's unless given)")
    add("--run-dir", default=None, help="finetune: the run folder (args.json, last.pth) (default: "
        f"REPORT_DIR/{RUN_DIR_NAME})")
    add("--resume", action="store_true", help="finetune: continue the run in the run folder from its last complete "
        "epoch (default: off)")
    add("--patience", type=int, default=3, help="finetune: stop after this many epochs without a better val AUROC "
        "(default: %(default)s)")
    add("--lr", type=float, default=1e-4, help="finetune: Adam learning rate (default: %(default)s)")
    add("--batch-size", type=int, default=16, help="images per batch (default: %(default)s)")
    add("--threshold-rule", default=None, choices=THRESHOLD_RULES, help="threshold rule (default: the base "
        "checkpoint's, else f1)")
    add("--orientation-images", type=int, default=0, help="finetune: local training images that refit the "
        "orientation check; 0 = drop it (recalibrate keeps the base's, fitted on the same weights) "
        "(default: %(default)s)")
    add("--bootstrap", type=int, default=1000, help="patient-bootstrap replicates for the intervals "
        "(default: %(default)s)")
    add("--device", default="auto", choices=("auto", "cpu", "cuda"), help="default: %(default)s")
    add("--workers", type=int, default=0, help="data-loading processes (default: %(default)s)")
    add("--no-progress", action="store_true", help="no progress bars (default: bars on)")
    return parser


def _log(*parts) -> None:
    print(*parts, flush=True)


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _loader(df: pd.DataFrame, labels, meta, batch_size: int, workers: int, train: bool = False,
            mask: np.ndarray | None = None, seed: int = 0) -> DataLoader:
    dataset = XrayDataset(df, labels, build_transform(meta, train=train), skip_unreadable=True)
    if mask is not None:
        dataset = _Masked(dataset, mask)
    generator = torch.Generator().manual_seed(seed) if train else None
    return DataLoader(dataset, batch_size=batch_size, shuffle=train, num_workers=workers,
                      collate_fn=collate_batch, generator=generator)


class _Masked(torch.utils.data.Dataset):
    """XrayDataset items whose target carries the loss mask: (image, stack([target, mask]) (2, L), index)."""

    def __init__(self, dataset: XrayDataset, mask: np.ndarray) -> None:
        self.dataset, self.mask = dataset, torch.from_numpy(mask)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        item = self.dataset[i]
        if not isinstance(item, tuple):
            return item
        image, target, index = item
        return image, torch.stack([target, self.mask[i]]), index


def masked_bce(logits: torch.Tensor, target_mask: torch.Tensor, pos_weight: torch.Tensor) -> torch.Tensor:
    """Weighted BCE over the entries whose mask is 1 (target_mask (B, 2, L): targets, mask) -> scalar."""
    y, m = target_mask[:, 0], target_mask[:, 1]
    loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y, pos_weight=pos_weight, reduction="none")
    return (loss * m).sum() / m.sum().clamp(min=1.0)


def trainable_modules(model, trainable: str) -> list[torch.nn.Module]:
    """The modules fine-tuning updates: the classifier; + the transition layer; + the trunk's last block."""
    modules = [model.classifier]
    if trainable in ("transition", "last-block"):
        modules.append(model.transition)
    if trainable == "last-block":
        # ResNet's layer4 and EfficientNet's last stage end the trunk; DenseNet's trunk is (features, ReLU).
        last = model.trunk[0].denseblock4 if model.arch == "densenet121" else model.trunk[-1]
        modules.append(last)
    return modules


def finetune(model, meta, parts: dict, informed, args, device, run_dir: Path, state: dict | None = None,
             provenance: dict | None = None) -> dict:
    """Train the chosen modules on parts["train"], keep the epoch with the best mean AUROC (informed labels) on
    parts["val"], stop after --patience epochs without improvement -> the history (the model holds the best
    weights). Frozen modules stay in eval mode, so their batch-norm statistics do not move either. After each epoch
    the resumable state goes to run_dir/last.pth (with `provenance`, e.g. the base's hash); `state` (from
    trainstate.load_resume_state) continues a run after its last complete epoch."""
    labels = meta.labels
    cols = [j for j, name in enumerate(labels) if name in informed]
    mask = loss_mask(parts["train"], labels, informed)
    y_train = targets(parts["train"], labels)
    pos_weight = pos_weight_from_targets(np.where(mask > 0, y_train, 0)).to(device)
    modules = trainable_modules(model, args.trainable)
    optimizer = torch.optim.Adam(_train_only(model, modules), lr=args.lr)
    normalize = build_normalize(meta)
    train_loader = _loader(parts["train"], labels, meta, args.batch_size, args.workers, True, mask, args.seed)
    val_loader = _loader(parts["val"], labels, meta, args.batch_size, args.workers)

    def val_auroc() -> float:
        logits, y, _, _ = predict_logits(model, val_loader, device, normalize, progress=False)
        return mean_auroc(y[:, cols], logits[:, cols]) if len(y) else math.nan

    if state is None:
        trainstate.seed_everything(args.seed)
        run = _FinetuneRun.before_training(model, val_auroc())
    else:
        run = _FinetuneRun.resumed(model, optimizer, train_loader, state, args.epochs)
    for epoch in range(run.start, args.epochs + 1):
        if run.stopped:
            break
        loss = _finetune_one_epoch(model, modules, train_loader, optimizer, normalize, pos_weight, device)
        score = val_auroc()
        run.history.append({"epoch": epoch, "loss": loss, "val_mean_auroc": score})
        _log(f"finetune epoch {epoch}: loss {loss:.4f}, val mean AUROC {fmt(score)}")
        run.record(model, epoch, score, args.patience)
        trainstate.save_state(run_dir, {
            "epoch": epoch, "model": _cpu(model.state_dict()), "optimizer": optimizer.state_dict(),
            "rng": trainstate.rng_state(), "sampler": train_loader.generator.get_state(), "history": run.history,
            "best_score": run.best, "best_epoch": run.best_epoch, "best_model": _cpu(run.best_state),
            "stale": run.stale, "stopped": run.stopped, **(provenance or {})})
    model.load_state_dict(run.best_state)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(True)
    return {"history": run.history, "best_epoch": run.best_epoch, "best_val_mean_auroc": run.best,
            "run_dir": str(run_dir), "resumed_after_epoch": None if state is None else int(state["epoch"])}


def _train_only(model: nn.Module, modules: list[nn.Module]) -> list[nn.Parameter]:
    """Freeze the model but `modules` -> their parameters (the optimiser's)."""
    for p in model.parameters():
        p.requires_grad_(False)
    params = [p for m in modules for p in m.parameters()]
    for p in params:
        p.requires_grad_(True)
    return params


def _finetune_one_epoch(model, modules, loader, optimizer, normalize, pos_weight, device) -> float:
    """One pass over `loader` training `modules` only (the rest in eval mode) -> the mean masked BCE per image."""
    model.eval()
    for m in modules:
        m.train()
    total, seen = 0.0, 0
    for images, target_mask, _, _ in loader:
        if images.numel() == 0:
            continue
        x = normalize(images.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss = masked_bce(model(x), target_mask.to(device), pos_weight)
        loss.backward()
        optimizer.step()
        total, seen = total + loss.item() * len(images), seen + len(images)
    return total / max(seen, 1)


@dataclass
class _FinetuneRun:
    """Where a fine-tune stands: its history, the best epoch so far and its weights, the early-stopping count."""

    best_state: dict
    best: float
    best_epoch: int
    history: list
    stale: int
    stopped: bool
    start: int  # the next epoch to train

    @classmethod
    def before_training(cls, model: nn.Module, score: float) -> _FinetuneRun:
        """A new run: the base weights are epoch 0, scored `score` on the validation part."""
        _log(f"finetune: val mean AUROC before training {fmt(score)}")
        return cls(copy.deepcopy(model.state_dict()), score, 0, [{"epoch": 0, "loss": None, "val_mean_auroc": score}],
                   0, False, 1)

    @classmethod
    def resumed(cls, model, optimizer, train_loader, state: dict, epochs: int) -> _FinetuneRun:
        """A run continued from its saved state: weights, optimiser, RNG and sampler as after its last epoch."""
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        trainstate.set_rng_state(state["rng"])
        train_loader.generator.set_state(state["sampler"])  # the next epoch draws the order it would have drawn
        run = cls(state["best_model"], state["best_score"], state["best_epoch"], list(state["history"]),
                  state["stale"], state["stopped"], state["epoch"] + 1)
        if run.stopped or run.start > epochs:
            _log(f"finetune: the run already ended after epoch {state['epoch']}"
                 + (" (early stopping)" if run.stopped else f"; pass --epochs N > {state['epoch']} to train longer"))
        return run

    def record(self, model: nn.Module, epoch: int, score: float, patience: int) -> None:
        """Keep the epoch's weights when its score is the best so far; else count it towards early stopping."""
        if math.isfinite(score) and (not math.isfinite(self.best) or score > self.best):
            self.best, self.best_epoch, self.stale = score, epoch, 0
            self.best_state = copy.deepcopy(model.state_dict())
        else:
            self.stale += 1
            self.stopped = self.stale >= patience


def _cpu(state_dict: dict) -> dict:
    return {k: v.detach().cpu().clone() for k, v in state_dict.items()}


def prepare_finetune_run(args: argparse.Namespace, base_sha256: str, labels_sha256: str) -> tuple[Path, dict | None]:
    """The fine-tune's run folder and, on --resume, its state (args filled from the saved args.json; locked settings
    must not change, nor the base checkpoint or the labels file) -> (run_dir, state or None). Writes args.json."""
    run_dir = Path(args.run_dir or Path(args.report_dir) / RUN_DIR_NAME)
    state = None
    if args.resume:
        try:
            state, notes = trainstate.load_resume_state(run_dir)
        except trainstate.NoTrainingState as exc:
            raise UsageError(f"--resume: {exc}; drop --resume to start a new fine-tune") from None
        for note in notes:
            _log(note)
        saved = trainstate.read_config(run_dir, state)
        parser = get_args_parser()
        defaults = {key: parser.get_default(key) for key in vars(args) if key not in ("resume", "run_dir")}
        try:
            merged, changed = trainstate.merge_config(vars(args), saved, defaults, LOCKED)
        except trainstate.LockedSettingChanged as exc:
            raise UsageError(f"--{exc.key.replace('_', '-')} cannot change on --resume (the run in progress uses "
                             f"{exc.saved!r}); start a new fine-tune with another --run-dir instead") from None
        vars(args).update(merged)
        for key, value, label in (("base_sha256", base_sha256, "base checkpoint"),
                                  ("labels_sha256", labels_sha256, "labels file")):
            if state.get(key) != value:
                raise UsageError(f"the {label} changed since {run_dir} was started (SHA-256 {value[:12]}…, the run "
                                 f"used {str(state.get(key))[:12]}…); start a new fine-tune with another --run-dir")
        changes = ", ".join(f"--{key.replace('_', '-')} {new} (was {old})" for key, new, old in changed)
        _log(f"resuming {run_dir} after epoch {state['epoch']}" + (f"; changed: {changes}" if changes else ""))
    elif (run_dir / trainstate.STATE_FILE).exists():
        raise UsageError(f"{run_dir} already holds a fine-tune ({trainstate.STATE_FILE}); pass --resume to continue "
                         "it, or choose another --run-dir (or --report-dir)")
    args.run_dir = str(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    trainstate.write_config(run_dir, {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()})
    return run_dir, state


def merge_uninformed(trust: Trust, thresholds: np.ndarray, base: Trust, base_thresholds, labels, informed,
                     logits_unchanged: bool) -> tuple[Trust, np.ndarray]:
    """Labels the local data do not inform: the base's calibration, threshold and evidence when their logits are
    unchanged; else not validated (their base calibration no longer describes the model)."""
    thresholds = np.array(thresholds, dtype=np.float64)
    cal, evidence = trust.calibration, dict(trust.evidence or {})
    slope, intercept, fitted = list(cal.slope), list(cal.intercept), list(cal.fitted)
    for j, name in enumerate(labels):
        if name in informed:
            continue
        old = dict((base.evidence or {}).get(name) or {})
        if logits_unchanged:
            if base.calibration is not None:
                slope[j], intercept[j] = base.calibration.slope[j], base.calibration.intercept[j]
                fitted[j] = base.calibration.fitted[j]
            else:
                slope[j], intercept[j], fitted[j] = 1.0, 0.0, False
            thresholds[j] = float(base_thresholds[j])
            evidence[name] = {**(old or evidence[name]), "validated": bool(old.get("validated", False)),
                              "local_note": "not informed by the local labels: kept from the base checkpoint"}
            if not old:
                evidence[name].update(validated=False, reason="the base checkpoint has no evidence for it and the "
                                                             "local labels do not inform it")
        else:
            evidence[name] = {**evidence[name], "validated": False,
                              "reason": "the local labels do not inform this label and fine-tuning changed the "
                                        "features under it: not validated"}
    new_cal = Calibration(cal.labels, tuple(slope), tuple(intercept), tuple(fitted))
    return Trust(scope=trust.scope, calibration=new_cal, evidence=evidence, report=trust.report,
                 orientation=trust.orientation, reference=trust.reference), thresholds


def local_counts(df: pd.DataFrame, labels, informed) -> dict:
    y = targets(df, labels)
    return {"images": int(len(df)), "patients": int(df["patient"].nunique()),
            "positives": {name: int(y[:, j].sum()) for j, name in enumerate(labels) if name in informed}}


# ----------------------------------------------------------------------------------------------------------------
# Before / after


def evaluate_checkpoint(path: Path, rows: pd.DataFrame, out: Path, args, title: str,
                        not_informed: list[str]) -> tuple[dict, pd.DataFrame]:
    """test.py's evaluation of one checkpoint on the held-out rows, its outputs written to `out` -> (metrics,
    predictions frame)."""
    predictor = Predictor.from_checkpoint(path, device=args.device)
    meta = predictor.meta
    frame, unreadable = evaluation.predict_frame(predictor, rows, batch_size=args.batch_size, workers=args.workers,
                                                 progress=not args.no_progress, split="local held-out", log=_log)
    metrics = evaluation.evaluate_frame(frame, meta.labels, meta.thresholds, args.bootstrap, args.seed)
    metrics.update(evaluation.user_metrics(frame, predictor, args.bootstrap, args.seed))
    metrics["calibration"]["per_label"] = metrics.pop("calibration_errors")
    y_true = frame[[f"{n}_true" for n in meta.labels]].to_numpy(dtype=np.float64)
    metrics["baselines"] = {
        "prevalence": prevalence_baseline(y_true, meta.labels, frame["patient"].to_numpy(), None, args.bootstrap,
                                          args.seed),
        "metadata": {"available": False, "reason": "the adaptation report compares the base and the adapted "
                                                   "model; Model_Training/test.py fits the metadata baseline"}}
    context = {"checkpoint": str(path), "arch": meta.arch, "image_size": meta.image_size,
               "data_dir": str(args.data_dir), "split": "local held-out",
               "split_description": f"{title}: the local held-out part ({len(rows)} images, "
                                    f"{rows['patient'].nunique()} patients), never seen by the adaptation",
               "limit": None, "external": True, "in_sample": None,
               "training_overlap": {"checked": True, "images": 0, "patients": 0, "by_split": None,
                                    "how": "patient-disjoint from the local parts the adaptation used"},
               "threshold_source": "as stored in the checkpoint",
               "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
               "device": str(predictor.device), "backend": "torch", "unreadable": unreadable,
               "notes": [f"the local labels do not inform {', '.join(not_informed)}: every held-out image reads as "
                         "negative for them, so their rows here mean nothing"] if not_informed else [],
               "training": {k: meta.training.get(k) for k in ("data", "epochs", "val_mean_auroc", "date", "commit")}}
    metrics["run"] = context
    out.mkdir(parents=True, exist_ok=True)
    frame.to_csv(out / "predictions.csv", index=False)
    evaluation.write_outputs(out, frame, metrics, meta, context)
    return metrics, frame


def paired_auroc_difference(y_true: np.ndarray, before: np.ndarray, after: np.ndarray, patients: np.ndarray,
                            labels, n_boot: int, seed: int) -> dict:
    """Per label: AUROC after - before on the same images, with a paired patient-bootstrap 95% interval (both models
    scored on each replicate's same draw) -> {label: {"before", "after", "difference", "ci"}} (None where a class is
    missing)."""
    weights = patient_bootstrap_weights(patients, n_boot, seed)
    ones = np.ones((1, len(y_true)))
    out = {}
    for j, name in enumerate(labels):
        b, a = weighted_auroc(y_true[:, j], before[:, j], ones)[0], weighted_auroc(y_true[:, j], after[:, j], ones)[0]
        if not (math.isfinite(a) and math.isfinite(b)):
            out[name] = {"before": None, "after": None, "difference": None, "ci": None}
            continue
        diff = (weighted_auroc(y_true[:, j], after[:, j], weights)
                - weighted_auroc(y_true[:, j], before[:, j], weights)) if n_boot else np.zeros(0)
        diff = diff[np.isfinite(diff)]
        ci = [float(np.percentile(diff, 2.5)), float(np.percentile(diff, 97.5))] if diff.size >= 10 else None
        out[name] = {"before": float(b), "after": float(a), "difference": float(a - b), "ci": ci}
    return out


def promotion(comparison: dict, before: dict, after: dict, informed, positives: dict) -> dict:
    """The promotion rule: "recommended" only when, on every informed label whose AUROC the held-out part can
    estimate, the AUROC difference's interval reaches 0 or above (no worse within the CI), and the mean ECE over
    those labels is lower after than before (better calibration). Otherwise the reasons why not."""
    checked = [n for n in informed if comparison[n]["difference"] is not None
               and positives.get(n, 0) >= MIN_HELD_OUT_POSITIVES]
    unchecked = [n for n in informed if n not in checked]
    reasons = []
    if not checked:
        reasons.append(f"no informed label has {MIN_HELD_OUT_POSITIVES} or more positive images in the held-out "
                       "part: nothing can be compared")
    worse = [n for n in checked if comparison[n]["ci"] is None or comparison[n]["ci"][1] < 0]
    for name in worse:
        c = comparison[name]
        reasons.append(f"{name}: AUROC {fmt(c['before'])} -> {fmt(c['after'])}, difference "
                       + (f"{fmt_ci(c['difference'], c['ci'])} lies below 0" if c["ci"] else "has no interval"))
    ece = {}
    for key, metrics in (("before", before), ("after", after)):
        values = [metrics["calibration"]["per_label"][n]["ece"] for n in checked]
        values = [v for v in values if v is not None]
        ece[key] = float(np.mean(values)) if values else None
    if checked and (ece["before"] is None or ece["after"] is None or not ece["after"] < ece["before"]):
        reasons.append(f"calibration not better: mean ECE {fmt(ece['before'])} -> {fmt(ece['after'])}")
    return {"recommended": not reasons, "labels_checked": checked, "labels_not_checked": unchecked, "mean_ece": ece,
            "reasons": reasons,
            "rule": "recommended only when no worse on every label the local data inform with at least "
                    f"{MIN_HELD_OUT_POSITIVES} held-out positive images (the paired-bootstrap interval of the AUROC "
                    "difference reaches 0 or above) and better calibrated (lower mean ECE over those labels)"}


def write_adaptation_report(path: Path, summary: dict) -> None:
    comparison, verdict, adaptation = summary["comparison"], summary["promotion"], summary["adaptation"]
    before, after = summary["before"], summary["after"]
    header = ["label", "AUROC before", "AUROC after", "difference (95% CI)", "ECE before", "ECE after",
              "Brier before", "Brier after"]
    rows = []
    for name, c in comparison.items():
        cb, ca = before["calibration"]["per_label"][name], after["calibration"]["per_label"][name]
        if name not in adaptation["informed"]:  # its truth is unknown here: every image reads as negative
            rows.append([f"{name} (not informed)", *["n/a"] * (len(header) - 1)])
            continue
        rows.append([name, fmt(c["before"]), fmt(c["after"]), fmt_ci(c["difference"], c["ci"]), fmt(cb["ece"]),
                     fmt(ca["ece"]), fmt(cb["brier"]), fmt(ca["brier"])])
    lines = [f"# Adaptation report: {adaptation['mode']}", "",
             f"**Verdict: {'recommended' if verdict['recommended'] else 'not recommended'}.** Rule: {verdict['rule']}.",
             ""]
    lines += [f"- why not: {r}" for r in verdict["reasons"]]
    if verdict["labels_not_checked"]:
        lines += ["", f"Not checked (fewer than {MIN_HELD_OUT_POSITIVES} held-out positive images): "
                  f"{', '.join(verdict['labels_not_checked'])}; their calls stand on the adapted model's own evidence "
                  "on the local calibration part."]
    counts = adaptation["local"]
    lines += ["", f"- base checkpoint: `{adaptation['base_checkpoint']}` (sha256 {adaptation['base_sha256'][:16]}…)",
              f"- adapted checkpoint: `{adaptation['output']}`",
              f"- local data: {counts['all']['images']} images of {counts['all']['patients']} patients "
              f"({adaptation['label_format']} labels, uncertain policy {adaptation['uncertain_policy']}); parts: "
              + ", ".join(f"{k} {v['images']} images / {v['patients']} patients" for k, v in counts.items()
                          if k != "all"),
              f"- labels informed by the local data: {', '.join(adaptation['informed']) or 'none'}; the others keep "
              "the base checkpoint's figures (or are not validated after fine-tuning changed their features)",
              f"- time: {adaptation['seconds']:.1f} s on {adaptation['device']}", "",
              "Held-out part, the same images for both models (paired patient bootstrap of the AUROC difference):", "",
              "```", text_table(header, rows), "```", "",
              "Full reports in test.py's format: [before/report.md](before/report.md), "
              "[after/report.md](after/report.md)"
              + (f" (their rows for {', '.join(adaptation['not_informed'])} score every image as negative, the "
                 "local labels being silent on them: ignore those rows)." if adaptation["not_informed"] else ".")]
    path.write_text("\n".join(lines) + "\n")


# ----------------------------------------------------------------------------------------------------------------
# Main


def adapt(args: argparse.Namespace) -> dict:
    """Read, split, adapt, write the new checkpoint and the report -> the report summary (metrics.json's content)."""
    start = time.perf_counter()
    base_path, output = _checked_paths(args)
    obj = safe_torch_load(base_path)
    base_sha256 = file_sha256(base_path)
    run_dir, state = None, None
    if args.mode == "finetune":  # before the labels are read: a resume takes their settings from the run's args.json
        if not Path(args.labels).is_file():
            raise DataError(f"--labels {args.labels} is not a file")
        run_dir, state = prepare_finetune_run(args, base_sha256, file_sha256(args.labels))
    model, meta, _ = checkpoint_from_obj(obj, base_path)
    base_trust = Trust.from_checkpoint(obj, meta.labels)
    labels = meta.labels
    df, informed, parts = _read_local_data(args, labels)
    device = resolve_device(args.device)
    model = model.to(device)
    history = None
    if args.mode == "finetune":
        history = finetune(model, meta, parts, informed, args, device, run_dir, state,
                           {"base_sha256": base_sha256, "labels_sha256": file_sha256(args.labels)})
    rule = args.threshold_rule or meta.training.get("threshold_rule") or "f1"
    trust, thresholds = _fit_local_trust(model, meta, parts, informed, base_trust, rule, args, device)
    counts = {"all": local_counts(df, labels, informed),
              **{name: local_counts(part, labels, informed) for name, part in parts.items()}}
    adaptation = {"mode": args.mode, "base_checkpoint": str(base_path), "base_sha256": base_sha256,
                  "output": str(output), "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                  "label_format": df.attrs["format"], "uncertain_policy": df.attrs["uncertain_policy"],
                  "uncertain_counts": df.attrs["uncertain_counts"], "lesion_as": args.lesion_as,
                  "informed": informed, "not_informed": [n for n in labels if n not in informed],
                  "local": counts, "split_seed": args.seed, "threshold_rule": rule,
                  "trainable": args.trainable if args.mode == "finetune" else None,
                  "finetune": history}
    output.parent.mkdir(parents=True, exist_ok=True)
    write_checkpoint(output, _adapted_checkpoint(obj, model, thresholds, trust, adaptation))
    adaptation["seconds"] = time.perf_counter() - start
    adaptation["device"] = str(device)
    _log(f"wrote {output} ({args.mode}, {adaptation['seconds']:.1f} s; local: {counts['all']['images']} images of "
         f"{counts['all']['patients']} patients; informed labels: {', '.join(informed)})")
    return compare_on_held_out(base_path, output, parts["test"], labels, adaptation, args)


def _checked_paths(args: argparse.Namespace) -> tuple[Path, Path]:
    """(base checkpoint, output) once the output is known to be a new file; UsageError otherwise."""
    if args.mode != "finetune" and (args.resume or args.run_dir):
        raise UsageError("--resume and --run-dir belong to --mode finetune; recalibrate has no training to resume")
    base_path, output = Path(args.checkpoint), Path(args.output)
    if output.resolve() == base_path.resolve():
        raise UsageError("--output is the base checkpoint; the base is never overwritten: choose another file")
    if output.exists():
        raise UsageError(f"--output {output} exists; choose a new file (an adapted model never replaces another)")
    return base_path, output


def _read_local_data(args: argparse.Namespace, labels) -> tuple[pd.DataFrame, list[str], dict]:
    """The local labels, the model's labels they inform and the patient-disjoint parts -> (df, informed, parts);
    DataError when they inform no label or leave a part empty."""
    df = read_local_labels(args.labels, args.data_dir, args.label_format, args.uncertain, args.lesion_as, labels)
    informed = [n for n in labels if n in df.attrs["informed"]]
    if not informed:
        raise DataError(f"the labels in {args.labels} inform none of the model's labels {list(labels)}")
    parts = local_splits(df, args.test_fraction, args.val_fraction, args.calibration_fraction, args.seed)
    empty = [name for name, part in parts.items() if not len(part)]
    if empty:
        raise DataError(f"the local data ({len(df)} images, {df['patient'].nunique()} patients) leave the "
                        f"{', '.join(empty)} part(s) empty; add images or change the fractions")
    return df, informed, parts


def _fit_local_trust(model, meta, parts: dict, informed: list[str], base_trust: Trust, rule: str,
                     args: argparse.Namespace, device) -> tuple[Trust, list[float]]:
    """Trust and thresholds fitted on the local parts (train+val for the scope, calibration for the rest), the
    uninformed labels' taken from the base -> (trust, thresholds). Recalibrating keeps the base's orientation check."""
    labels = meta.labels
    fit_rows = pd.concat([parts["train"], parts["val"]], ignore_index=True)
    calibration_rows = parts["calibration"]
    orientation_loader = None
    if args.mode == "finetune" and args.orientation_images > 0:
        orientation_loader = _loader(subsample(fit_rows, args.orientation_images, args.seed), labels, meta,
                                     args.batch_size, args.workers)
    trust, thresholds = fit_trust(
        model, labels, _loader(fit_rows, labels, meta, args.batch_size, args.workers),
        _loader(calibration_rows, labels, meta, args.batch_size, args.workers),
        calibration_rows["patient"].to_numpy(), device, build_normalize(meta), rule, n_boot=args.bootstrap,
        seed=args.seed, progress=not args.no_progress, orientation_loader=orientation_loader,
        split_name="local calibration")
    if args.mode == "recalibrate":
        trust = Trust(trust.scope, trust.calibration, trust.evidence, trust.report, base_trust.orientation,
                      trust.reference)
    unchanged = args.mode == "recalibrate" or args.trainable == "head"
    return merge_uninformed(trust, thresholds, base_trust, meta.thresholds, labels, informed, unchanged)


def _adapted_checkpoint(obj: dict, model: nn.Module, thresholds, trust: Trust, adaptation: dict) -> dict:
    """The base checkpoint's contents with the adapted weights, thresholds, trust and the adaptation's record."""
    new = {key: value for key, value in obj.items()}
    new["model"] = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    new_meta = dict(obj["meta"])
    new_meta["thresholds"] = [float(t) for t in thresholds]
    training = dict(new_meta.get("training") or {})
    training["adapted"] = {k: v for k, v in adaptation.items() if k != "output"}
    new_meta["training"] = training
    new["meta"] = new_meta
    new[TRUST_KEY] = trust.to_dict()
    return new


def compare_on_held_out(base_path: Path, output: Path, test_rows: pd.DataFrame, labels, adaptation: dict,
                        args: argparse.Namespace) -> dict:
    """Evaluate both checkpoints on the same held-out images, compare them (paired patient bootstrap), decide the
    promotion and write metrics.json and report.md into --report-dir -> the summary."""
    report_dir = Path(args.report_dir)
    before, frame_b = evaluate_checkpoint(base_path, test_rows, report_dir / "before", args, "base checkpoint",
                                          adaptation["not_informed"])
    after, frame_a = evaluate_checkpoint(output, test_rows, report_dir / "after", args, "adapted checkpoint",
                                         adaptation["not_informed"])
    if list(frame_b["image"]) != list(frame_a["image"]):
        raise DataError("the two models read different held-out images; the comparison would not be paired")
    y_true = frame_b[[f"{n}_true" for n in labels]].to_numpy(dtype=np.float64)
    comparison = paired_auroc_difference(
        y_true, frame_b[[f"{n}_prob" for n in labels]].to_numpy(), frame_a[[f"{n}_prob" for n in labels]].to_numpy(),
        frame_b["patient"].to_numpy(), labels, args.bootstrap, args.seed)
    verdict = promotion(comparison, before, after, adaptation["informed"], adaptation["local"]["test"]["positives"])
    summary = {"before": before, "after": after, "comparison": comparison, "promotion": verdict,
               "adaptation": adaptation}
    write_json(report_dir / "metrics.json", summary)
    write_adaptation_report(report_dir / "report.md", summary)
    _log(f"{'recommended' if verdict['recommended'] else 'not recommended'}"
         + ("" if verdict["recommended"] else ": " + "; ".join(verdict["reasons"])) + f" -> {report_dir}/report.md")
    return summary


def main(args: argparse.Namespace) -> int:
    """Returns 0 when the adapted checkpoint and its report are written, 2 for bad input (message on stderr)."""
    try:
        adapt(args)
    except (UsageError, DataError, CheckpointError, ScopeError, DeviceUnavailable) as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
