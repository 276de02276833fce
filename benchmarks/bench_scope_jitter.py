"""Tried for the demo model's in-scope check: widening its fit with intensity-jittered copies of the training (and
calibration) images, so that washed-out or differently windowed chest X-rays from other sites are accepted. Prints,
per variant, how many images of each set are accepted (calibration split = held-out NIH images).

    python benchmarks/bench_scope_jitter.py [--checkpoint .cache/demo_model.pth] [--data-dir samples/nih]

Jitter: gamma 0.6/0.8/1.25/1.6 and contrast around the mean x0.5/x0.75, on the model's uint8 input. "jitter on
calibration": the calibration images (which set the part scales and the limit) are jittered too. The sets are
those of bench_demo_scope.py. Figures in benchmarks/results/scope_jitter.md.
"""
from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import bench_demo_scope as sets_of
import numpy as np
import torch
from common import ROOT, add_out_argument, write_report
from torch.utils.data import DataLoader

from chestxray.checkpoint import checkpoint_from_obj, safe_torch_load
from chestxray.data import XrayDataset, collate_batch
from chestxray.fitting import training_splits
from chestxray.imaging import InvalidImage, read_xray
from chestxray.transforms import build_normalize, build_transform
from chestxray.trust.scope import fit_scope, image_statistics, pooled_features

GAMMAS = (0.6, 0.8, 1.25, 1.6)
CONTRASTS = (0.5, 0.75)
VARIANTS = {"none": [], "gamma": [("gamma", g) for g in GAMMAS], "contrast": [("contrast", c) for c in CONTRASTS],
            "both": [("gamma", g) for g in GAMMAS] + [("contrast", c) for c in CONTRASTS]}


def jitter(x_u8: torch.Tensor, kind: str, value: float) -> torch.Tensor:
    """(N, 1, S, S) uint8 inputs with gamma `value`, or their contrast around each image's mean scaled by `value`."""
    x = x_u8.float() / 255
    if kind == "gamma":
        x = x**value
    else:
        mean = x.mean(dim=(2, 3), keepdim=True)
        x = mean + value * (x - mean)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


class Features:
    """The demo model's pooled features and image statistics of uint8 inputs, as the in-scope check reads them."""

    def __init__(self, checkpoint: str):
        model, self.meta, _ = checkpoint_from_obj(safe_torch_load(checkpoint), checkpoint)
        self.model = model.eval()
        self.transform, self.normalize = build_transform(self.meta, train=False), build_normalize(self.meta)

    @torch.inference_mode()
    def __call__(self, x_u8: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        x = self.normalize(x_u8)
        pooled = pooled_features(self.model.features(x))
        return pooled.numpy(), image_statistics(x, self.meta.mean[0], self.meta.std[0]).numpy()

    def split_inputs(self, frame) -> torch.Tensor:
        loader = DataLoader(XrayDataset(frame, self.meta.labels, self.transform, None, skip_unreadable=True),
                            batch_size=32, collate_fn=collate_batch)
        return torch.cat([batch[0] for batch in loader])

    def set_inputs(self, images: list[tuple[str, bytes]]) -> torch.Tensor:
        inputs = []
        for _, data in images:
            try:
                inputs.append(self.transform(read_xray(data)))
            except InvalidImage:
                pass  # refused before the model, as bench_demo_scope counts it
        return torch.stack(inputs)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=str(ROOT / ".cache" / "demo_model.pth"),
                        help="the demo checkpoint (default: %(default)s)")
    parser.add_argument("--data-dir", default=str(ROOT / "samples" / "nih"),
                        help="the folder it was trained on (default: %(default)s)")
    parser.add_argument("--other-cxr", default=str(ROOT.parent / "shared" / "data" / "other-cxr"),
                        help="external chest X-rays (default: %(default)s)")
    add_out_argument(parser, "scope_jitter.md")
    return parser


def main(args: argparse.Namespace) -> int:
    warnings.simplefilter("ignore")
    features = Features(args.checkpoint)
    splits = training_splits(features.meta, args.data_dir)
    train, cal = features.split_inputs(splits["train"]), features.split_inputs(splits["calibration"])
    sets = {"photos": sets_of.photos(), "CT/MR": sets_of.dicom_files(), "generated": sets_of.generated(),
            "other-cxr": sets_of.folder(Path(args.other_cxr)),
            "samples/other-cxr": sets_of.folder(ROOT / "samples" / "other-cxr")}
    inputs = {name: features.set_inputs(images) for name, images in sets.items()}
    scored = {name: features(x) for name, x in inputs.items()}
    base_train, base_cal = features(train), features(cal)
    lines = ["| jitter | jitter on calibration | limit percentile | calibration | " + " | ".join(sets) + " |",
             "|---|---|---|---|" + "---|" * len(sets)]
    for name, jitters in VARIANTS.items():
        for on_cal in ((False,) if name == "none" else (False, True)):
            fit_p, fit_i, cal_p, cal_i = [base_train[0]], [base_train[1]], [base_cal[0]], [base_cal[1]]
            for kind, value in jitters:
                pooled, stats = features(jitter(train, kind, value))
                fit_p.append(pooled)
                fit_i.append(stats)
                if on_cal:
                    pooled, stats = features(jitter(cal, kind, value))
                    cal_p.append(pooled)
                    cal_i.append(stats)
            fit_p, fit_i, cal_p, cal_i = map(np.concatenate, (fit_p, fit_i, cal_p, cal_i))
            for percentile in (99, 100):
                scope = fit_scope(fit_p, "mahalanobis+image", fit_i, cal_p, cal_i, percentile)
                scope = scope.with_limit(scope.score(cal_p, cal_i), percentile)
                accepted = {k: int(scope.in_scope(scope.score(*scored[k])).sum()) for k in scored}
                held = int(scope.in_scope(scope.score(*base_cal)).sum())
                lines.append(f"| {name} | {'yes' if on_cal else 'no'} | {percentile} | {held}/{len(cal)} | "
                             + " | ".join(f"{accepted[k]}/{len(inputs[k])}" for k in sets) + " |")
    write_report(lines, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(get_args_parser().parse_args()))
