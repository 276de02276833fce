"""Train the chest X-ray classifier on NIH ChestX-ray14.

    python Model_Training/train.py --data-dir /path/to/nih
    torchrun --nproc_per_node N Model_Training/train.py --data-dir /path/to/nih      (several GPUs, DDP)

--data-dir holds Data_Entry_2017_v2020.csv, Data_Entry_2017.csv or labels.csv, the images anywhere below it, and
optionally the official train_val_list.txt / test_list.txt. The non-test patients are split three ways: train (fits
the weights), validation (chooses the epoch) and calibration (calibration, thresholds, evidence and the in-scope
limit, fitted after the last epoch on images that chose nothing else); the test split is never used here. After
every epoch the run folder (--run-dir) gets a resumable state (last.pth; continue with --resume), history.csv,
training_curves.png; args.json, the run configuration (its one copy: the state and the checkpoint refer to it), at
start. The epoch with the best validation mean AUROC is written to --output with the split it used and which split
served which role (meta.training["split"], its "roles").

The loop reads top to bottom: prepare_run -> build_meta_and_model -> load_data -> build_optimisation -> restore ->
for each epoch run_epoch, save_epoch (torchvision's references/classification layout).
"""
from __future__ import annotations

import argparse
import csv
import datetime
import io
import math
import os
import subprocess
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler

