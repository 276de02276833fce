"""The results database (chestxray.store) on SQLite and on a real PostgreSQL server: every field of an analysis back
as written, feedback, deletion, the Alembic migrations (an empty database and one at the previous revision both
upgrade; the migrations make exactly the models' schema), concurrent writers, and two app servers sharing one
PostgreSQL."""
from __future__ import annotations

import io
import json
import sys
import threading
import urllib.request
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
from e2e.livesite import free_port, stop_server
from sqlalchemy import create_engine, inspect, text
from support import forked
from support.data import DICOM_MONO2, NIH_PNG, ROOT
from support.store import create_database, database_fixture, postgres_fixture

from chestxray.store import HEAD, AnalysisStore, ModelVersion, Review, StoreError, answered_entry, refused_entry

postgres = pytest.fixture(scope="session", name="postgres")(postgres_fixture)
database = pytest.fixture(params=["sqlite", "postgresql"], name="database")(database_fixture)
MODEL = ModelVersion("tiny.pth (resnet18 64px)", "ab" * 32, "torch")


@pytest.fixture(scope="module")
def predictions(tiny_predictor):
    return [tiny_predictor.predict(NIH_PNG), tiny_predictor.predict(DICOM_MONO2)]


def test_an_analysis_reads_back_as_written(database, predictions):
    store = AnalysisStore(database)
    assert store.revision() == HEAD
    png, dcm = predictions
    when = datetime(2026, 12, 1, 9, 30, tzinfo=UTC)
    store.record(answered_entry(png, source="web", latency_s=0.25, model=MODEL, result_id="a" * 32,
                                data=NIH_PNG.read_bytes(), input_stats=(0.4, 0.2), created=when))
    store.record(answered_entry(dcm, source="dicom", latency_s=0.5, model=MODEL, result_id="b" * 32,
                                data=DICOM_MONO2.read_bytes(), created=when + timedelta(hours=1)))
    store.record(refused_entry(source="api", reason="unreadable image", latency_s=0.01, model=MODEL,
                               created=when + timedelta(hours=2)))
    first, second, third = store.analyses()
    expected = png.to_dict()
    assert first["result_id"] == "a" * 32 and first["source"] == "web" and first["outcome"] == "answered"
    assert datetime.fromisoformat(first["created"]) == when
    assert first["model"] == {"name": MODEL.name, "hash": MODEL.hash, "backend": "torch"}
    assert [(a["label"], a["call"]) for a in first["labels"]] == [(r["label"], r["call"]) for r in expected["labels"]]
    assert np.allclose([a["probability"] for a in first["labels"]], [r["probability"] for r in expected["labels"]])
    assert first["image"] == {"format": "PNG", "width": 1024, "height": 1024, "bit_depth": 8,
                              "photometric": "MONOCHROME2"}
    assert first["input"] == {"brightness": 0.4, "contrast": 0.2} and first["latency_ms"] == pytest.approx(250)
    # The DICOM's technical facts come from its header (pydicom reads the same elements independently here).
    import pydicom

    header = pydicom.dcmread(DICOM_MONO2, stop_before_pixels=True)
    assert second["image"]["bit_depth"] == header.BitsStored
    assert second["image"]["photometric"] == header.PhotometricInterpretation
    # Without input_stats given, the row holds the prediction's own (read from the input its forward pass used).
    assert np.allclose([second["input"]["brightness"], second["input"]["contrast"]], dcm.input_stats, atol=1e-6)
    assert second["image"]["format"] == "DICOM" and second["source"] == "dicom"
    assert third["outcome"] == "refused" and third["reason"] == "unreadable image" and third["labels"] == []
    # since / until / limit, oldest first; newest first on request
    assert [a["source"] for a in store.analyses(since=when + timedelta(minutes=30))] == ["dicom", "api"]
    assert [a["source"] for a in store.analyses(until=when + timedelta(minutes=30))] == ["web"]
    assert [a["source"] for a in store.analyses(limit=1, newest=True)] == ["api"]
    columns = store.columns()
    assert list(columns["outcome"]) == ["answered", "answered", "refused"]
    assert columns["labels"] == list(png.labels) and columns["probability"].shape == (3, len(png.labels))
    assert np.isnan(columns["probability"][2]).all()
    assert list(store.columns(last=1)["source"]) == ["dicom"]  # the drift window holds answered analyses only
    assert store.totals() == {("web", "answered"): 1, ("dicom", "answered"): 1, ("api", "refused"): 1}


