"""Backend "auto": PyTorch on CUDA; on a CPU, ONNX Runtime from an export made once per checkpoint.

The export is stored beside the checkpoint as `<name>.<first 16 hex of the checkpoint's SHA-256>.onnx`, so a changed
checkpoint gets a new export (the old one is removed) and an unchanged one is never exported twice. Before an export
is kept it is checked against PyTorch on a few inputs: probabilities within PROBABILITY_TOLERANCE and every label's
map within MAP_TOLERANCE (relative to the map's range), as Model_Training/export.py checks. When the export or the
check fails, or the folder cannot be written, the caller falls back to PyTorch and says so in one line.

Once the export is there, nothing here needs torch: the digest is hashlib's, and the export carries the checkpoint's
meta and trust data (Predictor.from_checkpoint then never reads the .pth with torch). Only making and checking an
export imports it.
"""
from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .fileio import cached_file_sha256
from .meta import Meta
from .onnx_backend import OnnxModel, OnnxModelError, export_onnx

if TYPE_CHECKING:
    import torch

PROBABILITY_TOLERANCE = 1e-4  # max |probability difference| between PyTorch and the export
MAP_TOLERANCE = 1e-3  # max |map difference| over the map's range
PROBES = 3  # seeded inputs the export is checked on
DIGEST_CHARS = 16
EXPORTED_AS_GRAPH = ("format", "model", "meta", "train")  # every other checkpoint field travels as metadata


class ExportRefused(OnnxModelError):
    """The export could not be made or did not match PyTorch: serve with PyTorch instead."""


def checkpoint_digest(path: str | os.PathLike) -> str:
    """SHA-256 of the checkpoint file, hex: what names its export. Read once per file version in a process (the
    results database names the model version by the same digest)."""
    return cached_file_sha256(path)


def export_path(checkpoint: str | os.PathLike, digest: str) -> Path:
    """Where the export of this checkpoint version lives: beside it, named by its digest."""
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(f"{checkpoint.stem}.{digest[:DIGEST_CHARS]}.onnx")


def _stale_exports(checkpoint: Path, keep: Path) -> list[Path]:
    """Earlier versions' exports of this checkpoint name (same stem, another digest)."""
    found = []
    for path in checkpoint.parent.glob(f"{checkpoint.stem}.*.onnx"):
        middle = path.name[len(checkpoint.stem) + 1:-len(".onnx")]
        if path != keep and len(middle) == DIGEST_CHARS and all(c in "0123456789abcdef" for c in middle):
            found.append(path)
    return found


def verify(model: torch.nn.Module, onnx_model: OnnxModel, meta: Meta, seed: int = 0) -> tuple[float, float]:
    """(max |probability difference|, max map difference over the map's range) on PROBES seeded inputs.
    Raises ExportRefused when either is over its tolerance."""
    import torch

    from .cam import predict_with_maps

    generator = torch.Generator().manual_seed(seed)
    batch = torch.randn(PROBES, 3, meta.image_size, meta.image_size, generator=generator)
    with torch.inference_mode():
        logits, maps = predict_with_maps(model.eval(), batch)
    o_logits, o_maps, _ = onnx_model.run(batch.numpy())
    p_diff = float(np.abs(torch.sigmoid(logits).numpy() - 1 / (1 + np.exp(-o_logits.astype(np.float64)))).max())
    maps = maps.numpy()
    scale = np.maximum(maps.max(axis=(2, 3), keepdims=True) - maps.min(axis=(2, 3), keepdims=True), 1e-6)
    m_diff = float((np.abs(maps - o_maps) / scale).max())
    if not (p_diff <= PROBABILITY_TOLERANCE and m_diff <= MAP_TOLERANCE):
        raise ExportRefused(f"the ONNX export disagrees with PyTorch (probability {p_diff:.1e}, limit "
                            f"{PROBABILITY_TOLERANCE}; heatmap {m_diff:.1e}, limit {MAP_TOLERANCE})")
    return p_diff, m_diff


def ensure_export(checkpoint: str | os.PathLike, obj: dict, model: torch.nn.Module, meta: Meta, train: dict | None,
                  log: Callable[[str], None]) -> Path:
    """The verified export of this checkpoint, made now when there is none -> its path.

    Written to a temporary file in the same folder and renamed only once verified, so a crash never leaves a
    half-written export under the final name. Raises ExportRefused when it cannot be made or does not match.
    """
    checkpoint = Path(checkpoint)
    target = export_path(checkpoint, checkpoint_digest(checkpoint))
    if target.is_file():
        return target
    log(f"first start with this checkpoint: exporting it to ONNX Runtime once ({target.name}; about a minute "
        "for ResNet-50 at 512 px) ...")
    extra = {k: v for k, v in obj.items() if k not in EXPORTED_AS_GRAPH}  # trust data travel in the metadata
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.stem}.", suffix=".onnx.tmp", dir=checkpoint.parent)
        os.close(fd)
    except OSError as exc:
        raise ExportRefused(f"cannot write the export beside {checkpoint} ({exc.strerror or exc})") from None
    tmp = Path(tmp_name)
    try:
        export_onnx(model, meta, tmp, train, extra)
        p_diff, m_diff = verify(model, OnnxModel(tmp, device="cpu", expected_meta=meta), meta)
        os.replace(tmp, target)
    except ExportRefused:
        raise
    except Exception as exc:  # any failure of the exporter or ONNX Runtime: serve with PyTorch instead
        raise ExportRefused(f"the ONNX export failed ({type(exc).__name__}: {str(exc)[:200]})") from None
    finally:
        tmp.unlink(missing_ok=True)
    for stale in _stale_exports(checkpoint, target):
        stale.unlink(missing_ok=True)
    log(f"exported and checked against PyTorch (max |Δprobability| {p_diff:.1e}, heatmaps {m_diff:.1e}) -> "
        f"{target}")
    return target
