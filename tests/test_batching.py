"""In-server batching (chestxray.batching): concurrent callers share forward passes and each gets exactly what its
image gets alone; one bad image fails alone; the web app batches by default and MAX_BATCH=1 turns it off."""
from __future__ import annotations

import io
import threading

import numpy as np
import pytest
from support.checkpoints import make_checkpoint
from support.data import NIH_DIR

import Model_Training.export as export
from chestxray.batching import BatchingPredictor
from chestxray.predictor import Predictor

IMAGES = sorted((NIH_DIR / "images_64").glob("*.png"))[:6]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny checkpoint with its ONNX export beside it."""
    path = make_checkpoint(tmp_path_factory.mktemp("batching") / "model.pth")
    assert export.main(export.get_args_parser().parse_args(["--checkpoint", str(path)])) == 0
    return path


def _at_once(call, items: list) -> list:
    """call(item) from one thread per item, all released together -> the answers (or exceptions), in order."""
    answers: list = [None] * len(items)
    start = threading.Barrier(len(items))

    def run(i: int) -> None:
        start.wait()
        try:
            answers[i] = call(items[i])
        except Exception as exc:  # noqa: BLE001 - the test compares what each caller got
            answers[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(items))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return answers


def _gap(a, b) -> float:
    """Largest probability difference of two Predictions."""
    return max(abs(a.probabilities[label] - b.probabilities[label]) for label in a.labels)


def _same(batched, alone) -> None:
    assert batched.labels == alone.labels
    assert _gap(batched, alone) <= 1e-6
    assert batched.calls == alone.calls and batched.support == alone.support
    assert batched.orientation == alone.orientation
    assert batched.in_scope == alone.in_scope
    assert (batched.scope_score is None) == (alone.scope_score is None)
    if alone.scope_score is not None:
        assert batched.scope_score == pytest.approx(alone.scope_score, rel=1e-5, abs=1e-6)
    scale = np.ptp(alone.heatmaps, axis=(1, 2)).max()
    assert np.abs(batched.heatmaps - alone.heatmaps).max() <= 1e-5 * max(scale, 1e-6)


@pytest.mark.parametrize("backend", ["torch", "onnx"])
def test_concurrent_callers_share_forward_passes_and_get_their_own_answers(checkpoint, backend):
    predictor = Predictor.from_checkpoint(checkpoint, device="cpu", backend=backend)
    alone = [predictor.predict(path) for path in IMAGES]
    # A long gathering window, so that the callers released together land in shared passes even on a busy machine.
    batcher = BatchingPredictor(predictor, max_batch=8, max_wait=2.0)
    batched = _at_once(batcher.predict, IMAGES)
    assert sum(size * count for size, count in batcher.batch_sizes.items()) == len(IMAGES)
    assert max(batcher.batch_sizes) > 1, batcher.batch_sizes  # some images did share a pass
    for b, a in zip(batched, alone):
        assert not isinstance(b, Exception), b
        _same(b, a)
        assert b.format == a.format == "PNG"


def test_a_bad_image_fails_alone_and_heatmaps_can_be_left_out(checkpoint):
    predictor = Predictor.from_checkpoint(checkpoint, device="cpu", backend="torch")
    batcher = BatchingPredictor(predictor, max_batch=8, max_wait=2.0)
    good = [predictor.decode(path)[0] for path in IMAGES[:3]]
    bad = np.zeros((2, 2, 2, 2), dtype=np.float32)  # no image: the transform refuses it

    def call(item):
        image, heatmaps = item
        return batcher.predict_batch([image], heatmaps=heatmaps)[0]

    answers = _at_once(call, [(good[0], True), (bad, True), (good[1], False), (good[2], True)])
    assert isinstance(answers[1], Exception)
    for i, image in ((0, good[0]), (2, good[1]), (3, good[2])):
        alone = predictor.predict_batch([image])[0]
        assert _gap(answers[i], alone) <= 1e-6
    assert answers[2].heatmaps is None and answers[0].heatmaps is not None
    # The worker survived the failure: the next caller is answered.
    assert batcher.predict(IMAGES[4]).labels == predictor.labels


def test_bad_settings_are_refused(checkpoint):
    predictor = Predictor.from_checkpoint(checkpoint, device="cpu", backend="torch")
    with pytest.raises(ValueError, match="max_batch"):
        BatchingPredictor(predictor, max_batch=0)


def test_the_web_app_batches_when_asked_and_by_default_only_on_cuda(checkpoint, tmp_path):
    from chestxray.batching import serving
    from chestxray.web import create_app

    served = {}
    for max_batch in (4, None):
        config = {"CHECKPOINT": str(checkpoint), "DEVICE": "cpu", "BACKEND": "torch", "TESTING": True,
                  "RESULTS_DIR": str(tmp_path / f"results-{max_batch}"), "INSTANCE_PATH": str(tmp_path / "instance")}
        if max_batch is not None:
            config["MAX_BATCH"] = max_batch
        app = create_app(config)
        predictor = app.extensions["chestxray"].predictor
        response = app.test_client().post("/api/predict", data={"file": (io.BytesIO(IMAGES[0].read_bytes()),
                                                                         IMAGES[0].name)},
                                          content_type="multipart/form-data")
        assert response.status_code == 200, response.get_data(as_text=True)
        served[max_batch] = [item["probability"] for item in response.get_json()["labels"]]
        assert isinstance(predictor, BatchingPredictor) == (max_batch == 4)  # on this CPU, None: each image alone
        if max_batch == 4:
            assert predictor.max_batch == 4
            assert sum(predictor.batch_sizes.values()) == 1  # the upload went through the shared worker
    assert np.abs(np.subtract(served[None], served[4])).max() <= 1e-6
    cpu = Predictor.from_checkpoint(checkpoint, device="cpu", backend="torch")
    assert serving(cpu) is cpu and serving(cpu, 1) is cpu
    cpu.device = "cuda:0"  # what the default decides from (no GPU here to load it on)
    assert serving(cpu).max_batch == 8
    with pytest.raises(ValueError, match="MAX_BATCH"):
        create_app({"CHECKPOINT": str(checkpoint), "DEVICE": "cpu", "MAX_BATCH": 0,
                    "INSTANCE_PATH": str(tmp_path / "instance")})
