"""Benchmark: the in-scope check's accept rate on real chest X-rays and reject rate on other images; calibration.

    python Model_Training/train.py --data-dir ../shared/data/nih --image-size 64 --epochs 2 --no-pretrained \
        --device cpu --output /tmp/x.pth                                   # docs/TRAINING.md's smoke run
    python Model_Training/fit_trust.py --checkpoint /tmp/x.pth --data-dir ../shared/data/nih
    python benchmarks/bench_scope.py --checkpoint /tmp/x.pth --data-dir ../shared/data/nih

Real chest X-rays the fit never saw: the checkpoint's validation split (its limit is chosen on these, so a 2-fold
cross-check is reported too: limit from one half, accept rate on the other) and every file in
../shared/data/other-cxr. Not chest X-rays: scikit-image's bundled sample images, pydicom's bundled test DICOMs
(CT, MR, RT dose, secondary captures; identical pixel data counted once), and generated noise, flat, gradient and
text-screenshot images. Every image goes through the product's own reader (imaging.read_xray) and preprocessing.
Each scope method in --methods is fitted on the training split's features here, side by side.
Writes benchmarks/results/scope.md and benchmarks/results/calibration.md.
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import io
import platform
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch.utils.data import DataLoader

from chestxray.checkpoint import load_checkpoint, safe_torch_load
from chestxray.data import XrayDataset, collate_batch
from chestxray.fitting import training_splits
from chestxray.imaging import InvalidImage, read_xray
from chestxray.transforms import build_normalize, build_transform
from chestxray.trust.scope import IMAGE_STATS, METHODS, collect_outputs, fit_scope, image_statistics, pooled_features

ROOT = Path(__file__).resolve().parents[1]
OTHER_CXR = ROOT.parent / "shared" / "data" / "other-cxr"


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--checkpoint", required=True, help="a checkpoint fitted with Model_Training/fit_trust.py")
    add("--data-dir", required=True, help="the NIH folder it was trained on")
    add("--methods", default=",".join(METHODS), help="scope methods to compare (default: %(default)s)")
    add("--percentile", type=float, default=99.0, help="limit percentile of validation scores (default: 99)")
    add("--command", default="", help="the training command, quoted in the results")
    add("--out", default=str(ROOT / "benchmarks" / "results" / "scope.md"), help="scope table (markdown)")
    add("--calibration-out", default=str(ROOT / "benchmarks" / "results" / "calibration.md"),
        help="ECE/Brier table (markdown)")
    return parser


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _u8(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype == bool:
        return (a * 255).astype(np.uint8)
    if a.dtype != np.uint8:
        a = (a - a.min()) / max(float(a.max() - a.min()), 1e-12) * 255
    return a.astype(np.uint8)


def skimage_images() -> list[tuple[str, bytes]]:
    """scikit-image's bundled images (those that need no download), as PNG bytes; faces upscaled to 100 px."""
    import skimage.data as data

    out = []
    for name in ("astronaut", "binary_blobs", "brick", "camera", "cat", "cell", "checkerboard", "chelsea", "clock",
                 "coffee", "coins", "colorwheel", "grass", "gravel", "horse", "hubble_deep_field",
                 "immunohistochemistry", "logo", "microaneurysms", "moon", "page", "retina", "rocket",
                 "shepp_logan_phantom", "text"):
        out.append((f"skimage:{name}", _png(_u8(getattr(data, name)()))))
    left, right, _ = data.stereo_motorcycle()
    out.append(("skimage:stereo_motorcycle", _png(_u8(left))))
    # lfw_subset: 25x25 face crops, below the reader's 32 px minimum; upscaled so they reach the model.
    for i, face in enumerate(data.lfw_subset()[:20]):
        big = Image.fromarray(_u8(face)).resize((100, 100), Image.BILINEAR)
        out.append((f"skimage:face{i:02d}", _png(np.asarray(big))))
    return out


def pydicom_images() -> list[tuple[str, bytes]]:
    """pydicom's bundled test DICOMs that the product's reader can read; identical pixel data once."""
    import pydicom.data

    folder = Path(pydicom.data.__file__).parent / "test_files"
    out, seen = [], set()
    for path in sorted(folder.glob("*.dcm")):
        data = path.read_bytes()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                image = read_xray(data)
        except InvalidImage:
            continue
        key = hashlib.md5(np.round(image * 255).astype(np.uint8).tobytes()).hexdigest()
        if key in seen:
            continue
        seen.add(key)
        out.append((f"pydicom:{path.name}", data))
    return out


