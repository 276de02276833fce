"""Scoring many files: decode in DataLoader workers (in input order), shard a file list by rank, merge the parts.

predictions.py uses these for `--batch-size` / `--workers` and under `torchrun`: each rank takes one contiguous
block of the sorted file list, so concatenating the ranks' parts in rank order gives the input order back. The
scoring loop itself (score_files) writes one record per image, as JSON lines and CSV rows, in input order.
"""
from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .cam import with_legend
from .fileio import SpreadsheetWriter, atomic_write, dumps_json
from .imaging import IMAGE_SUFFIXES, InvalidImage, read_bytes, read_xray, sniff
from .predictor import Prediction, Predictor
from .results import PNG_COMPRESS_LEVEL
from .store import answered_entry, model_version, refused_entry


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


# ---------------------------------------------------------------------------------------------------------------
# Scoring a file list into JSON lines and CSV rows (predictions.py): one record per image, in input order


def find_images(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """Expand files and folders (searched recursively for PNG/JPEG/DICOM) into a sorted, de-duplicated list."""
    found: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found.extend(sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES))
        else:
            found.append(p)  # a missing or odd file is reported as that image's error, not skipped
    seen: set[Path] = set()
    return [f for f in found if not (f in seen or seen.add(f))]


def heatmap_folders(out: str | os.PathLike | None, images: Sequence[Path], heatmaps: str) -> list[Path | None]:
    """One overlay folder per image under `out` (named after its stem, made unique), or None per image when no
    overlays are written. Named over the whole list, so every rank of a sharded run names them alike."""
    if out is None or heatmaps == "none":
        return [None] * len(images)
    used: set[str] = set()
    folders: list[Path | None] = []
    for image in images:
        # The stem of "..png" is "." and of "...png" is "..": as a folder name they would put the overlays in
        # `out` itself or in its parent.
        stem = image.stem if image.stem not in ("", ".", "..") else "image"
        name, n = stem, 1
        while name in used:
            n += 1
            name = f"{stem}_{n}"
        used.add(name)
        folders.append(Path(out) / name)
    return folders


def image_record(pred: Prediction, path: Path, folder: Path | None, which: str) -> dict:
    """{"image": path, **to_dict()}, plus "heatmaps" {label: overlay PNG path} when `folder` is given (`which`:
    "all" labels or the "positive" ones)."""
    record = {"image": str(path), **pred.to_dict()}
    if folder is not None:
        record["heatmaps"] = {}
        for label in pred.labels if which == "all" else pred.positive:
            supported = pred.support[label]
            caption = (f"{label}: colour = evidence for this finding, scaled to this map's own peak" if supported
                       else f"{label}: no region supports this finding")
            image = with_legend(pred.overlay(label), caption)
            target = atomic_write(folder / f"{label}.png", lambda f, image=image: image.save(
                f, format="PNG", compress_level=PNG_COMPRESS_LEVEL))  # the web app's level: ~3x faster than 6
            record["heatmaps"][label] = str(target)
    return record


def csv_header(labels) -> list[str]:
    """The CSV columns: path, in_scope, one probability per label (model order), one call per label ("LABEL
    call": positive, negative, not validated or out of scope), the positive calls, the warning, the error."""
    return ["path", "in_scope", *labels, *(f"{name} call" for name in labels), "positive", "warning", "error"]


def csv_row(record: dict, labels) -> list:
    """An image_record (or {"image", "error"}) as a row under csv_header(labels)."""
    if "error" in record:
        return [record["image"], "", *([""] * 2 * len(labels)), "", "", record["error"]]
    rows = {item["label"]: item for item in record["labels"]}
    return [record["image"], record["in_scope"], *(f"{rows[name]['probability']:.6f}" for name in labels),
            *(rows[name]["call"] for name in labels), "|".join(record["positive"]), record.get("warning") or "", ""]