from chestxray.checkpoint import DEFAULT_CHECKPOINT, CheckpointError, model_from_meta, save_checkpoint
from chestxray.data import (
    DataError,
    MissingImages,
    XrayDataset,
    check_patient_disjoint,
    collate_batch,
    find_unreadable,
    load_index,
    rebuild_splits,
    split_spec,
    targets,
    with_roles,
)
from chestxray.device import DeviceUnavailable, resolve_device
from chestxray.engine import TrainingDiverged, evaluate, train_one_epoch
from chestxray.fileio import atomic_write, remove_stale_temporaries, write_json
from chestxray.fitting import fit_checkpoint
from chestxray.labels import CHESTXRAY8_LABELS, LABELS, LabelError, check_labels
from chestxray.losses import LOSSES, build_loss
from chestxray.messages import UsageError
from chestxray.meta import (
    DEFAULT_CALIBRATION_FRACTION,
    MAX_IMAGE_SIZE,
    MIN_IMAGE_SIZE,
    OUTPUT_STRIDES,
    Meta,
    SplitSpec,
)
from chestxray.metrics import THRESHOLD_RULES, choose_thresholds
from chestxray.model import ARCHS, PretrainedWeightsUnavailable
from chestxray.trainstate import (
    CONFIG_FILE,
    STATE_FILE,
    LockedSettingChanged,
    NoTrainingState,
    load_resume_state,
    merge_config,
    read_config,
    rng_state,
    save_state,
    seed_everything,
    set_rng_state,
    write_config,
)
from chestxray.transforms import build_normalize, build_transform
from chestxray.trust import orientation
from chestxray.trust.scope import ScopeError

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_EPOCHS = 5


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--data-dir", default=None, help="NIH data folder: Data_Entry CSV + images below it (required, "
        "except on --resume, which reuses the saved one)")
    add("--output", default=DEFAULT_CHECKPOINT,
        help="best checkpoint, where the web app looks (default: %(default)s)")
    add("--run-dir", default=None, help="run folder for last.pth, history.csv, curves, args.json "
        "(default: runs/<timestamp>)")
    add("--resume", action="store_true", help="continue the run in --run-dir from its last.pth (default: off)")
    add("--arch", default="resnet50", choices=sorted(ARCHS), help="trunk (default: %(default)s)")
    add("--labels", default="all", help="'all' (14 NIH labels), 'chestxray8' (the first 8), or comma-separated "
        "label names (default: %(default)s)")
    add("--image-size", type=int, default=512, help="square input size in pixels (default: %(default)s)")
    add("--output-stride", type=int, default=32, choices=OUTPUT_STRIDES, help="input pixels per heatmap cell: the "
        "maps are image-size/output-stride cells a side; 16 or 8 (ResNets only) dilate the last stages instead of "
        "striding, finer maps for 4x or 16x the compute of those stages (default: %(default)s)")
    add("--transition-kernel", type=int, default=3, help="kernel size of the transition convolution between the "
        "trunk and the pooling, odd; 1 costs a ninth of 3, which matters at a fine output stride "
        "(default: %(default)s)")
    add("--epochs", type=int, default=None, help=f"total epochs (default: {DEFAULT_EPOCHS}; on --resume the "
        "saved run's; pass a larger number to train longer)")
    add("--batch-size", type=int, default=16, help="images per step and per process (default: %(default)s)")
    add("--lr", type=float, default=1e-4, help="Adam learning rate (default: %(default)s)")
    add("--weight-decay", type=float, default=0.0, help="Adam weight decay (default: %(default)s)")
    add("--scheduler", default="none", choices=("none", "plateau", "cosine"),
        help="learning-rate schedule: plateau = x0.1 after 1 epoch without a better validation AUROC; cosine "
        "over --epochs (default: %(default)s)")
    add("--clip-grad", type=float, default=0.0, help="clip the gradient norm to this value; 0 = off "
        "(default: %(default)s)")
    add("--loss", default="wbce", choices=LOSSES, help="wbce = Wang et al. weighted cross-entropy (betas over "
        "the batch), wbce-per-label, bce, pos-weight = BCE with per-label negatives/positives of the training "
        "split (default: %(default)s)")
    add("--seed", type=int, default=0, help="seed for the validation split, sampling and initialisation "
        "(default: %(default)s)")
    add("--val-fraction", type=float, default=0.1, help="fraction of the non-test patients held out for validation: "
        "epoch selection (default: %(default)s)")
    add("--calibration-fraction", type=float, default=DEFAULT_CALIBRATION_FRACTION, help="fraction of the non-test "
        "patients held out for calibration, thresholds, evidence and the in-scope limit, never used to fit weights "
        "or choose the epoch (default: %(default)s)")
    add("--stratify-split", action="store_true", help="assign patients to validation, calibration (and test) by "
        "scikit-learn's StratifiedGroupKFold on view position x any finding, so that each split's view mix and "
        "finding share are close to the data's; the fractions must then be multiples of 1/n, n <= 100; recorded in "
        "the checkpoint's split (default: off: each patient's own seeded draw)")
    add("--threshold-rule", default="f1", choices=THRESHOLD_RULES, help="per-label threshold chosen on the "
        "calibration split (the validation split until the trust fit): max F1 or Youden's J (default: %(default)s)")
    add("--workers", type=int, default=min(4, os.cpu_count() or 1), help="data-loading processes per training "
        "process (default: %(default)s)")
    add("--cache-dir", default=None, help="resized-image cache folder (uint8 .npy per image and size), built "
        "during the first epoch and reused later (default: none)")
    add("--limit", type=int, default=None, help="at most N images per split, after splitting (smoke runs; "
        "default: all)")
    add("--device", default="auto", choices=("auto", "cpu", "cuda"), help="auto = CUDA when available "
        "(default: %(default)s)")
    add("--amp", default="auto", choices=("auto", "on", "off"), help="float16 mixed precision; auto = on with "
        "CUDA (default: %(default)s)")
    add("--no-channels-last", action="store_true", help="keep the default memory format on CUDA "
        "(default: channels_last on CUDA)")
    add("--no-pretrained", action="store_true", help="random initialisation instead of ImageNet weights "
        "(default: ImageNet weights via torchvision)")
    add("--hflip", action="store_true", help="random horizontal flips in augmentation (default: off; a flip "
        "puts the heart on the wrong side)")
    add("--intensity-augment", type=float, default=0.0, help="strength s in [0, 1) of a random grey-level curve in "
        "augmentation: gamma in [e^-s, e^s], contrast in [1 - s, 1 + s], a brightness offset; for exposure and "
        "contrast that differ between sites; recorded in meta.training (default: %(default)s = off)")
    add("--allow-missing", action="store_true", help="skip labelled images whose file is missing, and report "
        "them (default: stop with a count and examples)")
    add("--check-data", action="store_true", help="read every train/val image once before training, list the "
        "unreadable ones and leave them out (fills --cache-dir) (default: off)")
    add("--no-progress", action="store_true", help="no progress bars (default: bars on the first process)")
    add("--orientation-images", type=int, default=orientation.DEFAULT_IMAGES, help="training images whose upright, "
        "mirrored and rotated copies fit the orientation check after training; 0 = none (default: %(default)s)")
    add("--no-trust", action="store_true", help="skip the final fit of the in-scope check, calibration, evidence "
        "(on the calibration split) and orientation check (default: fitted into --output after the last epoch; "
        "Model_Training/fit_trust.py does it later)")
    return parser


# ----------------------------------------------------------------------------------------------------------------
# Arguments


def parse_labels(text: str) -> tuple[str, ...]:
    """'all' -> LABELS, 'chestxray8' -> CHESTXRAY8_LABELS, 'A,B' -> those labels (validated, NIH order kept)."""
    key = text.strip().lower()
    if key == "all":
        return LABELS
    if key in ("chestxray8", "chestx-ray8"):
        return CHESTXRAY8_LABELS
    return check_labels([name.strip() for name in text.split(",") if name.strip()])


