"""Export a checkpoint to ONNX: one graph (logits, all-label maps, pooled features) with the checkpoint's metadata.

    python Model_Training/export.py --checkpoint CKPT [--out model.onnx]
    python Model_Training/export.py --checkpoint CKPT --int8 --calibration-dir DIR [--out model.onnx]
        (writes model.onnx and model.int8.onnx)

The .onnx file is self-describing (labels, image size, normalisation, thresholds, training record and any other
data the checkpoint carries are in its metadata); `predictions.py --backend onnx`, main.py and test.py read it.
After writing, the export is checked against PyTorch on a few images (fp32 must agree to 1e-4 in probability).

--int8 quantizes statically (ONNX Runtime, QDQ, per-channel weights, head kept in float), calibrated on images from
--calibration-dir: when that folder is an NIH data folder (Data_Entry CSV), only its *training* split is used, as
the checkpoint was split; otherwise every image found in it. --calibration-method, --float-first-conv and
--int8-activations choose among the settings benchmarks/int8_gate.py compares. Check int8 quality with
benchmarks/int8_gate.py before using it (BENCHMARKS.md, "int8 quality gate"). Exit code 0 done, 2 bad input.
"""
from __future__ import annotations

import argparse
import random
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from chestxray.auto_backend import PROBABILITY_TOLERANCE  # the one fp32 agreement limit
from chestxray.cam import predict_with_maps
from chestxray.checkpoint import CheckpointError, Meta, checkpoint_from_obj, safe_torch_load
from chestxray.data import DataError, find_data_entry, load_index, make_splits, subsample
from chestxray.imaging import IMAGE_SUFFIXES, InvalidImage, read_xray
from chestxray.messages import UsageError
from chestxray.onnx_backend import OnnxModel, OnnxModelError, export_onnx, quantize_int8
from chestxray.transforms import preprocess

CHECKPOINT_KEYS = ("format", "model", "meta", "train")  # everything else a checkpoint holds travels as "extra"


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--checkpoint", required=True, help="checkpoint written by Model_Training/train.py")
    add("--out", default=None, help="the fp32 .onnx file to write (default: the checkpoint's name with .onnx)")
    add("--int8", action="store_true", help="also write a statically quantized int8 model beside it, named "
        "*.int8.onnx (default: fp32 only)")
    add("--calibration-dir", default=None, help="images to calibrate int8 on: an NIH data folder (its training "
        "split is used) or any folder of PNG/JPEG/DICOM files (required with --int8)")
    add("--calibration-images", type=int, default=128, help="how many calibration images, a seeded sample "
        "(default: %(default)s)")
    add("--batch-size", type=int, default=16, help="calibration batch size (default: %(default)s)")
    add("--no-per-channel", action="store_true", help="one weight scale per tensor instead of per output "
        "channel (default: per channel)")
    add("--quantize-head", action="store_true", help="quantize the head (pool, classifier, CAM) too (default: "
        "float head, so the maps and the pooled vector stay float)")
    add("--calibration-method", choices=("minmax", "percentile", "entropy"), default="minmax",
        help="how activation ranges are chosen from the calibration images: minmax, percentile (99.999 %%) or "
        "entropy (default: %(default)s)")
    add("--float-first-conv", action="store_true", help="keep the first convolution (the stem) in float too "
        "(default: quantized)")
    add("--int8-activations", action="store_true", help="signed int8 activations instead of uint8 (default: "
        "uint8)")
    add("--seed", type=int, default=0, help="seed of the calibration sample (default: %(default)s)")
    return parser


def _check_args(args: argparse.Namespace) -> None:
    if args.int8 and not args.calibration_dir:
        raise UsageError("--int8 needs --calibration-dir DIR: training-split images to calibrate on "
                         "(an NIH data folder or a folder of images)")
    if args.calibration_dir and not args.int8:
        raise UsageError("--calibration-dir is only used with --int8; add --int8 or drop it")
    if args.calibration_images < 1:
        raise UsageError(f"--calibration-images must be at least 1, got {args.calibration_images}")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {args.batch_size}")


def int8_path(fp32_path: Path) -> Path:
    """model.onnx -> model.int8.onnx (where --int8 writes)."""
    return fp32_path.with_name(fp32_path.stem + ".int8.onnx")