def test_feedback_is_replaced_removed_and_checked(database, predictions):
    store = AnalysisStore(database)
    png = predictions[0]
    store.record(answered_entry(png, source="web", latency_s=0.1, model=MODEL, result_id="c" * 32))
    labels = list(png.labels)
    assert store.save_feedback("c" * 32, {labels[0]: Review(True, None), labels[1]: Review(None, "present")},
                               reader="  Dr   Reader ") == 2
    saved = store.feedback("c" * 32)
    assert saved[labels[0]]["agree"] is True and saved[labels[0]]["truth"] is None
    assert saved[labels[1]]["truth"] == "present" and saved[labels[1]]["reader"] == "Dr Reader"
    # A second review of a label replaces the first; an empty one removes it.
    assert store.save_feedback("c" * 32, {labels[0]: Review(False, "absent"), labels[1]: Review()}) == 1
    assert set(store.feedback("c" * 32)) == {labels[0]}
    assert store.feedback("c" * 32)[labels[0]]["agree"] is False
    calls = {row["label"]: row["call"] for row in png.to_dict()["labels"]}
    assert store.reviews() == [(labels[0], calls[labels[0]], False, "absent")]
    with pytest.raises(ValueError, match="no label"):
        store.save_feedback("c" * 32, {"Not_A_Label": Review(True)})
    with pytest.raises(LookupError):
        store.save_feedback("d" * 32, {labels[0]: Review(True)})
    with pytest.raises(ValueError, match="true label"):
        Review(truth="maybe")


def table_counts(url: str) -> dict[str, int]:
    engine = create_engine(url.replace("postgresql://", "postgresql+psycopg://"))
    try:
        with engine.connect() as connection:
            return {t: connection.execute(text(f"SELECT count(*) FROM {t}")).scalar()
                    for t in ("analyses", "analysis_labels", "feedback")}
    finally:
        engine.dispose()


def test_deleting_a_result_deletes_its_row_labels_and_feedback(database, predictions):
    store = AnalysisStore(database)
    png = predictions[0]
    for rid in ("e" * 32, "f" * 32):
        store.record(answered_entry(png, source="web", latency_s=0.1, model=MODEL, result_id=rid))
        store.save_feedback(rid, {png.labels[0]: Review(True)})
    assert store.delete_result("e" * 32) is True and store.delete_result("e" * 32) is False
    n = len(png.labels)
    assert table_counts(database) == {"analyses": 1, "analysis_labels": n, "feedback": 1}


def test_an_empty_database_and_one_at_the_previous_revision_both_upgrade(database, predictions):
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    old = AnalysisStore(database, upgrade=False)
    assert old.revision() is None  # empty
    assert ScriptDirectory.from_config(old.alembic_config()).get_current_head() == HEAD
    old.upgrade("0001")  # the previous revision: analyses without feedback
    assert old.revision() == "0001" and "feedback" not in inspect(old.engine).get_table_names()
    old.record(answered_entry(predictions[0], source="cli", latency_s=0.2, model=MODEL, result_id="1" * 32))
    old.dispose()
    store = AnalysisStore(database)  # opening upgrades
    assert store.revision() == HEAD
    assert [a["result_id"] for a in store.analyses()] == ["1" * 32]  # the old row survived
    assert store.save_feedback("1" * 32, {predictions[0].labels[0]: Review(True)}) == 1
    with store.engine.connect() as connection:  # the migrations make exactly what the models describe
        from chestxray.store.models import Base

        assert compare_metadata(MigrationContext.configure(connection), Base.metadata) == []
    AnalysisStore(database)  # a second open at the head is a no-op
    assert store.revision() == HEAD


def test_concurrent_writers_lose_nothing(database, predictions):
    store = AnalysisStore(database)
    entry = answered_entry(predictions[0], source="api", latency_s=0.1, model=MODEL)
    errors = []

    def write(k: int) -> None:
        try:
            for i in range(15):
                store.record({**entry, "result_id": f"{k:02x}{i:030x}"})
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and store.count() == 60


