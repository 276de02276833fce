"""Predict chest X-rays from the command line: probabilities, positive calls and heatmap overlays per image.

    python predictions.py PATH [PATH ...] --checkpoint CKPT [--out DIR] [--heatmaps all|positive|none]

prints one JSON object per image on its own line: Prediction.to_dict() (the shape the web API answers) plus
"image" (its path) and, with --out, "heatmaps" ({label: overlay PNG path}); a refused image gets
{"image": PATH, "error": MESSAGE}. Exit code 1 if any image failed, 2 without a usable checkpoint.
The inference itself lives in chestxray.predictor (Predictor is re-exported here).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from chestxray.checkpoint import DEFAULT_CHECKPOINT, CheckpointError
from chestxray.fileio import atomic_write, dumps_json
from chestxray.imaging import IMAGE_SUFFIXES, InvalidImage
from chestxray.predictor import Prediction, Predictor

__all__ = ["DEFAULT_CHECKPOINT", "TRAIN_COMMAND", "Prediction", "Predictor", "get_args_parser", "main"]

TRAIN_COMMAND = "python Model_Training/train.py --data-dir /path/to/nih --output chestxray_model_resnet50.pth"


def find_images(paths: list[str]) -> list[Path]:
    """Expand files and folders (searched recursively for PNG/JPEG/DICOM) into a sorted, de-duplicated list."""
    found: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found.extend(sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES))
        else:
            found.append(p)  # a missing or odd file is reported as that image's error, not skipped
    seen: set[Path] = set()
    return [f for f in found if not (f in seen or seen.add(f))]


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", metavar="PATH", help="image files or folders (searched recursively)")
    parser.add_argument(
        "--checkpoint",
        default=os.environ.get("CXR_CHECKPOINT", DEFAULT_CHECKPOINT),
        help="checkpoint file (default: $CXR_CHECKPOINT, else %(default)s)",
    )
    parser.add_argument("--out", default=None, help="folder for heatmap overlay PNGs (default: none written)")
    parser.add_argument(
        "--heatmaps", choices=("all", "positive", "none"), default="all",
        help="which labels get an overlay PNG under --out (default: %(default)s)",
    )
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda (default: %(default)s)")
    return parser


def _heatmap_dir(out: Path, image: Path, used: set[str]) -> Path:
    # The stem of "..png" is "." and of "...png" is "..": as a folder name they would put the overlays in --out
    # itself or in its parent.
    stem = image.stem if image.stem not in ("", ".", "..") else "image"
    name, n = stem, 1
    while name in used:
        n += 1
        name = f"{stem}_{n}"
    used.add(name)
    return out / name


def _predict_one(predictor: Predictor, path: Path, out: Path | None, which: str, used: set[str]) -> dict:
    """to_dict() of one image, plus "heatmaps" {label: overlay PNG path} when `out` is given. Raises InvalidImage."""
    want_maps = out is not None and which != "none"
    pred = predictor.predict(path, heatmaps=want_maps)
    record = pred.to_dict()
    if want_maps:
        folder = _heatmap_dir(out, path, used)  # made by atomic_write with the first overlay
        record["heatmaps"] = {}
        for label in pred.labels if which == "all" else pred.positive:
            image = pred.overlay(label)
            target = atomic_write(folder / f"{label}.png", lambda f, image=image: image.save(f, format="PNG"))
            record["heatmaps"][label] = str(target)
    return record


def main(args: argparse.Namespace) -> int:
    """Run the CLI; returns the exit code (0 all good, 1 some image failed, 2 no usable checkpoint)."""
    try:
        predictor = Predictor.from_checkpoint(args.checkpoint, device=args.device)
    except (CheckpointError, RuntimeError) as exc:
        print(f"error: {exc}\nTrain a model with: {TRAIN_COMMAND}\nor point at one with --checkpoint", file=sys.stderr)
        return 2
    images = find_images(args.paths)
    if not images:
        print("error: no PNG, JPEG or DICOM files found in the given paths", file=sys.stderr)
        return 1
    out = Path(args.out) if args.out else None
    used: set[str] = set()
    failed = 0
    progress = None
    if len(images) > 1 or any(Path(p).is_dir() for p in args.paths):
        from tqdm import tqdm

        progress = tqdm(total=len(images), unit="img", file=sys.stderr)
    for path in images:
        try:
            record = {"image": str(path), **_predict_one(predictor, path, out, args.heatmaps, used)}
        except InvalidImage as exc:
            failed += 1
            record = {"image": str(path), "error": str(exc)}
        print(dumps_json(record), flush=True)
        if progress is not None:
            progress.update(1)
    if progress is not None:
        progress.close()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
