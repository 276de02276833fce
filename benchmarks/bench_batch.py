"""Benchmark: scoring a folder of 1024 px PNGs with predictions.py, batched vs one image at a time, both backends.

    python benchmarks/bench_batch.py [--arch resnet50] [--image-size 512] [--images 32] [--repeats 2]

Each run is a whole `predictions.main` call in this process (model load included, JSON lines to a file) over the
same real NIH PNGs: --batch-size 1 --workers 0 is today's loop (read, then predict, one file after the other);
--batch-size 16 --workers 2 decodes in DataLoader workers while the model predicts in batches. Runs are
interleaved; medians of images/s and their ratio to the torch one-at-a-time loop go to benchmarks/results/batch.md.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import predictions  # noqa: E402
from benchmarks.common import write_report  # noqa: E402
from chestxray.checkpoint import Meta, model_from_meta, save_checkpoint  # noqa: E402
from chestxray.onnx_backend import export_onnx  # noqa: E402

IMAGES = ROOT.parent / "shared" / "data" / "nih" / "images"
GOAL = 1.5


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="resnet50", help="(default: %(default)s)")
    parser.add_argument("--image-size", type=int, default=512, help="(default: %(default)s)")
    parser.add_argument("--images", type=int, default=32, help="1024 px PNGs scored per run (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each variant (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=16, help="batched variant (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=2, help="batched variant (default: %(default)s)")
    parser.add_argument("--folder", default=str(IMAGES), help="(default: the NIH sample's 1024 px PNGs)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "batch.md"),
                        help="(default: %(default)s)")
    return parser


def main(args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    files = sorted(Path(args.folder).glob("*.png"))[: args.images]
    meta = Meta.new(arch=args.arch, image_size=args.image_size)
    model = model_from_meta(meta)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        scans = tmp / "scans"
        scans.mkdir()
        for f in files:
            (scans / f.name).symlink_to(f)
        ckpt = tmp / "model.pth"
        save_checkpoint(ckpt, model, meta)
        export_onnx(model, meta, tmp / "model.onnx")
        variants = {
            "torch, one at a time (today's loop)": ["--backend", "torch", "--batch-size", "1", "--workers", "0"],
            f"torch, batched ({args.batch_size}, {args.workers} workers)":
                ["--backend", "torch", "--batch-size", str(args.batch_size), "--workers", str(args.workers)],
            "onnx fp32, one at a time": ["--backend", "onnx", "--batch-size", "1", "--workers", "0"],
            f"onnx fp32, batched ({args.batch_size}, {args.workers} workers)":
                ["--backend", "onnx", "--batch-size", str(args.batch_size), "--workers", str(args.workers)],
        }
        rates: dict[str, list[float]] = {name: [] for name in variants}
        load_before = os.getloadavg()[0]
        for _ in range(args.repeats):
            for name, extra in variants.items():
                argv = [str(scans), "--checkpoint", str(ckpt), "--device", "cpu", "--jsonl", str(tmp / "out.jsonl"),
                        *extra]
                start = time.perf_counter()
                rc = predictions.main(predictions.get_args_parser().parse_args(argv))
                rates[name].append(len(files) / (time.perf_counter() - start))
                if rc != 0:
                    raise SystemExit(f"{name}: predictions.py exit code {rc}")
        load_after = os.getloadavg()[0]
    base = statistics.median(rates["torch, one at a time (today's loop)"])
    lines = [
        "# Batched folder scoring vs one image at a time", "",
        f"Command: `python benchmarks/bench_batch.py --arch {args.arch} --image-size {args.image_size} --images "
        f"{args.images} --repeats {args.repeats}`", "",
        f"`predictions.py` over {len(files)} real NIH 1024x1024 PNGs, {args.arch} at {args.image_size} px, random "
        f"weights, CPU ({os.cpu_count()} cores, {platform.machine()}), torch {torch.__version__}; "
        f"{time.strftime('%Y-%m-%d')}; model load included in every run. The machine was shared (load average "
        f"{load_before:.1f} before, {load_after:.1f} after).", "",
        "| variant | median images/s | vs today's loop |", "|---|---:|---:|",
    ]
    for name, values in rates.items():
        lines.append(f"| {name} | {statistics.median(values):.2f} | {statistics.median(values) / base:.2f}x |")
    best = max(rates, key=lambda k: statistics.median(rates[k]))
    same = f"torch, batched ({args.batch_size}, {args.workers} workers)"
    lines += ["", f"Same backend (torch): batched / loop = **{statistics.median(rates[same]) / base:.2f}x**; fastest "
              f"({best}) / today's loop = **{statistics.median(rates[best]) / base:.2f}x** (goal >= {GOAL}x).", "",
              "Runs (images/s): " + "; ".join(f"{k}: " + ", ".join(f"{v:.2f}" for v in vals)
                                               for k, vals in rates.items())]
    write_report(lines, args.out)
    return rates


if __name__ == "__main__":
    main(get_args_parser().parse_args())