@dataclass
class Outputs:
    """Where records go: a JSON-lines text stream and/or a CSV writer (SpreadsheetWriter, header written)."""

    jsonl: IO[str] | None
    writer: SpreadsheetWriter | None

    def write(self, record: dict, labels) -> None:
        if self.jsonl is not None:
            self.jsonl.write(dumps_json(record) + "\n")
            self.jsonl.flush()
        if self.writer is not None:
            self.writer.writerow(csv_row(record, labels))


def open_outputs(stack: ExitStack, jsonl: str | None, csv: str | None, labels, rank: int = 0,
                 world_size: int = 1) -> Outputs:
    """The JSON-lines file (stdout when none is named and the run is not sharded) and the CSV file, opened on
    `stack`; under several ranks each rank writes its part (part_path) for merge_ranks."""
    def open_file(path: str | None):
        if path is None:
            return None
        target = part_path(path, rank) if world_size > 1 else Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        return stack.enter_context(target.open("w", newline="", encoding="utf-8"))

    stream = open_file(jsonl) or (sys.stdout if world_size == 1 else None)
    csv_file = open_file(csv)
    writer = SpreadsheetWriter(csv_file) if csv_file is not None else None
    if writer is not None:
        writer.writerow(csv_header(labels))
    return Outputs(stream, writer)


def score_files(predictor: Predictor, images: Sequence[Path], folders: Sequence[Path | None], outputs: Outputs, *,
                heatmaps: str = "all", batch_size: int = 16, workers: int = 0, max_bytes: int | None = None,
                progress=None, store=None, checkpoint: str | os.PathLike | None = None,
                on_out_of_scope: Callable[[Path, str], object] | None = None) -> int:
    """Decode (workers), predict (batches) and write every image's record in input order -> the failures.

    store: a chestxray.store.AnalysisStore that gets one row per image (model version from `checkpoint`), or None;
    progress: a tqdm-like object updated per batch; on_out_of_scope(path, reason) for an image the in-scope check
    refuses."""
    want_maps = any(folder is not None for folder in folders)
    failed = 0
    version = model_version(checkpoint, predictor) if store is not None else None
    decoded = decode_in_order(images, predictor.transform, workers, max_bytes=max_bytes)
    for batch in batched(decoded, batch_size):
        good = [d for d in batch if d.error is None]
        started = time.perf_counter()
        preds = iter(predictor.predict_batch([d.image for d in good], want_maps, [d.format for d in good],
                                             torch.stack([d.inputs for d in good])) if good else [])
        seconds, entries = (time.perf_counter() - started) / max(1, len(good)), []  # each image's share of the batch
        for d in batch:
            if d.error is not None:
                failed += 1
                record = {"image": str(d.path), "error": d.error}
                entries.append(refused_entry(source="cli", reason="unreadable image", latency_s=None, model=version)
                               if store is not None else None)
            else:
                prediction = next(preds)
                record = image_record(prediction, d.path, folders[d.index], heatmaps)
                entries.append(answered_entry(prediction, source="cli", latency_s=seconds, model=version, data=d.path)
                               if store is not None else None)
                if record.get("in_scope") is False and on_out_of_scope is not None:
                    on_out_of_scope(d.path, record["scope"])
            outputs.write(record, predictor.labels)
        if store is not None:
            store.record_many(entries)  # technical facts only: never the path or the DICOM header's patient data
        if progress is not None:
            progress.update(len(batch))
    return failed


def merge_ranks(jsonl: str | None, csv: str | None, rank: int, world_size: int, failed: int) -> int:
    """Under torchrun: wait for every rank, rank 0 merges the parts in rank (= input) order -> the failures of all
    ranks (so every rank's exit code reports a failure anywhere). Needs the process group initialised."""
    import torch.distributed as dist

    failures = torch.tensor([failed])
    dist.all_reduce(failures)
    dist.barrier()
    if rank == 0:
        for path, header_lines in ((jsonl, 0), (csv, 1)):
            if path:
                merge_parts(path, world_size, header_lines=header_lines)
    dist.barrier()
    dist.destroy_process_group()
    return int(failures.item())
