"""The web side of monitoring (chestxray/web/monitoring.py): every upload gets a row, the review form (CSRF,
validation) stores feedback, /api/results and its CSV export, /monitor and its plots, /metrics in Prometheus' format,
the drift notice on result pages, deletion vs retention, and no patient data in the database from any entry point."""
from __future__ import annotations

import io
import re
import sqlite3
from pathlib import Path

import numpy as np
import pytest
import torch
from support.data import NIH_DIR, NIH_PNG
from support.hostile import CORPUS, dicom_bytes, identified_dicom, phi_strings

from chestxray.checkpoint import safe_torch_load
from chestxray.monitor import fit_reference, input_statistics
from chestxray.predictor import Predictor
from chestxray.trust import TRUST_KEY

SMALL = sorted((NIH_DIR / "images_128").glob("*.png"))[:24]
VALIDATED = "Effusion"  # any label: the app runs with ALLOW_UNTRUSTED, so every label gets a call


@pytest.fixture(scope="module")
def monitored_checkpoint(tmp_path_factory, tiny_checkpoint) -> Path:
    """The tiny checkpoint with a trust entry holding only a reference, fitted on 24 small sample images."""
    path = tmp_path_factory.mktemp("monitored") / "model.pth"
    predictor = Predictor.from_checkpoint(tiny_checkpoint, device="cpu")
    predictions = [predictor.predict(p) for p in SMALL]
    probs = np.array([[p.probabilities[label] for label in p.labels] for p in predictions])
    stats = np.array([input_statistics(predictor.transform(p.image)) for p in predictions])
    # Each prediction carries the same figures, from the input its forward pass used (the monitor records them).
    assert np.allclose([p.input_stats for p in predictions], stats, atol=1e-6)
    reference = fit_reference(probs, predictor.labels)
    reference.samples["brightness"], reference.samples["contrast"] = np.sort(stats[:, 0]), np.sort(stats[:, 1])
    obj = safe_torch_load(tiny_checkpoint)
    obj[TRUST_KEY] = {"format": 1, "reference": reference.to_dict()}
    torch.save(obj, path)
    return path


@pytest.fixture
def app(make_app, monitored_checkpoint):
    return make_app(CHECKPOINT=str(monitored_checkpoint), ALLOW_UNTRUSTED=True, ALERT_LIMITS={"window": 20})


def upload(client, data: bytes, name: str = "x.png", path: str = "/api/predict"):
    return client.post(path, data={"file": (io.BytesIO(data), name)})


def test_every_upload_and_refusal_gets_a_row(app):
    client = app.test_client()
    rid = upload(client, NIH_PNG.read_bytes()).get_json()["id"]
    assert upload(client, NIH_PNG.read_bytes(), path="/predict").status_code == 303
    assert upload(client, b"%PDF-1.4\n%\xe2\xe3\n", "x.pdf").status_code == 415
    assert upload(client, b"\x89PNG\r\n\x1a\n" + b"\0" * 40).status_code == 400
    rows = client.get("/api/results").get_json()["analyses"]
    assert [(r["source"], r["outcome"], r["reason"]) for r in rows] == [
        ("api", "answered", None), ("web", "answered", None), ("api", "refused", "unsupported format"),
        ("api", "refused", "unreadable image")]
    assert rows[0]["result_id"] == rid and rows[0]["latency_ms"] > 0 and 0 < rows[0]["input"]["brightness"] < 1
    assert rows[0]["model"]["hash"] and rows[0]["model"]["name"].startswith("model.pth")


def csrf_token(page: bytes) -> str:
    return re.search(rb'name="csrf_token" value="([^"]+)"', page).group(1).decode()