def _check_args(args: argparse.Namespace) -> None:
    if args.data_dir is None:
        raise UsageError("--data-dir is required: the folder holding Data_Entry_2017.csv and the images")
    checks = [
        (args.epochs >= 1, f"--epochs must be at least 1, got {args.epochs}"),
        (args.batch_size >= 1, f"--batch-size must be at least 1, got {args.batch_size}"),
        (MIN_IMAGE_SIZE <= args.image_size <= MAX_IMAGE_SIZE,
         f"--image-size must lie in [{MIN_IMAGE_SIZE}, {MAX_IMAGE_SIZE}] pixels, got {args.image_size}"),
        (args.lr > 0, f"--lr must be positive, got {args.lr}"),
        (args.weight_decay >= 0, f"--weight-decay must be non-negative, got {args.weight_decay}"),
        (args.clip_grad >= 0, f"--clip-grad must be non-negative (0 = off), got {args.clip_grad}"),
        (0 < args.val_fraction < 1, f"--val-fraction must lie strictly between 0 and 1, got {args.val_fraction}"),
        (0 < args.calibration_fraction < 1 - args.val_fraction, "--calibration-fraction must lie strictly between 0 "
         f"and 1 - --val-fraction ({1 - args.val_fraction:g}), got {args.calibration_fraction}"),
        (0 <= args.intensity_augment < 1,
         f"--intensity-augment must lie in [0, 1) (0 = off), got {args.intensity_augment}"),
        (args.workers >= 0, f"--workers must be non-negative, got {args.workers}"),
        (args.limit is None or args.limit >= 1, f"--limit must be at least 1, got {args.limit}"),
        (args.orientation_images >= 0, f"--orientation-images must be non-negative, got {args.orientation_images}"),
        (args.transition_kernel >= 1 and args.transition_kernel % 2 == 1,
         f"--transition-kernel must be odd and positive, got {args.transition_kernel}"),
        (args.output_stride == 32 or args.arch.startswith("resnet"),
         f"--output-stride {args.output_stride} is available for the ResNet trunks only; {args.arch} has 32"),
    ]
    for ok, message in checks:
        if not ok:
            raise UsageError(message)
    parse_labels(args.labels)


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def plain_args(args: argparse.Namespace) -> dict:
    """vars(args) with paths as strings: the run configuration as plain data (args.json)."""
    return {k: str(v) if isinstance(v, os.PathLike) else v for k, v in vars(args).items()}


def git_commit() -> str | None:
    """Short hash of the code's git HEAD, or None outside a git checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def _finite_or_none(value: float) -> float | None:
    return float(value) if value is not None and math.isfinite(value) else None


# ----------------------------------------------------------------------------------------------------------------
# Run files


def write_history(path: Path, history: list[dict]) -> None:
    """history.csv: one row per epoch (atomic replace)."""
    if not history:
        return
    fields = list(history[0])
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=fields)
    writer.writeheader()
    for row in history:
        writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in fields})
    atomic_write(path, text.getvalue())


def plot_history(path: Path, history: list[dict]) -> None:
    """training_curves.png: train/val loss and validation mean AUROC per epoch (matplotlib Figure + Agg, atomic)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    epochs = [row["epoch"] for row in history]
    fig = Figure(figsize=(10, 4))
    FigureCanvasAgg(fig)
    ax_loss, ax_auc = fig.subplots(1, 2)
    ax_loss.plot(epochs, [row["train_loss"] for row in history], "o-", label="train")
    ax_loss.plot(epochs, [row["val_loss"] for row in history], "o-", label="validation")
    ax_loss.set(xlabel="epoch", ylabel="loss", title="Loss")
    ax_loss.legend()
    ax_auc.plot(epochs, [np.nan if row["val_mean_auroc"] is None else row["val_mean_auroc"] for row in history],
                "o-", color="tab:green")
    ax_auc.set(xlabel="epoch", ylabel="mean AUROC", title="Validation mean AUROC")
    for ax in (ax_loss, ax_auc):
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))


# ----------------------------------------------------------------------------------------------------------------
# Processes


class _Dist:
    """Process-group facts; world_size 1 without torchrun."""

    def __init__(self) -> None:
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.enabled = self.world_size > 1
        self.main = self.rank == 0

    def log(self, *parts, **kwargs) -> None:
        if self.main:
            print(*parts, **kwargs, flush=True)

    def broadcast(self, value):
        if not self.enabled:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, value) -> list:
        if not self.enabled:
            return [value]
        out: list = [None] * self.world_size
        dist.all_gather_object(out, value)
        return out

    def barrier(self) -> None:
        if self.enabled:
            if dist.get_backend() == "nccl":
                dist.barrier(device_ids=[self.local_rank])
            else:
                dist.barrier()


def _device(args: argparse.Namespace, ddp: _Dist) -> torch.device:
    """chestxray.device.resolve_device, plus the per-rank GPU under torchrun."""
    device = resolve_device(args.device)
    if device.type != "cuda":
        return device
    if ddp.local_rank >= torch.cuda.device_count():
        raise UsageError(f"local rank {ddp.local_rank} has no GPU ({torch.cuda.device_count()} visible); "
                         "use --nproc_per_node <= the number of GPUs")
    torch.cuda.set_device(ddp.local_rank)
    return torch.device("cuda", ddp.local_rank)


