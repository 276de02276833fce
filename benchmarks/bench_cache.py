"""Benchmark: input-pipeline images/s from the resized-image cache vs from the original 1024-px PNGs.

    python benchmarks/bench_cache.py [--image-size 512] [--workers 2] [--repeats 3]

Both pipelines are the training one (XrayDataset + the training transform, augmentation included, in a
DataLoader with the same workers and batch size) over the same real full-resolution NIH images, measured side by
side in one process, interleaved. The original files are read once beforehand, so both read from the page cache and
the comparison is decode + resize vs loading a uint8 array. Goal: the cache delivers >= 5x.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from chestxray.checkpoint import Meta
from chestxray.data import XrayDataset, collate_batch, load_index
from chestxray.labels import LABELS
from chestxray.transforms import build_normalize, build_transform

ROOT = Path(__file__).resolve().parents[1]

DATA_DIR = ROOT.parent / "shared" / "data" / "nih"


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=str(DATA_DIR), help="NIH data folder (default: the shared sample)")
    parser.add_argument("--folder", default="images", help="sub-folder whose images are used: the sample's "
                        "full-resolution ones (default: %(default)s)")
    parser.add_argument("--image-size", type=int, default=512, help="training input size (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers, both pipelines "
                        "(default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=16, help="batch size (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes of each pipeline (default: %(default)s)")
    parser.add_argument("--cache-dir", default=None, help="cache folder (default: a temporary folder, removed)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "cache.md"),
                        help="markdown file for the figures (default: %(default)s)")
    return parser


def images_per_second(dataset: XrayDataset, args: argparse.Namespace, finish=None) -> list[float]:
    """images/s of `repeats` full passes after one warm-up pass, with persistent workers as in train.py.

    `finish(images)` runs on each batch in the main process (the per-batch stage, as on a GPU in training).
    """
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=False, num_workers=args.workers,
                        collate_fn=collate_batch, persistent_workers=args.workers > 0)
    for _ in loader:  # warm-up: starts the workers (and fills the cache on a cached dataset's first pass)
        pass
    rates = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        n = 0
        for batch in loader:
            images = finish(batch[0]) if finish is not None else batch[0]
            n += images.shape[0]
        rates.append(n / (time.perf_counter() - start))
    return rates


def per_image_ms(dataset: XrayDataset, what: str) -> float:
    """Median milliseconds per image in this process (no loader): 'load' = load_image only, 'item' = __getitem__."""
    times = []
    for i in range(len(dataset)):
        start = time.perf_counter()
        dataset.load_image(i) if what == "load" else dataset[i]
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def build_rate(dataset: XrayDataset, args: argparse.Namespace) -> float:
    """images/s of the pass that fills the cache (decode + resize + write), fresh workers."""
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=False, num_workers=args.workers,
                        collate_fn=collate_batch)
    start = time.perf_counter()
    n = sum(batch[0].shape[0] for batch in loader)
    return n / (time.perf_counter() - start)


def main(args: argparse.Namespace) -> dict:
    torch.set_num_threads(1)  # the loaders' workers do the work; the main process only collects batches
    index = load_index(args.data_dir)
    index = index[index["path"].map(lambda p: Path(p).parent.name == args.folder)].reset_index(drop=True)
    if index.empty:
        raise SystemExit(f"no images in {args.data_dir}/{args.folder}")
    for path in index["path"]:
        Path(path).read_bytes()  # page cache: both pipelines then read from memory
    meta = Meta.new(image_size=args.image_size)
    normalize = build_normalize(meta)
    pipelines = {  # name -> (per-image transform, per-batch step in the main process)
        "training: loader output (the per-batch stage runs on the GPU)": (build_transform(meta, train=True), None),
        "validation: loader output": (build_transform(meta, train=False), None),
        "training, per-batch stage on this CPU too": (build_transform(meta, train=True), normalize),
    }
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cache_dir = Path(args.cache_dir or tmp)
        build = build_rate(XrayDataset(index, LABELS, build_transform(meta), cache_dir=cache_dir), args)
        cache_bytes = sum(f.stat().st_size for f in (cache_dir / f"{args.image_size}px").glob("*.npy"))
        split_rows = []
        for name, (transform, finish) in pipelines.items():
            original = XrayDataset(index, LABELS, transform)
            cached = XrayDataset(index, LABELS, transform, cache_dir=cache_dir, image_size=args.image_size)
            if finish is None:
                split_rows.append((name, per_image_ms(original, "load"), per_image_ms(cached, "load"),
                                   per_image_ms(original, "item"), per_image_ms(cached, "item")))
            from_png, from_cache = images_per_second(original, args, finish), images_per_second(cached, args, finish)
            rows.append((name, statistics.median(from_png), statistics.median(from_cache), from_png, from_cache))
    table = "\n".join(f"| {name} | {png:.1f} | {cache:.1f} | **{cache / png:.1f}x** |"
                      for name, png, cache, _, _ in rows)
    split_table = "\n".join(f"| {name} | {a:.2f} | {b:.2f} | {c:.2f} | {d:.2f} |" for name, a, b, c, d in split_rows)
    passes = "\n".join(f"- {name}: PNG {', '.join(f'{v:.1f}' for v in a)}; cache {', '.join(f'{v:.1f}' for v in b)}"
                       for name, _, _, a, b in rows)
    train_ratio, cpu_ratio = rows[0][2] / rows[0][1], rows[2][2] / rows[2][1]
    _, png_read, cache_read, _, cache_item = split_rows[0]
    verdict = (
        f"Goal >= 5x: {'met' if train_ratio >= 5 else 'NOT met'} by the training loader ({train_ratio:.1f}x). The "
        f"cache replaces the PNG decode + resize ({png_read:.1f} ms -> {cache_read:.2f} ms per image, "
        f"{png_read / cache_read:.0f}x); what is left per cached item ({cache_item:.2f} ms) is the Pillow affine of "
        f"the augmentation. transforms.py's per-image stage hands (1, S, S) uint8 to the loader, and its per-batch "
        f"stage (float, 3 channels, normalisation) runs on the training device; done on this CPU as well, the ratio "
        f"is {cpu_ratio:.1f}x."
    )
    command = ("python benchmarks/bench_cache.py " + " ".join(sys.argv[1:])).strip()
    text = f"""# Input pipeline: resized-image cache vs original PNGs

