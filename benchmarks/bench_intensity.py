"""Tried for the demo model: standardising each input image's grey levels (its 1st-99th percentile grey levels
stretched to 0-255, or its histogram equalised) in training, calibration fitting and inference alike, so that a
washed-out film from another site reaches the model with the contrast it learned on; or, in training only, random
grey-level curves (train.py --intensity-augment S: gamma, contrast, brightness), so that the features stop
depending on a site's exposure. Trains the demo recipe (Model_Training/demo.py's arguments) once per variant and
seed and compares, per variant:

- acceptance per image set, counted as benchmarks/bench_demo_scope.py counts it (same sets, same Predictor path);
- the in-scope check's parts (features, layout, histogram; each over its calibration scale) of the external films;
- validation mean AUROC (what training records; 21 images for seed 0) and mean AUROC on the NIH images of
  ../shared/data/nih whose patients are not in samples/nih (never trained, validated or calibrated on);
- the calibration images against washed-out copies of themselves (grey levels 0.35 + 0.4 v): how far the
  probabilities move, and how many copies are still in scope.

    python benchmarks/bench_intensity.py [--work /tmp/bench-intensity] [--reuse] [--seeds 0 1] [--variants ...]

The standardisation is applied here by wrapping the per-image stage (transforms.build_transform) of train.py, of
the trust fitting and of the Predictor, so this script measures it without any option in the product code; the
augmentation variants pass --intensity-augment to train.py and change nothing else.
Figures in benchmarks/results/intensity.md.
"""
from __future__ import annotations

import argparse
import contextlib
import warnings
from pathlib import Path

import bench_demo_scope as sets_of
import numpy as np
import torch
from common import ROOT, add_out_argument, write_report

import chestxray.fitting
from chestxray.data import load_index
from chestxray.evaluation import predict_frame
from chestxray.fitting import training_splits
from chestxray.imaging import InvalidImage, read_xray
from chestxray.metrics import mean_auroc
from chestxray.predictor import Predictor
from chestxray.transforms import to_uint8_square
from chestxray.trust import scope as S
from Model_Training import demo
from Model_Training import train as train_script

AUGMENT = {"augment-0.3": 0.3, "augment-0.6": 0.6}  # train.py --intensity-augment, training only
VARIANTS = ("none", "stretch-1-99", "equalize", *AUGMENT)
STRETCH = (1.0, 99.0)  # percentiles mapped to grey levels 0 and 255
WASH = (0.35, 0.4)  # washed-out copy: 0.35 + 0.4 * v, grey levels 0.35-0.75 like the refused films
SHOWN_FILMS = ("2168a917.jpg", "2c35005f.jpg", "b343e657.jpg")


def stretch(x: torch.Tensor) -> torch.Tensor:
    """(1, S, S) uint8 -> its STRETCH percentile grey levels mapped to 0 and 255 (clipped); a flat image unchanged."""
    v = x.float()
    low, high = torch.quantile(v.flatten(), torch.tensor([p / 100 for p in STRETCH])).tolist()
    if high - low < 1.0:
        return x
    return ((v - low) * (255.0 / (high - low))).round_().clamp_(0, 255).to(torch.uint8)


def equalize(x: torch.Tensor) -> torch.Tensor:
    """(1, S, S) uint8 -> histogram-equalised (each grey level to its cumulative share, the lowest present to 0)."""
    cdf = torch.bincount(x.flatten().long(), minlength=256).cumsum(0).double()
    low = cdf[x.min().long()]
    if cdf[-1] - low < 1:
        return x
    return ((cdf - low) / (cdf[-1] - low) * 255).round().clamp(0, 255).to(torch.uint8)[x.long()]


STANDARDISE = {"stretch-1-99": stretch, "equalize": equalize}


class Standardised:
    """A per-image stage (transforms.XrayTransform) with `variant` applied first: before any augmentation."""

    def __init__(self, inner, variant: str):
        self.inner, self.size, self.fn = inner, inner.size, STANDARDISE[variant]

    def __call__(self, image):
        return self.inner(self.fn(to_uint8_square(image, self.size))[0])


