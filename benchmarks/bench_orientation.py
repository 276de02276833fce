"""Orientation check: how often validation images are flagged "appears mirrored" / "appears rotated", as given and
mirrored or rotated, through the product's own Predictor (the image is flipped or rotated before the Predictor reads
it, as an upload would be).

    python benchmarks/bench_orientation.py --checkpoint /tmp/r18.pth --data-dir ../shared/data/nih

The checkpoint's orientation check was fitted by Model_Training/fit_trust.py (or train.py) on copies of training
images; the validation split (the checkpoint's own, rebuilt from its SplitSpec) never entered that fit. Writes a
markdown table to --out.
"""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import add_out_argument, write_report  # noqa: E402
from chestxray.data import load_index, rebuild_splits  # noqa: E402
from chestxray.imaging import read_xray  # noqa: E402
from chestxray.predictor import Predictor  # noqa: E402
from chestxray.trust.orientation import MIRRORED, ROTATED, UPRIGHT  # noqa: E402

VARIANTS = {
    "as given": lambda a: a,
    "mirrored left-right": np.fliplr,
    "rotated 90": lambda a: np.rot90(a, 1),
    "rotated 180": lambda a: np.rot90(a, 2),
    "rotated 270": lambda a: np.rot90(a, 3),
}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="checkpoint with an orientation check (fit_trust.py)")
    parser.add_argument("--data-dir", required=True, help="the data folder the checkpoint was trained on")
    parser.add_argument("--split", default="val", choices=("val", "calibration", "test"),
                        help="which of the checkpoint's splits to flip and rotate (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default: %(default)s)")
    parser.add_argument("--command", default=None, help="the command line to print above the table (default: "
                        "this one)")
    add_out_argument(parser, "orientation.md")
    return parser


def flag_rates(predictor: Predictor, images: list[np.ndarray], batch_size: int) -> dict[str, dict[str, int]]:
    """{variant: {UPRIGHT, MIRRORED, ROTATED: count}} over `images`, each variant made before prediction."""
    out = {}
    for name, change in VARIANTS.items():
        counts = dict.fromkeys((UPRIGHT, MIRRORED, ROTATED), 0)
        for start in range(0, len(images), batch_size):
            batch = [np.ascontiguousarray(change(a)) for a in images[start:start + batch_size]]
            for prediction in predictor.predict_batch(batch, heatmaps=False):
                counts[prediction.orientation] += 1
        out[name] = counts
    return out


def main(args: argparse.Namespace) -> dict:
    predictor = Predictor.from_checkpoint(args.checkpoint, device="cpu", allow_untrusted=True)
    if predictor.trust.orientation is None:
        raise SystemExit(f"{args.checkpoint} has no orientation check; fit it with Model_Training/fit_trust.py")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        frame = rebuild_splits(predictor.meta, load_index(args.data_dir, allow_missing=True), args.data_dir)[args.split]
    images = [read_xray(path) for path in frame["path"]]
    counts = flag_rates(predictor, images, args.batch_size)
    n = len(images)
    meta = predictor.meta
    lines = [
        f"Checkpoint: {meta.arch} at {meta.image_size} px, orientation check fitted on "
        f"{predictor.trust.orientation.n_fit} training images x {len(predictor.trust.orientation.classes)} "
        f"orientations; measured on the {args.split} split: {n} images of {frame['patient'].nunique()} patients "
        "(none of them in the fit).",
        "",
        f"Command: `{args.command or ' '.join(sys.argv)}`",
        "",
        "| images | n | flagged \"appears mirrored\" | flagged \"appears rotated\" | flagged (either) |",
        "|---|---|---|---|---|",
    ]
    for name, c in counts.items():
        flagged = c[MIRRORED] + c[ROTATED]
        lines.append(f"| {name} | {n} | {c[MIRRORED]} ({c[MIRRORED] / n:.1%}) | {c[ROTATED]} ({c[ROTATED] / n:.1%}) "
                     f"| {flagged} ({flagged / n:.1%}) |")
    write_report(lines, args.out)
    return counts


if __name__ == "__main__":
    main(get_args_parser().parse_args())