def _report(ddp: _Dist, what: str, names: list[str], limit: int = 10) -> None:
    shown = ", ".join(names[:limit]) + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")
    ddp.log(f"warning: {what}: {shown}")


# ----------------------------------------------------------------------------------------------------------------
# Main


def main(args: argparse.Namespace) -> int:
    """Train; returns the exit code (0 done, 1 a failed write, 2 bad input or data). Under torchrun, one process."""
    ddp = _Dist()
    try:
        if ddp.enabled and not dist.is_initialized():
            backend = "nccl" if args.device != "cpu" and torch.cuda.is_available() else "gloo"
            if backend == "nccl":
                torch.cuda.set_device(ddp.local_rank)
            dist.init_process_group(backend)
        return _train(args, ddp)
    except (UsageError, DataError, LabelError, CheckpointError, PretrainedWeightsUnavailable,
            DeviceUnavailable, TrainingDiverged) as exc:
        print(f"error: {exc}{_advice(exc)}", file=sys.stderr, flush=True)
        return 2
    except OSError as exc:
        if exc.filename is None and exc.errno is None:
            raise
        # A full disk or a read-only folder while writing a state or a checkpoint: the atomic writes leave the
        # previous files as they were.
        print(f"error: {exc.strerror or exc} ({exc.filename or 'file operation'}). States and checkpoints are "
              "written atomically, so the previous ones are unchanged; fix the cause (e.g. free disk space) and "
              "continue with --resume.", file=sys.stderr, flush=True)
        return 1
    finally:
        if ddp.enabled and dist.is_initialized():
            dist.destroy_process_group()


def _advice(exc: BaseException) -> str:
    """The command-line advice the core's errors leave to the script, chosen by exception type."""
    if isinstance(exc, PretrainedWeightsUnavailable):
        return "\nTo train without ImageNet weights, pass --no-pretrained."
    if isinstance(exc, MissingImages):
        return " (on the command line: --allow-missing)"
    if isinstance(exc, DeviceUnavailable):
        return " (pass --device cpu or auto)"
    if isinstance(exc, TrainingDiverged):
        return " (--lr, --clip-grad)"
    return ""


@dataclass
class Run:
    """One training process's view of the run: its folder, device and settings derived from the arguments."""

    args: argparse.Namespace
    ddp: _Dist
    dir: Path
    device: torch.device
    amp: bool
    channels_last: bool
    labels: tuple[str, ...]
    state: dict | None  # the state being resumed, or None for a new run


@dataclass
class Data:
    """The splits, datasets and loaders of a run; `unreadable` grows as epochs meet unreadable images."""

    index: object
    spec: SplitSpec  # how the splits were made; recorded in the checkpoint as meta.training["split"]
    splits: dict
    train_ds: XrayDataset
    val_ds: XrayDataset
    train_sampler: DistributedSampler
    train_loader: DataLoader
    val_loader: DataLoader
    normalize: object  # the per-batch stage, on the device (transforms.build_normalize)
    unreadable: dict[str, str] = field(default_factory=dict)


@dataclass
class Optimisation:
    """Model (and its DDP wrapper), loss, optimiser, schedule and gradient scaler."""

    model: torch.nn.Module
    net: torch.nn.Module
    loss_fn: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    scaler: torch.amp.GradScaler


@dataclass
class Progress:
    """Where the run stands: the next epoch, the history rows and the best epoch so far."""

    start_epoch: int = 1
    history: list = field(default_factory=list)
    best_score: float | None = None
    best_epoch: int | None = None


def _train(args: argparse.Namespace, ddp: _Dist) -> int:
    run = prepare_run(args, ddp)
    meta, model = build_meta_and_model(run)
    data = load_data(run, meta)
    opt = build_optimisation(run, model, data)
    progress = restore(run, opt)
    if ddp.main and progress.history:  # a kill after the last state but before its history: catch the files up
        write_run_files(run, data, progress.history)
    ddp.log(f"training {args.arch} at {args.image_size} px (output stride {args.output_stride}) on {run.device}"
            f"{f' x {ddp.world_size} processes' if ddp.enabled else ''} ({len(data.train_ds)} train / "
            f"{len(data.val_ds)} val images, batch {args.batch_size}, {args.loss} loss, amp "
            f"{'on' if run.amp else 'off'}); run folder {run.dir}")
    for epoch in range(progress.start_epoch, args.epochs + 1):
        stats, result, is_best = run_epoch(run, data, opt, progress, epoch)
        if ddp.main:
            save_epoch(run, meta, data, opt, progress, epoch, result, is_best)
            ddp.log(_epoch_line(epoch, args.epochs, stats, result, run.labels) + ("  * saved" if is_best else ""))
    ddp.barrier()
    if progress.best_epoch is not None:
        if ddp.main and not args.no_trust:
            fit_trust_into(args)
        best = "n/a" if not math.isfinite(progress.best_score) else f"{progress.best_score:.4f}"
        ddp.log(f"done: best epoch {progress.best_epoch} (validation mean AUROC {best}) -> {args.output}; "
                f"run folder {run.dir}")
    return 0