@contextlib.contextmanager
def standardised(variant: str):
    """train.py and the trust fitting build their per-image stage with `variant` inside this block."""
    if variant not in STANDARDISE:
        yield
        return
    saved = train_script.build_transform, chestxray.fitting.build_transform
    wrapped = lambda meta, **kw: Standardised(saved[0](meta, **kw), variant)  # noqa: E731
    train_script.build_transform = chestxray.fitting.build_transform = wrapped
    try:
        yield
    finally:
        train_script.build_transform, chestxray.fitting.build_transform = saved


def build(variant: str, seed: int, work: Path, reuse: bool) -> Path:
    """The demo recipe trained with `variant` and `seed` -> its checkpoint (kept when --reuse finds it)."""
    out = work / f"demo-{variant}-seed{seed}.pth"
    if reuse and out.is_file():
        return out
    argv = ["--data-dir", str(demo.SAMPLE_DIR), *demo.DEMO_TRAIN_ARGS, "--seed", str(seed), "--output", str(out),
            "--run-dir", str(work / f"run-{variant}-seed{seed}"), "--no-progress"]
    if variant in AUGMENT:
        argv += ["--intensity-augment", str(AUGMENT[variant])]
    with standardised(variant):
        rc = train_script.main(train_script.get_args_parser().parse_args(argv))
    if rc != 0:
        raise SystemExit(f"training {variant} failed (exit code {rc})")
    return out


def predictor(path: Path, variant: str) -> Predictor:
    p = Predictor.from_checkpoint(path, device="cpu")
    if variant in STANDARDISE:
        p.transform = Standardised(p.transform, variant)
    return p


def parts(p: Predictor, data: bytes) -> tuple[float, float, float]:
    """One image's in-scope parts, each over its calibration scale: features, layout, histogram."""
    _, _, pooled, x = p._outputs(p.transform(read_xray(data)).unsqueeze(0).numpy())  # x: the normalised channel 0
    sc = p.trust.scope
    feature = S._distance(S._prepare(pooled, sc.method), sc.mean, sc.precision)[0] / sc.feature_scale
    part = S._input_part(S.image_statistics(x, p.meta.mean[0], p.meta.std[0]), sc.method)
    layout, hist = (S._distance(part[:, a:b], sc.image_mean[a:b], sc.image_precision[a:b, a:b])[0] / sc.image_scale
                    for a, b in S.LAYOUT_BLOCKS)
    return float(feature), float(layout), float(hist)


def held_out_nih(nih_dir: Path) -> object:
    """../shared/data/nih rows whose patients are not in samples/nih."""
    seen = set(load_index(demo.SAMPLE_DIR, allow_missing=True)["patient"])
    rows = load_index(nih_dir, allow_missing=True)
    return rows[~rows["patient"].isin(seen)].reset_index(drop=True)


def washed_out(p: Predictor) -> tuple[float, int, int]:
    """Calibration images vs their washed-out copies -> (mean |probability change|, copies in scope, images)."""
    rows = training_splits(p.meta, demo.SAMPLE_DIR)["calibration"]
    change, kept = [], 0
    for path in rows["path"]:
        try:
            image = read_xray(path)
        except InvalidImage:
            continue
        a, b = p.predict_batch([image, WASH[0] + WASH[1] * image], heatmaps=False)
        change.append(np.mean([abs(a.probabilities[k] - b.probabilities[k]) for k in p.labels]))
        kept += b.in_scope is True
    return float(np.mean(change)), kept, len(change)