@pytest.mark.parametrize("url, words", [
    ("mysql://u:pw@localhost/x", "SQLite or PostgreSQL"),
    ("not a url", "cannot parse"),
])
def test_a_bad_database_url_is_refused_with_a_clear_message(url, words):
    with pytest.raises(StoreError, match=words):
        AnalysisStore(url)


def test_an_unreachable_postgresql_names_it_without_the_password():
    with pytest.raises(StoreError) as caught:
        AnalysisStore(f"postgresql://user:hunter2secret@127.0.0.1:{free_port()}/nothing?connect_timeout=2")
    message = str(caught.value)
    assert "127.0.0.1" in message and "hunter2secret" not in message and "***" in message


def start_app(checkpoint, root, database: str):
    port = free_port()
    root.mkdir(parents=True, exist_ok=True)
    log = root / "server.log"
    cmd = [sys.executable, str(ROOT / "main.py"), "--checkpoint", str(checkpoint), "--port", str(port),
           "--results-dir", str(root / "results"), "--instance-dir", str(root / "instance"), "--device", "cpu",
           "--threads", "2", "--database", database]
    return forked.popen(cmd, cwd=ROOT, stdout=log), f"http://127.0.0.1:{port}", log


def wait_healthy(proc, base: str, log) -> None:
    import time

    deadline = time.monotonic() + 90
    while True:
        assert proc.poll() is None, f"the server exited:\n{log.read_text()}"
        try:
            with urllib.request.urlopen(base + "/healthz", timeout=2):
                return
        except OSError:
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)


def post_image(base: str, data: bytes, name: str) -> dict:
    boundary = "store-test-boundary"
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
            f"Content-Type: application/octet-stream\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    request = urllib.request.Request(base + "/api/predict", data=body, method="POST",
                                     headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.load(response)


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.load(response)


@pytest.mark.slow(8)
def test_two_app_servers_share_one_postgresql(postgres, tiny_checkpoint, tmp_path):
    """Behind a load balancer: each server writes its analyses, and each reads everyone's."""
    url = create_database(postgres)
    servers = [start_app(tiny_checkpoint, tmp_path / name, url) for name in ("a", "b")]  # start (and migrate) at once
    try:
        for proc, base, log in servers:
            wait_healthy(proc, base, log)
        (_, a, _), (_, b, _) = servers
        ids = [post_image(a, NIH_PNG.read_bytes(), "x.png")["id"], post_image(b, NIH_PNG.read_bytes(), "y.png")["id"],
               post_image(a, DICOM_MONO2.read_bytes(), "z.dcm")["id"]]
        for base in (a, b):
            listed = get_json(base + "/api/results")["analyses"]
            assert [row["result_id"] for row in listed] == ids
        since = get_json(a + "/api/results")["analyses"][1]["created"]
        assert {row["result_id"] for row in get_json(f"{b}/api/results?since={since}")["analyses"]} >= set(ids[1:])
        with urllib.request.urlopen(b + "/metrics", timeout=30) as response:
            metrics = response.read().decode()
        assert 'chestxray_analyses_total{outcome="answered",source="api"} 3.0' in metrics
    finally:
        for proc, _, _ in servers:
            stop_server(proc)
    assert table_counts(url)["analyses"] == 3


def test_the_default_store_is_sqlite_in_the_instance_folder_and_ignored_by_git(make_app, tmp_path):
    import subprocess

    app = make_app()
    monitor = app.extensions["chestxray.monitor"]
    assert monitor.store.dialect == "sqlite"
    assert monitor.store.url.database == str((tmp_path / "instance" / "results.sqlite3").resolve())
    client = app.test_client()
    assert client.post("/api/predict", data={"file": (io.BytesIO(NIH_PNG.read_bytes()), "x.png")}).status_code == 200
    assert monitor.store.count() == 1
    # The project's own instance folder (make run) is git-ignored, so the database never dirties a clone.
    ignored = subprocess.run(["git", "check-ignore", "-q", "instance/results.sqlite3"], cwd=ROOT)
    assert ignored.returncode == 0


def test_the_config_file_names_the_database(make_app, tmp_path):
    (tmp_path / "instance").mkdir()
    other = tmp_path / "elsewhere.sqlite3"
    (tmp_path / "instance" / "config.toml").write_text(f'DATABASE = "sqlite:///{other}"\n')
    app = make_app()
    assert app.extensions["chestxray.monitor"].store.url.database == str(other)
    assert other.exists()
