"""The web app through Flask's test client: every route, every error status, no-model mode, retention, CSRF,
security headers, privacy of DICOM headers, and concurrency. The tiny 64 px ResNet-18 checkpoint keeps it fast.
"""
from __future__ import annotations

import csv
import html
import io
import json
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pydicom
import pytest
from flask import Flask
from PIL import Image
from support.data import DICOM_MONO1, DICOM_MONO2, NIH_DIR, NIH_PNG, OTHER_CXR_DIR, ROOT
from support.web import results_dir, saved_ids, upload

import main
import predictions
from chestxray import results as results_module
from chestxray.cam import heatmap_image
from chestxray.checkpoint import DEFAULT_CHECKPOINT, CheckpointError, load_checkpoint
from chestxray.messages import POINT_COMMAND, TRAIN_COMMAND
from chestxray.model import ChestXrayNet
from chestxray.predictor import Predictor
from chestxray.results import DISPLAY_MAX_SIDE, default_label, label_names, ranked
from chestxray.trust.evidence import format_call
from chestxray.web import checkpoints, create_app
from chestxray.web import http as webhttp

JPEG = OTHER_CXR_DIR / "2c35005f.jpg"  # 2000 px grayscale JPEG
RGBA_PNG = NIH_DIR / "images_64" / "00000004_000.png"  # an NIH PNG stored as RGBA
PHI = ("Zyxwvut^Secretname", "PHI-ID-5550199", "Secret General Hospital")
UPLOAD_NAME = "upload-name-QWERTY"  # a user-supplied file name that must never reach the disk


@pytest.fixture
def app(make_app) -> Flask:
    return make_app()


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture(scope="module")
def phi_dicom() -> bytes:
    """The real JPEG-compressed DICOM with distinctive patient name, ID and institution in its header."""
    ds = pydicom.dcmread(DICOM_MONO2)
    ds.PatientName, ds.PatientID, ds.InstitutionName = PHI
    ds.PatientBirthDate = "19450517"
    buf = io.BytesIO()
    ds.save_as(buf)
    data = buf.getvalue()
    assert all(s.encode() in data for s in PHI)
    return data


def post_png(client) -> str:
    """POST /predict with the NIH PNG; returns the new result id from the redirect."""
    response = client.post("/predict", data=upload(NIH_PNG))
    assert response.status_code == 303, response.data[:500]
    return response.headers["Location"].rsplit("/", 1)[1]


def probabilities(doc: dict) -> dict[str, float]:
    """{label: probability} in the document's (the model's) label order."""
    return {row["label"]: row["probability"] for row in doc["labels"]}


def flashes(body: bytes) -> list[str]:
    return [html.unescape(m) for m in re.findall(r'<li class="flash[^"]*">(.*?)</li>', body.decode(), re.S)]


def back_to_upload_page(client, response) -> list[str]:
    """A refused upload form: a 303 to the upload page (a reload posts nothing); returns the messages shown there."""
    assert response.status_code == 303 and response.headers["Location"] == "/", response.data[:300]
    page = client.get("/")
    assert page.status_code == 200 and b'id="dropzone"' in page.data
    return flashes(page.data)


# ---------------------------------------------------------------- serving set-up


