"""Train the chest X-ray classifier on NIH ChestX-ray14.

    python Model_Training/train.py --data-dir /path/to/nih
    torchrun --nproc_per_node N Model_Training/train.py --data-dir /path/to/nih      (several GPUs, DDP)

--data-dir holds Data_Entry_2017_v2020.csv, Data_Entry_2017.csv or labels.csv, the images anywhere below it, and
optionally the official train_val_list.txt / test_list.txt (validation is carved from train_val by patient; the
test split is never used here). After every epoch the run folder (--run-dir) gets a resumable state (last.pth;
continue with --resume), history.csv, training_curves.png; args.json at start. The epoch with the best validation
mean AUROC is written to --output with per-label thresholds chosen on the validation set.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import math
import os
import random
import subprocess
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a file: make the chestxray package importable
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.utils.data import DataLoader, DistributedSampler  # noqa: E402

from chestxray.checkpoint import (  # noqa: E402
    DEFAULT_CHECKPOINT,
    CheckpointError,
    Meta,
    atomic_torch_save,
    model_from_meta,
    remove_stale_temporaries,
    safe_torch_load,
    save_checkpoint,
)
from chestxray.data import (  # noqa: E402
    DataError,
    XrayDataset,
    check_patient_disjoint,
    collate_batch,
    find_unreadable,
    has_official_lists,
    load_index,
    make_splits,
    subsample,
    targets,
)
from chestxray.engine import evaluate, train_one_epoch  # noqa: E402
from chestxray.labels import CHESTXRAY8_LABELS, LABELS, LabelError, check_labels  # noqa: E402
from chestxray.losses import LOSSES, build_loss  # noqa: E402
from chestxray.metrics import THRESHOLD_RULES, choose_thresholds  # noqa: E402
from chestxray.model import ARCHS, PretrainedWeightsUnavailable  # noqa: E402
from chestxray.transforms import build_normalize, build_transform  # noqa: E402

STATE_FILE = "last.pth"
PREVIOUS_STATE_FILE = "last.prev.pth"  # the state before last.pth: --resume falls back to it if last.pth is damaged
STATE_FORMAT = 1
DEFAULT_EPOCHS = 5
# Settings that define the run: on --resume they come from the saved run; giving another value is an error.
LOCKED = ("arch", "labels", "image_size", "batch_size", "lr", "weight_decay", "scheduler", "loss", "seed",
          "val_fraction", "limit", "hflip", "no_pretrained", "clip_grad")


class UsageError(ValueError):
    """A bad command-line value or combination; the message says what to change."""


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
    add("--val-fraction", type=float, default=0.1, help="fraction of train_val patients held out for validation "
        "(default: %(default)s)")
    add("--threshold-rule", default="f1", choices=THRESHOLD_RULES, help="per-label threshold chosen on the "
        "validation set: max F1 or Youden's J (default: %(default)s)")
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
    add("--allow-missing", action="store_true", help="skip labelled images whose file is missing, and report "
        "them (default: stop with a count and examples)")
    add("--check-data", action="store_true", help="read every train/val image once before training, list the "
        "unreadable ones and leave them out (fills --cache-dir) (default: off)")
    add("--no-progress", action="store_true", help="no progress bars (default: bars on the first process)")
    return parser


# ----------------------------------------------------------------------------------------------------------------
# Helpers


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
        (args.image_size >= 32, f"--image-size must be at least 32 pixels, got {args.image_size}"),
        (args.lr > 0, f"--lr must be positive, got {args.lr}"),
        (args.weight_decay >= 0, f"--weight-decay must be non-negative, got {args.weight_decay}"),
        (args.clip_grad >= 0, f"--clip-grad must be non-negative (0 = off), got {args.clip_grad}"),
        (0 < args.val_fraction < 1, f"--val-fraction must lie strictly between 0 and 1, got {args.val_fraction}"),
        (args.workers >= 0, f"--workers must be non-negative, got {args.workers}"),
        (args.limit is None or args.limit >= 1, f"--limit must be at least 1, got {args.limit}"),
    ]
    for ok, message in checks:
        if not ok:
            raise UsageError(message)
    parse_labels(args.labels)


def _merge_resumed_args(args: argparse.Namespace, saved: dict) -> list[str]:
    """Fill args from the saved run: locked settings must match; others keep a non-default command-line value."""
    defaults = vars(get_args_parser().parse_args([]))
    notes = []
    for key, value in saved.items():
        if key not in defaults or key in ("resume", "run_dir"):
            continue
        given = getattr(args, key)
        if key in LOCKED:
            if given != defaults[key] and given != value:
                flag = "--" + key.replace("_", "-")
                raise UsageError(f"{flag} cannot change on --resume (the run in progress uses {value!r}); start a "
                                 "new run with another --run-dir instead")
            setattr(args, key, value)
        elif given == defaults[key] or given is None:
            setattr(args, key, value)
        elif given != value:
            notes.append(f"--{key.replace('_', '-')} {given} (was {value})")
    return notes


def plain_args(args: argparse.Namespace) -> dict:
    """vars(args) with paths as strings: plain data for JSON and weights_only checkpoints."""
    return {k: str(v) if isinstance(v, os.PathLike) else v for k, v in vars(args).items()}


def git_commit() -> str | None:
    """Short hash of the code's git HEAD, or None outside a git checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def rng_state() -> dict:
    """Python, NumPy, torch (and CUDA) RNG states as tensors/lists, loadable with weights_only=True."""
    version, internal, gauss = random.getstate()
    _, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": {"version": version, "internal": list(internal), "gauss": gauss},
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what rng_state() saved (CUDA states only when the device count matches)."""
    py = state["python"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state(("MT19937", npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _finite_or_none(value: float) -> float | None:
    return float(value) if value is not None and math.isfinite(value) else None


def write_history(path: Path, history: list[dict]) -> None:
    """history.csv: one row per epoch (atomic replace)."""
    if not history:
        return
    fields = list(history[0])
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for row in history:
            writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in fields})
    os.replace(tmp, path)


def plot_history(path: Path, history: list[dict]) -> None:
    """training_curves.png: train/val loss and validation mean AUROC per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [row["epoch"] for row in history]
    fig, (ax_loss, ax_auc) = plt.subplots(1, 2, figsize=(10, 4))
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
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


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
    if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise UsageError("--device cuda was asked for but no CUDA GPU is available; use --device cpu or auto")
        if ddp.local_rank >= torch.cuda.device_count():
            raise UsageError(f"local rank {ddp.local_rank} has no GPU ({torch.cuda.device_count()} visible); "
                             "use --nproc_per_node <= the number of GPUs")
        torch.cuda.set_device(ddp.local_rank)
        return torch.device("cuda", ddp.local_rank)
    return torch.device("cpu")


