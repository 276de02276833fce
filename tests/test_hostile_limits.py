"""Limits of the web app and the CLI, through Flask's test client and `predictions.py`: a bad file in a batch loses
nothing, bounded concurrent analyses (503 + Retry-After), cross-origin API requests refused, retention counted per
source with a minimum age and never pruning its own batch, a full disk answered 507, per-image limits on the
command line, form limits with their own messages, no caching of results, and a checkpoint with a bad meta field
giving no-model mode. Behaviour only: no timing is asserted.
"""
from __future__ import annotations

import errno
import io
import json
import sys
import threading
from pathlib import Path

import pytest
import torch
from flask import Flask
from PIL import Image
from support import forked
from support.data import NIH_PNG, ROOT
from support.hostile import CORPUS, blank_png, png_bytes

from chestxray.results import RESULT_ID
from chestxray.web import views

BAD_HEADER = CORPUS["DICOM with VR ZZ on Columns"]


def upload(data: bytes = b"", name: str = "x.png") -> dict:
    return {"file": (io.BytesIO(data or png_bytes()), name)}


def saved(app: Flask) -> set[str]:
    folder = Path(app.config["RESULTS_DIR"])
    return {p.name for p in folder.iterdir() if RESULT_ID.fullmatch(p.name)} if folder.is_dir() else set()


# ---------------------------------------------------------------- a bad file in a batch loses nothing


def test_a_malformed_file_in_a_batch_keeps_the_others(make_app):
    app = make_app()
    client = app.test_client()
    files = [(io.BytesIO(png_bytes()), "a.png"), (io.BytesIO(BAD_HEADER.make()), "bad.dcm"),
             (io.BytesIO(png_bytes()), "b.png")]
    response = client.post("/predict", data={"file": files})
    assert response.status_code == 200  # several files: the batch page is the answer itself (names never stored)
    page = response.data.decode()
    assert len(saved(app)) == 2 and all(f"/results/{rid}" in page for rid in saved(app))
    assert "bad.dcm" in page and BAD_HEADER.message in page


def test_an_unexpected_error_on_one_file_keeps_the_others(make_app, monkeypatch, caplog):
    app = make_app(PROPAGATE_EXCEPTIONS=False)
    predictor = app.extensions["chestxray"].predictor
    real = predictor.predict

    def flaky(image, *args, **kwargs):
        if isinstance(image, (bytes, bytearray)) and bytes(image).startswith(b"\x89PNG") and len(image) % 2:
            raise RuntimeError("boom")
        return real(image, *args, **kwargs)

    good, odd = png_bytes(), png_bytes() + b"\0"  # trailing byte after IEND: same image, odd length
    assert len(good) % 2 == 0
    monkeypatch.setattr(type(predictor), "predict", lambda self, image, *a, **k: flaky(image, *a, **k))
    response = app.test_client().post("/predict", data={"file": [(io.BytesIO(good), "a.png"),
                                                                 (io.BytesIO(odd), "b.png")]})
    assert response.status_code == 200 and len(saved(app)) == 1
    assert "something went wrong on our side" in response.data.decode()


# ---------------------------------------------------------------- bounded concurrent analyses


class Blocked:
    """Makes the app's predictor wait inside predict() until released; counts who is inside."""

    def __init__(self, app: Flask, monkeypatch):
        self.inside = threading.Semaphore(0)
        self.release = threading.Event()
        predictor = app.extensions["chestxray"].predictor
        real = type(predictor).predict

        def predict(this, *args, **kwargs):
            self.inside.release()
            assert self.release.wait(30)
            return real(this, *args, **kwargs)

        monkeypatch.setattr(type(predictor), "predict", predict)