def test_the_review_form_saves_feedback_behind_its_csrf_token(make_app, monitored_checkpoint):
    app = make_app(CHECKPOINT=str(monitored_checkpoint), ALLOW_UNTRUSTED=True, WTF_CSRF_ENABLED=True)
    client = app.test_client()
    rid = upload(client, NIH_PNG.read_bytes()).get_json()["id"]
    page = client.get(f"/results/{rid}").data
    assert b'id="feedback-form"' in page and f'name="agree_{VALIDATED}"'.encode() in page
    form = {f"agree_{VALIDATED}": "disagree", "truth_Mass": "present", "truth_Hernia": "absent", "reader": "Dr R"}
    assert client.post(f"/results/{rid}/feedback", data=form).status_code == 400  # no token
    store = app.extensions["chestxray.monitor"].store
    assert store.feedback(rid) == {}
    answer = client.post(f"/results/{rid}/feedback", data={**form, "csrf_token": csrf_token(page)})
    assert answer.status_code == 303 and answer.headers["Location"].endswith(f"/results/{rid}#feedback")
    saved = store.feedback(rid)
    assert {k: (v["agree"], v["truth"], v["reader"]) for k, v in saved.items()} == {
        VALIDATED: (False, None, "Dr R"), "Mass": (None, "present", "Dr R"), "Hernia": (None, "absent", "Dr R")}
    page = client.get(f"/results/{rid}").data.decode()
    assert re.search(rf'name="agree_{VALIDATED}" value="disagree"\s+checked', page)
    assert re.search(r'<option value="present" selected>present</option>', page)
    token = csrf_token(page.encode())
    # Values outside the vocabulary are refused.
    assert client.post(f"/results/{rid}/feedback", data={"agree_Mass": "yes", "csrf_token": token}).status_code == 400
    assert client.post(f"/results/{rid}/feedback", data={"truth_Mass": "maybe", "csrf_token": token}
                       ).status_code == 400
    assert client.post(f"/results/{'0' * 32}/feedback", data={"csrf_token": token}).status_code == 404


def test_api_results_since_and_the_csv_export(app):
    client = app.test_client()
    first = upload(client, NIH_PNG.read_bytes()).get_json()["id"]
    second = upload(client, NIH_PNG.read_bytes()).get_json()["id"]
    store = app.extensions["chestxray.monitor"].store
    from chestxray.store import Review

    store.save_feedback(second, {VALIDATED: Review(True, "present")}, reader="R2")
    rows = client.get("/api/results").get_json()["analyses"]
    since = rows[1]["created"]
    listed = client.get("/api/results", query_string={"since": since}).get_json()["analyses"]
    assert second in [r["result_id"] for r in listed]
    assert [r["result_id"] for r in client.get("/api/results?reviewed=1").get_json()["analyses"]] == [second]
    paged = client.get("/api/results?limit=1").get_json()
    assert paged["count"] == 1 and paged["next"] and paged["analyses"][0]["result_id"] == first
    assert client.get("/api/results?since=yesterday").status_code == 400
    assert client.get("/api/results?limit=0").status_code == 400
    import csv

    table = list(csv.DictReader(io.StringIO(client.get("/api/results.csv").data.decode())))
    assert [r["result_id"] for r in table] == [first, second]
    assert table[1][f"{VALIDATED} agree"] == "agree" and table[1][f"{VALIDATED} truth"] == "present"
    assert table[0][f"{VALIDATED} truth"] == "not assessed" and table[1]["reader"] == "R2"
    assert float(table[0][f"{VALIDATED} probability"]) == pytest.approx(
        next(a["probability"] for a in rows[0]["labels"] if a["label"] == VALIDATED), abs=1e-6)


def inverted(path: Path) -> bytes:
    from PIL import Image, ImageOps

    buffer = io.BytesIO()
    ImageOps.invert(Image.open(path).convert("L")).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.slow(9)