def _report(ddp: _Dist, what: str, names: list[str], limit: int = 10) -> None:
    shown = ", ".join(names[:limit]) + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")
    ddp.log(f"warning: {what}: {shown}")


# ----------------------------------------------------------------------------------------------------------------
# Main


def main(args: argparse.Namespace) -> int:
    """Train; returns the exit code (0 done, 2 bad input or data). Under torchrun, runs as one DDP process."""
    ddp = _Dist()
    try:
        if ddp.enabled and not dist.is_initialized():
            backend = "nccl" if args.device != "cpu" and torch.cuda.is_available() else "gloo"
            if backend == "nccl":
                torch.cuda.set_device(ddp.local_rank)
            dist.init_process_group(backend)
        return _train(args, ddp)
    except (UsageError, DataError, LabelError, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
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
    except PretrainedWeightsUnavailable as exc:
        print(f"error: {exc}\nTo train without ImageNet weights, pass --no-pretrained.", file=sys.stderr,
              flush=True)
        return 2
    finally:
        if ddp.enabled and dist.is_initialized():
            dist.destroy_process_group()


def _read_state(path: Path) -> dict:
    state = safe_torch_load(path)
    if not isinstance(state, dict) or state.get("kind") != "train-state" or "args" not in state:
        raise CheckpointError(f"{path} is not a resumable training state of this tool")
    return state


def load_resume_state(run_dir: Path, log=print) -> dict:
    """The newest complete training state in run_dir: last.pth, else (damaged or missing) last.prev.pth.

    Raises UsageError when the folder holds neither, CheckpointError when neither loads.
    """
    current, previous = run_dir / STATE_FILE, run_dir / PREVIOUS_STATE_FILE
    if not current.is_file() and not previous.is_file():
        raise UsageError(f"--resume: no {STATE_FILE} in {run_dir}; drop --resume to start a new run")
    stale = remove_stale_temporaries(current)
    if stale:
        log(f"removed {len(stale)} partial state file(s) left by an interrupted write")
    try:
        if not current.is_file():
            raise CheckpointError(f"{current} is missing (the run stopped while replacing it)")
        return _read_state(current)
    except CheckpointError as exc:
        if not previous.is_file():
            raise
        log(f"warning: {exc}; falling back to the previous state {previous}")
        try:
            state = _read_state(previous)
        except CheckpointError as prev_exc:
            raise CheckpointError(f"neither training state can be used: {exc}; {prev_exc}") from None
        log(f"resuming from {previous} (epoch {state['epoch']}); the epochs after it are trained again")
        return state


def _train(args: argparse.Namespace, ddp: _Dist) -> int:
    if not ddp.main:
        warnings.simplefilter("ignore")  # the first process reports data notices once
    # --- run folder and resume -------------------------------------------------------------------------------
    state = None
    if args.resume:
        if not args.run_dir:
            raise UsageError("--resume needs --run-dir: the folder of the run to continue (it holds last.pth)")
        state = load_resume_state(Path(args.run_dir), ddp.log)
        notes = _merge_resumed_args(args, state["args"])
        ddp.log(f"resuming {args.run_dir} after epoch {state['epoch']}" + (f"; changed: {', '.join(notes)}"
                                                                            if notes else ""))
    if args.epochs is None:
        args.epochs = DEFAULT_EPOCHS
    _check_args(args)
    if state is not None and args.epochs <= state["epoch"] and ddp.main:
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
    channels_last = device.type == "cuda" and not args.no_channels_last
    labels = parse_labels(args.labels)
    data_dir = Path(args.data_dir)
    if ddp.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "args.json").write_text(json.dumps(plain_args(args), indent=2) + "\n")
        if remove_stale_temporaries(args.output):
            ddp.log(f"removed a partial checkpoint file beside {args.output} left by an interrupted write")
    seed_everything(args.seed)

    # --- model first: a missing ImageNet download stops us before any data work --------------------------------
    meta = Meta.new(arch=args.arch, labels=labels, image_size=args.image_size)
    if ddp.main:
        model = model_from_meta(meta, pretrained=not args.no_pretrained and state is None)
    ddp.barrier()  # the first process downloads the weights once; the others then find them in the cache
    if not ddp.main:
        model = model_from_meta(meta, pretrained=not args.no_pretrained and state is None)

    # --- data ------------------------------------------------------------------------------------------------
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        index = load_index(data_dir, allow_missing=args.allow_missing)
        official = has_official_lists(data_dir)
        splits = make_splits(index, data_dir, val_fraction=args.val_fraction, seed=args.seed)
    for w in caught:
        ddp.log(f"warning: {w.message}")
    if index.attrs.get("missing") and ddp.main:
        (run_dir / "missing.txt").write_text("\n".join(index.attrs["missing"]) + "\n")
    splits = {name: subsample(df, args.limit, args.seed) for name, df in splits.items()}
    check_patient_disjoint(splits)  # asserted here too, on exactly what is trained and validated on
    if len(splits["train"]) == 0:
        raise DataError(f"the training split is empty ({len(index)} images indexed under {data_dir})")
    if len(splits["val"]) == 0:
        raise DataError("the validation split is empty; use a larger --val-fraction or more images")
    ddp.log(f"data: {len(index)} images of {index['patient'].nunique()} patients in {data_dir}; "
            f"{'official' if official else 'seeded patient-wise'} split: {len(splits['train'])} train / "
            f"{len(splits['val'])} val / {len(splits['test'])} test (patient-disjoint; test not used here)")
    if len(splits["test"]) == 0:
        ddp.log("notice: the test split is empty (every indexed image is in the train_val list); training "
                "goes ahead, but evaluate the model on data that includes test_list.txt images")

    train_tf = build_transform(meta, train=True, hflip=args.hflip)
    eval_tf = build_transform(meta, train=False)
    normalize = build_normalize(meta)  # per batch, on the device

    def datasets() -> tuple[XrayDataset, XrayDataset]:
        return (XrayDataset(splits["train"], labels, train_tf, args.cache_dir, skip_unreadable=True),
                XrayDataset(splits["val"], labels, eval_tf, args.cache_dir, skip_unreadable=True))

    train_ds, val_ds = datasets()
    unreadable_names: dict[str, str] = {}
    if args.check_data:
        bad = []
        for name, ds in (("train", train_ds), ("val", val_ds)):
            shard = range(ddp.rank, len(ds), ddp.world_size)
            found = find_unreadable(ds, shard, workers=args.workers, progress=ddp.main and not args.no_progress)
            bad += [(name, u) for part in ddp.gather(found) for u in part]
        ddp.log(f"checked {len(train_ds) + len(val_ds)} images: {len(bad)} unreadable")
        for name, u in bad:
            ddp.log(f"  unreadable ({name}): {u.reason}")
            unreadable_names[u.name] = u.reason
        if bad:
            drop = set(unreadable_names)
            splits = {k: df[~df["image"].isin(drop)].reset_index(drop=True) for k, df in splits.items()}
            train_ds, val_ds = datasets()
            ddp.log(f"left out {len(drop)} unreadable image(s); list in {run_dir / 'unreadable.txt'}")
            if len(train_ds) == 0 or len(val_ds) == 0:
                raise DataError("no readable training or validation images are left")

    train_sampler = DistributedSampler(train_ds, num_replicas=ddp.world_size, rank=ddp.rank, shuffle=True,
                                       seed=args.seed, drop_last=ddp.enabled)
    val_sampler = DistributedSampler(val_ds, num_replicas=ddp.world_size, rank=ddp.rank, shuffle=False)
    loader_kwargs = dict(batch_size=args.batch_size, num_workers=args.workers, collate_fn=collate_batch,
                         pin_memory=device.type == "cuda", persistent_workers=args.workers > 0)
    # A final batch of one image would break BatchNorm in training mode; drop it (it is reshuffled next epoch).
    train_loader = DataLoader(train_ds, sampler=train_sampler, drop_last=len(train_sampler) % args.batch_size == 1,
                              **loader_kwargs)
    val_loader = DataLoader(val_ds, sampler=val_sampler, **loader_kwargs)

    # --- model, loss, optimiser ------------------------------------------------------------------------------
    loss_fn = build_loss(args.loss, targets(splits["train"], labels))
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    net = model
    if ddp.enabled:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                        else None)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    scheduler = None
    if args.scheduler == "plateau":
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=0.1, patience=1)
    elif args.scheduler == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.epochs)
    scaler = torch.amp.GradScaler("cuda", enabled=amp)

    start_epoch, history, best_score, best_epoch = 1, [], None, None
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        if scheduler is not None and state.get("scheduler"):
            scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        if not ddp.main:  # each process draws its own augmentations
            seed_everything(args.seed * 1000 + ddp.rank + 7919 * state["epoch"])
        start_epoch = state["epoch"] + 1
        history, best_score, best_epoch = list(state["history"]), state["best_score"], state["best_epoch"]
    elif not ddp.main:
        seed_everything(args.seed * 1000 + ddp.rank)

    n_images = f"{len(train_ds)} train / {len(val_ds)} val"
    ddp.log(f"training {args.arch} at {args.image_size} px on {device}"
            f"{f' x {ddp.world_size} processes' if ddp.enabled else ''} ({n_images} images, batch "
            f"{args.batch_size}, {args.loss} loss, amp {'on' if amp else 'off'}); run folder {run_dir}")
    progress = ddp.main and not args.no_progress
    for epoch in range(start_epoch, args.epochs + 1):
        train_sampler.set_epoch(epoch)
        stats = train_one_epoch(net, train_loader, loss_fn, optimizer, device, normalize, scaler=scaler, amp=amp,
                                clip_grad=args.clip_grad or None, channels_last=channels_last, progress=progress,
                                desc=f"epoch {epoch}/{args.epochs} train")
        if ddp.enabled and epoch == start_epoch:
            shards = ddp.gather(stats.indices.tolist())
            if ddp.main:
                _check_shards(shards, run_dir, epoch, ddp)
        train_bad = [u for part in ddp.gather(stats.unreadable) for u in part]
        result = evaluate(net, val_loader, loss_fn, device, normalize, amp=amp, channels_last=channels_last,
                          progress=progress, desc=f"epoch {epoch}/{args.epochs} val")
        lr = optimizer.param_groups[0]["lr"]
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            if math.isfinite(result.mean_auroc):
                scheduler.step(result.mean_auroc)
        elif scheduler is not None:
            scheduler.step()

        new_bad = sorted({u.name: u for u in train_bad + result.unreadable}.values(), key=lambda u: u.name)
        for u in new_bad:
            unreadable_names[u.name] = u.reason
        if new_bad:
            _report(ddp, f"epoch {epoch}: skipped {len(new_bad)} unreadable image(s)", [u.reason for u in new_bad])

        score = result.mean_auroc if math.isfinite(result.mean_auroc) else -math.inf
        is_best = best_epoch is None or score > best_score
        if is_best:
            best_score, best_epoch = score, epoch
        row = {"epoch": epoch, "train_loss": stats.loss, "val_loss": result.loss,
               "val_mean_auroc": _finite_or_none(result.mean_auroc), "lr": lr, "train_images": stats.images,
               "val_images": len(result.indices), "seconds": round(stats.seconds, 2),
               "images_per_s": round(stats.images_per_s, 2)}
        row.update({f"auroc_{name}": _finite_or_none(a) for name, a in zip(labels, result.auroc)})
        history.append(row)
        if ddp.main:
            write_history(run_dir / "history.csv", history)
            plot_history(run_dir / "training_curves.png", history)
            if unreadable_names:
                (run_dir / "unreadable.txt").write_text(
                    "".join(f"{name}\t{reason}\n" for name, reason in sorted(unreadable_names.items())))
            if is_best:
                thresholds = choose_thresholds(result.targets, result.probs, args.threshold_rule)
                summary = _training_summary(args, data_dir, official, labels, result, epoch, len(train_ds), ddp)
                save_checkpoint(args.output, model, meta.replace(thresholds=tuple(thresholds), training=summary),
                                train={"args": plain_args(args), "history": history})
            atomic_torch_save(
                {"format": STATE_FORMAT, "kind": "train-state", "epoch": epoch,
                 "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                 "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                 "scheduler": scheduler.state_dict() if scheduler is not None else None, "rng": rng_state(),
                 "best_score": best_score, "best_epoch": best_epoch, "history": history, "args": plain_args(args),
                 "world_size": ddp.world_size},
                run_dir / STATE_FILE,
                backup=run_dir / PREVIOUS_STATE_FILE,
            )
            ddp.log(_epoch_line(epoch, args.epochs, stats, result, labels) + ("  * saved" if is_best else ""))
    ddp.barrier()
    if best_epoch is not None:
        best = "n/a" if not math.isfinite(best_score) else f"{best_score:.4f}"
        ddp.log(f"done: best epoch {best_epoch} (validation mean AUROC {best}) -> {args.output}; "
                f"run folder {run_dir}")
    return 0


