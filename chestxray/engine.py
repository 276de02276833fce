"""Training and evaluation loops, shared by Model_Training/train.py and Model_Training/test.py.

Loaders yield (images (B, 1, S, S) uint8, targets (B, L), indices (B,)[, unreadable]) as built by
data.collate_batch (a plain default-collated 3-tuple works too); `normalize` turns the images into the model's
(B, 3, S, S) float32 input on the device. The model returns logits; the sigmoid is applied once, here.
Under torch.distributed, `evaluate` gathers every rank's predictions so metrics cover the whole set.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from .data import DataError, Unreadable
from .metrics import per_label_auroc
from .transforms import Normalize


class TrainingDiverged(FloatingPointError):
    """The epoch's mean training loss is not finite (the scripts add their flag advice)."""


@dataclass
class EpochStats:
    """One training epoch: mean loss over images (all ranks), counts, throughput, skipped images."""

    loss: float
    images: int
    seconds: float
    images_per_s: float
    unreadable: list[Unreadable] = field(default_factory=list)
    indices: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64), repr=False)


@dataclass
class EvalResult:
    """Predictions over a whole (gathered) data set, sorted by dataset index, and their metrics."""

    loss: float
    probs: np.ndarray  # (N, L) in [0, 1]
    targets: np.ndarray  # (N, L) in {0, 1}
    indices: np.ndarray  # (N,) dataset indices
    auroc: np.ndarray  # (L,), NaN where a label lacks positives or negatives
    mean_auroc: float
    unreadable: list[Unreadable] = field(default_factory=list)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _split_batch(batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[Unreadable]]:
    images, targets, indices = batch[:3]
    return images, targets, indices, list(batch[3]) if len(batch) > 3 else []


def _to_device(images: torch.Tensor, device: torch.device, channels_last: bool, normalize: Normalize) -> torch.Tensor:
    # The loader yields (N, 1, S, S) uint8; the per-batch stage of transforms.py runs on the device.
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return normalize(images.to(device, non_blocking=True)).contiguous(memory_format=fmt)


def train_one_epoch(
    model: nn.Module,
    loader,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    normalize: Normalize,
    scaler: torch.amp.GradScaler | None = None,
    amp: bool = False,
    clip_grad: float | None = None,
    channels_last: bool = False,
    progress: bool = True,
    desc: str = "train",
) -> EpochStats:
    """One pass over `loader` with optimizer steps; float16 autocast when amp. Raises on a non-finite mean loss."""
    model.train()
    device = torch.device(device)
    use_scaler = scaler is not None and scaler.is_enabled()
    total = torch.zeros((), dtype=torch.float64, device=device)
    seen, unreadable, indices = 0, [], []
    start = time.perf_counter()
    bar = tqdm(loader, desc=desc, unit="batch", disable=not progress, leave=False, dynamic_ncols=True)
    for step, batch in enumerate(bar):
        images, targets, batch_indices, bad = _split_batch(batch)
        unreadable.extend(bad)
        if images.numel() == 0:
            if _distributed():  # skipping a step on one rank only would hang the others' gradient all-reduce
                raise DataError("a whole batch was unreadable: " + "; ".join(f"{u.name}: {u.reason}" for u in bad))
            continue
        images = _to_device(images, device, channels_last, normalize)
        targets = targets.to(device, non_blocking=True)
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=amp):
            logits = model(images)
        loss = loss_fn(logits, targets)
        if use_scaler:
            scaler.scale(loss).backward()
            if clip_grad:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            if clip_grad:
                nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
            optimizer.step()
        n = images.shape[0]
        total += loss.detach().double() * n
        seen += n
        indices.append(batch_indices)
        if progress and (step % 10 == 0 or step == len(bar) - 1):  # .item() syncs the GPU: not every step
            elapsed = time.perf_counter() - start
            bar.set_postfix(loss=f"{total.item() / seen:.4f}", img_s=f"{seen / max(elapsed, 1e-9):.1f}")
    bar.close()
    counts = torch.tensor([total.item(), float(seen)], dtype=torch.float64, device=device)
    if _distributed():
        dist.all_reduce(counts)
    seconds = time.perf_counter() - start
    mean_loss = counts[0].item() / counts[1].item() if counts[1].item() else math.nan
    if counts[1].item() and not math.isfinite(mean_loss):
        raise TrainingDiverged(f"training diverged: the mean loss is {mean_loss}; lower the learning rate or clip "
                               "the gradient norm")
    idx = torch.cat(indices).numpy().astype(np.int64) if indices else np.zeros(0, dtype=np.int64)
    return EpochStats(mean_loss, int(counts[1].item()), seconds, counts[1].item() / max(seconds, 1e-9),
                      unreadable, idx)