def test_monitor_metrics_and_the_drift_notice(app):
    from prometheus_client.parser import text_string_to_metric_families

    client = app.test_client()
    rid = upload(client, SMALL[0].read_bytes()).get_json()["id"]
    assert b'id="drift-notice"' not in client.get(f"/results/{rid}").data  # 1 of 20: no verdict yet
    page = client.get("/monitor")
    assert page.status_code == 200 and b"Collecting: 1 of the 20" in page.data
    for name in ("volume", "rates", "drift", "latency"):
        png = client.get(f"/monitor/{name}.png?period=week")
        assert png.status_code == 200 and png.data.startswith(b"\x89PNG")
    assert client.get("/monitor/nothing.png").status_code == 404
    for path in SMALL[:20]:  # inverted films: darker, different texture, out of scope
        rid = upload(client, inverted(path)).get_json()["id"]
    from chestxray.web import monitoring

    status = app.extensions["chestxray.monitor"].status()
    assert status.n == 20 and status.alerts  # the window is full of inverted films
    result_page = client.get(f"/results/{rid}").data.decode()
    assert 'id="drift-notice"' in result_page
    assert all(monitoring.quantity_name(row.quantity) in result_page for row in status.alerts)
    monitor_page = client.get("/monitor").data
    assert b"Drift alert." in monitor_page and b"ALERT" in monitor_page
    families = {f.name: f for f in text_string_to_metric_families(client.get("/metrics").data.decode())}
    totals = {tuple(sorted(s.labels.items())): s.value for s in families["chestxray_analyses"].samples
              if s.name.endswith("_total")}
    assert totals == {(("outcome", "answered"), ("source", "api")): 21.0}
    alerts = {s.labels["quantity"]: s.value for s in families["chestxray_drift_alert"].samples}
    assert alerts == {row.quantity: float(row.alert) for row in status.rows} and 1.0 in alerts.values()
    assert families["chestxray_drift_window_analyses"].samples[0].value == 20
    assert {s.labels["quantile"] for s in families["chestxray_latency_seconds"].samples} == {"0.5", "0.95"}


def test_deleting_a_result_deletes_its_row_but_retention_keeps_rows(make_app, monitored_checkpoint):
    app = make_app(CHECKPOINT=str(monitored_checkpoint), ALLOW_UNTRUSTED=True, RETENTION=1, RESULT_MIN_AGE=0)
    client = app.test_client()
    store = app.extensions["chestxray.monitor"].store
    old = upload(client, NIH_PNG.read_bytes()).get_json()["id"]
    new = upload(client, NIH_PNG.read_bytes()).get_json()["id"]  # prunes `old`'s files (retention 1)
    assert client.get(f"/results/{old}").status_code == 404 and store.has_result(old)
    assert client.delete(f"/api/results/{new}").status_code == 200
    assert not store.has_result(new) and store.count() == 1


def test_no_patient_data_reaches_the_database_from_any_entry_point(make_app, monitored_checkpoint, tmp_path):
    import predictions
    from chestxray.pacs import node as dicom_node

    secrets = phi_strings()
    phi_kinds = [kind for kind, case in CORPUS.items() if any(s.encode() in case.make() for s in secrets)]
    app = make_app(CHECKPOINT=str(monitored_checkpoint), ALLOW_UNTRUSTED=True)
    client = app.test_client()
    monitor = app.extensions["chestxray.monitor"]
    data = dicom_bytes(identified_dicom())
    named = f"{secrets[0]}_{secrets[2]}.dcm"  # the file name carries the patient's name and ID too
    assert upload(client, data, named).status_code == 200 and upload(client, data, named, "/predict").status_code == 303
    for kind in phi_kinds:  # valid and broken DICOMs full of patient data: answered or refused, never stored
        upload(client, CORPUS[kind].make(), named)
    analyse = dicom_node.analyser(app.extensions["chestxray"].predictor, app.extensions["chestxray.results"],
                                  monitor)
    analyse(dicom_node.Received.parse(data))
    cli_file = tmp_path / "in" / named
    cli_file.parent.mkdir()
    cli_file.write_bytes(data)
    assert predictions.main(predictions.get_args_parser().parse_args(
        [str(cli_file), "--checkpoint", str(monitored_checkpoint), "--workers", "0", "--device", "cpu",
         "--jsonl", str(tmp_path / "out.jsonl"), "--database", str(monitor.store.url)])) == 0
    rows = monitor.store.analyses()
    assert {r["source"] for r in rows} == {"api", "web", "dicom", "cli"} and len(rows) >= 4 + len(phi_kinds)
    assert {r["image"]["photometric"] for r in rows if r["source"] == "dicom"} == {"MONOCHROME2"}
    # Everything the database holds, as SQL text and as the raw files on disk (the WAL included).
    folder = Path(monitor.store.url.database).parent
    with sqlite3.connect(monitor.store.url.database) as connection:
        dump = "\n".join(connection.iterdump())
    assert "INSERT INTO" in dump
    blobs = [dump.encode(), *(p.read_bytes() for p in folder.glob("results.sqlite3*")),
             client.get("/api/results").data, client.get("/api/results.csv").data, client.get("/metrics").data]
    for blob in blobs:
        assert [s for s in secrets if s.encode() in blob] == []


