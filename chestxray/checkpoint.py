"""The checkpoint contract: one file {"format", "model", "meta", "train"} of tensors and plain Python types.

`Meta` holds everything needed to rebuild the model and its preprocessing, so nothing downstream re-declares a
size, a normalisation, a label list or a threshold. Loading uses `torch.load(weights_only=True)` (a pickled
object is refused, its code never runs) and strict state-dict loading (a peer package that loads with
strict=False silently serves an untrained head).

An optional fifth entry "trust" (chestxray/trust/: in-scope statistics, calibration, validation evidence) is
written at the end of training or by Model_Training/fit_trust.py; a checkpoint without it still loads, and its
answers say the in-scope check and calibration are not available. With calibration, Meta.thresholds are on the
calibrated scale.
"""
from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .fileio import atomic_write, remove_stale_temporaries
from .meta import IMAGENET_MEAN, IMAGENET_STD, CheckpointError, Meta, SplitSpec

if TYPE_CHECKING:
    from .model import ChestXrayNet

# torch and the model are imported inside the functions that need them: the ONNX server imports this module for
# CheckpointError and the constants only, and never loads torch (tests/test_torch_free.py).

# Meta, SplitSpec and CheckpointError live in chestxray.meta (no torch import); re-exported for existing imports.
__all__ = ["CHECKPOINT_KEYS", "DEFAULT_CHECKPOINT", "FORMAT", "IMAGENET_MEAN", "IMAGENET_STD", "CheckpointError",
           "Meta", "SplitSpec", "atomic_torch_save", "load_checkpoint", "model_from_meta", "remove_stale_temporaries",
           "safe_torch_load", "save_checkpoint", "write_checkpoint"]

FORMAT = 1
CHECKPOINT_KEYS = ("format", "model", "meta", "train", "trust")  # every field a checkpoint may hold
DEFAULT_CHECKPOINT = "chestxray_model_resnet50.pth"  # where training writes and the web app looks


def model_from_meta(meta: Meta, pretrained: bool = False) -> ChestXrayNet:
    """Build the (untrained, or ImageNet-initialised) model that `meta` describes."""
    from .model import build_model

    return build_model(meta.arch, len(meta.labels), meta.lse_r, meta.transition_kernel, pretrained, meta.output_stride)


def atomic_torch_save(obj: Any, path: str | os.PathLike, backup: str | os.PathLike | None = None) -> None:
    """torch.save via fileio.atomic_write (temporary file, fsync, os.replace): never a half-written file.

    With `backup`, the file being replaced is first renamed to it (only once the new one is safely on disk), so
    the previous version survives a later corruption. A failed write (e.g. a full disk) leaves `path` as it was.
    """
    import torch

    atomic_write(path, lambda f: torch.save(obj, f), backup=backup, fsync=True)


def save_checkpoint(path: str | os.PathLike, model: ChestXrayNet, meta: Meta, train: dict | None = None,
                    trust: dict | None = None) -> None:
    """Write {"format", "model", "meta", "train"[, "trust"]} atomically. `train` and `trust` must be plain data."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    obj = {"format": FORMAT, "model": state, "meta": meta.to_dict(), "train": dict(train or {})}
    if trust is not None:
        obj["trust"] = trust
    write_checkpoint(path, obj)


def write_checkpoint(path: str | os.PathLike, obj: dict) -> None:
    """The one writer of checkpoint files: a loaded checkpoint dict, changed or not, saved atomically with every
    field it holds. Raises CheckpointError for a field outside CHECKPOINT_KEYS or a missing model/meta/format, so a
    re-save can neither drop nor invent a field."""
    unknown = sorted(set(obj) - set(CHECKPOINT_KEYS))
    missing = [key for key in ("format", "model", "meta") if key not in obj]
    if unknown or missing:
        raise CheckpointError(f"not a checkpoint to write: unknown fields {unknown}, missing fields {missing}")
    atomic_torch_save(obj, path)


def safe_torch_load(path: str | os.PathLike, map_location: Any = "cpu") -> Any:
    """torch.load(weights_only=True) with clear errors: missing, truncated/corrupt, or holding Python objects."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if not zipfile.is_zipfile(path):
        # torch.save writes a zip archive; anything else (a cut-off file, junk, a legacy pickle) is refused here.
        raise CheckpointError(f"{path} is truncated or corrupt, or not a PyTorch checkpoint file")
    import torch

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


def _check_weights(state: Any) -> None:
    """Every weight a tensor of finite values: NaN/inf weights would give NaN probabilities on every page."""
    import torch

    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint field 'model' must be a state dict, got {type(state).__name__}")
    for name, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"checkpoint field 'model': {str(name)[:80]!r} is not a tensor")
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise CheckpointError(f"checkpoint field 'model': tensor {name!r} holds NaN or infinite values")


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> tuple[ChestXrayNet, Meta, dict]:
    """Load (model in eval mode, meta, train summary). Raises CheckpointError naming what is wrong."""
    return checkpoint_from_obj(safe_torch_load(path, map_location), path)


def checkpoint_from_obj(obj: Any, path: str | os.PathLike = "checkpoint") -> tuple[ChestXrayNet, Meta, dict]:
    """load_checkpoint on an already loaded dict (callers that also read its other entries, e.g. "trust")."""
    if not isinstance(obj, dict) or "model" not in obj or "meta" not in obj or "format" not in obj:
        keys = sorted(obj)[:8] if isinstance(obj, dict) else type(obj).__name__
        raise CheckpointError(
            f"{path} is not a checkpoint of this tool (expected keys format/model/meta, found {keys}); "
            "train one with Model_Training/train.py"
        )
    if obj["format"] != FORMAT:
        raise CheckpointError(f"{path} has checkpoint format {obj['format']!r}; this version reads format {FORMAT}")
    import torch

    meta = Meta.from_dict(obj["meta"])
    _check_weights(obj["model"])
    # Built without storage (no random initialisation to throw away: ~0.1 s for ResNet-18, ~0.3 s for ResNet-50)
    # and given the loaded tensors themselves; strict=True leaves no parameter or buffer unset.
    with torch.device("meta"):
        model = model_from_meta(meta)
    try:
        model.load_state_dict(obj["model"], strict=True, assign=True)
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())[:600]
        raise CheckpointError(f"{path}: the weights do not match its metadata ({meta.arch}, "
                              f"{len(meta.labels)} labels): {detail}") from None
    model.eval()
    return model, meta, dict(obj.get("train") or {})