def calibration_paths(folder: Path, meta: Meta, limit: int, seed: int) -> tuple[list[Path], str]:
    """Up to `limit` image paths to calibrate on and a description; an NIH data folder gives its training split."""
    if not folder.is_dir():
        raise UsageError(f"--calibration-dir {folder} is not a folder")
    index = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # split notices and the bundled-metadata notice are training's business
        try:
            labels_csv = find_data_entry(folder)
        except DataError:
            labels_csv = None
        if labels_csv is not None:
            try:
                index = load_index(folder, allow_missing=True)
            except DataError:
                # Its own label file must index. The bundled NIH metadata stands in for any folder, so a folder
                # holding none of the images it lists is a plain image folder (every image found is used).
                if labels_csv.parent == folder:
                    raise
    if index is None:
        found = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not found:
            raise UsageError(f"no PNG, JPEG or DICOM files in {folder} to calibrate on") from None
        chosen = sorted(random.Random(seed).sample(found, min(limit, len(found))))
        return chosen, f"{len(chosen)} of the {len(found)} images in {folder}"
    # The checkpoint's own split (as test.py rebuilds it): calibrating on validation images would flatter the gate.
    split = dict(meta.training.get("split") or {})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # split notices (no test list...) are training's business
        # calibration_fraction 0: a checkpoint from before the calibration split, whose train split was all the rest
        splits = make_splits(index, folder, val_fraction=float(split.get("val_fraction", 0.1)),
                             seed=int(split.get("seed", 0)),
                             calibration_fraction=float(split.get("calibration_fraction", 0.0)),
                             stratify=bool(split.get("stratify", False)))
    train = subsample(splits["train"], limit, seed)
    if len(train) == 0:
        raise UsageError(f"the training split of {folder} is empty: nothing to calibrate on")
    return [Path(p) for p in train["path"]], (f"{len(train)} of the {len(splits['train'])} training-split images "
                                              f"of {folder}")


def calibration_batches(paths: list[Path], meta: Meta, batch_size: int, skipped: list[str]) -> Iterator[np.ndarray]:
    """Normalised (B, 3, S, S) float32 batches of the images; unreadable ones are named in `skipped`."""
    batch: list[torch.Tensor] = []
    for path in paths:
        try:
            batch.append(preprocess(meta, read_xray(path)))
        except InvalidImage as exc:
            skipped.append(f"{path}: {exc}")
            continue
        if len(batch) == batch_size:
            yield torch.cat(batch).numpy()
            batch = []
    if batch:
        yield torch.cat(batch).numpy()


def compare_with_torch(model, onnx_model: OnnxModel, batch: np.ndarray) -> float:
    """Max |probability difference| between PyTorch and ONNX Runtime on a normalised batch."""
    with torch.inference_mode():
        logits, _ = predict_with_maps(model, torch.from_numpy(batch))
    onnx_logits = onnx_model.run(batch)[0]
    return float(np.abs(torch.sigmoid(logits).numpy() - torch.sigmoid(torch.from_numpy(onnx_logits)).numpy()).max())


def main(args: argparse.Namespace) -> int:
    """Export; returns the exit code (0 done, 2 bad input). Prints what was written and how it was checked."""
    try:
        _check_args(args)
        checkpoint = Path(args.checkpoint)
        raw = safe_torch_load(checkpoint)
        model, meta, train = checkpoint_from_obj(raw, checkpoint)
        extra = {k: v for k, v in raw.items() if k not in CHECKPOINT_KEYS}
        out = Path(args.out) if args.out else checkpoint.with_suffix(".onnx")
        out.parent.mkdir(parents=True, exist_ok=True)
        if args.int8:  # find bad calibration input before the export's minute of work
            paths, description = calibration_paths(Path(args.calibration_dir), meta, args.calibration_images,
                                                   args.seed)
        torch.manual_seed(args.seed)
        probe = torch.randn(2, 3, meta.image_size, meta.image_size).numpy()
        export_onnx(model, meta, out, train, extra)
        diff = compare_with_torch(model, OnnxModel(out, device="cpu"), probe)
        if diff > PROBABILITY_TOLERANCE:
            out.unlink(missing_ok=True)
            raise OnnxModelError(f"the export disagrees with PyTorch by {diff:.2e} in probability (limit "
                                 f"{PROBABILITY_TOLERANCE}); it was removed. Report this with your torch/onnx versions")
        print(f"wrote {out} (fp32, {out.stat().st_size / 1e6:.1f} MB); max |Δprobability| vs PyTorch {diff:.1e} "
              f"on {len(probe)} random inputs")
        if not args.int8:
            return 0
        skipped: list[str] = []
        quantized = int8_path(out)
        quantize_int8(out, quantized, calibration_batches(paths, meta, args.batch_size, skipped),
                      per_channel=not args.no_per_channel, exclude_head=not args.quantize_head,
                      calibration=args.calibration_method, float_first_conv=args.float_first_conv,
                      symmetric_activations=args.int8_activations,
                      note={"calibration_data": description, "checkpoint": checkpoint.name})
        diff = compare_with_torch(model, OnnxModel(quantized, device="cpu"), probe)
    except (UsageError, CheckpointError, DataError) as exc:  # OnnxModelError is a CheckpointError
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for line in skipped:
        print(f"skipped unreadable calibration image {line}", file=sys.stderr)
    print(f"wrote {quantized} (int8, {quantized.stat().st_size / 1e6:.1f} MB), calibrated on {description}"
          f"{f' ({len(skipped)} unreadable skipped)' if skipped else ''}; max |Δprobability| vs PyTorch fp32 "
          f"{diff:.1e} on {len(probe)} random inputs. Check its quality on the validation split before use.")
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
