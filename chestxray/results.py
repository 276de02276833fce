"""Saved results on disk: RESULTS_DIR/<random id>/ with image.png, heatmaps.npy, result.json, heatmap/<label>.png.

No Flask here: the web views call ResultStore and map ResultNotFound to 404. A result folder is written whole
(temporary folder + rename), so a reader never sees half a result; the newest `retention` results are kept, but
never one younger than `min_age` or from the saving request's own batch, and the source holding the most results
loses its oldest first (so one client cannot flush another's results).
Each heatmap PNG is rendered on first view from the saved raw maps. The upload itself, its file name and any DICOM
header are never written: result.json holds Prediction.to_dict() plus the id, the time and the display size.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Collection
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from PIL import Image

from .calls import ranked_labels
from .cam import heatmap_image, shared_peak
from .fileio import atomic_write, write_json
from .predictor import Prediction

RESULT_ID = re.compile(r"[0-9a-f]{32}")
DISPLAY_MAX_SIDE = 768  # the saved plain image; the original upload is not kept
HEATMAP_MAX_SIDE = 512  # heat layers are smooth (bilinear from a 2..32 px map); the browser scales them up
PNG_COMPRESS_LEVEL = 1  # level 6 costs ~4x the time for ~25% smaller files; speed wins (the page waits on it)
TMP_PREFIX = ".tmp-"
HEATMAP_SCALES = ("own", "shared")  # each map to its own peak, or one scale for all labels (raw CAM units)
STALE_TMP_SECONDS = 3600


class ResultNotFound(LookupError):
    """A malformed, unknown or expired result id, or a label its model does not have; the message says which."""


def display_image(image: np.ndarray) -> Image.Image:
    """(H, W) float image in [0, 1] -> 8-bit grayscale PIL image, longest side at most DISPLAY_MAX_SIDE."""
    im = Image.fromarray(np.round(np.clip(image, 0.0, 1.0) * 255).astype(np.uint8), mode="L")
    scale = DISPLAY_MAX_SIDE / max(im.size)
    if scale < 1:
        im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.Resampling.LANCZOS)
    return im


def heatmap_size(display_size: list[int]) -> tuple[int, int]:
    """(width, height) of a heat layer: the plain image's aspect ratio, longest side at most HEATMAP_MAX_SIDE."""
    width, height = display_size
    scale = min(1.0, HEATMAP_MAX_SIDE / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def label_names(record: dict) -> list[str]:
    """The result's labels in model order."""
    return [row["label"] for row in record["labels"]]


def ranked(record: dict) -> list[dict]:
    """The result's label rows ({label, probability, threshold, positive, ...}): called findings first, then the
    rest, each most probable first."""
    rows = {row["label"]: row for row in record["labels"]}
    order = ranked_labels({label: row["probability"] for label, row in rows.items()},
                          {label for label, row in rows.items() if row["positive"]})
    return [rows[label] for label in order]


def default_label(record: dict) -> str:
    """The label whose heatmap is shown first: the most probable positive call, else the most probable label."""
    rows = ranked(record)
    return next((row["label"] for row in rows if row["positive"]), rows[0]["label"])


class ResultStore:
    """The results folder. Thread- and process-safe by construction: whole-folder renames and atomic file writes."""

    def __init__(self, folder: str | os.PathLike, retention: int, min_age: float = 0.0) -> None:
        if int(retention) < 1:
            raise ValueError(f"retention must be at least 1, got {retention}")
        self.folder = Path(folder)
        self.retention = int(retention)
        self.min_age = float(min_age)  # seconds a result is kept whatever the retention
        # Called with the id before a delete() removes the folder (the results database deletes its row), so a
        # failure there leaves the result whole. Retention's pruning does not call it: rows outlive their files.
        self.on_delete: Callable[[str], object] | None = None
        self.folder.mkdir(parents=True, exist_ok=True)

    def save(self, prediction: Prediction, source: str = "", protect: Collection[str] = ()) -> dict:
        """Write <new random id>/ whole (temp folder + rename), then prune (sparing it and `protect`); returns
        result.json's record. `source` (an opaque client key) is what retention counts per.

        The prediction must carry heatmaps. Raises OSError when the folder cannot be written (nothing is left).
        """
        if prediction.heatmaps is None:
            raise ValueError("a saved result needs the prediction's heatmaps (predict with heatmaps=True)")
        image = display_image(prediction.image)
        record = {
            "id": secrets.token_hex(16),
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            **prediction.to_dict(),
            "display_size": [image.width, image.height],  # image.png; the model's input size is model.image_size
            "source": source,
        }
        tmp = Path(tempfile.mkdtemp(prefix=TMP_PREFIX, dir=self.folder))
        try:
            image.save(tmp / "image.png", compress_level=PNG_COMPRESS_LEVEL)
            np.save(tmp / "heatmaps.npy", np.asarray(prediction.heatmaps, dtype=np.float32))
            (tmp / "heatmap").mkdir()
            write_json(tmp / "result.json", record)
            # Every heat layer, the one shown first included, is drawn when it is first asked for (then kept):
            # an API client, the batch scorer or the DICOM node never views them, and drawing one (colour map, PNG
            # of the display size) cost about a third of a small model's whole analysis.
            os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
            os.rename(tmp, self.folder / record["id"])
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self.prune(protect={*protect, record["id"]})
        return record

    def load(self, rid: str) -> dict:
        """result.json of a saved result. Raises ResultNotFound for a malformed, unknown or expired id."""
        try:
            record = json.loads((self._folder(rid) / "result.json").read_text())
        except FileNotFoundError:
            raise self._expired() from None
        if "display_size" not in record:  # saved by a version before Prediction.to_dict: its pages cannot be drawn
            raise ResultNotFound("This result was saved by an older version of the app and can no longer be shown.")
        return record

    def image_path(self, rid: str) -> Path:
        """The saved plain image (image.png). Raises ResultNotFound."""
        path = self._folder(rid) / "image.png"
        if not path.is_file():
            raise self._expired()
        return path

    def heatmaps_path(self, rid: str) -> Path:
        """The raw class activation maps (heatmaps.npy: float32 (L, h, w) in label order). Raises ResultNotFound."""
        path = self._folder(rid) / "heatmaps.npy"
        if not path.is_file():
            raise self._expired()
        return path

    def delete(self, rid: str) -> None:
        """Remove a result now (image, maps, record). Raises ResultNotFound for an unknown or already deleted id."""
        folder = self._folder(rid)
        if not folder.is_dir():
            raise self._expired()
        if self.on_delete is not None:
            self.on_delete(rid)
        doomed = self.folder / f"{TMP_PREFIX}deleted-{rid}"
        try:
            os.rename(folder, doomed)  # gone for readers at once; two deletes cannot both succeed
        except FileNotFoundError:
            raise self._expired() from None
        shutil.rmtree(doomed, ignore_errors=True)

    def heatmap_path(self, rid: str, label: str, scale: str = "own") -> Path:
        """heatmap/<label>.png (scale "own": the map's own peak) or <label>.shared.png (one scale for all labels),
        rendered now if not yet made. Raises ResultNotFound (also for an unknown label or scale)."""
        record = self.load(rid)
        if label not in label_names(record):
            raise ResultNotFound(f"This model has no label {label!r}.")
        if scale not in HEATMAP_SCALES:
            raise ResultNotFound(f"Unknown heatmap scale {scale!r}; use one of {list(HEATMAP_SCALES)}.")
        try:
            return _render_heatmap(self._folder(rid), record, label, scale)
        except FileNotFoundError:  # removed by retention while rendering
            raise ResultNotFound("This result has expired.") from None

    def prune(self, protect: Collection[str] = ()) -> list[str]:
        """Delete results beyond `retention`, and stale temp folders; returns the deleted ids.

        Never deletes a result in `protect` or younger than `min_age`, so the count may exceed `retention` for a
        while: otherwise a batch of 20 with retention 5 expires 15 of its own results before its page shows them.
        Among the others, the source holding the most results loses its oldest first.
        """
        results, now = [], time.time()
        for entry in os.scandir(self.folder):
            try:
                if entry.name.startswith(TMP_PREFIX):
                    if now - entry.stat().st_mtime > STALE_TMP_SECONDS:  # left by a crash mid-write
                        shutil.rmtree(entry.path, ignore_errors=True)
                elif RESULT_ID.fullmatch(entry.name):
                    path = os.path.join(entry.path, "result.json")
                    results.append((os.stat(path).st_mtime, entry.name, _source_of(path)))
            except FileNotFoundError:  # removed meanwhile by a concurrent request
                continue
        excess = len(results) - self.retention
        count: dict[str, int] = defaultdict(int)
        candidates: dict[str, list[tuple[float, str]]] = defaultdict(list)
        for mtime, name, source in results:
            count[source] += 1
            if name not in protect and now - mtime >= self.min_age:
                candidates[source].append((mtime, name))
        for group in candidates.values():
            group.sort(reverse=True)  # oldest last, popped first
        removed = []
        while excess > 0 and any(candidates.values()):
            source = max((s for s, group in candidates.items() if group),
                         key=lambda s: (count[s], -candidates[s][-1][0]))
            name = candidates[source].pop()[1]
            shutil.rmtree(self.folder / name, ignore_errors=True)
            removed.append(name)
            count[source] -= 1
            excess -= 1
        return removed

    def _folder(self, rid: str) -> Path:
        if not RESULT_ID.fullmatch(rid):  # never build a path from anything but 32 hex digits
            raise self._expired()
        return self.folder / rid

    def _expired(self) -> ResultNotFound:
        return ResultNotFound(f"This result does not exist or has expired (only the newest {self.retention} "
                              "results are kept).")


def _source_of(result_json: str) -> str:
    try:
        with open(result_json) as f:
            return str(json.load(f).get("source", ""))
    except (OSError, ValueError):
        return ""


def _render_heatmap(folder: Path, record: dict, label: str, scale: str = "own") -> Path:
    """heatmap/<label>[.shared].png from the saved raw maps (RGBA, opacity following the heat); kept once made."""
    target = folder / "heatmap" / (f"{label}.png" if scale == "own" else f"{label}.{scale}.png")
    if target.is_file():
        return target
    maps = np.load(folder / "heatmaps.npy")
    width, height = heatmap_size(record["display_size"])
    peak = shared_peak(maps) if scale == "shared" else None
    layer = heatmap_image(maps[label_names(record).index(label)], height, width, peak=peak)
    # Two requests rendering the same label both write whole files; the last rename wins.
    atomic_write(target, lambda f: layer.save(f, format="PNG", compress_level=PNG_COMPRESS_LEVEL))
    if not (folder / "result.json").is_file():  # pruned meanwhile: atomic_write re-made heatmap/; leave no orphan
        shutil.rmtree(folder, ignore_errors=True)
        raise FileNotFoundError(folder)
    return target