def _check_shards(shards: list[list[int]], run_dir: Path, epoch: int, ddp: _Dist) -> None:
    """The ranks' training indices of one epoch must be disjoint; written to shards.json as evidence."""
    seen: set[int] = set()
    for rank, shard in enumerate(shards):
        overlap = seen & set(shard)
        if overlap:
            raise RuntimeError(f"rank {rank} trained on images another rank also had: {sorted(overlap)[:5]}")
        seen |= set(shard)
    (run_dir / "shards.json").write_text(json.dumps({"epoch": epoch, "world_size": len(shards),
                                                     "train_indices": shards}) + "\n")
    ddp.log(f"ranks: {len(shards)} disjoint training shards of {[len(s) for s in shards]} images")


def _training_summary(args, data_dir: Path, official: bool, labels, result, epoch: int, n_train: int,
                      ddp: _Dist) -> dict:
    val_auroc = {name: _finite_or_none(a) for name, a in zip(labels, result.auroc)}
    return {
        "data": f"NIH ChestX-ray14, {'official' if official else 'seeded patient-wise'} split, from "
                f"{data_dir.name}",
        "data_dir": data_dir.name,
        "epochs": epoch,
        "epochs_planned": args.epochs,
        "val_auroc": val_auroc,
        "val_mean_auroc": _finite_or_none(result.mean_auroc),
        "val_loss": _finite_or_none(result.loss),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "split": {"val_fraction": args.val_fraction, "seed": args.seed, "official": official, "limit": args.limit},
        "loss": args.loss,
        "threshold_rule": args.threshold_rule,
        "n_train": n_train,
        "n_val": int(len(result.indices)),
        "arch": args.arch,
        "image_size": args.image_size,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "pretrained": not args.no_pretrained,
        "world_size": ddp.world_size,
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
