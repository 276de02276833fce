"""What the demo model behind `make run` answers for images that are not chest X-rays, and for chest X-rays it never
saw: per set of images, how many are accepted as in scope and how many positive calls they get.

    python benchmarks/bench_demo_scope.py [--checkpoint .cache/demo_model.pth] [--out benchmarks/results/demo_scope.md]

Sets: scikit-image's sample photos (real non-X-ray images, a text page among them), pydicom's CT/MR test files,
generated images (noise, flat, gradient, checkerboard), the 16 external chest X-rays of ../shared/data/other-cxr and
the bundled samples/other-cxr (not NIH, never trained on). The goal for the demo model: no positive call and
nothing accepted among the non-X-rays; at least 90 % of the external chest X-rays accepted.
"""
from __future__ import annotations

import argparse
import io
import warnings
from pathlib import Path

import numpy as np
import pydicom
import skimage.data
from common import write_report
from PIL import Image

from chestxray.imaging import InvalidImage
from chestxray.predictor import Predictor

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = ("astronaut", "camera", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "page",
          "moon", "horse", "brick", "grass", "gravel", "text", "coins", "clock", "retina", "cell", "colorwheel",
          "logo", "motorcycle_left", "eagle")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".dcm"}


def _png(array: np.ndarray) -> bytes:
    if array.dtype != np.uint8:
        array = np.round(255 * (array - array.min()) / max(float(np.ptp(array)), 1e-9)).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def photos() -> list[tuple[str, bytes]]:
    out = []
    for name in PHOTOS:
        try:
            out.append((name, _png(np.asarray(getattr(skimage.data, name)()))))
        except Exception as exc:  # a photo this scikit-image lacks or cannot fetch offline is left out, and said
            print(f"skipped skimage.data.{name}: {type(exc).__name__}")
    return out


def dicom_files() -> list[tuple[str, bytes]]:
    # The files installed with pydicom only: get_testdata_files would also try to download its external test data
    # (minutes of retries offline).
    root = Path(pydicom.data.DATA_ROOT) / "test_files"
    return [(p.name, p.read_bytes()) for p in sorted([*root.glob("CT_*.dcm"), *root.glob("MR*.dcm")])]


def generated(size: int = 256, seed: int = 0) -> list[tuple[str, bytes]]:
    rng = np.random.default_rng(seed)
    ramp = np.tile(np.linspace(0, 255, size, dtype=np.float32), (size, 1))
    checker = ((np.indices((size, size)) // 32).sum(0) % 2 * 255).astype(np.uint8)
    return [("uniform noise", _png(rng.integers(0, 256, (size, size), dtype=np.uint8))),
            ("gaussian noise", _png(np.clip(rng.normal(128, 40, (size, size)), 0, 255).astype(np.uint8))),
            ("black", _png(np.zeros((size, size), np.uint8))), ("white", _png(np.full((size, size), 255, np.uint8))),
            ("gradient", _png(ramp.astype(np.uint8))), ("checkerboard", _png(checker))]


def folder(path: Path) -> list[tuple[str, bytes]]:
    return [(p.name, p.read_bytes()) for p in sorted(path.rglob("*")) if p.suffix.lower() in IMAGE_SUFFIXES]


def score(predictor: Predictor, images: list[tuple[str, bytes]]) -> dict:
    accepted = positives = flagged = unreadable = 0
    for name, data in images:
        try:
            prediction = predictor.predict(data, heatmaps=False, filename=name)
        except InvalidImage:
            unreadable += 1  # refused before the model: as safe as out of scope
            continue
        accepted += prediction.in_scope is True
        positives += len(prediction.positive)
        flagged += getattr(prediction, "orientation", None) not in (None, "upright")
    return {"n": len(images), "readable": len(images) - unreadable, "accepted": accepted, "positives": positives}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=str(ROOT / ".cache" / "demo_model.pth"),
                        help="the demo checkpoint (default: %(default)s; build it with Model_Training/demo.py)")
    parser.add_argument("--other-cxr", default=str(ROOT.parent / "shared" / "data" / "other-cxr"),
                        help="external chest X-rays (default: %(default)s)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "demo_scope.md"),
                        help="markdown table of the figures (default: %(default)s)")
    return parser


def main(args: argparse.Namespace) -> int:
    warnings.simplefilter("ignore")
    predictor = Predictor.from_checkpoint(args.checkpoint, device="cpu")
    sets = {
        "scikit-image photos": (photos(), False),
        "pydicom CT/MR files": (dicom_files(), False),
        "generated images": (generated(), False),
        f"external chest X-rays ({Path(args.other_cxr).name})": (folder(Path(args.other_cxr)), True),
        "bundled samples/other-cxr": (folder(ROOT / "samples" / "other-cxr"), True),
    }
    lines = ["| images | kind | count | readable | accepted as in scope | positive calls |",
             "|---|---|---|---|---|---|"]
    for name, (images, chest) in sets.items():
        s = score(predictor, images)
        share = f"{s['accepted']}/{s['readable']} ({100 * s['accepted'] / max(s['readable'], 1):.0f} %)"
        lines.append(f"| {name} | {'chest X-ray' if chest else 'not a chest X-ray'} | {s['n']} | {s['readable']} | "
                     f"{share} | {s['positives']} |")
    card = predictor.model_card()
    lines.append("")
    lines.append(f"Model: {card['arch']} at {card['image_size']} px, demo {card['training'].get('demo')}; scope "
                 f"{card['scope']['method'] if card['scope'] else None}, limit "
                 f"{card['scope']['limit'] if card['scope'] else None}; validated labels: "
                 f"{sum(bool(v) for v in predictor.validated.values())}/{len(predictor.labels)}")
    write_report(lines, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(get_args_parser().parse_args()))