def test_import_builds_no_app_or_model(monkeypatch):
    import importlib
    import sys

    import torch.nn

    built = []
    real_init = ChestXrayNet.__init__

    def record_init(self, *args, **kwargs):
        built.append(self)
        real_init(self, *args, **kwargs)

    def refuse(*args, **kwargs):
        raise AssertionError("importing main loaded a model")

    monkeypatch.setattr(ChestXrayNet, "__init__", record_init)
    monkeypatch.setattr(Predictor, "from_checkpoint", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    web = [name for name in sys.modules if name.startswith(("chestxray.web", "chestxray.pacs"))]
    for name in ("main", *web):
        monkeypatch.delitem(sys.modules, name, raising=False)
    fresh = importlib.import_module("main")
    modules = [fresh, *(module for name, module in sys.modules.items() if name.startswith("chestxray.web"))]
    assert "chestxray.web.views" in sys.modules
    values = [value for module in modules for value in vars(module).values()]
    assert not any(isinstance(value, (Flask, Predictor, torch.nn.Module)) for value in values)
    assert built == []


def test_args_defaults_and_checkpoint_from_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("CXR_CHECKPOINT", raising=False)
    args = main.get_args_parser().parse_args([])
    assert (args.host, args.port, args.retention, args.checkpoint, args.no_demo) == ("127.0.0.1", 5000, 200, None,
                                                                                     False)
    assert checkpoints.default_checkpoint() == str(ROOT / DEFAULT_CHECKPOINT)  # which wins over the demo: test_demo.py
    monkeypatch.setenv("CXR_CHECKPOINT", str(tmp_path / "env.pth"))
    assert checkpoints.choose_checkpoint(main.get_args_parser().parse_args([])) == str(tmp_path / "env.pth")


def test_checkpoint_from_environment_is_loaded_once(monkeypatch, tiny_checkpoint, tmp_path):
    monkeypatch.setenv("CXR_CHECKPOINT", str(tiny_checkpoint))
    app = create_app({"RESULTS_DIR": str(tmp_path), "DEVICE": "cpu", "INSTANCE_PATH": str(tmp_path / "instance")})
    state = app.extensions["chestxray"]
    assert state.checkpoint == str(tiny_checkpoint) and state.predictor is not None and state.error is None
    assert app.config["SECRET_KEY"] and app.config["WTF_CSRF_ENABLED"]
    assert app.config["MAX_CONTENT_LENGTH"] == 50 * 1024 * 1024 and app.config["RETENTION"] == 200


def test_main_serves_the_app_with_waitress(monkeypatch, capsys, tiny_checkpoint, tmp_path):
    import waitress

    served = {}

    class FakeServer:
        effective_host, effective_port = "127.0.0.1", 5123

        def run(self):
            served["ran"] = True

        def close(self):
            pass

    def create_server(app, host, port, threads, max_request_body_size, **options):
        served.update(app=app, host=host, port=port, threads=threads, max_body=max_request_body_size, options=options)
        return FakeServer()

    monkeypatch.setattr(waitress, "create_server", create_server)
    args = main.get_args_parser().parse_args(["--checkpoint", str(tiny_checkpoint), "--port", "5123", "--device",
                                              "cpu", "--results-dir", str(tmp_path), "--retention", "7",
                                              "--instance-dir", str(tmp_path / "instance")])
    assert main.main(args) == 0
    assert "Serving the chest X-ray app on http://127.0.0.1:5123/" in capsys.readouterr().out
    assert served["ran"] and (served["host"], served["port"]) == ("127.0.0.1", 5123)
    # Far above the app's limit, so every upload a person makes over the limit gets the app's own 413 answer.
    assert served["max_body"] == webhttp.waitress_body_limit(50 * 1024 * 1024) == 20 * 50 * 1024 * 1024
    # Bodies up to the limit stay in memory, never in a temporary file; silent connections are closed; 100+ may wait.
    assert served["options"]["inbuf_overflow"] > 50 * 1024 * 1024
    assert served["options"]["channel_timeout"] == 30 and served["options"]["cleanup_interval"] == 5
    assert served["options"]["connection_limit"] == 500
    app = served["app"]
    assert app.config["RETENTION"] == 7 and app.config["RESULTS_DIR"] == str(tmp_path)
    assert app.extensions["chestxray"].predictor is not None
    # With the defaults, 8 readers posting at once all get a slot or a place in line (none refused), and one
    # worker thread is left for /healthz and the pages.
    admitted = app.config["MAX_ANALYSES"] + app.config["ANALYSIS_QUEUE"]
    assert admitted >= 8 and admitted == served["threads"] - 1


def test_invalid_retention_is_refused(make_app):
    with pytest.raises(ValueError, match="RETENTION"):
        make_app(RETENTION=0)


def test_healthz_and_model_card(client, tiny_predictor):
    assert client.get("/healthz").get_json() == {"status": "ok", "model_loaded": True, "backend": "torch"}
    assert client.get("/api/model").get_json() == tiny_predictor.model_card()
    assert client.get("/favicon.ico").status_code == 204


def test_upload_page(make_app):
    body = make_app(WTF_CSRF_ENABLED=True).test_client().get("/").data.decode()
    assert re.search(r'<input[^>]*type="file"[^>]*multiple', body)
    assert 'enctype="multipart/form-data"' in body and 'name="csrf_token"' in body
    for accepted in (".png", ".jpg", ".jpeg", ".dcm"):
        assert accepted in body
    assert 'id="dropzone"' in body and "not for clinical use" in body.lower()
    assert "NIH ChestX-ray14" in body
    assert "resnet18" in body and "64 × 64 px" in body and "random init (test fixture)" in body


# ---------------------------------------------------------------- the HTML flow


def test_predict_redirects_to_result_page_with_all_labels(client, app, tiny_predictor):
    rid = post_png(client)
    body = client.get(f"/results/{rid}").data.decode()
    record = json.loads((results_dir(app) / rid / "result.json").read_text())
    expected = tiny_predictor.predict(NIH_PNG)

    shown = re.findall(r'class="label-link" href="[^"]*"\s+data-label="([^"]+)"', body)
    assert shown == expected.ranked() and len(shown) == len(tiny_predictor.labels)
    assert body.count('class="finding positive') == len(expected.positive) > 0
    for label in expected.labels:
        p_text, _ = format_call(expected.probabilities[label], expected.thresholds[label], call=expected.call(label))
        assert f'<td class="num probability">{p_text}</td>' in body
    assert body.count('class="threshold"') == len(expected.labels)  # the threshold mark on every bar
    assert body.count('<td class="num threshold">50.0 %</td>') == len(expected.labels)
    assert "In-scope check: not available" in body  # the fixture checkpoint has no scope statistics
    top = default_label(record)
    assert top == next(label for label in expected.ranked() if label in expected.positive)
    assert f'src="/results/{rid}/heatmap/{top}.png"' in body and 'id="heat"' in body
    assert f'href="/api/results/{rid}"' in body and f'src="/results/{rid}/image.png"' in body
    assert 'id="opacity"' in body and 'id="plain"' in body
    # model panel: arch, input size, training data, validation AUROC per label, date
    assert "resnet18" in body and "64 × 64 px" in body and "random init (test fixture)" in body
    assert "2026-11-25" in body and body.count("<td class=\"num\">0.50</td>") == len(expected.labels)


def test_label_opacity_and_plain_view_render_server_side(client):
    rid = post_png(client)
    body = client.get(f"/results/{rid}?label=Mass&opacity=30").data.decode()
    assert f'id="heat" src="/results/{rid}/heatmap/Mass.png"' in body
    assert re.search(r'data-label="Mass"[^>]*aria-current="true"', body)
    assert 'class="heat op-3"' in body and 'value="30"' in body and not re.search(r'<img class="heat[^>]*hidden>', body)
    plain = client.get(f"/results/{rid}?label=Mass&plain=1").data.decode()
    assert re.search(r'<img class="heat[^>]*hidden>', plain)
    assert client.get(f"/results/{rid}?label=NotALabel").status_code == 404  # a typo in a link is not a silent default
    bad_opacity = client.get(f"/results/{rid}?label=Mass&opacity=abc")
    assert bad_opacity.status_code == 200 and b'class="heat op-6"' in bad_opacity.data


def test_saved_result_layout_and_contents(client, app, tiny_predictor):
    response = client.post("/predict", data=upload(NIH_PNG, f"{UPLOAD_NAME}.png"))
    rid = response.headers["Location"].rsplit("/", 1)[1]
    folder = results_dir(app) / rid
    assert sorted(p.name for p in folder.iterdir()) == ["heatmap", "heatmaps.npy", "image.png", "result.json"]
    record = json.loads((folder / "result.json").read_text())
    expected = tiny_predictor.predict(NIH_PNG)
    assert probabilities(record) == pytest.approx(expected.probabilities, abs=1e-6)
    assert record["positive"] == expected.positive and record["format"] == "PNG"
    assert record["original_size"] == [1024, 1024]
    np.testing.assert_allclose(np.load(folder / "heatmaps.npy"), expected.heatmaps, rtol=1e-5, atol=1e-7)
    with Image.open(folder / "image.png") as im:
        assert im.mode == "L" and max(im.size) == DISPLAY_MAX_SIDE and list(im.size) == record["display_size"]
    for path in results_dir(app).rglob("*"):
        assert UPLOAD_NAME not in path.name
        assert not path.is_file() or UPLOAD_NAME.encode() not in path.read_bytes()
    assert not [p for p in results_dir(app).iterdir() if p.name.startswith(".tmp-")]


def test_heatmaps_are_rendered_on_first_request_and_kept(client, app):
    rid = post_png(client)
    folder = results_dir(app) / rid
    record = json.loads((folder / "result.json").read_text())
    top = default_label(record)
    assert list((folder / "heatmap").iterdir()) == []  # none drawn until asked for, not even the one shown first
    assert client.get(f"/results/{rid}/heatmap/{top}.png").status_code == 200
    assert [p.name for p in (folder / "heatmap").iterdir()] == [f"{top}.png"]
    other = next(label for label in label_names(record) if label != top)
    response = client.get(f"/results/{rid}/heatmap/{other}.png")
    assert response.status_code == 200 and response.mimetype == "image/png"
    saved = folder / "heatmap" / f"{other}.png"
    assert saved.is_file()
    with Image.open(io.BytesIO(response.data)) as im:
        maps = np.load(folder / "heatmaps.npy")
        independent = heatmap_image(maps[label_names(record).index(other)], im.height, im.width)
        assert im.mode == "RGBA" and np.array_equal(np.asarray(im), np.asarray(independent))
    mtime = saved.stat().st_mtime_ns
    assert client.get(f"/results/{rid}/heatmap/{other}.png").data == response.data
    assert saved.stat().st_mtime_ns == mtime  # served from disk, not rendered again
    assert client.get(f"/results/{rid}/image.png").mimetype == "image/png"


@pytest.mark.parametrize("path, fmt", [
    (NIH_PNG, "PNG"), (JPEG, "JPEG"), (RGBA_PNG, "PNG"), (DICOM_MONO2, "DICOM"), (DICOM_MONO1, "DICOM"),
], ids=["nih-png", "jpeg", "rgba-png", "dicom-mono2", "dicom-mono1"])
def test_accepted_formats(client, tiny_predictor, path, fmt):
    response = client.post("/api/predict", data=upload(path))
    assert response.status_code == 200, response.get_json()
    doc = response.get_json()
    assert doc["format"] == fmt
    assert probabilities(doc) == pytest.approx(tiny_predictor.predict(path).probabilities, abs=1e-6)


def test_several_files_give_a_batch_page_with_their_names(client, app):
    names = [NIH_PNG.name, DICOM_MONO2.name, "<img src=x onerror=alert(1)>.jpg"]
    files = [(io.BytesIO(p.read_bytes()), name) for p, name in zip((NIH_PNG, DICOM_MONO2, JPEG), names)]
    response = client.post("/predict", data={"file": files})
    body = response.data.decode()
    assert response.status_code == 200  # the names live in this response only
    ids = re.findall(r'href="/results/([0-9a-f]{32})" class="result-link"', body)
    assert len(ids) == 3 and set(ids) == saved_ids(app)
    assert re.findall(r'<th scope="row" class="file-name"><a href="[^"]+">(.*?)</a>', body) == [
        html.escape(name) for name in names]
    assert "<img src=x" not in body and "DICOM" in body and "JPEG" in body
    for path in results_dir(app).rglob("*"):  # the names are never written
        assert not path.is_file() or not any(n.encode() in path.read_bytes() for n in (NIH_PNG.stem, "onerror"))
    listing = client.get(f"/results?ids={','.join(ids)}").data.decode()  # the permanent link: numbers, no names
    assert "Image 3" in listing and NIH_PNG.name not in listing


def test_a_bad_file_among_several_is_listed_in_its_place_and_the_rest_analysed(client, app):
    files = [(io.BytesIO(NIH_PNG.read_bytes()), "good.png"), (io.BytesIO(b"plain text"), "notes.txt"),
             (io.BytesIO(JPEG.read_bytes()), "third.jpg")]
    response = client.post("/predict", data={"file": files})
    assert response.status_code == 200 and len(saved_ids(app)) == 2
    rows = re.findall(r"<tr data-number=\"(\d)\".*?</tr>", response.data.decode(), re.S)
    assert rows == ["1", "2", "3"]
    assert "notes.txt</th>" in response.data.decode()
    assert "Not analysed: unsupported file type (&#39;.txt&#39;)" in response.data.decode()


def test_a_batch_of_failures_returns_to_the_upload_page_with_each_reason(make_app):
    client = make_app().test_client()
    files = [(io.BytesIO(b"text %d" % i), f"notes{i}.txt") for i in range(8)]
    messages = back_to_upload_page(client, client.post("/predict", data={"file": files}))
    assert [m.split(":")[0] for m in messages[:5]] == [f"notes{i}.txt" for i in range(5)]
    assert messages[5] == "… and 3 more files could not be analysed."  # the session cookie stays small


def batch_form(ids: list[str], names: list[str], errors: list[str] | None = None, **extra) -> dict:
    return {"id": ids, "name": names, "error": errors or [""] * len(ids), **extra}


def test_batch_summary_sorts_by_any_finding_and_downloads_as_csv(client, app):
    files = [(io.BytesIO(p.read_bytes()), p.name) for p in (NIH_PNG, DICOM_MONO2, JPEG)]
    body = client.post("/predict", data={"file": files}).data.decode()
    ids = re.findall(r'name="id" value="([0-9a-f]*)"', body)
    records = {rid: json.loads((results_dir(app) / rid / "result.json").read_text()) for rid in ids}
    form = batch_form([ids[0], "", ids[2], ids[1]], [NIH_PNG.name, "bad.txt", JPEG.name, "scan.dcm"],
                      ["", "unsupported file type", "", ""])
    for label in ("Mass", "Hernia", "top"):
        page = client.post("/results", data={**form, "sort": label}).data.decode()
        shown = re.findall(r'<th scope="row" class="file-name">(?:<a href="[^"]+">)?([^<]*)', page)

        def key(rid, label=label):
            p = probabilities(records[rid])
            return max(p.values()) if label == "top" else p[label]

        expected = sorted([ids[0], ids[2], ids[1]], key=lambda rid: -key(rid))
        by_id = {ids[0]: NIH_PNG.name, ids[2]: JPEG.name, ids[1]: "scan.dcm"}
        assert shown == [by_id[rid] for rid in expected] + ["bad.txt"], label
    response = client.post("/results.csv", data=form)
    assert response.status_code == 200 and response.mimetype == "text/csv"
    assert "attachment" in response.headers["Content-Disposition"] and response.headers["Cache-Control"] == "no-store"
    table = list(csv.DictReader(io.StringIO(response.data.decode())))
    assert [row["file"] for row in table] == [NIH_PNG.name, "bad.txt", JPEG.name, "scan.dcm"]
    assert table[1]["error"] == "unsupported file type" and table[1]["result"] == ""
    for row, rid in zip([table[0], table[2], table[3]], [ids[0], ids[2], ids[1]]):
        record = records[rid]
        assert row["result"] == f"http://localhost/results/{rid}"
        assert row["called_findings"] == "|".join(record["positive"])
        for label, p in probabilities(record).items():
            assert float(row[label]) == pytest.approx(p, abs=1e-6)
        top = ranked(record)[0]
        assert (row["top_finding"], float(row["top_probability"])) == (top["label"], pytest.approx(top["probability"]))
    numbered = client.get(f"/results.csv?ids={ids[0]},{ids[1]}").data.decode()
    assert [row["file"] for row in csv.DictReader(io.StringIO(numbered))] == ["Image 1", "Image 2"]


def test_batch_forms_name_between_one_and_max_files_results(make_app):
    client = make_app(MAX_FILES=2).test_client()
    assert client.post("/results", data=batch_form([], [])).status_code == 400
    assert client.post("/results", data=batch_form(["a" * 32] * 3, ["x"] * 3)).status_code == 400
    assert client.post("/results.csv", data=batch_form(["b" * 32], ["x"])).status_code == 404  # none exist


# ---------------------------------------------------------------- JSON API


def test_api_predict_document(client, app, tiny_predictor):
    response = client.post("/api/predict", data=upload(NIH_PNG))
    assert response.status_code == 200 and response.mimetype == "application/json"
    doc = response.get_json()
    expected = tiny_predictor.predict(NIH_PNG)
    assert {"id", "labels", "positive", "heatmaps", "model", "image", "result"} <= doc.keys()
    assert label_names(doc) == list(expected.labels)  # the model's label order
    assert probabilities(doc) == pytest.approx(expected.probabilities, abs=1e-6)
    assert doc["positive"] == [row["label"] for row in doc["labels"] if row["probability"] >= 0.5]
    assert [row["positive"] for row in doc["labels"]] == [row["probability"] >= 0.5 for row in doc["labels"]]
    assert {row["label"]: row["threshold"] for row in doc["labels"]} == expected.thresholds
    assert doc["model"] == tiny_predictor.model_card()
    assert set(doc["heatmaps"]) == set(expected.labels)
    for label in ("Mass", expected.ranked()[-1]):
        image = client.get(doc["heatmaps"][label])
        assert image.status_code == 200 and image.data.startswith(b"\x89PNG")
    assert client.get(doc["result"]).status_code == 200 and client.get(doc["image"]).status_code == 200
    assert client.get(f"/api/results/{doc['id']}").get_json() == doc  # the page's JSON link
    assert saved_ids(app) == {doc["id"]}


BAD_UPLOADS = {
    "empty": (b"", "x.png", 400, "the file is empty"),
    "truncated-png": (NIH_PNG.read_bytes()[:3000], "x.png", 400, "truncated or corrupt"),
    "text-named-png": (b"not an image at all", "x.png", 400, "not a readable image"),
    "too-small": (None, "small.png", 400, "at least 32 pixels"),
    "txt": (b"plain text notes", "notes.txt", 415, "unsupported file type"),
    "pdf": (b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj", "report.pdf", 415, "PDF"),
    "gif": (None, "anim.gif", 415, "GIF"),
    "gif-named-png": (None, "anim.png", 415, "GIF"),
}


def _bad_upload(case: str) -> tuple[bytes, str, int, str]:
    data, name, status, message = BAD_UPLOADS[case]
    if data is None:
        buf = io.BytesIO()
        if "gif" in case:
            Image.new("L", (64, 64), 128).save(buf, "GIF")
        else:
            Image.new("L", (16, 16), 128).save(buf, "PNG")
        data = buf.getvalue()
    return data, name, status, message


@pytest.mark.parametrize("case", list(BAD_UPLOADS))
def test_api_rejects_bad_uploads_with_json_errors(client, app, case):
    data, name, status, message = _bad_upload(case)
    response = client.post("/api/predict", data=upload(data, name))
    assert response.status_code == status and response.mimetype == "application/json"
    assert message in response.get_json()["error"]
    assert not saved_ids(app)


@pytest.mark.parametrize("case", list(BAD_UPLOADS))
def test_html_shows_the_same_errors_on_the_upload_page(client, case):
    data, name, status, message = _bad_upload(case)
    messages = back_to_upload_page(client, client.post("/predict", data=upload(data, name)))
    assert len(messages) == 1 and messages[0].startswith(f"{name}: ") and message in messages[0]
    assert "Traceback" not in messages[0]


def test_missing_file_field(client):
    response = client.post("/api/predict", data={"other": "x"})
    assert response.status_code == 400 and "'file'" in response.get_json()["error"]
    page = client.post("/predict", data={"file": (io.BytesIO(b""), "")})  # a form submitted with no file chosen
    assert "No file was chosen" in back_to_upload_page(client, page)[0]


def test_too_large_uploads_get_413(make_app):
    client = make_app(MAX_CONTENT_LENGTH=20_000).test_client()
    api = client.post("/api/predict", data=upload(NIH_PNG))
    assert api.status_code == 413 and "too large" in api.get_json()["error"]
    page = client.post("/predict", data=upload(NIH_PNG))
    assert "too large" in back_to_upload_page(client, page)[0]
    assert b'data-max-bytes="20000"' in client.get("/").data  # the page's script checks the limit before sending


def test_too_many_files(make_app):
    client = make_app(MAX_FILES=2).test_client()
    files = [(io.BytesIO(NIH_PNG.read_bytes()), f"{i}.png") for i in range(3)]
    response = client.post("/predict", data={"file": files})
    assert "at most 2" in back_to_upload_page(client, response)[0]
    files = [(io.BytesIO(NIH_PNG.read_bytes()), f"{i}.png") for i in range(3)]
    api = client.post("/api/predict", data={"file": files})
    assert api.status_code == 400 and "at most 2" in api.get_json()["error"]


# ---------------------------------------------------------------- no model loaded


def _assert_no_model_everywhere(client, reason: str) -> None:
    for path in ("/", "/nope"):
        body = html.unescape(client.get(path).data.decode())
        assert "No model is loaded" in body and reason in body
        assert TRAIN_COMMAND in body and POINT_COMMAND in body
    page = client.post("/predict", data=upload(NIH_PNG))
    assert "No model is loaded" in back_to_upload_page(client, page)[0]
    for response in (client.post("/api/predict", data=upload(NIH_PNG)), client.get("/api/model")):
        assert response.status_code == 503
        error = response.get_json()["error"]
        assert "No model is loaded" in error and reason in error and TRAIN_COMMAND in error and "--checkpoint" in error
    assert client.get("/healthz").get_json() == {"status": "ok", "model_loaded": False}


def test_no_model_mode_when_the_checkpoint_is_missing(make_app, tmp_path):
    missing = tmp_path / "missing.pth"
    app = make_app(CHECKPOINT=str(missing))
    assert app.extensions["chestxray"].predictor is None
    _assert_no_model_everywhere(app.test_client(), f"checkpoint not found: {missing}")


def test_no_model_mode_shows_the_loaders_error_for_a_broken_checkpoint(make_app, tmp_path, tiny_checkpoint):
    broken = tmp_path / "broken.pth"
    broken.write_bytes(tiny_checkpoint.read_bytes()[:5000])
    with pytest.raises(CheckpointError) as loader_error:
        load_checkpoint(broken)
    _assert_no_model_everywhere(make_app(CHECKPOINT=str(broken)).test_client(), str(loader_error.value))


def test_saved_results_stay_viewable_without_a_model(make_app, tmp_path):
    rid = post_png(make_app().test_client())
    client = make_app(CHECKPOINT=str(tmp_path / "missing.pth")).test_client()
    assert client.get(f"/results/{rid}").status_code == 200


# ---------------------------------------------------------------- errors, retention, safety


def test_404_405_and_500_have_our_pages_and_json(make_app):
    app = make_app(PROPAGATE_EXCEPTIONS=False)

    def boom():
        raise RuntimeError("secret internal detail")

    app.add_url_rule("/boom", "boom", boom)
    app.add_url_rule("/api/boom", "api_boom", boom)
    client = app.test_client()
    for path, method, status in [("/nope", "get", 404), ("/predict", "get", 405), ("/boom", "get", 500),
                                 (f"/results/{'0' * 32}", "get", 404), ("/results/..%2Fetc", "get", 404),
                                 ("/results", "get", 404), (f"/results/{'0' * 32}/heatmap/Mass.png", "get", 404)]:
        response = getattr(client, method)(path)
        assert response.status_code == status and response.mimetype == "text/html", path
        body = response.data.decode()
        assert f"<h1>{status} ·" in body and "ChestX-ray14 classifier" in body
        assert "Traceback" not in body and "secret internal detail" not in body
    for path, method, status in [("/api/nope", "get", 404), ("/api/predict", "get", 405), ("/api/boom", "get", 500),
                                 (f"/api/results/{'0' * 32}", "get", 404), ("/api/model", "post", 405)]:
        response = getattr(client, method)(path)
        assert response.status_code == status and set(response.get_json()) == {"error"}, path
        assert "secret internal detail" not in response.get_json()["error"]


def test_unknown_heatmap_label_is_404(client):
    rid = post_png(client)
    assert client.get(f"/results/{rid}/heatmap/Bogus.png").status_code == 404
    assert client.get(f"/results/{rid}/heatmap/..%2Fresult.json.png").status_code == 404


def test_retention_keeps_the_newest_results(make_app):
    app = make_app(RETENTION=2, RESULT_MIN_AGE=0)  # the minimum age is tested in test_hostile_limits.py
    client = app.test_client()
    stale, fresh = results_dir(app) / ".tmp-crashed", results_dir(app) / ".tmp-in-progress"
    stale.mkdir()
    fresh.mkdir()
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    ids = [client.post("/api/predict", data=upload(NIH_PNG)).get_json()["id"] for _ in range(3)]
    assert saved_ids(app) == set(ids[1:])
    assert client.get(f"/results/{ids[0]}").status_code == 404 and b"expired" in client.get(f"/results/{ids[0]}").data
    assert all(client.get(f"/results/{rid}").status_code == 200 for rid in ids[1:])
    assert not stale.exists() and fresh.exists()


def test_a_failed_save_leaves_nothing_behind(make_app, monkeypatch):
    app = make_app(PROPAGATE_EXCEPTIONS=False)

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(results_module, "write_json", fail)  # the last write of a result folder
    response = app.test_client().post("/api/predict", data=upload(NIH_PNG))
    assert response.status_code == 503 and list(results_dir(app).iterdir()) == []


def test_csrf_protects_the_form_but_not_the_api(make_app):
    app = make_app(WTF_CSRF_ENABLED=True)
    client = app.test_client()
    rejected = client.post("/predict", data={"file": [(io.BytesIO(NIH_PNG.read_bytes()), "first.png"),
                                                      (io.BytesIO(b"x"), "second.dcm")]})
    message = back_to_upload_page(client, rejected)[0]
    assert "security token" in message and "Please choose the files again: first.png, second.dcm." in message
    assert not saved_ids(app)
    token = re.search(r'name="csrf_token" value="([^"]+)"', client.get("/").data.decode()).group(1)
    forged = client.post("/predict", data={**upload(NIH_PNG), "csrf_token": "forged"})
    assert forged.status_code == 303 and not saved_ids(app)
    accepted = client.post("/predict", data={**upload(NIH_PNG), "csrf_token": token})
    assert accepted.status_code == 303
    assert client.post("/api/predict", data=upload(NIH_PNG)).status_code == 200


def test_security_headers_on_every_response(client):
    rid = post_png(client)
    responses = [client.get(path) for path in (
        "/", f"/results/{rid}", f"/results/{rid}/image.png", "/static/css/app.css", "/static/js/app.js",
        "/healthz", "/api/model", "/nope", "/api/nope",
    )] + [client.post("/api/predict", data=upload(b"x", "x.txt")), client.post("/predict", data=upload(NIH_PNG))]
    for response in responses:
        csp = response.headers["Content-Security-Policy"]
        directives = dict(d.strip().split(" ", 1) for d in csp.split(";"))
        assert directives["script-src"] == "'self'" and directives["frame-ancestors"] == "'none'"
        assert "unsafe-inline" not in csp
        assert response.headers["X-Content-Type-Options"] == "nosniff"
        assert response.headers["Referrer-Policy"] == "no-referrer"


def test_pages_have_no_inline_script_or_cdn(client):
    rid = post_png(client)
    other = client.post("/api/predict", data=upload(DICOM_MONO2)).get_json()["id"]
    for path in ("/", f"/results/{rid}", f"/results?ids={rid},{other}", "/nope"):
        body = client.get(path).data.decode()
        scripts = re.findall(r"<script\b[^>]*>", body)
        assert scripts == ['<script src="/static/js/app.js" defer>']
        assert "</script>" in body and not re.search(r"<script[^>]*>[^<]+</script>", body)
        assert not re.search(r"\son[a-z]+=", body) and " style=" not in body
        assert not re.search(r'(src|href)="(https?:)?//', body.replace('href="https://nihcc.app.box.com', ""))


def test_dicom_header_data_is_never_saved_or_shown(make_app, phi_dicom):
    app = make_app(WTF_CSRF_ENABLED=False)
    client = app.test_client()
    answers = [client.post("/api/predict", data=upload(phi_dicom, "scan.dcm"))]
    doc = answers[0].get_json()
    page = client.post("/predict", data={"file": [(io.BytesIO(phi_dicom), "scan.dcm"),
                                                  (io.BytesIO(NIH_PNG.read_bytes()), "b.png")]})
    answers.append(page)
    ids = re.findall(r'name="id" value="([0-9a-f]{32})"', page.data.decode())
    answers.append(client.get(f"/results?ids={','.join(ids)}"))
    ids.append(doc["id"])
    for rid in ids:
        answers += [client.get(f"/results/{rid}"), client.get(f"/api/results/{rid}"),
                    client.get(f"/results/{rid}/image.png")]
    answers += [client.get(url) for url in doc["heatmaps"].values()]
    assert all(r.status_code in (200, 303) for r in answers)
    secrets = [s.encode() for s in (*PHI, "Zyxwvut", "Secretname", "19450517")]
    saved = [p for p in results_dir(app).rglob("*") if p.is_file()]
    assert len(saved) > 10
    blobs = [r.data for r in answers] + [str(r.headers).encode() for r in answers] + [p.read_bytes() for p in saved]
    for blob in blobs:
        for secret in secrets:
            assert secret not in blob


def test_concurrent_requests_are_independent(make_app, tiny_predictor):
    app = make_app(MAX_ANALYSES=4, ANALYSIS_QUEUE=4)  # 4 at once; the bound itself is tested in test_hostile_limits
    paths = [NIH_PNG, DICOM_MONO2, RGBA_PNG, DICOM_MONO1] * 2
    expected = {p: tiny_predictor.predict(p).probabilities for p in set(paths)}

    def post(path: Path) -> dict:
        response = app.test_client().post("/api/predict", data=upload(path))
        assert response.status_code == 200
        return response.get_json()

    with ThreadPoolExecutor(max_workers=4) as pool:
        docs = list(pool.map(post, paths))
    assert len({d["id"] for d in docs}) == len(paths) == len(saved_ids(app))
    for path, doc in zip(paths, docs):
        assert probabilities(doc) == pytest.approx(expected[path], abs=1e-6)


def test_uploads_stay_in_memory(client, monkeypatch):
    import werkzeug.wrappers.request

    def spool_to_disk(*args, **kwargs):
        raise AssertionError("an upload was spooled to a temporary file")

    monkeypatch.setattr(werkzeug.wrappers.request, "default_stream_factory", spool_to_disk)
    with Image.open(NIH_PNG) as im:  # the real 1024 px PNG stored uncompressed: 1 MB, over Werkzeug's 500 KB limit
        big = io.BytesIO()
        im.save(big, "PNG", compress_level=0)
    assert big.tell() > 1_000_000
    assert client.post("/api/predict", data=upload(big.getvalue(), "big.png")).status_code == 200


# ---------------------------------------------------------------- one JSON shape


def test_cli_line_api_and_result_json_share_prediction_to_dict(client, app, tiny_checkpoint, capsys):
    """The CLI's JSON line, the API's answer and result.json all hold Prediction.to_dict() for the same image."""
    args = predictions.get_args_parser().parse_args([str(DICOM_MONO2), "--checkpoint", str(tiny_checkpoint),
                                                     "--device", "cpu", "--allow-untrusted", "--backend", "torch"])
    assert predictions.main(args) == 0  # the app fixture runs PyTorch too: the same numbers to the last digit
    line = json.loads(capsys.readouterr().out)
    doc = client.post("/api/predict", data=upload(DICOM_MONO2)).get_json()
    record = json.loads((results_dir(app) / doc["id"] / "result.json").read_text())
    shared = ["labels", "positive", "format", "original_size", "model", "in_scope", "scope_score", "scope_limit",
              "scope", "warning", "calibrated", "orientation"]
    assert set(line) == {*shared, "image"}  # the CLI adds the path (and "heatmaps" with --out)
    assert set(record) == {*shared, "id", "created", "display_size", "source"}  # source: a keyed client hash
    assert set(doc) == {*record, "image", "heatmaps", "heatmaps_npy", "report", "result"} - {"source"}  # + URLs
    for key in shared:
        assert line[key] == record[key] == doc[key], key
    assert line["image"] == str(DICOM_MONO2) and doc["image"] == f"http://localhost/results/{doc['id']}/image.png"
