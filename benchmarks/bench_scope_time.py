"""Benchmark: Predictor.predict with the in-scope check and calibration vs without, same model, one process.

    python benchmarks/bench_scope_time.py [--arch resnet50] [--image-size 512] [--repeats 9]

The two predictors share one model (random weights: speed does not depend on them); the trusted one carries scope
statistics (mahalanobis+image, 1024 features + 64 thumbnail values) and a calibration. Calls are interleaved and
reported as medians and their ratio. Goal: <= 1.05x, since the check reuses the forward pass.
"""
from __future__ import annotations

import argparse
import platform
import statistics
from pathlib import Path

import numpy as np
import torch
from common import NIH_IMAGES, add_out_argument, model_args_parser, timed

from chestxray.checkpoint import model_from_meta
from chestxray.imaging import read_xray
from chestxray.meta import Meta
from chestxray.predictor import Predictor
from chestxray.trust import Trust
from chestxray.trust.calibration import Calibration
from chestxray.trust.scope import IMAGE_STATS, fit_scope

IMAGE = NIH_IMAGES / "00000001_000.png"


def get_args_parser() -> argparse.ArgumentParser:
    parser = model_args_parser(__doc__)
    parser.add_argument("--repeats", type=int, default=9, help="timed calls of each (default: %(default)s)")
    add_out_argument(parser, "scope_time.md")
    return parser


def main(args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    meta = Meta.new(arch=args.arch, image_size=args.image_size)
    model = model_from_meta(meta).eval()
    rng = np.random.default_rng(0)
    c = model.classifier.in_features
    scope = fit_scope(rng.normal(size=(2 * c, c)), "mahalanobis+image", rng.normal(size=(200, IMAGE_STATS)),
                      rng.normal(size=(100, c)), rng.normal(size=(100, IMAGE_STATS)))
    scope = scope.with_limit(np.array([1.0, 2.0]))
    trust = Trust(scope, Calibration.identity(meta.labels), None, {})
    plain, trusted = Predictor(model, meta, "cpu"), Predictor(model, meta, "cpu", trust)
    image = read_xray(IMAGE)
    for p in (plain, trusted):
        p.predict(image)  # warm-up
    times: dict[str, list[float]] = {"plain": [], "trusted": []}
    for _ in range(args.repeats):
        for name, p in (("plain", plain), ("trusted", trusted)):
            times[name].append(timed(lambda p=p: p.predict(image)))
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med["trusted"] / med["plain"]
    lines = ["## predict with the in-scope check and calibration vs without", "",
             f"`python benchmarks/bench_scope_time.py --arch {args.arch} --image-size {args.image_size} --repeats "
             f"{args.repeats}` on {platform.machine()} CPU, {torch.get_num_threads()} threads, torch "
             f"{torch.__version__}.", "",
             "| what | median s | ratio |", "|---|---|---|",
             f"| `Predictor.predict` without scope statistics or calibration | {med['plain']:.3f} | 1.00 |",
             f"| `Predictor.predict` with scope check (mahalanobis+image) and calibration | {med['trusted']:.3f} | "
             f"{ratio:.3f} |", "", f"ratio = **{ratio:.3f}** (goal <= 1.05)."]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return {"ratio": ratio, **med}


if __name__ == "__main__":
    main(get_args_parser().parse_args())