def test_a_fresh_database_shows_the_monitor_even_without_a_model(make_app, tmp_path):
    app = make_app(CHECKPOINT=str(tmp_path / "missing.pth"))
    client = app.test_client()
    page = client.get("/monitor")
    assert page.status_code == 200 and b'id="no-reference"' in page.data
    assert b"No analyses in this span yet" in page.data
    assert client.get("/monitor/volume.png?period=week").data.startswith(b"\x89PNG")
    assert client.get("/api/results").get_json() == {"analyses": [], "count": 0, "next": None}
    assert b"chestxray_store_write_errors_total 0.0" in client.get("/metrics").data


def test_every_c_store_the_dicom_node_refuses_gets_a_row_without_patient_data(make_app, monitored_checkpoint,
                                                                               tmp_path):
    """The node as main.py starts it: an answered image, an unreadable one and an oversized one, each full of patient
    data, give one row each (answered / refused and why) and the database holds none of that data."""
    from pydicom.uid import DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian
    from pynetdicom import AE
    from support.pacs import NODE_AET, radiograph

    import main
    from chestxray.web import worklist

    app = make_app(CHECKPOINT=str(monitored_checkpoint), ALLOW_UNTRUSTED=True)
    args = main.get_args_parser().parse_args(["--dicom-port", "0", "--dicom-aet", NODE_AET, "--instance-dir",
                                              str(tmp_path / "node"), "--dicom-max-dataset-mb", "1"])
    good, broken, big = (radiograph(tmp_path / f"{name}.dcm") for name in ("good", "broken", "big"))
    broken.PixelData = b"\x00" * 100  # 64 x 64 pixels promised, 100 bytes given
    big.Rows = big.Columns = 1024
    big.PixelData = bytes(1024 * 1024) * 2  # 2 MiB over the 1 MiB limit (8-bit: the first half would do)
    node = worklist.start_node(app, args)
    try:
        ae = AE(ae_title="XRAY_ROOM_1")
        ae.add_requested_context(DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 120
        assoc = ae.associate("127.0.0.1", node.port, ae_title=NODE_AET)
        assert assoc.is_established
        try:
            statuses = [int(assoc.send_c_store(ds).Status) for ds in (good, broken, big)]
        finally:
            assoc.release()
        assert node.wait_idle(120)
    finally:
        node.stop()
    assert statuses == [0x0000, 0xC000, 0xA700]
    monitor = app.extensions["chestxray.monitor"]
    rows = monitor.store.analyses()
    assert sorted((r["source"], r["outcome"], r["reason"]) for r in rows) == [
        ("dicom", "answered", None), ("dicom", "refused", "data set over the size limit (0xA700)"),
        ("dicom", "refused", "unreadable image (0xC000)")]
    assert {r["model"]["hash"] for r in rows} == {monitor.model.hash}  # refusals count against the model serving
    secrets = phi_strings()
    with sqlite3.connect(monitor.store.url.database) as connection:
        dump = "\n".join(connection.iterdump())
    folder = Path(monitor.store.url.database).parent
    for blob in [dump.encode(), *(p.read_bytes() for p in folder.glob("results.sqlite3*")),
                 app.test_client().get("/api/results.csv").data]:
        assert [s for s in secrets if s.encode() in blob] == []
    metrics = app.test_client().get("/metrics").get_data(as_text=True)
    assert 'chestxray_analyses_total{outcome="refused",source="dicom"} 2.0' in metrics
    assert 'chestxray_analyses_total{outcome="answered",source="dicom"} 1.0' in metrics


def test_every_monitored_quantity_has_a_readable_name():
    from chestxray.monitor import CALLED, INPUTS, MEAN_LABEL_RANK, OUT_OF_SCOPE, probability_key
    from chestxray.web import monitoring

    quantities = [*INPUTS, MEAN_LABEL_RANK, OUT_OF_SCOPE, probability_key("Pleural_Thickening"),
                  CALLED + "Pleural_Thickening"]
    names = [monitoring.quantity_name(q) for q in quantities]
    assert all("_" not in name for name in names), names  # never a raw key on /monitor or a result page's notice
    assert monitoring.quantity_name(MEAN_LABEL_RANK) == "mean label rank (all labels)"