def measure(variant: str, path: Path, sets: dict, nih_rows) -> dict:
    p = predictor(path, variant)
    accepted = {name: sets_of.score(p, images) for name, images in sets.items()}
    films = {name: parts(p, data) for name, data in sets["other-cxr"] if name in SHOWN_FILMS}
    frame, _ = predict_frame(p, nih_rows, progress=False, log=lambda line: None)
    y, prob = (frame[[f"{k}_{kind}" for k in p.labels]].to_numpy() for kind in ("true", "prob"))
    return {"accepted": accepted, "films": films, "limit": p.trust.scope.limit,
            "val_auroc": p.meta.training.get("val_mean_auroc"), "n_val": p.meta.training.get("n_val"),
            "nih_auroc": mean_auroc(y, prob), "n_nih": len(frame),
            "washed": washed_out(p)}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="/tmp/bench-intensity", help="folder for the trained models and runs "
                        "(default: %(default)s)")
    parser.add_argument("--reuse", action="store_true", help="use the models already in --work (default: train)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds; 0 is the demo's own "
                        "(default: %(default)s)")
    parser.add_argument("--other-cxr", default=str(ROOT.parent / "shared" / "data" / "other-cxr"),
                        help="external chest X-rays (default: %(default)s)")
    parser.add_argument("--nih", default=str(ROOT.parent / "shared" / "data" / "nih"),
                        help="NIH images for the held-out AUROC (default: %(default)s)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS,
                        help="variants to train and measure (default: all)")
    add_out_argument(parser, "intensity.md")
    return parser


def report(results: dict, sets: dict) -> list[str]:
    lines = ["| input, seed | " + " | ".join(sets) + " | external X-rays without Fake_MONOHR1 | positive calls | "
             "scope limit |", "|---|" + "---|" * (len(sets) + 3)]
    for variant, r in results.items():
        a = r["accepted"]
        ext = a["other-cxr"]["accepted"] + a["samples/other-cxr"]["accepted"]
        ext_n = a["other-cxr"]["readable"] + a["samples/other-cxr"]["readable"] - 2
        lines.append(f"| {variant} | " + " | ".join(f"{s['accepted']}/{s['readable']}" for s in a.values())
                     + f" | {ext}/{ext_n} ({100 * ext / ext_n:.0f} %) | {sum(s['positives'] for s in a.values())} | "
                     f"{r['limit']:.3f} |")
    lines += ["", "Seed 0 is the demo model's own recipe (its `none` row is `.cache/demo_model.pth`, bit for bit); "
              "another seed also draws other validation and calibration patients. The external X-rays exclude the two "
              "copies of Fake_MONOHR1.dcm (a negative film, rightly refused); the goal is at least 90 %."]
    lines += ["", "| input, seed | film | features | layout | histogram |", "|---|---|---|---|---|"]
    lines += [f"| {variant} | {film} | {f:.2f} | {lay:.2f} | {h:.2f} |"
              for variant, r in results.items() for film, (f, lay, h) in r["films"].items()]
    lines += ["", "| input, seed | validation mean AUROC (images) | held-out NIH mean AUROC (images) | "
              "washed-out copies: mean probability change, in scope |", "|---|---|---|---|"]
    for variant, r in results.items():
        change, kept, n = r["washed"]
        lines.append(f"| {variant} | {r['val_auroc']:.3f} ({r['n_val']}) | {r['nih_auroc']:.3f} ({r['n_nih']}) | "
                     f"{change:.4f}, {kept}/{n} |")
    return lines


def main(args: argparse.Namespace) -> int:
    warnings.simplefilter("ignore")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    sets = {"photos": sets_of.photos(), "CT/MR": sets_of.dicom_files(), "generated": sets_of.generated(),
            "other-cxr": sets_of.folder(Path(args.other_cxr)),
            "samples/other-cxr": sets_of.folder(ROOT / "samples" / "other-cxr")}
    nih_rows = held_out_nih(Path(args.nih))
    results = {f"{v}, {seed}": measure(v, build(v, seed, work, args.reuse), sets, nih_rows)
               for seed in args.seeds for v in args.variants}
    write_report(report(results, sets), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(get_args_parser().parse_args()))