def fit_trust_into(args: argparse.Namespace) -> None:
    """Fit scope statistics (training split), their limit, calibration, calibrated thresholds, evidence (calibration
    split) and the orientation check into the best checkpoint, without augmentation, as Model_Training/fit_trust.py
    does with its defaults."""
    try:
        fit_checkpoint(args.output, args.data_dir, threshold_rule=args.threshold_rule, batch_size=args.batch_size,
                       workers=args.workers, device=args.device, orientation_images=args.orientation_images,
                       cache_dir=args.cache_dir or None, progress=not args.no_progress,
                       log=lambda line: print(line, flush=True))
    except ScopeError as exc:  # e.g. a smoke run with a single training image: the model itself is still saved
        print(f"warning: no in-scope check, calibration or evidence fitted ({exc}); answers say 'not available'",
              flush=True)


def prepare_run(args: argparse.Namespace, ddp: _Dist) -> Run:
    """Resume (state + the saved configuration) or start a run folder; checks the arguments. Rank 0 writes args.json."""
    if not ddp.main:
        warnings.simplefilter("ignore")  # the first process reports data notices once
    state = _resume(args, ddp) if args.resume else None
    if args.epochs is None:
        args.epochs = DEFAULT_EPOCHS
    _check_args(args)
    if state is not None and args.epochs <= state["epoch"]:
        ddp.log(f"the run already finished its {state['epoch']} epoch(s); pass --epochs N > {state['epoch']} "
                "to train longer")
    run_dir = args.run_dir or ddp.broadcast(
        str(Path("runs") / datetime.datetime.now().strftime("%Y%m%d-%H%M%S")) if ddp.main else None)
    run_dir = Path(run_dir)
    args.run_dir = str(run_dir)
    if state is None and (run_dir / STATE_FILE).exists():
        raise UsageError(f"{run_dir} already holds a run ({STATE_FILE}); pass --resume to continue it, or choose "
                         "another --run-dir")
    device = _device(args, ddp)
    amp = {"auto": device.type == "cuda", "on": True, "off": False}[args.amp]
    if amp and device.type != "cuda":
        raise UsageError("--amp on needs a CUDA device; use --amp auto or off on the CPU")
    if ddp.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_config(run_dir, plain_args(args))  # the one copy of the run configuration
        if remove_stale_temporaries(args.output):
            ddp.log(f"removed a partial checkpoint file beside {args.output} left by an interrupted write")
    seed_everything(args.seed)
    return Run(args, ddp, run_dir, device, amp, device.type == "cuda" and not args.no_channels_last,
               parse_labels(args.labels), state)


def _resume(args: argparse.Namespace, ddp: _Dist) -> dict:
    """Load the run's state and fill args from its saved configuration (locked settings must not change)."""
    if not args.run_dir:
        raise UsageError("--resume needs --run-dir: the folder of the run to continue (it holds last.pth)")
    try:
        state, notes = load_resume_state(args.run_dir)
    except NoTrainingState as exc:
        raise UsageError(f"--resume: {exc}; drop --resume to start a new run") from None
    for note in notes:
        ddp.log(note)
    saved = read_config(args.run_dir, state)
    if "calibration_fraction" not in saved:
        # Its split had no calibration part: the default one would now take patients it has trained on.
        raise UsageError(f"{args.run_dir} was started before training held out a calibration split; resuming it "
                         "would fit the calibration and evidence on patients it trained on. Start a new run with "
                         "another --run-dir")
    defaults = {k: v for k, v in vars(get_args_parser().parse_args([])).items() if k not in ("resume", "run_dir")}
    try:
        merged, changed = merge_config(vars(args), saved, defaults)
    except LockedSettingChanged as exc:
        raise UsageError(f"{_flag(exc.key)} cannot change on --resume (the run in progress uses {exc.saved!r}); "
                         "start a new run with another --run-dir instead") from None
    vars(args).update(merged)
    changes = ", ".join(f"{_flag(key)} {new} (was {old})" for key, new, old in changed)
    ddp.log(f"resuming {args.run_dir} after epoch {state['epoch']}" + (f"; changed: {changes}" if changes else ""))
    return state


