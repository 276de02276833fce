"""What a command line or the web app pays before and after its model runs: loading a checkpoint, writing overlays.

    .venv/bin/python benchmarks/bench_startup.py [--repeats 7] [--out benchmarks/results/startup.md]

1. Loading: `load_checkpoint` builds the model on the meta device and takes the saved tensors as its own
   (`load_state_dict(assign=True)`), against the earlier way in the same process: build it with torchvision's
   random initialisation, then copy the saved tensors over it. ResNet-18 and ResNet-50 (14 labels, random weights).
2. Overlays: one 1024-px heatmap overlay with its legend written as PNG at the level the app and predictions.py use
   (`PNG_COMPRESS_LEVEL`, 1) against Pillow's default level 6; sizes of both files.
Medians of --repeats interleaved runs; ratios new / old (lower is faster).
"""
from __future__ import annotations

import argparse
import io
import platform
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from common import ROOT, add_out_argument, support, timed

from chestxray.cam import overlay, with_legend
from chestxray.checkpoint import load_checkpoint, model_from_meta, safe_torch_load
from chestxray.imaging import read_xray
from chestxray.meta import Meta
from chestxray.results import PNG_COMPRESS_LEVEL

SAMPLE = ROOT / "samples" / "nih" / "images" / "00000001_000.png"


def load_with_random_init(path: Path) -> torch.nn.Module:
    """The earlier load: random initialisation first, then the saved weights copied over it."""
    obj = safe_torch_load(path)
    model = model_from_meta(Meta.from_dict(obj["meta"]))
    model.load_state_dict(obj["model"], strict=True)
    return model.eval()


def png_bytes(image, level: int) -> int:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=level)
    return len(buffer.getvalue())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7, help="interleaved runs of each (default: %(default)s)")
    add_out_argument(parser, "startup.md")
    args = parser.parse_args()
    torch.set_num_threads(2)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for arch in ("resnet18", "resnet50"):
            path = support.checkpoints.make_checkpoint(Path(tmp) / f"{arch}.pth", arch=arch, image_size=512)
            load_checkpoint(path)  # warm-up: the file in the page cache, both code paths loaded once
            load_with_random_init(path)
            new, old = [], []
            for _ in range(args.repeats):
                new.append(timed(lambda p=path: load_checkpoint(p)))
                old.append(timed(lambda p=path: load_with_random_init(p)))
            rows.append((f"load a {arch} checkpoint", statistics.median(old), statistics.median(new)))
    gray = read_xray(SAMPLE)
    heat = np.outer(np.hanning(32), np.hanning(32)).astype(np.float32)
    image = with_legend(overlay(gray, heat), "Cardiomegaly: colour = evidence for this finding")
    sizes = {level: png_bytes(image, level) for level in (6, PNG_COMPRESS_LEVEL)}
    six, chosen = [], []
    for _ in range(args.repeats):
        six.append(timed(lambda: png_bytes(image, 6)))
        chosen.append(timed(lambda: png_bytes(image, PNG_COMPRESS_LEVEL)))
    rows.append((f"write a {image.width}-px overlay PNG (level 6 -> level {PNG_COMPRESS_LEVEL})",
                 statistics.median(six), statistics.median(chosen)))

    lines = ["# Start-up and overlays: checkpoint load without a random initialisation, PNG level", "",
             f"`python benchmarks/bench_startup.py --repeats {args.repeats}` on {platform.machine()} CPU, "
             f"{torch.get_num_threads()} threads, torch {torch.__version__}, Python {sys.version.split()[0]}.", "",
             "| what | earlier (ms) | now (ms) | now / earlier |", "|---|---:|---:|---:|"]
    lines += [f"| {what} | {old * 1000:.1f} | {new * 1000:.1f} | **{new / old:.2f}** |" for what, old, new in rows]
    lines += ["", f"Overlay file size: {sizes[6] / 1024:.0f} KB at level 6, {sizes[PNG_COMPRESS_LEVEL] / 1024:.0f} KB "
              f"at level {PNG_COMPRESS_LEVEL} ({sizes[PNG_COMPRESS_LEVEL] / sizes[6]:.2f}x)."]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
