"""In-server batching: the images of concurrent requests gathered into one forward pass.

A server thread hands its decoded image to BatchingPredictor and waits; one worker thread takes the first image that
arrives, gathers the others that arrive within `max_wait` seconds (up to `max_batch` images), runs
Predictor.predict_batch on them once and hands each caller its own Prediction. Every image keeps its own heatmaps,
scope score and calls: predict_batch computes all of them per image, so a batched answer is what the image alone
gets (to float rounding of the batched kernels; tests/test_batching.py checks 1e-6). Decoding stays in the callers'
threads, where several run at once.

A failure of the batched pass is never shared: the images of a failed batch are retried one at a time, so each
caller gets its own answer or its own error.
"""
from __future__ import annotations

import collections
import queue
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

from .imaging import Source
from .predictor import Prediction, Predictor

MAX_BATCH = 8  # images in one forward pass at most, by default on CUDA
MAX_WAIT = 0.005  # seconds the worker waits for more images after the first of a batch


def serving(predictor: Predictor, max_batch: int | None = None) -> Predictor | BatchingPredictor:
    """The predictor a server shares between its threads: batching when max_batch > 1. None: MAX_BATCH on CUDA, where
    a batch costs little more than one image; on a CPU each image alone (BENCHMARKS.md, "In-server batching": 8 clients
    on 2 cores got 0.89-1.10x the throughput, as the cores are already busy with one image per analysis)."""
    if max_batch is None:  # ONNX Runtime's device is its session's (Predictor.device is "cpu" there: inputs)
        onnx = getattr(predictor, "onnx", None)
        device = onnx.device if onnx is not None else str(getattr(predictor, "device", "cpu"))
        max_batch = MAX_BATCH if device.startswith("cuda") else 1
    return BatchingPredictor(predictor, max_batch) if max_batch > 1 else predictor


@dataclass
class _Request:
    image: np.ndarray
    image_format: str | None
    heatmaps: bool
    answer: Future = field(default_factory=Future)


class BatchingPredictor:
    """A Predictor whose single-image calls from many threads share forward passes. Everything else (meta,
    model_card(), trust, ...) is the wrapped Predictor's."""

    def __init__(self, predictor: Predictor, max_batch: int = MAX_BATCH, max_wait: float = MAX_WAIT) -> None:
        if max_batch < 1 or max_wait < 0:
            raise ValueError(f"max_batch must be >= 1 and max_wait >= 0, got {max_batch} and {max_wait}")
        self.predictor, self.max_batch, self.max_wait = predictor, int(max_batch), float(max_wait)
        self.batch_sizes: collections.Counter[int] = collections.Counter()  # forward passes by images in them
        self._queue: queue.SimpleQueue[_Request] = queue.SimpleQueue()
        self._start = threading.Lock()
        self._worker: threading.Thread | None = None

    def __getattr__(self, name: str):
        return getattr(self.predictor, name)

    def predict(self, image: Source | np.ndarray, heatmaps: bool = True, filename: str = "") -> Prediction:
        """As Predictor.predict: decoded here, in the caller's thread; the forward pass is shared."""
        image, image_format = self.predictor.decode(image, filename)
        return self.predict_batch([image], heatmaps, [image_format])[0]

    def predict_batch(self, images: Sequence[np.ndarray], heatmaps: bool = True,
                      formats: Sequence[str | None] | None = None, inputs=None) -> list[Prediction]:
        """As Predictor.predict_batch. Images already prepared by the caller (`inputs`) go straight through."""
        formats = list(formats) if formats is not None else [None] * len(images)
        if inputs is not None or len(images) != len(formats):
            return self.predictor.predict_batch(images, heatmaps, formats, inputs)
        self._ensure_worker()
        requests = [_Request(image, image_format, heatmaps) for image, image_format in zip(images, formats)]
        for request in requests:
            self._queue.put(request)
        return [request.answer.result() for request in requests]

    def _ensure_worker(self) -> None:
        with self._start:
            if self._worker is None:
                self._worker = threading.Thread(target=self._serve, name="chestxray-batcher", daemon=True)
                self._worker.start()

    def _gather(self) -> list[_Request]:
        """The first request to arrive and those that follow within max_wait, up to max_batch."""
        batch = [self._queue.get()]
        deadline = time.monotonic() + self.max_wait
        while len(batch) < self.max_batch:
            try:
                batch.append(self._queue.get(timeout=max(0.0, deadline - time.monotonic())))
            except queue.Empty:
                break
        return batch

    def _serve(self) -> None:
        while True:
            batch = self._gather()
            try:
                self._answer(batch)
            except Exception:  # only a batch of several raises: each on its own, so an error is its caller's alone
                for request in batch:
                    self._answer([request])

    def _answer(self, batch: list[_Request]) -> None:
        """One forward pass for `batch`. A single request's error goes to its caller; a batch's is raised."""
        try:
            predictions = self.predictor.predict_batch([r.image for r in batch], True,
                                                       [r.image_format for r in batch])
        except Exception as exc:
            if len(batch) > 1:
                raise
            batch[0].answer.set_exception(exc)
            return
        self.batch_sizes[len(batch)] += 1
        for request, prediction in zip(batch, predictions):
            if not request.heatmaps:
                prediction.heatmaps = None
            request.answer.set_result(prediction)
