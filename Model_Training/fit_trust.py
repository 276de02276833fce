"""Fit the in-scope check, calibration, evidence and the orientation check into an existing checkpoint, without
retraining.

    python Model_Training/fit_trust.py --checkpoint chestxray_model_resnet50.pth --data-dir /path/to/nih

Rebuilds the checkpoint's own train / validation / calibration split (the seed, fractions and image limit it was
trained with), runs the model once over the training and calibration splits, and writes into the checkpoint
(atomically; --out for another file): scope statistics (training split) and their limit (calibration split),
per-label Platt calibration, thresholds chosen on the calibrated scale and per-label evidence (calibration split),
the orientation check (mirrored and rotated copies of --orientation-images training images), and which split served
which role (meta.training["split"]["roles"]). The validation split, which chose the epoch, is not used. A checkpoint
trained before the calibration split existed has none: its validation split is used, with a warning (see
chestxray/fitting.py).
"""
from __future__ import annotations

import argparse
import sys

from chestxray.checkpoint import CheckpointError
from chestxray.data import DataError
from chestxray.fitting import DEFAULT_BOOTSTRAP, fit_checkpoint
from chestxray.metrics import THRESHOLD_RULES
from chestxray.trust.orientation import DEFAULT_IMAGES
from chestxray.trust.scope import DEFAULT_METHOD, DEFAULT_PERCENTILE, METHODS, ScopeError


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--checkpoint", required=True, help="checkpoint to upgrade (written by Model_Training/train.py)")
    add("--data-dir", required=True, help="the NIH data folder the checkpoint was trained on (Data_Entry CSV + "
        "images)")
    add("--out", default=None, help="where to write the upgraded checkpoint (default: replace --checkpoint)")
    add("--threshold-rule", default=None, choices=THRESHOLD_RULES, help="rule for thresholds on the calibrated "
        "scale (default: the one the checkpoint was trained with, else f1)")
    add("--scope-method", default=DEFAULT_METHOD, choices=METHODS, help="in-scope score (default: %(default)s)")
    add("--percentile", type=float, default=DEFAULT_PERCENTILE, help="scope limit = this percentile of the "
        "calibration split's scores (default: %(default)s)")
    add("--orientation-images", type=int, default=DEFAULT_IMAGES, help="training images whose upright, mirrored "
        "and rotated copies fit the orientation check; 0 = no orientation check (default: %(default)s)")
    add("--n-boot", type=int, default=DEFAULT_BOOTSTRAP, help="patient-bootstrap replicates for the AUROC CIs "
        "(default: %(default)s)")
    add("--batch-size", type=int, default=32, help="images per batch (default: %(default)s)")
    add("--workers", type=int, default=0, help="data-loading processes (default: %(default)s)")
    add("--cache-dir", default=None, help="resized-image cache folder, as in training (default: none)")
    add("--device", default="auto", choices=("auto", "cpu", "cuda"), help="default: %(default)s")
    add("--progress", action="store_true", help="show progress bars (default: off)")
    return parser


def main(args: argparse.Namespace) -> int:
    """Returns 0 when written, 2 for a bad checkpoint or data (message on stderr)."""
    try:
        fit_checkpoint(**vars(args))
    except (CheckpointError, DataError, ScopeError) as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
