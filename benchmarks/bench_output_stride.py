"""What a finer output stride costs: heatmap cells, compute and CPU time of the demo model's trunk per setting.

    .venv/bin/python benchmarks/bench_output_stride.py [--repeats 5] [--out benchmarks/results/output_stride.md]

ResNet-18 (random weights, 14 labels) on a batch of 16: multiply-accumulates per image counted by
torch.utils.flop_counter (exact, load-free), and the medians of --repeats interleaved timings of one training step
(forward + backward) and one inference forward, as ratios to the old demo setting (128 px, stride 32, 3x3
transition) measured in the same process: the demo build's time is mostly these two (two epochs of training, then
the trust fit's forward passes).
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics

import torch
from common import ROOT, add_out_argument, timed, write_report
from torch.utils.flop_counter import FlopCounterMode

from chestxray.model import build_model

# (image size, output stride, transition kernel); the first is the baseline.
SETTINGS = [(128, 32, 3), (128, 8, 3), (128, 8, 1), (256, 16, 3), (256, 16, 1)]
BATCH = 16


def macs_per_image(model: torch.nn.Module, size: int) -> float:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.eval()(torch.randn(1, 3, size, size))
    return counter.get_total_flops() / 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="interleaved timings per setting (default: 5)")
    add_out_argument(parser, "output_stride.md")
    args = parser.parse_args()
    torch.manual_seed(0)
    models = {s: build_model("resnet18", 14, transition_kernel=s[2], output_stride=s[1]) for s in SETTINGS}
    inputs = {s: torch.randn(BATCH, 3, s[0], s[0]) for s in SETTINGS}

    def train_step(s):
        model = models[s].train()
        model.zero_grad()
        model(inputs[s]).sum().backward()

    def forward(s):
        with torch.no_grad():
            models[s].eval()(inputs[s])

    times = {s: {"train": [], "infer": []} for s in SETTINGS}
    for s in SETTINGS:  # warm-up
        train_step(s), forward(s)
    for _ in range(args.repeats):
        for s in SETTINGS:
            times[s]["train"].append(timed(lambda s=s: train_step(s)))
            times[s]["infer"].append(timed(lambda s=s: forward(s)))
    base = SETTINGS[0]
    med = {s: {k: statistics.median(v) for k, v in times[s].items()} for s in SETTINGS}
    load = os.getloadavg()
    lines = [
        "# Output stride: heatmap cells against compute (`benchmarks/bench_output_stride.py`)",
        "",
        f"ResNet-18, batch {BATCH}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"{platform.processor() or platform.machine()}; medians of {args.repeats} interleaved runs; load average "
        f"{load[0]:.1f} at the end (the machine was shared). Ratios are to the old demo setting (first row). "
        f"Command: `.venv/bin/python {os.path.relpath(__file__, ROOT)} --repeats {args.repeats}`.",
        "",
        "| input px | output stride | transition | heatmap cells | GMAC / image | ratio | train step s (ratio) | "
        "inference s (ratio) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    base_macs = macs_per_image(models[base], base[0])
    for s in SETTINGS:
        size, stride, kernel = s
        macs = macs_per_image(models[s], size)
        cells = size // stride
        lines.append(
            f"| {size} | {stride} | {kernel}x{kernel} | {cells}x{cells} | {macs / 1e9:.2f} | {macs / base_macs:.1f}x "
            f"| {med[s]['train']:.2f} ({med[s]['train'] / med[base]['train']:.1f}x) "
            f"| {med[s]['infer']:.2f} ({med[s]['infer'] / med[base]['infer']:.1f}x) |")
    write_report(lines, args.out)


if __name__ == "__main__":
    main()
