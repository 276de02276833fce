"""Heatmap localization against NIH's boxes (BBox_List_2017.csv), as in Wang et al. 2017, Sec. 5.

For each boxed (image, label): the label's class activation map from the one-pass CAM (cam.predict_with_maps),
upsampled to the loaded image, min-max normalised to [0, 255]; boxes around the connected regions above 60 and
above 180 (both sets are candidates, as in the paper); the box is found at T(IoBB) when some candidate has
IoBB = area(candidate ∩ truth) / area(candidate) > T. The pointing game asks whether the heatmap's peak lies
in the box; a fixed guess at the image centre is its trivial baseline. NIH's coordinates are in the 1024 x 1024
original and are scaled to the size actually loaded.
"""
from __future__ import annotations

import csv
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy import ndimage

from .cam import upsample_map
from .checkpoint import Meta
from .imaging import read_xray
from .labels import LABELS
from .model import ChestXrayNet
from .predictor import Predictor

BOX_SPACE = 1024  # NIH boxes are given in the 1024 x 1024 original images
BBOX_LABEL_NAMES = {"Infiltrate": "Infiltration"}  # BBox_List_2017 spelling -> Data_Entry spelling
HEATMAP_THRESHOLDS = (60, 180)  # on the 0-255 heatmap (Wang et al. 2017)
IOBB_THRESHOLDS = (0.1, 0.25, 0.5, 0.75, 0.9)
BBOX_COLUMNS = ["image", "label", "x", "y", "w", "h"]


class BBoxError(ValueError):
    """A bounding-box file that cannot be read; the message names the file, row and problem."""


@dataclass(frozen=True)
class Box:
    """Axis-aligned box in pixel coordinates: x, y of the top-left corner, width w, height h (edges, not centres)."""

    x: float
    y: float
    w: float
    h: float

    @property
    def area(self) -> float:
        """w * h (0 for a degenerate box)."""
        return max(self.w, 0.0) * max(self.h, 0.0)

    def intersection(self, other: Box) -> float:
        """Area of the overlap with `other` (0 when disjoint)."""
        dx = min(self.x + self.w, other.x + other.w) - max(self.x, other.x)
        dy = min(self.y + self.h, other.y + other.h) - max(self.y, other.y)
        return max(dx, 0.0) * max(dy, 0.0)

    def contains(self, px: float, py: float) -> bool:
        """Is the point inside the box (edges included)?"""
        return self.x <= px <= self.x + self.w and self.y <= py <= self.y + self.h

    def scaled(self, sx: float, sy: float) -> Box:
        """The box in an image resized by factors sx (width) and sy (height)."""
        return Box(self.x * sx, self.y * sy, self.w * sx, self.h * sy)


def read_bbox_csv(path: str | os.PathLike) -> pd.DataFrame:
    """Read NIH's BBox_List_2017.csv -> DataFrame[image, label, x, y, w, h] (1024-px space, labels as in LABELS).

    The header is `Image Index,Finding Label,Bbox [x,y,w,h],,,` (its brackets split into several fields), so the
    file is read positionally: the first six fields of each row. "Infiltrate" becomes "Infiltration".
    Raises BBoxError for a missing file, a short row, a non-numeric or non-positive size, or an unknown label.
    """
    path = Path(path)
    if not path.is_file():
        raise BBoxError(f"bounding-box file not found: {path}")
    rows = []
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if not header or header[0].strip() != "Image Index":
            raise BBoxError(f"{path}: expected NIH's header 'Image Index,Finding Label,Bbox [x,y,w,h]', got {header}")
        for line, row in enumerate(reader, start=2):
            if not any(cell.strip() for cell in row):
                continue
            if len(row) < 6:
                raise BBoxError(f"{path} line {line}: expected image, label, x, y, w, h; got {row}")
            image, label = row[0].strip(), row[1].strip()
            label = BBOX_LABEL_NAMES.get(label, label)
            if label not in LABELS:
                raise BBoxError(f"{path} line {line}: unknown label {row[1]!r}; known labels are {list(LABELS)}")
            try:
                x, y, w, h = (float(v) for v in row[2:6])
            except ValueError:
                raise BBoxError(f"{path} line {line}: box values {row[2:6]} are not numbers") from None
            if not all(math.isfinite(v) for v in (x, y, w, h)) or w <= 0 or h <= 0:
                raise BBoxError(f"{path} line {line}: box {row[2:6]} must be finite with positive width and height")
            rows.append((image, label, x, y, w, h))
    return pd.DataFrame(rows, columns=BBOX_COLUMNS)


def normalize_heatmap_255(cam: np.ndarray) -> np.ndarray:
    """Min-max normalise a map to [0, 255] float32 (Wang et al.); a constant map becomes all zeros."""
    m = np.asarray(cam, dtype=np.float32)
    lo, hi = float(m.min()), float(m.max())
    if not hi > lo:
        return np.zeros_like(m)
    return (m - lo) / (hi - lo) * 255.0


