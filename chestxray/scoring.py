"""Scoring many files: decode in DataLoader workers (in input order), shard a file list by rank, merge the parts.

predictions.py uses these for `--batch-size` / `--workers` and under `torchrun`: each rank takes one contiguous
block of the sorted file list, so concatenating the ranks' parts in rank order gives the input order back.
"""
from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .fileio import atomic_write
from .imaging import InvalidImage, read_bytes, read_xray, sniff


@dataclass
class Decoded:
    """One file after the per-image stage: `inputs` (1, S, S) uint8, `image` (H, W) float32 and its `format`
    (imaging.sniff), or the InvalidImage message."""

    index: int
    path: Path
    inputs: torch.Tensor | None = None
    image: np.ndarray | None = None
    format: str | None = None
    error: str | None = None


class DecodedImages(Dataset):
    """Paths -> Decoded, read exactly as Predictor.predict reads a path (sniff by content, then read_xray) plus the
    checkpoint's per-image transform; a bad file becomes its error text."""

    def __init__(self, paths: Sequence[str | os.PathLike], transform, keep_image: bool = True,
                 max_bytes: int | None = None) -> None:
        self.paths = [Path(p) for p in paths]
        self.max_bytes = max_bytes  # per file, checked from the size on disk before reading
        self.transform = transform
        self.keep_image = keep_image  # the full-size image is only needed for overlays; skip shipping it otherwise

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> Decoded:
        path = self.paths[i]
        try:
            data = read_bytes(path, self.max_bytes)
            image_format = sniff(data, path.name)
            image = read_xray(data)
            inputs = self.transform(image)
        except InvalidImage as exc:
            return Decoded(i, path, error=str(exc))
        return Decoded(i, path, inputs, image if self.keep_image else None, image_format)


def _single(item: Decoded) -> Decoded:  # module level: picklable for worker processes
    return item


def decode_in_order(paths: Sequence[str | os.PathLike], transform, workers: int = 0,
                    keep_image: bool = True, max_bytes: int | None = None) -> Iterator[Decoded]:
    """Decoded files in input order, decoded by `workers` processes (0 = in this process); a file over `max_bytes`
    becomes its error."""
    dataset = DecodedImages(paths, transform, keep_image, max_bytes)
    if workers <= 0 or len(dataset) <= 1:
        yield from (dataset[i] for i in range(len(dataset)))
        return
    # batch_size=None: one item per fetch, no collation; an unshuffled loader yields items in index order.
    loader = DataLoader(dataset, batch_size=None, shuffle=False, num_workers=min(workers, len(dataset)),
                        collate_fn=_single, prefetch_factor=4)
    yield from loader


def batched(items: Iterator[Decoded], size: int) -> Iterator[list[Decoded]]:
    """Group items into lists of `size` (the last may be shorter); order kept."""
    if size < 1:
        raise ValueError(f"batch size must be at least 1, got {size}")
    batch: list[Decoded] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def shard_bounds(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """[start, stop) of rank's contiguous block of n items; blocks differ in size by at most one."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a world of size {world_size}")
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def part_path(path: str | os.PathLike, rank: int) -> Path:
    """Where `rank` writes its part of `path` (beside it, so the merge is a local concatenation)."""
    path = Path(path)
    return path.with_name(f".{path.name}.part-{rank:05d}")


def merge_parts(path: str | os.PathLike, world_size: int, header_lines: int = 0) -> Path:
    """Concatenate the ranks' parts of `path` in rank order into `path` (atomically), then delete the parts.

    header_lines: lines at the top of every part (a CSV header) kept from the first part only.
    Raises FileNotFoundError naming a missing part.
    """
    parts = [part_path(path, rank) for rank in range(world_size)]
    missing = [str(p) for p in parts if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"missing part file(s) of {path}: {missing}")

    def write(f) -> None:
        for rank, part in enumerate(parts):
            with part.open("rb") as src:
                for k, line in enumerate(src):
                    if rank > 0 and k < header_lines:
                        continue
                    f.write(line)

    atomic_write(path, write)
    for part in parts:
        part.unlink()
    return Path(path)