def test_a_full_analysis_queue_answers_503_with_retry_after(make_app, monkeypatch):
    app = make_app(MAX_ANALYSES=1, ANALYSIS_QUEUE=0)
    blocked = Blocked(app, monkeypatch)
    first: dict = {}
    worker = threading.Thread(target=lambda: first.update(r=app.test_client().post("/api/predict", data=upload())))
    worker.start()
    try:
        assert blocked.inside.acquire(timeout=30)  # the first analysis holds the only slot
        client = app.test_client()
        busy = client.post("/api/predict", data=upload())
        assert busy.status_code == 503 and int(busy.headers["Retry-After"]) >= 1
        assert "busy" in busy.get_json()["error"]
        page = client.post("/predict", data=upload())
        # The upload form goes back to the upload page (303, so a reload posts nothing) with the message and
        # Retry-After.
        assert page.status_code == 303 and page.headers["Retry-After"]
        assert b"busy" in client.get(page.headers["Location"]).data
        # Health checks and static files need no analysis slot.
        assert client.get("/healthz").status_code == 200
        assert client.get("/static/css/app.css").status_code == 200
    finally:
        blocked.release.set()
        worker.join(30)
    assert first["r"].status_code == 200
    assert app.test_client().post("/api/predict", data=upload()).status_code == 200  # the slot is free again


def test_requests_wait_in_the_queue_before_being_refused(make_app, monkeypatch):
    app = make_app(MAX_ANALYSES=1, ANALYSIS_QUEUE=1)
    blocked = Blocked(app, monkeypatch)
    answers: list = []
    workers = [threading.Thread(target=lambda: answers.append(app.test_client().post("/api/predict",
                                                                                      data=upload())))
               for _ in range(2)]
    workers[0].start()
    try:
        assert blocked.inside.acquire(timeout=30)
        workers[1].start()
        gate = app.extensions["analyses"]
        for _ in range(300):  # the second request is queued (not refused) once the gate counts it
            if gate.admitted == 2:
                break
            threading.Event().wait(0.1)
        assert gate.admitted == 2
        assert app.test_client().post("/api/predict", data=upload()).status_code == 503
    finally:
        blocked.release.set()
        for worker in workers:
            worker.join(30)
    assert [a.status_code for a in answers] == [200, 200]


def _queue_up(gate, order: list, n: int) -> list[threading.Thread]:
    """n threads entering `gate` one after another (each counted by the gate before the next starts)."""
    threads = []
    for k in range(n):
        def enter(k=k):
            with gate.enter():
                order.append(k)
        before = gate.admitted
        thread = threading.Thread(target=enter)
        thread.start()
        for _ in range(300):
            if gate.admitted == before + 1:
                break
            threading.Event().wait(0.01)
        assert gate.admitted == before + 1
        threads.append(thread)
    return threads


def test_waiting_requests_get_their_slot_in_arrival_order():
    gate = views.AnalysisGate(slots=1, queue=5, wait=30)
    order: list = []
    with gate.enter():  # the one slot is taken: everyone else lines up
        threads = _queue_up(gate, order, 5)
        assert order == []
    with gate.enter():  # arrives just as the slot frees: it must not overtake the five already waiting
        order.append("late")
    for thread in threads:
        thread.join(30)
    assert order == [0, 1, 2, 3, 4, "late"] and gate.admitted == 0


def test_a_request_that_waits_too_long_is_refused_and_leaves_the_line():
    gate = views.AnalysisGate(slots=1, queue=2, wait=0.2)
    outcome: list = []

    def wait_in_line():
        try:
            with gate.enter():
                outcome.append("ran")
        except views.Busy as exc:
            outcome.append(exc.retry_after)

    with gate.enter():
        thread = threading.Thread(target=wait_in_line)
        thread.start()
        thread.join(30)
        assert outcome == [views.RETRY_AFTER_SECONDS] and gate.admitted == 1  # only the holder is left
    with gate.enter():  # the line did not jam: the next request gets the slot
        assert gate.admitted == 1


# ---------------------------------------------------------------- cross-origin API requests