def generated_images(seed: int = 0) -> list[tuple[str, bytes]]:
    """Noise, flat, gradient and text-screenshot images, as PNG bytes."""
    rng = np.random.default_rng(seed)
    s = 512
    yy, xx = np.mgrid[0:s, 0:s] / (s - 1)
    imgs = {
        "uniform-noise": rng.integers(0, 256, (s, s)),
        "gaussian-noise": np.clip(rng.normal(128, 40, (s, s)), 0, 255),
        "colour-noise": rng.integers(0, 256, (s, s, 3)),
        "noise-40px": rng.integers(0, 256, (40, 40)),
        "flat-black": np.zeros((s, s)),
        "flat-white": np.full((s, s), 255),
        "flat-gray": np.full((s, s), 128),
        "flat-red": np.tile(np.array([255, 0, 0]), (s, s, 1)),
        "gradient-horizontal": xx * 255,
        "gradient-vertical": yy * 255,
        "gradient-radial": np.clip(255 * (1 - np.hypot(xx - 0.5, yy - 0.5) * 1.4), 0, 255),
        "gradient-diagonal": (xx + yy) / 2 * 255,
    }
    out = [(f"generated:{k}", _png(np.asarray(v).astype(np.uint8))) for k, v in imgs.items()]
    font = ImageFont.load_default()
    text = ("Lorem ipsum dolor sit amet, consectetur adipiscing elit. Patient report: chest radiograph, PA view, "
            "no acute findings. def main(args): return 0  # screenshot of text").split()
    for i, (bg, fg, size) in enumerate([(255, 0, (800, 600)), (0, 255, (800, 600)), (240, 30, (1024, 768)),
                                        (30, 220, (600, 900))]):
        im = Image.new("L", size, bg)
        draw = ImageDraw.Draw(im)
        for row in range(0, size[1] - 12, 14):
            words = rng.choice(text, size=12)
            draw.text((8, row), " ".join(words), fill=fg, font=font)
        out.append((f"generated:text-screenshot-{i}", _png(np.asarray(im))))
    return out


def real_other_cxr() -> list[tuple[str, bytes]]:
    return [(f"other-cxr:{p.name}", p.read_bytes()) for p in sorted(OTHER_CXR.iterdir())
            if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".dcm")]


@torch.inference_mode()
def features_of(model, meta, items: list[tuple[str, bytes]]) -> tuple[list[str], np.ndarray, np.ndarray, list[str]]:
    """Read each image with the product's reader and preprocess -> (names, pooled (N, C), image statistics
    (N, IMAGE_STATS), unreadable names)."""
    tf, normalize = build_transform(meta), build_normalize(meta)
    names, feats, stats, bad = [], [], [], []
    for name, data in items:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                image = read_xray(data)
        except InvalidImage:
            bad.append(name)
            continue
        x = normalize(tf(image).unsqueeze(0))
        feats.append(pooled_features(model.features(x))[0].numpy())
        stats.append(image_statistics(x, meta.mean[0], meta.std[0])[0].numpy())
        names.append(name)
    if not feats:
        return names, np.zeros((0, model.classifier.in_features)), np.zeros((0, IMAGE_STATS)), bad
    return names, np.stack(feats), np.stack(stats), bad


def write_calibration(out: str, report: dict, labels, stamp: str) -> None:
    """The ECE/Brier before/after table of a fitted checkpoint's validation report -> markdown file."""
    before, after = report["before"], report["after"]
    cal = ["## Calibration on the validation split: ECE (10 bins) and Brier per label, before / after Platt "
           "scaling", "", f"{stamp}. Platt parameters are fitted on this same split (in-sample).", "",
           "| label | positives | ECE before | ECE after | Brier before | Brier after |",
           "|---|---|---|---|---|---|"]
    for name in labels:
        b, a = before[name], after[name]
        cal.append(f"| {name} | {b['positives']} | {b['ece']:.3f} | {a['ece']:.3f} | {b['brier']:.3f} | "
                   f"{a['brier']:.3f} |")
    def mean(d, metric):
        return np.mean([d[name][metric] for name in labels])

    cal.append(f"| **mean** | | **{mean(before, 'ece'):.3f}** | **{mean(after, 'ece'):.3f}** | "
               f"**{mean(before, 'brier'):.3f}** | **{mean(after, 'brier'):.3f}** |")
    Path(out).write_text("\n".join(cal) + "\n")
    print("\n".join(cal))


def score_methods(args: argparse.Namespace, pooled: dict, thumbs: dict, feats: dict, images: dict,
                  names: dict) -> tuple[list[dict], dict]:
    """Fit each scope method on the training split; its limit, accept rates and misjudged images per set."""
    rng = np.random.default_rng(0)
    halves = np.array_split(rng.permutation(len(pooled["val"])), 2)
    rows, failures = [], {}
    for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
        stats = fit_scope(pooled["train"], method, thumbs["train"], pooled["val"], thumbs["val"], args.percentile)
        val_scores = stats.score(pooled["val"], thumbs["val"])
        stats = stats.with_limit(val_scores, args.percentile)
        # 2-fold: the limit from one half of validation, the accept rate on the other half.
        cross = [np.mean(val_scores[b] <= np.percentile(val_scores[a], args.percentile))
                 for a, b in (halves, halves[::-1])]
        row = {"method": method, "limit": stats.limit,
               "val": (int(stats.in_scope(val_scores).sum()), len(val_scores)),
               "val_cross": float(np.mean(cross))}
        for key in feats:
            ok = stats.in_scope(stats.score(feats[key], images[key])) if len(feats[key]) else np.zeros(0, bool)
            row[key] = (int(ok.sum()), len(ok))
            real = key.startswith("other-cxr")
            failures[(method, key)] = [n for n, a in zip(names[key], ok) if a != real]
        rows.append(row)
    return rows, failures


