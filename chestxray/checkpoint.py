"""The checkpoint contract: one file {"format", "model", "meta", "train"} of tensors and plain Python types.

`Meta` holds everything needed to rebuild the model and its preprocessing, so nothing downstream re-declares a
size, a normalisation, a label list or a threshold. Loading uses `torch.load(weights_only=True)` (a pickled
object is refused, its code never runs) and strict state-dict loading (a peer package that loads with
strict=False silently serves an untrained head).
"""
from __future__ import annotations

import dataclasses
import os
import pickle
import tempfile
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .labels import LABELS, LabelError, check_labels
from .model import ARCHS, ChestXrayNet, build_model

FORMAT = 1
DEFAULT_CHECKPOINT = "chestxray_model_resnet50.pth"  # where training writes and the web app looks
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class CheckpointError(ValueError):
    """A file that is not a loadable checkpoint of this project; the message names the problem."""


@dataclass(frozen=True)
class Meta:
    """What rebuilds the model and its preprocessing, plus a training summary (plain data only)."""

    arch: str
    labels: tuple[str, ...]
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    lse_r: float
    transition_kernel: int
    thresholds: tuple[float, ...]
    # data, epochs, val_auroc {label: float}, val_mean_auroc, date, commit ... (free-form plain data)
    training: dict = field(hash=False)

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise CheckpointError(f"unknown arch {self.arch!r} in checkpoint metadata; known: {sorted(ARCHS)}")
        try:
            object.__setattr__(self, "labels", check_labels(self.labels))
        except LabelError as exc:
            raise CheckpointError(f"checkpoint metadata labels: {exc}") from None
        object.__setattr__(self, "thresholds", tuple(float(t) for t in self.thresholds))
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        if len(self.thresholds) != len(self.labels):
            raise CheckpointError(
                f"checkpoint metadata has {len(self.thresholds)} thresholds for {len(self.labels)} labels"
            )
        if not all(0.0 <= t <= 1.0 for t in self.thresholds):
            raise CheckpointError("checkpoint thresholds must lie in [0, 1]")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise CheckpointError("checkpoint mean/std must be three numbers each, std positive")
        if int(self.image_size) < 32:
            raise CheckpointError(f"checkpoint image_size {self.image_size} is below 32")

    @classmethod
    def new(
        cls,
        arch: str = "resnet50",
        labels: tuple[str, ...] = LABELS,
        image_size: int = 512,
        lse_r: float = 10.0,
        transition_kernel: int = 3,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
        thresholds: tuple[float, ...] | None = None,
        training: dict | None = None,
    ) -> Meta:
        """A fresh Meta with the seed defaults; thresholds 0.5 until training chooses them."""
        labels = tuple(labels)
        return cls(
            arch=arch,
            labels=labels,
            image_size=int(image_size),
            mean=tuple(mean),
            std=tuple(std),
            lse_r=float(lse_r),
            transition_kernel=int(transition_kernel),
            thresholds=tuple(thresholds) if thresholds is not None else (0.5,) * len(labels),
            training=dict(training or {}),
        )

    @classmethod
    def from_dict(cls, d: dict) -> Meta:
        """Rebuild from asdict() output; a missing or unknown key raises CheckpointError naming it."""
        if not isinstance(d, dict):
            raise CheckpointError(f"checkpoint 'meta' must be a dict, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        missing = sorted(names - d.keys())
        unknown = sorted(set(d) - names)
        if missing or unknown:
            parts = []
            if missing:
                parts.append(f"missing key(s) {missing}")
            if unknown:
                parts.append(f"unknown key(s) {unknown}")
            raise CheckpointError("checkpoint metadata: " + "; ".join(parts))
        return cls(**{**d, "labels": tuple(d["labels"])})

    def to_dict(self) -> dict:
        """Plain-data dict (lists, not tuples) for torch.save and JSON."""
        d = asdict(self)
        for key in ("labels", "mean", "std", "thresholds"):
            d[key] = list(d[key])
        return d

    def replace(self, **changes: Any) -> Meta:
        return dataclasses.replace(self, **changes)


def model_from_meta(meta: Meta, pretrained: bool = False) -> ChestXrayNet:
    """Build the (untrained, or ImageNet-initialised) model that `meta` describes."""
    return build_model(meta.arch, len(meta.labels), meta.lse_r, meta.transition_kernel, pretrained)


def atomic_torch_save(obj: Any, path: str | os.PathLike, backup: str | os.PathLike | None = None) -> None:
    """torch.save to a temporary file in the same folder, fsync, then os.replace: never a half-written file.

    With `backup`, the file being replaced is first renamed to it (only once the new one is safely on disk), so
    the previous version survives a later corruption. A failed write (e.g. a full disk) leaves `path` as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        if backup is not None and path.exists():
            os.replace(path, backup)
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc  # name the file being written
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def remove_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Delete temporary files that a killed atomic_torch_save(path) left beside `path`; returns them."""
    path = Path(path)
    stale = sorted(path.parent.glob(f".{path.name}.*.tmp"))
    for tmp in stale:
        tmp.unlink(missing_ok=True)
    return stale


def save_checkpoint(path: str | os.PathLike, model: ChestXrayNet, meta: Meta, train: dict | None = None) -> None:
    """Write {"format", "model", "meta", "train"} atomically. `train` must be plain data."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    atomic_torch_save({"format": FORMAT, "model": state, "meta": meta.to_dict(), "train": dict(train or {})}, path)


def safe_torch_load(path: str | os.PathLike, map_location: Any = "cpu") -> Any:
    """torch.load(weights_only=True) with clear errors: missing, truncated/corrupt, or holding Python objects."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if not zipfile.is_zipfile(path):
        # torch.save writes a zip archive; anything else (a cut-off file, junk, a legacy pickle) is refused here.
        raise CheckpointError(f"{path} is truncated or corrupt, or not a PyTorch checkpoint file")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's message starts with advice to retry unsafely; quote only its line naming the refused object.
        lines = [line.strip() for line in str(exc).splitlines()]
        detail = next((line for line in lines if "GLOBAL" in line or "Unsupported" in line), "unsupported content")
        raise CheckpointError(
            f"{path} holds Python objects that a safe load refuses ({detail[:200]}); "
            "it is not a checkpoint of this tool, or it was saved unsafely. Only load checkpoints you trust."
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, KeyError, IndexError) as exc:
        raise CheckpointError(f"{path} is truncated or corrupt, or not a PyTorch file ({type(exc).__name__})") from None


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> tuple[ChestXrayNet, Meta, dict]:
    """Load (model in eval mode, meta, train summary). Raises CheckpointError naming what is wrong."""
    obj = safe_torch_load(path, map_location)
    if not isinstance(obj, dict) or "model" not in obj or "meta" not in obj or "format" not in obj:
        keys = sorted(obj)[:8] if isinstance(obj, dict) else type(obj).__name__
        raise CheckpointError(
            f"{path} is not a checkpoint of this tool (expected keys format/model/meta, found {keys}); "
            "train one with Model_Training/train.py"
        )
    if obj["format"] != FORMAT:
        raise CheckpointError(f"{path} has checkpoint format {obj['format']!r}; this version reads format {FORMAT}")
    meta = Meta.from_dict(obj["meta"])
    model = model_from_meta(meta)
    try:
        model.load_state_dict(obj["model"], strict=True)
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())[:600]
        raise CheckpointError(f"{path}: the weights do not match its metadata ({meta.arch}, "
                              f"{len(meta.labels)} labels): {detail}") from None
    model.eval()
    return model, meta, dict(obj.get("train") or {})