def heatmap_boxes(heat255: np.ndarray, threshold: float) -> list[Box]:
    """Boxes around the 8-connected regions of heat255 > threshold, in pixel edges (a lone pixel (r, c) is
    Box(c, r, 1, 1)); ordered by scipy.ndimage.label."""
    structure = np.ones((3, 3), dtype=bool)
    regions, _ = ndimage.label(np.asarray(heat255) > threshold, structure=structure)
    boxes = []
    for rows, cols in ndimage.find_objects(regions):
        boxes.append(Box(float(cols.start), float(rows.start), float(cols.stop - cols.start),
                         float(rows.stop - rows.start)))
    return boxes


def iobb(candidate: Box, truth: Box) -> float:
    """Intersection over the detected box: area(candidate ∩ truth) / area(candidate), in [0, 1]."""
    return candidate.intersection(truth) / candidate.area if candidate.area > 0 else 0.0


def peak_point(heatmap: np.ndarray) -> tuple[float, float]:
    """(x, y) centre of the heatmap's highest pixel (the first one on ties), in pixel coordinates."""
    row, col = np.unravel_index(int(np.argmax(heatmap)), np.shape(heatmap))
    return float(col) + 0.5, float(row) + 0.5


def localize(heatmap: np.ndarray, truth: Box) -> dict:
    """Score one heatmap (H, W) (any range; already at the image's size) against one true box (same pixel space).

    Returns {"iobb": best IoBB over the candidates of all HEATMAP_THRESHOLDS, "iobb_<t>": best per threshold,
    "candidates": number of candidate boxes, "pointing": peak in box, "centre": image centre in box}.
    """
    heat = normalize_heatmap_255(heatmap)
    out: dict = {}
    best, count = 0.0, 0
    for t in HEATMAP_THRESHOLDS:
        boxes = heatmap_boxes(heat, t)
        value = max((iobb(b, truth) for b in boxes), default=0.0)
        out[f"iobb_{t}"] = value
        best, count = max(best, value), count + len(boxes)
    h, w = np.shape(heatmap)
    out.update({"iobb": best, "candidates": count, "pointing": truth.contains(*peak_point(heatmap)),
                "centre": truth.contains(w / 2.0, h / 2.0)})
    return out


def evaluate_localization(
    model: ChestXrayNet,
    meta: Meta,
    boxes: pd.DataFrame,
    image_paths: Mapping[str, str | os.PathLike],
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> pd.DataFrame:
    """Score every box whose image is in image_paths and whose label the model has -> one row per box:
    image, label, x, y, w, h (1024 space), width, height (loaded), iobb, iobb_60, iobb_180, candidates,
    pointing, centre. Images are read with read_xray; the maps come from Predictor.predict (its preprocessing)."""
    predictor = Predictor(model, meta, device)
    index = {name: j for j, name in enumerate(meta.labels)}
    todo = boxes[boxes["image"].isin(list(image_paths)) & boxes["label"].isin(list(index))]
    groups = list(todo.groupby("image", sort=True))
    records = []
    for image, rows in _progress(groups, progress, desc="localization"):
        array = read_xray(image_paths[image])
        height, width = array.shape
        maps = predictor.predict(array, heatmaps=True).heatmaps
        for row in rows.itertuples(index=False):
            truth = Box(row.x, row.y, row.w, row.h).scaled(width / BOX_SPACE, height / BOX_SPACE)
            heatmap = upsample_map(maps[index[row.label]], height, width)
            records.append({**row._asdict(), "width": width, "height": height, **localize(heatmap, truth)})
    columns = [*BBOX_COLUMNS, "width", "height", "iobb", *(f"iobb_{t}" for t in HEATMAP_THRESHOLDS),
               "candidates", "pointing", "centre"]
    return pd.DataFrame(records, columns=columns)


def _progress(items: Sequence, enabled: bool, desc: str) -> Iterable:
    if not enabled:
        return items
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit="img")


def _scores(results: pd.DataFrame) -> dict:
    n = len(results)
    if n == 0:
        return {"boxes": 0, "accuracy": {str(t): None for t in IOBB_THRESHOLDS}, "pointing_game": None,
                "centre_baseline": None}
    return {
        "boxes": int(n),
        "accuracy": {str(t): float((results["iobb"] > t).mean()) for t in IOBB_THRESHOLDS},
        "pointing_game": float(results["pointing"].mean()),
        "centre_baseline": float(results["centre"].mean()),
    }


def localization_summary(results: pd.DataFrame, boxes: pd.DataFrame, labels: Sequence[str]) -> dict:
    """Per-label and overall accuracy at each T(IoBB), pointing game and centre baseline, as plain data.

    `boxes` is the whole bbox file (for the counts of what was and was not evaluated); labels: the model's labels.
    Labels without an evaluated box get None scores.
    """
    box_labels = [name for name in labels if name in set(boxes["label"])]
    return {
        "boxes_in_file": int(len(boxes)),
        "images_in_file": int(boxes["image"].nunique()),
        "boxes_evaluated": int(len(results)),
        "images_evaluated": int(results["image"].nunique()) if len(results) else 0,
        "boxes_not_evaluated": int(len(boxes) - len(results)),  # image not under the data dir, or label not in model
        "labels_not_in_model": sorted(set(boxes["label"]) - set(labels)),
        "heatmap_thresholds": list(HEATMAP_THRESHOLDS),
        "iobb_thresholds": list(IOBB_THRESHOLDS),
        "overall": _scores(results),
        "per_label": {name: _scores(results[results["label"] == name]) for name in box_labels},
    }