def write_scope_markdown(args: argparse.Namespace, stamp: str, rows: list[dict], accept: dict, reject: dict,
                         failures: dict, unreadable: dict) -> None:
    """Print and write the accept/reject table and the misjudged images to args.out."""
    lines = ["## In-scope check: accept rate on real chest X-rays, reject rate on other images", "",
             f"`python benchmarks/bench_scope.py --checkpoint CKPT --data-dir {args.data_dir}` {stamp}.",
             *([f"Model trained with `{args.command}`, then `Model_Training/fit_trust.py`."] if args.command else []),
             f"Limit = {args.percentile:g}th percentile of the validation split's scores; each method fitted on "
             "the training split's pooled transition features.", "",
             "| method | limit | validation accepted | validation accepted, 2-fold limit | other-cxr accepted | "
             "skimage rejected | pydicom rejected | generated rejected | **real accepted** | **others rejected** |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    def acc(r, key):
        a, n = r[key]
        return f"{a}/{n} ({a / n:.0%})" if n else "-"

    def rej(r, key):
        a, n = r[key]
        return f"{n - a}/{n} ({(n - a) / n:.0%})" if n else "-"

    for r in rows:

        lines.append(f"| {r['method']} | {r['limit']:.2f} | {acc(r, 'val')} | {r['val_cross']:.0%} | "
                     f"{acc(r, 'other-cxr (real, unseen)')} | {rej(r, 'scikit-image samples')} | "
                     f"{rej(r, 'pydicom test DICOMs')} | {rej(r, 'generated')} | **{accept[r['method']]:.1%}** | "
                     f"**{reject[r['method']]:.1%}** |")
    lines += ["", "Goal: >= 95 % of real chest X-rays accepted and >= 95 % of the others rejected.", ""]
    for (method, key), wrong in failures.items():
        if wrong:
            verb = "rejected" if key.startswith("other-cxr") else "accepted"
            lines.append(f"- {method}, {key}: {verb} {len(wrong)}: {', '.join(n.split(':', 1)[1] for n in wrong)}")
    for key, bad in unreadable.items():
        if bad:
            lines.append(f"- {key}: refused by the reader before the model (not counted): {', '.join(bad)}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main(args: argparse.Namespace) -> dict:
    model, meta, _ = load_checkpoint(args.checkpoint)
    report = (safe_torch_load(args.checkpoint).get("trust") or {}).get("report")  # calibration figures (fit_trust)
    splits = training_splits(meta, args.data_dir)
    tf, normalize = build_transform(meta), build_normalize(meta)
    pooled, thumbs = {}, {}
    for split in ("train", "val"):
        loader = DataLoader(XrayDataset(splits[split], meta.labels, tf, skip_unreadable=True), batch_size=32,
                            collate_fn=collate_batch)
        out = collect_outputs(model, loader, "cpu", normalize)
        pooled[split], thumbs[split] = out[1], out[4]
    sets = {"other-cxr (real, unseen)": real_other_cxr(), "scikit-image samples": skimage_images(),
            "pydicom test DICOMs": pydicom_images(), "generated": generated_images()}
    feats, images, names, unreadable = {}, {}, {}, {}
    for key, items in sets.items():
        names[key], feats[key], images[key], unreadable[key] = features_of(model, meta, items)

    rows, failures = score_methods(args, pooled, thumbs, feats, images, names)

    accept = {r["method"]: (r["val"][0] + r["other-cxr (real, unseen)"][0]) /
              (r["val"][1] + r["other-cxr (real, unseen)"][1]) for r in rows}
    reject = {}
    for r in rows:
        acc = sum(r[k][0] for k in sets if not k.startswith("other-cxr"))
        tot = sum(r[k][1] for k in sets if not k.startswith("other-cxr"))
        reject[r["method"]] = (tot - acc) / tot
    stamp = (f"on {platform.machine()} CPU, torch {torch.__version__}, {datetime.date.today()}; checkpoint: "
             f"{meta.arch} at {meta.image_size} px, validation mean AUROC {meta.training.get('val_mean_auroc')}, "
             f"{len(splits['train'])} train / {len(splits['val'])} val images")
    write_scope_markdown(args, stamp, rows, accept, reject, failures, unreadable)

    if report:
        write_calibration(args.calibration_out, report, meta.labels, stamp)
    return {"accept": accept, "reject": reject, "rows": rows}


if __name__ == "__main__":
    main(get_args_parser().parse_args())
