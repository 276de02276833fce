"""The int8 quality gate on a trained checkpoint: fp32 ONNX vs int8 ONNX on the checkpoint's validation split.

    python benchmarks/int8_gate.py --checkpoint CKPT --data-dir DIR [--calibration-images 128]

Exports fp32 and int8 (calibrated on the *training* split, as Model_Training/export.py --int8 does), then scores the
validation split (rebuilt as training made it) with PyTorch, ONNX fp32 and ONNX int8. Gate: mean AUROC of
int8 within 0.01 of fp32 and every label's heatmap correlation >= 0.98; max |Δprobability| is reported. Writes
benchmarks/results/int8.md.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import Model_Training.export as export  # noqa: E402
from chestxray.cam import predict_with_maps  # noqa: E402
from chestxray.checkpoint import load_checkpoint  # noqa: E402
from chestxray.data import load_index, make_splits, targets  # noqa: E402
from chestxray.imaging import read_xray  # noqa: E402
from chestxray.metrics import mean_auroc, per_label_auroc  # noqa: E402
from chestxray.onnx_backend import OnnxModel  # noqa: E402
from chestxray.transforms import preprocess  # noqa: E402

AUROC_TOL, MAP_CORR = 0.01, 0.98


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a trained checkpoint")
    parser.add_argument("--data-dir", required=True, help="the data folder it was trained on")
    parser.add_argument("--calibration-images", type=int, default=128, help="(default: %(default)s)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "int8.md"),
                        help="(default: %(default)s)")
    return parser


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x.astype(np.float64)))


def _corr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a.transpose(1, 0, 2, 3).reshape(a.shape[1], -1)
    b = b.transpose(1, 0, 2, 3).reshape(b.shape[1], -1)
    return np.array([np.corrcoef(x, y)[0, 1] for x, y in zip(a, b)])


def main(args: argparse.Namespace) -> dict:
    model, meta, _ = load_checkpoint(args.checkpoint)
    split = dict(meta.training.get("split") or {})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        val = make_splits(load_index(args.data_dir), args.data_dir, float(split.get("val_fraction", 0.1)),
                          int(split.get("seed", 0)))["val"]
    x = torch.cat([preprocess(meta, read_xray(p)) for p in val["path"]])
    y = targets(val, meta.labels)
    with torch.inference_mode():
        logits, maps = predict_with_maps(model, x)
    with tempfile.TemporaryDirectory() as tmp:
        fp32_path = Path(tmp) / "m.onnx"
        start = time.perf_counter()
        rc = export.main(export.get_args_parser().parse_args([
            "--checkpoint", args.checkpoint, "--out", str(fp32_path), "--int8", "--calibration-dir", args.data_dir,
            "--calibration-images", str(args.calibration_images)]))
        seconds = time.perf_counter() - start
        if rc != 0:
            raise SystemExit(rc)
        fp32, int8 = OnnxModel(fp32_path, device="cpu"), OnnxModel(export.int8_path(fp32_path), device="cpu")
        (l32, m32, _), (l8, m8, _) = fp32.run(x.numpy()), int8.run(x.numpy())
        quant = int8.info.quantization
    p_torch, p32, p8 = _sigmoid(logits.numpy()), _sigmoid(l32), _sigmoid(l8)
    a_torch, a32, a8 = mean_auroc(y, p_torch), mean_auroc(y, p32), mean_auroc(y, p8)
    corr8, corr32 = _corr(m8, m32), _corr(m32, maps.numpy())
    per32, per8 = per_label_auroc(y, p32), per_label_auroc(y, p8)
    gate = abs(a8 - a32) <= AUROC_TOL and corr8.min() >= MAP_CORR
    lines = [
        "# int8 quality gate", "",
        f"Command: `python benchmarks/int8_gate.py --checkpoint {Path(args.checkpoint).name} --data-dir "
        f"{args.data_dir} --calibration-images {args.calibration_images}`", "",
        f"Checkpoint: {meta.arch} at {meta.image_size} px, {meta.training.get('data', '')}; its validation mean "
        f"AUROC at training {meta.training.get('val_mean_auroc')}. Validation split rebuilt as training made it: "
        f"{len(val)} images. int8: {quant['method']}, per-channel {quant['per_channel']}, calibrated on "
        f"{quant['calibration_data']}; float nodes (head): {len(quant['float_nodes'])}. Export + quantization "
        f"{seconds:.0f} s.", "",
        "| | PyTorch | ONNX fp32 | ONNX int8 |", "|---|---:|---:|---:|",
        f"| mean AUROC (labels with positives) | {a_torch:.4f} | {a32:.4f} | {a8:.4f} |",
        f"| max abs Δprobability vs PyTorch | 0 | {np.abs(p32 - p_torch).max():.1e} | "
        f"{np.abs(p8 - p_torch).max():.1e} |",
        f"| lowest per-label heatmap correlation | 1 | {corr32.min():.5f} (vs PyTorch) | {corr8.min():.4f} (vs fp32) |",
        "",
        f"Gate: |Δ mean AUROC| = {abs(a8 - a32):.4f} (<= {AUROC_TOL}), lowest map correlation {corr8.min():.4f} "
        f"(>= {MAP_CORR}): **{'passed' if gate else 'FAILED'}**.", "",
        "Per label (AUROC fp32 / int8, map correlation int8 vs fp32): " + "; ".join(
            f"{name} {a:.3f}/{b:.3f}, {c:.3f}" for name, a, b, c in zip(meta.labels, per32, per8, corr8)),
    ]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return {"auroc_fp32": a32, "auroc_int8": a8, "gate": gate}


if __name__ == "__main__":
    main(get_args_parser().parse_args())