def build_meta_and_model(run: Run) -> tuple[Meta, torch.nn.Module]:
    """The model first: a missing ImageNet download stops the run before any data work."""
    args, ddp = run.args, run.ddp
    meta = Meta.new(arch=args.arch, labels=run.labels, image_size=args.image_size, output_stride=args.output_stride,
                    transition_kernel=args.transition_kernel)
    pretrained = not args.no_pretrained and run.state is None
    model = model_from_meta(meta, pretrained=pretrained) if ddp.main else None
    ddp.barrier()  # the first process downloads the weights once; the others then find them in the cache
    if not ddp.main:
        model = model_from_meta(meta, pretrained=pretrained)
    return meta, model


def load_data(run: Run, meta: Meta) -> Data:
    """Index the data folder, rebuild the split the run's SplitSpec describes, build datasets and loaders."""
    args, ddp = run.args, run.ddp
    data_dir = Path(args.data_dir)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        index = load_index(data_dir, allow_missing=args.allow_missing)
        spec = split_spec(index, data_dir, args.val_fraction, args.seed, args.limit, args.calibration_fraction,
                          args.stratify_split)
        splits = rebuild_splits(meta.replace(training={"split": spec.to_dict()}), index, data_dir)
    for w in caught:  # e.g. the bundled official metadata standing in for the data folder's own: say so on stderr
        ddp.log(f"warning: {w.message}", file=sys.stderr)
    if index.attrs.get("missing") and ddp.main:
        (run.dir / "missing.txt").write_text("\n".join(index.attrs["missing"]) + "\n")
    check_patient_disjoint(splits)  # asserted here too, on exactly what is trained and validated on
    if len(splits["train"]) == 0:
        raise DataError(f"the training split is empty ({len(index)} images indexed under {data_dir})")
    if len(splits["val"]) == 0:
        raise DataError("the validation split is empty; use a larger --val-fraction or more images")
    if len(splits["calibration"]) == 0:
        raise DataError("the calibration split is empty; use a larger --calibration-fraction or more images")
    ddp.log(f"data: {len(index)} images of {index['patient'].nunique()} patients in {data_dir}; "
            f"{'official' if spec.official else 'seeded patient-wise'} split: {len(splits['train'])} train / "
            f"{len(splits['val'])} val / {len(splits['calibration'])} calibration / {len(splits['test'])} test "
            "(patient-disjoint; test not used here)")
    if len(splits["test"]) == 0:
        ddp.log("notice: the test split is empty (every indexed image is in the train_val list); training "
                "goes ahead, but evaluate the model on data that includes test_list.txt images")
    unreadable: dict[str, str] = {}
    if args.check_data:
        splits = _leave_out_unreadable(run, meta, splits, unreadable)
    return _loaders(run, meta, index, spec, splits, unreadable)


def _datasets(run: Run, meta: Meta, splits: dict) -> tuple[XrayDataset, XrayDataset]:
    args = run.args
    return (XrayDataset(splits["train"], run.labels, build_transform(meta, train=True, hflip=args.hflip,
                                                                      intensity=args.intensity_augment),
                        args.cache_dir, skip_unreadable=True),
            XrayDataset(splits["val"], run.labels, build_transform(meta, train=False), args.cache_dir,
                        skip_unreadable=True))


def _leave_out_unreadable(run: Run, meta: Meta, splits: dict, unreadable: dict[str, str]) -> dict:
    """--check-data: read every train/val/calibration image once (sharded over the ranks); drop the unreadable ones."""
    args, ddp = run.args, run.ddp
    bad = []
    calibration = XrayDataset(splits["calibration"], run.labels, build_transform(meta, train=False), args.cache_dir,
                              skip_unreadable=True)
    for name, ds in zip(("train", "val", "calibration"), (*_datasets(run, meta, splits), calibration), strict=True):
        shard = range(ddp.rank, len(ds), ddp.world_size)
        found = find_unreadable(ds, shard, workers=args.workers, progress=ddp.main and not args.no_progress)
        bad += [(name, u) for part in ddp.gather(found) for u in part]
    ddp.log(f"checked {sum(len(splits[k]) for k in ('train', 'val', 'calibration'))} images: {len(bad)} unreadable")
    for name, u in bad:
        ddp.log(f"  unreadable ({name}): {u.reason}")
        unreadable[u.name] = u.reason
    if not bad:
        return splits
    splits = {k: df[~df["image"].isin(set(unreadable))].reset_index(drop=True) for k, df in splits.items()}
    ddp.log(f"left out {len(unreadable)} unreadable image(s); list in {run.dir / 'unreadable.txt'}")
    if any(len(splits[k]) == 0 for k in ("train", "val", "calibration")):
        raise DataError("no readable training, validation or calibration images are left")
    return splits