Command: `{command}`
Date: {datetime.date.today().isoformat()}; machine: {platform.machine()}, {os.cpu_count()} CPU cores; \
torch {torch.__version__}.

XrayDataset in a DataLoader ({args.workers} workers, batch {args.batch_size}) over the same {len(index)} real NIH
1024x1024 PNGs at {args.image_size} px, from the original PNG (decode + resize + transform) or from the cache
({args.image_size} px uint8 .npy: load + transform). The files are read once beforehand, so both read from the page
cache. Median images/s of {args.repeats} passes after a warm-up pass, with persistent workers as in train.py.

| pipeline | PNG images/s | cache images/s | cache / PNG |
|---|---|---|---|
{table}

Where the time goes, one process, no loader (median ms per image). "read" is what the cache replaces: PNG decode +
resize to {args.image_size} px, against loading the uint8 array; "item" is the whole `dataset[i]`, transform included.

| pipeline | PNG read | cache read | PNG item | cache item |
|---|---|---|---|---|
{split_table}

{verdict}

Building the cache (first epoch: decode + resize + write): {build:.1f} images/s.
Cache size: {cache_bytes / 1e6:.1f} MB for {len(index)} images ({cache_bytes / len(index) / 1e3:.0f} kB each; all
112,120 NIH images at this size would take about {cache_bytes / len(index) * 112_120 / 1e9:.0f} GB).

Passes (images/s):
{passes}
"""
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)
    return {"rows": rows, "build": build, "cache_bytes": cache_bytes}


if __name__ == "__main__":
    main(get_args_parser().parse_args())
