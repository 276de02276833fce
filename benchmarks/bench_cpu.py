"""Benchmark: the CPU inference paths side by side in one process, against today's PyTorch eager forward.

    python benchmarks/bench_cpu.py [--arch resnet50] [--image-size 512] [--repeats 7] [--no-compile]

Every variant does the whole predict step from a decoded X-ray: preprocess (transforms.py) -> logits and all 14
class activation maps -> probabilities and maps as numpy. The baseline is the bare eager forward `model(x)` on an
already preprocessed input (today's PyTorch eager forward). Variants:
  eager            PyTorch eager, cam.predict_with_maps
  channels_last    the same with model and input in channels_last
  jit.freeze       torch.jit.trace + torch.jit.freeze + optimize_for_inference (oneDNN: BatchNorm folded into the
                   convolutions, conv+ReLU fused)
  torch.compile    inductor (--no-compile skips it; its compile time is reported)
  onnxruntime fp32 the exported graph (chestxray.onnx_backend), all graph optimisations
  onnxruntime int8 the same graph quantized statically (QDQ, per-channel, float head), calibrated on NIH images
The model has random weights (speed does not depend on them); each variant's agreement with eager (max
|Δprobability|, lowest per-label heatmap correlation on a few real images) is reported beside its time. int8's
quality on a *trained* model is gated in tests/test_onnx.py and reported in BENCHMARKS.md. Runs are interleaved
(one of each variant per round) so that drifts in machine load hit all alike; medians and the median of per-round
ratios are written to benchmarks/results/cpu.md.
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

import numpy as np
import torch
from common import NIH_IMAGES, ROOT, add_out_argument, model_args_parser, timed

sys.path.insert(0, str(ROOT))

from chestxray.cam import class_activation_maps, predict_with_maps  # noqa: E402
from chestxray.checkpoint import Meta, model_from_meta  # noqa: E402
from chestxray.imaging import read_xray  # noqa: E402
from chestxray.onnx_backend import OnnxModel, export_onnx, quantize_int8  # noqa: E402
from chestxray.transforms import preprocess  # noqa: E402

IMAGES = NIH_IMAGES
GOALS = {"best fp32": 0.6, "int8": 0.35}


def get_args_parser() -> argparse.ArgumentParser:
    parser = model_args_parser(__doc__)
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds, one run of each variant per round "
                        "(default: %(default)s)")
    parser.add_argument("--images", default=str(IMAGES), help="folder of real X-rays: the timed image, the "
                        "agreement check and int8 calibration (default: the NIH sample's 1024 px PNGs)")
    parser.add_argument("--calibration-images", type=int, default=16, help="int8 calibration images "
                        "(default: %(default)s)")
    parser.add_argument("--check-images", type=int, default=4, help="images for the agreement check "
                        "(default: %(default)s)")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile (default: try it)")
    add_out_argument(parser, "cpu.md")
    return parser


def _torch_variant(run, meta: Meta, channels_last: bool = False):
    """predict step for a torch callable run(x) -> (logits, maps)."""
    def step(image: np.ndarray):
        x = preprocess(meta, image)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            logits, maps = run(x)
            return torch.sigmoid(logits).numpy(), maps.numpy()
    return step


def _onnx_variant(model: OnnxModel, meta: Meta):
    def step(image: np.ndarray):
        logits, maps, _ = model.run(preprocess(meta, image).numpy())
        return 1.0 / (1.0 + np.exp(-logits)), maps
    return step


def _agreement(step, reference, images) -> tuple[float, float]:
    """(max |Δprobability|, lowest per-label Pearson correlation of the maps) of step vs reference."""
    probs, maps, ref_probs, ref_maps = [], [], [], []
    for image in images:
        p, m = step(image)
        rp, rm = reference(image)
        probs.append(p), maps.append(m), ref_probs.append(rp), ref_maps.append(rm)
    p, rp = np.concatenate(probs), np.concatenate(ref_probs)
    m, rm = np.concatenate(maps), np.concatenate(ref_maps)
    m = m.transpose(1, 0, 2, 3).reshape(m.shape[1], -1)
    rm = rm.transpose(1, 0, 2, 3).reshape(rm.shape[1], -1)
    corr = min(float(np.corrcoef(a, b)[0, 1]) for a, b in zip(m, rm))
    return float(np.abs(p - rp).max()), corr


class _Graph(torch.nn.Module):
    """The model as one graph returning (logits, maps), for tracing and compiling."""

    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, t):
        a = self.m.features(t)
        return self.m.head(a), class_activation_maps(self.m, a)


def _torch_variants(model, meta: Meta, x: torch.Tensor, no_compile: bool, setup: dict, notes: list) -> dict:
    """The PyTorch variants (eager, channels_last, jit.freeze, torch.compile); one-off costs go to setup, failures
    to notes."""
    variants: dict[str, object] = {
        "PyTorch eager, predict + 14 maps": _torch_variant(lambda t: predict_with_maps(model, t), meta)}

    cl_model = model_from_meta(meta).eval()
    cl_model.load_state_dict(model.state_dict())
    cl_model = cl_model.to(memory_format=torch.channels_last)
    variants["PyTorch eager, channels_last"] = _torch_variant(lambda t: predict_with_maps(cl_model, t), meta, True)

    start = time.perf_counter()
    try:
        with torch.inference_mode(False), torch.no_grad():
            traced = torch.jit.trace(_Graph(model).eval(), x)
            frozen = torch.jit.optimize_for_inference(torch.jit.freeze(traced))
            frozen(x), frozen(x)  # the first calls run the profiling executor's optimisations
        setup["jit.freeze"] = time.perf_counter() - start
        variants["torch.jit.freeze + optimize_for_inference (oneDNN)"] = _torch_variant(frozen, meta)
    except Exception as exc:  # a benchmark reports a path that fails here rather than stopping
        notes.append(f"jit.freeze failed: {type(exc).__name__}: {str(exc)[:200]}")

    if not no_compile:
        start = time.perf_counter()
        try:
            compiled = torch.compile(_Graph(model).eval())
            with torch.inference_mode():
                compiled(x)
            setup["torch.compile"] = time.perf_counter() - start
            variants["torch.compile (inductor)"] = _torch_variant(compiled, meta)
        except Exception as exc:
            notes.append(f"torch.compile failed: {type(exc).__name__}: {str(exc)[:200]}")
    return variants


def _rows(times: dict, agreement: dict) -> list[tuple]:
    """Per variant: (name, median s, ratio of medians, median per-round ratio, max |Δprobability|, lowest map
    correlation)."""
    base = statistics.median(times["baseline"])
    rows = []
    for name, values in times.items():
        if name == "baseline":
            continue
        paired = statistics.median(v / b for v, b in zip(values, times["baseline"]))
        rows.append((name, statistics.median(values), statistics.median(values) / base, paired, *agreement[name]))
    return rows


def main(args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    meta = Meta.new(arch=args.arch, image_size=args.image_size)
    model = model_from_meta(meta).eval()
    paths = sorted(Path(args.images).glob("*.png"))
    if len(paths) < 2:
        raise SystemExit(f"need real X-rays in {args.images} (--images)")
    image = read_xray(paths[0])
    check = [read_xray(p) for p in paths[1:1 + args.check_images]]
    x = preprocess(meta, image)
    notes: list[str] = []

    def forward():
        with torch.inference_mode():
            model(x)

    setup: dict[str, float] = {}
    variants = _torch_variants(model, meta, x, args.no_compile, setup, notes)
    eager = variants["PyTorch eager, predict + 14 maps"]

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        fp32_path = export_onnx(model, meta, Path(tmp) / "m.onnx")
        setup["onnx export"] = time.perf_counter() - start
        fp32 = OnnxModel(fp32_path, device="cpu", threads=threads)
        variants["ONNX Runtime fp32"] = _onnx_variant(fp32, meta)
        calib = [preprocess(meta, read_xray(p)).numpy() for p in paths[-args.calibration_images:]]
        start = time.perf_counter()
        int8_path = quantize_int8(fp32_path, Path(tmp) / "m.int8.onnx", calib)
        setup["int8 quantization"] = time.perf_counter() - start
        int8 = OnnxModel(int8_path, device="cpu", threads=threads)
        variants["ONNX Runtime int8 (QDQ, per-channel)"] = _onnx_variant(int8, meta)

        agreement = {name: _agreement(step, eager, check) for name, step in variants.items()}
        for step in variants.values():
            step(image)  # warm-up
        forward()
        times: dict[str, list[float]] = {"baseline": [], **{name: [] for name in variants}}
        load_before = os.getloadavg()[0]
        for _ in range(args.repeats):
            times["baseline"].append(timed(forward))
            for name, step in variants.items():
                times[name].append(timed(lambda step=step: step(image)))
        load_after = os.getloadavg()[0]

    base = statistics.median(times["baseline"])
    rows = _rows(times, agreement)
    fp32_rows = [r for r in rows if "int8" not in r[0]]
    best = min(fp32_rows, key=lambda r: r[2])
    int8_row = next(r for r in rows if "int8" in r[0])
    result = {"baseline_s": base, "rows": rows, "best_fp32": best, "int8": int8_row, "setup": setup,
              "notes": notes, "load": (load_before, load_after), "times": times}
    write_markdown(args, result, threads)
    return result


def write_markdown(args: argparse.Namespace, result: dict, threads: int) -> None:
    best, int8 = result["best_fp32"], result["int8"]
    lines = [
        "# CPU inference paths: ONNX Runtime, int8, channels_last, TorchScript freeze, torch.compile",
        "",
        f"Command: `python benchmarks/bench_cpu.py --arch {args.arch} --image-size {args.image_size} "
        f"--repeats {args.repeats}{' --no-compile' if args.no_compile else ''}`",
        "",
        f"{args.arch} at {args.image_size} px, random weights, batch 1, one real NIH PNG "
        f"({Path(sorted(Path(args.images).glob('*.png'))[0]).name}); {platform.machine()}, {os.cpu_count()} CPUs, "
        f"{threads} torch/ORT threads; torch {torch.__version__}, onnxruntime {_ort_version()}; "
        f"{time.strftime('%Y-%m-%d')}. {args.repeats} interleaved rounds after a warm-up. The machine was shared "
        f"with other jobs (load average {result['load'][0]:.1f} before, {result['load'][1]:.1f} after), so the "
        "absolute times are noisy; the per-round ratio (each run divided by the baseline of the same round) is the "
        "steadier figure.",
        "",
        "| path (preprocess + logits + 14 maps) | median s | ratio of medians | median per-round ratio | "
        "max abs Δprobability vs eager | lowest per-label map correlation |",
        "|---|---:|---:|---:|---:|---:|",
        f"| baseline: bare eager forward `model(x)` | {result['baseline_s']:.3f} | 1.00 | 1.00 | | |",
    ]
    for name, med, ratio, paired, dprob, corr in result["rows"]:
        lines.append(f"| {name} | {med:.3f} | {ratio:.2f} | {paired:.2f} | {dprob:.1e} | {corr:.4f} |")
    lines += [
        "",
        f"Best fp32 path: **{best[0]}, {best[2]:.2f}x** the eager forward (goal <= {GOALS['best fp32']}: "
        f"{'met' if best[2] <= GOALS['best fp32'] else 'not met'}). "
        f"int8: **{int8[2]:.2f}x** (goal <= {GOALS['int8']}: {'met' if int8[2] <= GOALS['int8'] else 'not met'}).",
        "",
        "One-off costs (s): " + ", ".join(f"{k} {v:.1f}" for k, v in result["setup"].items()) + ".",
    ]
    if result["notes"]:
        lines += ["", "Paths that failed here: " + "; ".join(result["notes"])]
    lines += ["", "Runs (s): " + "; ".join(f"{k}: " + ", ".join(f"{v:.3f}" for v in vals)
                                       for k, vals in result["times"].items())]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


if __name__ == "__main__":
    main(get_args_parser().parse_args())