@torch.inference_mode()
def predict_logits(
    model: nn.Module,
    loader,
    device: torch.device,
    normalize: Normalize,
    amp: bool = False,
    channels_last: bool = False,
    progress: bool = True,
    desc: str = "predict",
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[Unreadable]]:
    """Eval-mode pass -> (logits (N, L) float32, targets (N, L), indices (N,), unreadable items) of this process."""
    model = _unwrap(model).eval()
    device = torch.device(device)
    logits, targets, indices, unreadable = [], [], [], []
    for batch in tqdm(loader, desc=desc, unit="batch", disable=not progress, leave=False, dynamic_ncols=True):
        images, batch_targets, batch_indices, bad = _split_batch(batch)
        unreadable.extend(bad)
        if images.numel() == 0:
            continue
        with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=amp):
            out = model(_to_device(images, device, channels_last, normalize))
        logits.append(out.float().cpu())
        targets.append(batch_targets.float())
        indices.append(batch_indices.long())
    if not logits:
        n_labels = _unwrap(model).classifier.out_features
        empty = np.zeros((0, n_labels), dtype=np.float32)
        return empty, empty.copy(), np.zeros(0, dtype=np.int64), unreadable
    return (torch.cat(logits).numpy(), torch.cat(targets).numpy(), torch.cat(indices).numpy(), unreadable)


def predict_probabilities(
    model: nn.Module, loader, device: torch.device, normalize: Normalize, amp: bool = False, progress: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Eval-mode pass -> (probabilities (N, L) in [0, 1], targets (N, L), dataset indices (N,)) of this process.

    The sigmoid is applied here, exactly once. Items the loader reported unreadable are absent (see indices).
    """
    logits, targets, indices, _ = predict_logits(model, loader, device, normalize, amp=amp, progress=progress)
    return torch.sigmoid(torch.from_numpy(logits)).numpy(), targets, indices


def gather_predictions(
    logits: np.ndarray, targets: np.ndarray, indices: np.ndarray, unreadable: list[Unreadable]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[Unreadable]]:
    """All ranks' predictions (identity without torch.distributed), de-duplicated by index and sorted by it.

    DistributedSampler pads the last shard with repeated items; keeping one row per index undoes that.
    """
    if _distributed():
        parts: list = [None] * dist.get_world_size()
        dist.all_gather_object(parts, (logits, targets, indices, unreadable))
        logits = np.concatenate([p[0] for p in parts])
        targets = np.concatenate([p[1] for p in parts])
        indices = np.concatenate([p[2] for p in parts])
        by_index = {u.index: u for p in parts for u in p[3]}
        unreadable = [by_index[i] for i in sorted(by_index)]
    _, first = np.unique(indices, return_index=True)
    return logits[first], targets[first], indices[first], unreadable


def _sync_buffers(model: nn.Module) -> None:
    # Each DDP rank updates its own BatchNorm running statistics; evaluate (and save) with rank 0's everywhere.
    if isinstance(model, nn.parallel.DistributedDataParallel) and _distributed():
        for buffer in model.module.buffers():
            dist.broadcast(buffer, src=0)


def evaluate(model: nn.Module, loader, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
             device: torch.device, normalize: Normalize, **options) -> EvalResult:
    """Predict the whole set (gathered over ranks) -> loss over its full label matrix, probabilities, AUROCs.

    options: predict_logits' keywords (amp, channels_last, progress; desc defaults to "val")."""
    _sync_buffers(model)
    options.setdefault("desc", "val")
    logits, targets, indices, unreadable = predict_logits(model, loader, device, normalize, **options)
    logits, targets, indices, unreadable = gather_predictions(logits, targets, indices, unreadable)
    if len(indices) == 0:
        nan = np.full(targets.shape[1], np.nan)
        return EvalResult(math.nan, logits, targets, indices, nan, math.nan, unreadable)
    logits_t = torch.from_numpy(logits)
    loss = float(loss_fn(logits_t, torch.from_numpy(targets)))
    probs = torch.sigmoid(logits_t).numpy()
    auroc = per_label_auroc(targets, probs)
    mean = float(np.nanmean(auroc)) if np.isfinite(auroc).any() else math.nan
    return EvalResult(loss, probs, targets, indices, auroc, mean, unreadable)