@pytest.mark.parametrize(("headers", "status"), [
    ({}, 200),  # curl, scripts: no Origin, no Sec-Fetch-Site
    ({"Origin": "http://localhost"}, 200),  # the app's own pages
    ({"Sec-Fetch-Site": "same-origin"}, 200),
    ({"Sec-Fetch-Site": "none"}, 200),  # typed into the address bar
    ({"Origin": "https://evil.example"}, 403),
    ({"Origin": "null"}, 403),
    ({"Sec-Fetch-Site": "cross-site"}, 403),
    ({"Sec-Fetch-Site": "same-site", "Origin": "http://other.localhost"}, 403),
], ids=["none", "same-origin Origin", "same-origin fetch", "user typed", "evil Origin", "null Origin",
        "cross-site fetch", "same-site other host"])
def test_cross_origin_api_requests_are_refused(make_app, headers, status):
    app = make_app()
    response = app.test_client().post("/api/predict", data=upload(), headers=headers)
    assert response.status_code == status, response.get_json()
    if status == 403:
        assert "cross-origin" in response.get_json()["error"] and saved(app) == set()


def test_one_source_cannot_flush_another_sources_results(make_app):
    app = make_app(RETENTION=3, RESULT_MIN_AGE=0)
    client = app.test_client()
    mine = client.post("/api/predict", data=upload(), environ_base={"REMOTE_ADDR": "10.0.0.1"}).get_json()["id"]
    theirs = [client.post("/api/predict", data=upload(), environ_base={"REMOTE_ADDR": "10.0.0.2"}).get_json()["id"]
              for _ in range(6)]
    kept = saved(app)
    assert mine in kept and len(kept) == 3 and set(theirs[-2:]) <= kept
    # The source is stored keyed and hashed, never as the address, and never shown.
    record = (Path(app.config["RESULTS_DIR"]) / mine / "result.json").read_text()
    assert "10.0.0.1" not in record
    assert "source" not in client.get(f"/api/results/{mine}").get_json()


# ---------------------------------------------------------------- minimum age, a batch keeps its own


def test_young_results_are_never_pruned(make_app):
    app = make_app(RETENTION=2)  # default minimum age: 10 minutes
    client = app.test_client()
    ids = [client.post("/api/predict", data=upload()).get_json()["id"] for _ in range(4)]
    assert saved(app) == set(ids)
    assert all(client.get(f"/results/{rid}").status_code == 200 for rid in ids)


def test_a_batch_never_prunes_its_own_results(make_app):
    app = make_app(RETENTION=2, RESULT_MIN_AGE=0, MAX_FILES=8)
    client = app.test_client()
    response = client.post("/predict", data={"file": [(io.BytesIO(png_bytes()), f"{i}.png") for i in range(6)]})
    ids = saved(app)
    assert response.status_code == 200 and len(ids) == 6  # the batch page, every result of the batch kept
    assert all(f"/results/{rid}" in response.data.decode() for rid in ids)
    assert all(client.get(f"/results/{rid}").status_code == 200 for rid in ids)
    client.post("/api/predict", data=upload())  # the next request prunes back to the retention
    assert len(saved(app)) == 2


# ---------------------------------------------------------------- a full disk


def test_a_full_disk_answers_507(make_app, monkeypatch, caplog):
    app = make_app(PROPAGATE_EXCEPTIONS=False)
    data = png_bytes()

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", full)  # the first write of a result
    client = app.test_client()
    api = client.post("/api/predict", data=upload(data))
    assert api.status_code == 507 and "disk is full" in api.get_json()["error"]
    page = client.post("/predict", data=upload(data))
    assert page.status_code == 303 and b"disk is full" in client.get(page.headers["Location"]).data
    assert saved(app) == set() and "Traceback" not in caplog.text
    assert client.get("/healthz").status_code == 200


# ---------------------------------------------------------------- form limits, file names, caching


def test_too_many_form_parts_get_their_own_message(make_app):
    client = make_app().test_client()
    fields = {f"f{i}": "x" for i in range(1001)}
    response = client.post("/api/predict", data={**fields, **upload()})
    assert response.status_code == 413
    message = response.get_json()["error"]
    assert "1000" in message and "MB" not in message