def _loaders(run: Run, meta: Meta, index, spec: SplitSpec, splits: dict, unreadable: dict) -> Data:
    args, ddp = run.args, run.ddp
    train_ds, val_ds = _datasets(run, meta, splits)
    train_sampler = DistributedSampler(train_ds, num_replicas=ddp.world_size, rank=ddp.rank, shuffle=True,
                                       seed=args.seed, drop_last=ddp.enabled)
    val_sampler = DistributedSampler(val_ds, num_replicas=ddp.world_size, rank=ddp.rank, shuffle=False)
    loader_kwargs = dict(batch_size=args.batch_size, num_workers=args.workers, collate_fn=collate_batch,
                         pin_memory=run.device.type == "cuda", persistent_workers=args.workers > 0)
    # A final batch of one image would break BatchNorm in training mode; drop it (it is reshuffled next epoch).
    train_loader = DataLoader(train_ds, sampler=train_sampler, drop_last=len(train_sampler) % args.batch_size == 1,
                              **loader_kwargs)
    val_loader = DataLoader(val_ds, sampler=val_sampler, **loader_kwargs)
    return Data(index, spec, splits, train_ds, val_ds, train_sampler, train_loader, val_loader,
                build_normalize(meta), unreadable)


def build_optimisation(run: Run, model: torch.nn.Module, data: Data) -> Optimisation:
    """Loss (its weights from the training split), model on the device (DDP-wrapped), Adam, schedule, scaler."""
    args = run.args
    loss_fn = build_loss(args.loss, targets(data.splits["train"], run.labels))
    model = model.to(run.device)
    if run.channels_last:
        model = model.to(memory_format=torch.channels_last)
    net = model
    if run.ddp.enabled:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[run.device.index] if run.device.type == "cuda" else None)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    scheduler = None
    if args.scheduler == "plateau":
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=0.1, patience=1)
    elif args.scheduler == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.epochs)
    scaler = torch.amp.GradScaler("cuda", enabled=run.amp)
    return Optimisation(model, net, loss_fn, optimizer, scheduler, scaler)


def restore(run: Run, opt: Optimisation) -> Progress:
    """Load the resumed state into the model, optimiser, scaler, schedule and RNGs; a new run starts at epoch 1."""
    state, ddp, seed = run.state, run.ddp, run.args.seed
    if state is None:
        if not ddp.main:
            seed_everything(seed * 1000 + ddp.rank)  # each process draws its own augmentations
        return Progress()
    opt.model.load_state_dict(state["model"])
    opt.optimizer.load_state_dict(state["optimizer"])
    if state.get("scaler"):
        opt.scaler.load_state_dict(state["scaler"])
    if opt.scheduler is not None and state.get("scheduler"):
        opt.scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    if not ddp.main:
        seed_everything(seed * 1000 + ddp.rank + 7919 * state["epoch"])
    return Progress(state["epoch"] + 1, list(state["history"]), state["best_score"], state["best_epoch"])


