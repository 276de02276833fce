"""The one path from an image to a stored result, for the web app (upload, batch, API) and the DICOM node.

`analyse_and_store` predicts, saves the result in the ResultStore and records the analysis in the results database
(when a monitor is given): an upload's bytes, or a DICOM data set the node has already parsed (its header and
image, so the file is never read twice). The callers only map its errors to their own answers (HTTP codes, DICOM
statuses).
"""
from __future__ import annotations

import time
from collections.abc import Collection
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np

from chestxray.predictor import Prediction, Predictor
from chestxray.results import ResultStore

if TYPE_CHECKING:
    from pydicom.dataset import Dataset


class Monitor(Protocol):
    """What the service records through (chestxray.web.monitoring.Monitor): one row per analysis."""

    def answered(self, prediction, source: str, started: float, data, result_id: str | None,
                 predictor=None) -> None: ...

    def refused(self, source: str, started: float, exc: BaseException) -> None: ...


@dataclass(frozen=True)
class ParsedDicom:
    """A DICOM data set read once (chestxray.imaging.read_dicom): its header without pixel data, and its image."""

    header: Dataset
    image: np.ndarray  # (H, W) float32 in [0, 1]


class ResultNotSaved(OSError):
    """The result could not be written to the ResultStore (errno and strerror are the write's)."""


@dataclass(frozen=True)
class Stored:
    """An analysis that was saved: the Prediction and the ResultStore's record (record["id"] is the result id)."""

    prediction: Prediction
    record: dict


def analyse_and_store(predictor: Predictor, results: ResultStore, image: bytes | ParsedDicom, *, source: str,
                      channel: str, filename: str = "", monitor: Monitor | None = None,
                      protect: Collection[str] = ()) -> Stored:
    """Predict one image, save its result under the retention `source`, record it on `monitor` as `channel`.

    image: an upload's bytes (the format sniffed from the content; `filename`'s suffix only tells an unsupported
    file from a broken image), or a ParsedDicom. protect: result ids that pruning must spare (the rest of the
    caller's batch). Raises what Predictor.predict raises (InvalidImage, UnsupportedFormat, ...), recorded as a
    refusal first; ResultNotSaved (an OSError) when the result cannot be written (not recorded: the caller answers
    it as its own failure).
    """
    started = time.perf_counter()
    try:
        if isinstance(image, ParsedDicom):
            prediction = predictor.predict_batch([image.image], formats=["DICOM"])[0]
        else:
            prediction = predictor.predict(image, filename=filename)
    except Exception as exc:
        if monitor is not None:
            monitor.refused(channel, started, exc)
        raise
    try:
        record = results.save(prediction, source=source, protect=protect)
    except OSError as exc:
        raise ResultNotSaved(exc.errno, exc.strerror or type(exc).__name__, exc.filename) from exc
    if monitor is not None:
        # The image's technical facts (bit depth, photometric) come from the header already read, or the bytes.
        facts_from = image.header if isinstance(image, ParsedDicom) else image
        monitor.answered(prediction, channel, started, facts_from, record["id"])
    return Stored(prediction, record)
