"""Inference: load a checkpoint once, predict one image -> probabilities, positive calls and all-label heatmaps.

Command line:
    python predictions.py PATH [PATH ...] --checkpoint CKPT [--out DIR] [--heatmaps all|positive|none]
prints one JSON object per image on its own line; exit code 1 if any image failed.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from chestxray.cam import overlay, predict_with_maps
from chestxray.checkpoint import DEFAULT_CHECKPOINT, CheckpointError, Meta, load_checkpoint
from chestxray.device import resolve_device
from chestxray.imaging import IMAGE_SUFFIXES, InvalidImage, Source, read_xray
from chestxray.model import ChestXrayNet
from chestxray.transforms import build_normalize, build_transform

TRAIN_COMMAND = "python Model_Training/train.py --data-dir /path/to/nih --output chestxray_model_resnet50.pth"


@dataclass
class Prediction:
    """One image's result. heatmaps: raw class activation maps (L, h, w), in `labels` order."""

    labels: tuple[str, ...]
    probabilities: dict[str, float]
    positive: list[str]
    thresholds: dict[str, float]
    image: np.ndarray = field(repr=False)  # (H, W) float32 in [0, 1], as read
    heatmaps: np.ndarray | None = field(default=None, repr=False)

    def ranked(self) -> list[str]:
        """Labels sorted by probability, highest first."""
        return sorted(self.labels, key=lambda name: -self.probabilities[name])

    def overlay(self, label: str, alpha: float = 0.45):
        """The heatmap of `label` blended over the X-ray, as an RGB PIL image of the original size."""
        if self.heatmaps is None:
            raise ValueError("this prediction was made without heatmaps")
        if label not in self.labels:
            raise KeyError(f"unknown label {label!r}; this model's labels are {list(self.labels)}")
        return overlay(self.image, self.heatmaps[self.labels.index(label)], alpha=alpha)


class Predictor:
    """A loaded model with its preprocessing. Stateless per call, so one instance serves many threads."""

    def __init__(self, model: ChestXrayNet, meta: Meta, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.meta = meta
        self.labels = meta.labels
        self.model = model.to(self.device).eval()
        self.transform = build_transform(meta, train=False)
        self.normalize = build_normalize(meta)
        self.thresholds = np.asarray(meta.thresholds, dtype=np.float64)

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, device: str = "auto") -> Predictor:
        """Load once (CUDA when available for 'auto'). Raises CheckpointError for a bad file."""
        dev = resolve_device(device)
        model, meta, _ = load_checkpoint(path, map_location="cpu")
        return cls(model, meta, dev)

    def preprocess(self, image: np.ndarray) -> torch.Tensor:
        """(H, W) image in [0, 1] -> (1, 3, S, S) tensor on the model's device, as in training."""
        return self.normalize(self.transform(image).unsqueeze(0).to(self.device))

    def predict(self, image: Source | np.ndarray, heatmaps: bool = True) -> Prediction:
        """Path/bytes/array -> Prediction. One forward pass gives probabilities and every label's heatmap.

        Raises InvalidImage for unreadable input.
        """
        array = image if isinstance(image, np.ndarray) else read_xray(image)
        x = self.preprocess(array)
        with torch.inference_mode():
            if heatmaps:
                logits, maps = predict_with_maps(self.model, x)
                maps = maps[0].float().cpu().numpy()
            else:
                logits, maps = self.model(x), None
            probs = torch.sigmoid(logits.float())[0].cpu().numpy().astype(np.float64)
        return Prediction(
            labels=self.labels,
            probabilities={name: float(p) for name, p in zip(self.labels, probs)},
            positive=[name for name, p, t in zip(self.labels, probs, self.thresholds) if p >= t],
            thresholds={name: float(t) for name, t in zip(self.labels, self.thresholds)},
            image=array,
            heatmaps=maps,
        )

    def model_card(self) -> dict:
        """Plain-data description of the loaded model (arch, input, labels, thresholds, training summary)."""
        return {
            "arch": self.meta.arch,
            "image_size": self.meta.image_size,
            "labels": list(self.labels),
            "thresholds": dict(zip(self.labels, map(float, self.thresholds))),
            "lse_r": self.meta.lse_r,
            "training": self.meta.training,
            "device": str(self.device),
        }


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
    parser.add_argument("--max-file-mb", type=float, default=50,
                        help="largest image file read, per image, as the web app's upload limit; larger ones get an "
                             "error line (default: %(default)s)")
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
        record: dict = {"image": str(path)}
        try:
            want_maps = out is not None and args.heatmaps != "none"
            # The same limits as the web app, per image: the file size here, the pixel budgets in read_xray.
            image = read_xray(path, max_bytes=int(args.max_file_mb * 2**20))
            pred = predictor.predict(image, heatmaps=want_maps)
            record["probabilities"] = {k: round(v, 6) for k, v in pred.probabilities.items()}
            record["positive"] = pred.positive
            if want_maps:
                chosen = pred.labels if args.heatmaps == "all" else pred.positive
                folder = _heatmap_dir(out, path, used)
                folder.mkdir(parents=True, exist_ok=True)
                record["heatmaps"] = {}
                for label in chosen:
                    target = folder / f"{label}.png"
                    pred.overlay(label).save(target)
                    record["heatmaps"][label] = str(target)
        except InvalidImage as exc:
            failed += 1
            record = {"image": str(path), "error": str(exc)}
        print(json.dumps(record), flush=True)
        if progress is not None:
            progress.update(1)
    if progress is not None:
        progress.close()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