def test_an_oversized_text_field_gets_its_own_message(make_app):
    client = make_app().test_client()
    response = client.post("/api/predict", data={"note": "x" * 600_000, **upload()})
    assert response.status_code == 413
    message = response.get_json()["error"]
    assert "text field" in message and "50 MB" not in message


@pytest.mark.parametrize("name", [b"\xff\xfe-scan.png", "r\xe9sum\xe9.png".encode("latin-1")])
def test_non_utf8_file_names_are_read(make_app, name):
    app = make_app()
    boundary = "b0undary"
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="'.encode() + name
            + b'"\r\nContent-Type: image/png\r\n\r\n' + png_bytes() + f"\r\n--{boundary}--\r\n".encode())
    for path, status in (("/api/predict", 200), ("/predict", 303)):
        response = app.test_client().post(path, data=body, content_type=f"multipart/form-data; boundary={boundary}")
        assert response.status_code == status, response.data[:300]


def test_bidi_override_in_an_extension_is_not_echoed(make_app):
    client = make_app().test_client()
    response = client.post("/api/predict", data=upload(b"<svg xmlns='http://www.w3.org/2000/svg'/>",
                                                       "photo.s\u202egv"))
    assert response.status_code == 415 and "\u202e" not in response.get_json()["error"]


def test_results_are_never_cached(make_app):
    client = make_app().test_client()
    doc = client.post("/api/predict", data=upload()).get_json()
    rid = doc["id"]
    for url in (f"/results/{rid}", doc["image"], *doc["heatmaps"].values(), f"/api/results/{rid}",
                f"/results?ids={rid}"):
        response = client.get(url)
        assert response.status_code == 200 and "no-store" in response.headers.get("Cache-Control", ""), url
    again = client.post("/api/predict", data=upload())
    assert "no-store" in again.headers.get("Cache-Control", "")


# ---------------------------------------------------------------- a bad meta field (app side)


@pytest.mark.parametrize(("field", "value"), [("lse_r", float("nan")), ("image_size", "abc"), ("labels", 7)])
def test_a_checkpoint_with_a_bad_meta_field_runs_the_app_without_a_model(make_app, tiny_checkpoint, tmp_path,
                                                                          field, value):
    state = torch.load(tiny_checkpoint, weights_only=True)
    state["meta"][field] = value
    bad = tmp_path / "bad-meta.pth"
    torch.save(state, bad)
    client = make_app(CHECKPOINT=str(bad)).test_client()
    assert client.get("/healthz").get_json() == {"status": "ok", "model_loaded": False}
    response = client.post("/api/predict", data=upload())
    assert response.status_code == 503 and field in response.get_json()["error"]
    assert client.get("/").status_code == 200


# ---------------------------------------------------------------- per-image limits on the command line


@pytest.mark.slow(10)
def test_cli_applies_per_image_limits_and_goes_on(tiny_checkpoint, tmp_path):
    sparse = tmp_path / "huge.dcm"
    with sparse.open("wb") as f:
        f.truncate(12 * 2**30)  # 12 GB on paper: read whole, it was a MemoryError that ended the batch
    blank = tmp_path / "blank.png"
    blank.write_bytes(blank_png())  # 60 MP in 58 KB: took 217 s and 8.2 GB with --out
    good = tmp_path / "good.png"
    good.write_bytes(NIH_PNG.read_bytes())
    result = forked.run(
        [sys.executable, "predictions.py", str(sparse), str(blank), str(good), "--checkpoint", str(tiny_checkpoint),
         "--out", str(tmp_path / "out"), "--device", "cpu", "--max-file-mb", "50"],
        cwd=ROOT, timeout=300,
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    records = {Path(r["image"]).name: r for r in map(json.loads, result.stdout.splitlines())}
    assert "limit per image" in records["huge.dcm"]["error"]
    assert "megapixel" in records["blank.png"]["error"]
    assert "labels" in records["good.png"] and "error" not in records["good.png"]
