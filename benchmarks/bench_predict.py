"""Benchmark: Predictor.predict with all-label heatmaps vs a bare forward pass vs pytorch-grad-cam, one process.

    python benchmarks/bench_predict.py [--arch resnet50] [--image-size 512] [--repeats 9] [--gradcam-repeats 3]

All three are measured side by side on the same real NIH image and the same model (random weights: speed does
not depend on them), interleaved, and reported as medians and ratios to the bare forward pass. Goal:
predict <= 1.15x forward, and >= 10x faster than the grad-cam package computing the same 14 maps label by label.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from common import NIH_IMAGES, add_out_argument, model_args_parser, timed

from chestxray.checkpoint import Meta, model_from_meta, save_checkpoint
from chestxray.imaging import read_xray
from chestxray.predictor import Predictor

IMAGE = NIH_IMAGES / "00000001_000.png"


def get_args_parser() -> argparse.ArgumentParser:
    parser = model_args_parser(__doc__)
    parser.add_argument("--repeats", type=int, default=9, 
                        help="timed runs of forward and predict (default: %(default)s)")
    parser.add_argument("--gradcam-repeats", type=int, default=3, help="timed grad-cam runs (default: %(default)s)")
    parser.add_argument("--image", default=str(IMAGE), help="X-ray to use (default: a real NIH PNG)")
    add_out_argument(parser, "predict.md")
    return parser


def main(args: argparse.Namespace) -> dict:
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    torch.manual_seed(0)
    meta = Meta.new(arch=args.arch, image_size=args.image_size)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.pth"
        save_checkpoint(path, model_from_meta(meta), meta)
        predictor = Predictor.from_checkpoint(path, device="cpu")
    image = read_xray(args.image)
    x = predictor.preprocess(image)
    model = predictor.model
    n_labels = len(predictor.labels)

    def forward():
        with torch.inference_mode():
            model(x)

    def predict():
        predictor.predict(image, heatmaps=True)

    def gradcam():
        with GradCAM(model=model, target_layers=[model.transition]) as cam:
            for c in range(n_labels):
                cam(input_tensor=x, targets=[ClassifierOutputTarget(c)])

    forward(), predict()  # warm-up
    fwd, pred = [], []
    for _ in range(args.repeats):  # interleaved, so drifts in machine load hit both alike
        fwd.append(timed(forward))
        pred.append(timed(predict))
    grad = []
    for _ in range(args.gradcam_repeats):
        fwd.append(timed(forward))
        grad.append(timed(gradcam))
    f, p, g = statistics.median(fwd), statistics.median(pred), statistics.median(grad)
    result = {"forward_s": f, "predict_s": p, "gradcam_s": g,
              "predict_over_forward": p / f, "gradcam_over_predict": g / p}
    lines = [
        "## predict with all-label heatmaps vs bare forward vs pytorch-grad-cam",
        "",
        f"`python benchmarks/bench_predict.py --arch {args.arch} --image-size {args.image_size} "
        f"--repeats {args.repeats} --gradcam-repeats {args.gradcam_repeats}` on {platform.machine()} CPU, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}.",
        "",
        "| what | median s | ratio |",
        "|---|---|---|",
        f"| bare forward `model(x)` ({args.arch}, {args.image_size} px) | {f:.3f} | 1.00 |",
        f"| `Predictor.predict` (preprocess + forward + sigmoid + {n_labels} maps) | {p:.3f} | {p / f:.3f} |",
        f"| grad-cam package, {n_labels} labels one at a time | {g:.3f} | {g / f:.2f} |",
        "",
        f"predict / forward = **{p / f:.3f}** (goal <= 1.15); grad-cam / predict = **{g / p:.1f}x** (goal >= 10x).",
        "",
    ]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))
    return result


if __name__ == "__main__":
    main(get_args_parser().parse_args())
