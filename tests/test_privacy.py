"""Privacy: no DICOM patient-identifying value (name, ID, birth date, accession number, institution) from any corpus
input appears in a response body or header, the session cookie, a saved file, the logs or warnings, the CLI's
output or its heatmap files, or a real server's console.
"""
from __future__ import annotations

import json
import logging
import sys
import warnings
from pathlib import Path

import pytest
from flask import Flask
from flask.testing import FlaskClient
from support import forked
from support.data import ROOT
from support.hostile import CORPUS, dicom_bytes, identified_dicom, phi_strings
from support.training import TRAIN_PY, linked_data
from support.web import file_field, multipart, post, serve

SECRETS = phi_strings()  # name (whole and given part), ID, birth date (2 forms), accession, institution, ...
PHI_KINDS = [kind for kind, case in CORPUS.items() if any(s.encode() in case.make() for s in SECRETS)]


def leaks(blob: str | bytes) -> list[str]:
    """The secrets found in `blob`."""
    data = blob.encode() if isinstance(blob, str) else blob
    return [s for s in SECRETS if s.encode() in data]


def test_the_corpus_carries_patient_data():
    assert len(PHI_KINDS) >= 8 and "DICOM with patient data (valid)" in PHI_KINDS
    assert any(CORPUS[kind].valid for kind in PHI_KINDS) and any(not CORPUS[kind].valid for kind in PHI_KINDS)


@pytest.fixture
def app(make_app) -> Flask:
    return make_app()


def exercise(client: FlaskClient, app: Flask, kind: str) -> dict[str, bytes]:
    """POST the case to the API and the upload page, then GET every page and file a result offers; what came back."""
    seen: dict[str, bytes] = {}
    serializer = app.session_interface.get_signing_serializer(app)

    def keep(what: str, response) -> None:
        assert response.status_code < 500, (what, response.status_code)
        seen[what] = response.data
        seen[what + " headers"] = str(response.headers).encode()
        for cookie in response.headers.getlist("Set-Cookie"):  # the session is signed, not encrypted: decode it
            value = cookie.split(";", 1)[0].split("=", 1)[1]
            if value:
                seen[what + " session"] = json.dumps(serializer.loads(value)).encode()

    case = CORPUS[kind]
    api = client.post("/api/predict", data=file_field(case))
    keep("api", api)
    page = client.post("/predict", data=file_field(case))
    keep("page", page)
    if case.valid:
        doc = api.get_json()
        rids = [doc["id"], page.headers["Location"].removeprefix("/results/")]
        for url in (page.headers["Location"], f"/results/{rids[1]}?plain=1&label=Mass", f"/api/results/{rids[0]}",
                    f"/results?ids={','.join(rids)}", doc["image"], *doc["heatmaps"].values(), "/"):
            keep(url, client.get(url))
    return seen


@pytest.mark.parametrize("kind", PHI_KINDS)
def test_web_app_never_shows_saves_or_logs_patient_data(kind, app, caplog, capsys):
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="pydicom")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        seen = exercise(app.test_client(), app, kind)
    for what, data in seen.items():
        assert not leaks(data), what
    results = Path(app.config["RESULTS_DIR"])
    saved = list(results.rglob("*"))
    assert len(saved) > 0 if CORPUS[kind].valid else saved == []
    for path in saved:
        assert not leaks(str(path.relative_to(results)))
        if path.is_file():
            assert not leaks(path.read_bytes()), path
    captured = capsys.readouterr()
    assert not leaks(caplog.text) and not leaks(captured.out) and not leaks(captured.err)
    assert not leaks(" ".join(str(w.message) for w in caught))


@pytest.mark.slow(10)
def test_predictions_cli_never_prints_or_writes_patient_data(tiny_checkpoint, tmp_path):
    inputs, out = tmp_path / "inputs", tmp_path / "out"
    inputs.mkdir()
    for i, kind in enumerate(PHI_KINDS):
        (inputs / f"case-{i:02d}.dcm").write_bytes(CORPUS[kind].make())
    result = forked.run(
        [sys.executable, "-W", "always", "predictions.py", str(inputs), "--checkpoint", str(tiny_checkpoint),
         "--out", str(out), "--heatmaps", "positive", "--device", "cpu", "--allow-untrusted"],
        cwd=ROOT, timeout=300,
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(records) == len(PHI_KINDS) and sum("heatmaps" in r for r in records) == sum(
        CORPUS[kind].valid for kind in PHI_KINDS)
    assert not leaks(result.stdout) and not leaks(result.stderr)
    written = [p for p in out.rglob("*") if p.is_file()]
    assert len(written) >= 1
    for path in written:
        assert not leaks(str(path.relative_to(out))) and not leaks(path.read_bytes()), path


@pytest.mark.slow(5)
def test_a_real_server_console_never_shows_patient_data(tiny_checkpoint, tmp_path):
    with serve(tiny_checkpoint, tmp_path / "live") as server:
        for kind in PHI_KINDS:
            status, doc = post(server, multipart(CORPUS[kind].make(), CORPUS[kind].filename.encode()))
            assert (status == 200) == CORPUS[kind].valid and not leaks(json.dumps(doc))
    console = server.log.read_text(errors="replace")
    assert "Serving the chest X-ray app" in console and not leaks(console)
    for path in server.results.rglob("*"):
        assert not (path.is_file() and leaks(path.read_bytes())), path


CORRUPTED_LENGTH_KINDS = ["DICOM with a corrupted SOPClassUID length",
                          "DICOM with patient data swallowed into PhotometricInterpretation"]


def test_corrupted_length_dicoms_are_among_the_checked_kinds():
    # A wrong length makes an element's value swallow its neighbours; pydicom then quotes the raw bytes.
    for kind in CORRUPTED_LENGTH_KINDS:
        assert kind in PHI_KINDS
        data = CORPUS[kind].make()
        assert sum(secret.encode() in data for secret in SECRETS) >= 10


@pytest.mark.slow(11)
def test_train_py_skips_corrupted_dicoms_and_prints_no_patient_data(nih_dir, tmp_path):

    names = sorted(p.name for p in (nih_dir / "images_64").iterdir())[:24]
    root = linked_data(nih_dir, tmp_path / "data", names)
    bad = names[:len(CORRUPTED_LENGTH_KINDS) + 1]
    for name, data in zip(bad, [*(CORPUS[kind].make() for kind in CORRUPTED_LENGTH_KINDS),
                                dicom_bytes(identified_dicom())[:600]]):
        (root / name).unlink()
        (root / name).write_bytes(data)  # a DICOM under an NIH name: the content decides
    run = tmp_path / "run"
    result = forked.run(
        [sys.executable, "-W", "always", str(TRAIN_PY), "--data-dir", str(root), "--arch", "resnet18",
         "--image-size", "64", "--epochs", "1", "--no-pretrained", "--device", "cpu", "--batch-size", "4",
         "--workers", "0", "--no-progress", "--val-fraction", "0.3", "--check-data", "--run-dir", str(run),
         "--output", str(tmp_path / "x.pth")],
        cwd=tmp_path, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert f"checked {len(names)} images: {len(bad)} unreadable" in result.stdout
    for name in bad:
        assert f"cannot read image {name}" in result.stdout
    assert sorted(line.split("\t")[0] for line in (run / "unreadable.txt").read_text().splitlines()) == bad
    assert not leaks(result.stdout) and not leaks(result.stderr)
    for path in run.rglob("*"):
        assert not (path.is_file() and leaks(path.read_bytes())), path