def run_epoch(run: Run, data: Data, opt: Optimisation, progress: Progress, epoch: int):
    """Train one epoch, validate, step the schedule, record the history row -> (stats, result, is_best)."""
    args, ddp = run.args, run.ddp
    bars = ddp.main and not args.no_progress
    data.train_sampler.set_epoch(epoch)
    stats = train_one_epoch(opt.net, data.train_loader, opt.loss_fn, opt.optimizer, run.device,
                            data.normalize, scaler=opt.scaler, amp=run.amp,
                            clip_grad=args.clip_grad or None, channels_last=run.channels_last, progress=bars,
                            desc=f"epoch {epoch}/{args.epochs} train")
    if ddp.enabled and epoch == progress.start_epoch:
        shards = ddp.gather(stats.indices.tolist())
        if ddp.main:
            _check_shards(shards, run.dir, epoch, ddp)
    train_bad = [u for part in ddp.gather(stats.unreadable) for u in part]
    result = evaluate(opt.net, data.val_loader, opt.loss_fn, run.device, data.normalize, amp=run.amp,
                      channels_last=run.channels_last, progress=bars, desc=f"epoch {epoch}/{args.epochs} val")
    lr = opt.optimizer.param_groups[0]["lr"]
    if isinstance(opt.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        if math.isfinite(result.mean_auroc):
            opt.scheduler.step(result.mean_auroc)
    elif opt.scheduler is not None:
        opt.scheduler.step()
    new_bad = sorted({u.name: u for u in train_bad + result.unreadable}.values(), key=lambda u: u.name)
    data.unreadable.update((u.name, u.reason) for u in new_bad)
    if new_bad:
        _report(ddp, f"epoch {epoch}: skipped {len(new_bad)} unreadable image(s)", [u.reason for u in new_bad])
    score = result.mean_auroc if math.isfinite(result.mean_auroc) else -math.inf
    is_best = progress.best_epoch is None or score > progress.best_score
    if is_best:
        progress.best_score, progress.best_epoch = score, epoch
    row = {"epoch": epoch, "train_loss": stats.loss, "val_loss": result.loss,
           "val_mean_auroc": _finite_or_none(result.mean_auroc), "lr": lr, "train_images": stats.images,
           "val_images": len(result.indices), "seconds": round(stats.seconds, 2),
           "images_per_s": round(stats.images_per_s, 2)}
    row.update({f"auroc_{name}": _finite_or_none(a) for name, a in zip(run.labels, result.auroc)})
    progress.history.append(row)
    return stats, result, is_best


def save_epoch(run: Run, meta: Meta, data: Data, opt: Optimisation, progress: Progress, epoch: int, result,
               is_best: bool) -> None:
    """Rank 0: the best checkpoint (when best), the resumable state, then history.csv, curves and unreadable.txt.

    The state goes before the files derived from it, so a kill between them leaves a history one epoch short (which
    --resume rewrites from the state), never one listing an epoch that --resume cannot find."""
    args = run.args
    if is_best:
        thresholds = choose_thresholds(result.targets, result.probs, args.threshold_rule)
        summary = _training_summary(run, data, result, epoch)
        save_checkpoint(args.output, opt.model, meta.replace(thresholds=tuple(thresholds), training=summary),
                        train={"run_config": str(run.dir / CONFIG_FILE), "history": progress.history})
    save_state(run.dir, {
        "epoch": epoch, "model": {k: v.detach().cpu() for k, v in opt.model.state_dict().items()},
        "optimizer": opt.optimizer.state_dict(), "scaler": opt.scaler.state_dict(),
        "scheduler": opt.scheduler.state_dict() if opt.scheduler is not None else None, "rng": rng_state(),
        "best_score": progress.best_score, "best_epoch": progress.best_epoch, "history": progress.history,
        "world_size": run.ddp.world_size,
    })
    write_run_files(run, data, progress.history)


def write_run_files(run: Run, data: Data, history: list[dict]) -> None:
    """history.csv, training_curves.png and unreadable.txt in the run folder, from the epochs' history rows."""
    write_history(run.dir / "history.csv", history)
    plot_history(run.dir / "training_curves.png", history)
    if data.unreadable:
        atomic_write(run.dir / "unreadable.txt",
                     "".join(f"{name}\t{reason}\n" for name, reason in sorted(data.unreadable.items())))


def _check_shards(shards: list[list[int]], run_dir: Path, epoch: int, ddp: _Dist) -> None:
    """The ranks' training indices of one epoch must be disjoint; written to shards.json as evidence."""
    seen: set[int] = set()
    for rank, shard in enumerate(shards):
        overlap = seen & set(shard)
        if overlap:
            raise RuntimeError(f"rank {rank} trained on images another rank also had: {sorted(overlap)[:5]}")
        seen |= set(shard)
    write_json(run_dir / "shards.json", {"epoch": epoch, "world_size": len(shards), "train_indices": shards})
    ddp.log(f"ranks: {len(shards)} disjoint training shards of {[len(s) for s in shards]} images")


def _training_summary(run: Run, data: Data, result, epoch: int) -> dict:
    """meta.training: the model's results and data; the run configuration stays in args.json (train["run_config"])."""
    args, data_dir = run.args, Path(run.args.data_dir)
    return {
        "data": f"NIH ChestX-ray14, {'official' if data.spec.official else 'seeded patient-wise'} split, from "
                f"{data_dir.name}",
        "data_dir": data_dir.name,
        "epochs": epoch,
        "val_auroc": {name: _finite_or_none(a) for name, a in zip(run.labels, result.auroc)},
        "val_mean_auroc": _finite_or_none(result.mean_auroc),
        "val_loss": _finite_or_none(result.loss),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "split": with_roles(data.spec, data.splits),
        "loss": args.loss,
        "threshold_rule": args.threshold_rule,
        "intensity_augment": args.intensity_augment,
        "n_train": len(data.train_ds),
        "n_val": int(len(result.indices)),
        "n_calibration": len(data.splits["calibration"]),
        "world_size": run.ddp.world_size,
    }


def _epoch_line(epoch: int, epochs: int, stats, result, labels) -> str:
    line = (f"epoch {epoch}/{epochs}  train loss {stats.loss:.4f}  val loss {result.loss:.4f}  "
            f"val mean AUROC {result.mean_auroc:.4f}")
    defined = [(a, name) for name, a in zip(labels, result.auroc) if math.isfinite(a)]
    if defined:
        (worst, worst_name), (best, best_name) = min(defined), max(defined)
        line += f"  worst {worst_name} {worst:.3f}  best {best_name} {best:.3f}"
    if len(defined) < len(labels):
        line += f"  ({len(labels) - len(defined)} label(s) without AUROC: no positives in validation)"
    return line + f"  [{stats.seconds:.0f} s, {stats.images_per_s:.1f} img/s]"


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
