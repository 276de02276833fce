"""The hostile-input corpus and the HTTP-level hostile kinds through the web app: a clear 4xx (never a 500 or a
traceback), nothing left in the results folder for a refused file, and /healthz still answering afterwards.

Corpus cases and malformed requests go through Flask's test client; partial, stalled, slow and oversized uploads
go through a real `python main.py` (waitress) on a free loopback port, every wait bounded by a timeout. The status
each corpus kind gets is also checked against the table in docs/RELIABILITY.md, so the table stays true.
"""
from __future__ import annotations

import html
import http.client
import io
import json
import os
import re
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from flask import Flask
from flask.testing import FlaskClient
from support.data import NIH_DIR, ROOT
from support.hostile import CORPUS, Case, png_bytes
from support.web import BOUNDARY, LiveServer, file_field, multipart, post, serve

import predictions
from chestxray.imaging import ACCEPTED
from chestxray.results import RESULT_ID

RELIABILITY_DOC = ROOT / "docs" / "RELIABILITY.md"
HOSTILE_NAME = CORPUS["hostile file name (../, NUL, non-ASCII)"].filename
SAVED_FILES = {"image.png", "heatmaps.npy", "heatmap", "result.json"}  # what a result folder may hold
TIMEOUT = 10.0  # seconds; bounds every socket wait against the live server


def documented_statuses() -> dict[str, int]:
    """Kind -> the `POST /api/predict` status in docs/RELIABILITY.md's corpus table (its third column)."""
    statuses = {}
    for line in RELIABILITY_DOC.read_text().splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) >= 3 and cells[0] in CORPUS:
            match = re.match(r"`(\d{3})`", cells[2])
            if match:
                statuses[cells[0]] = int(match.group(1))
    return statuses


DOCUMENTED = documented_statuses()


@pytest.fixture
def app(make_app) -> Flask:
    return make_app(MAX_CONTENT_LENGTH=1024 * 1024)


@pytest.fixture
def client(app) -> FlaskClient:
    return app.test_client()


def entries(folder: Path) -> list[str]:
    """Everything in the results folder (result ids, temporary folders, anything else)."""
    return sorted(os.listdir(folder))


def check_result_folders(folder: Path) -> None:
    """Only random hex ids in the results folder, each holding only the files a saved result is made of."""
    for name in entries(folder):
        assert RESULT_ID.fullmatch(name), name
        assert set(os.listdir(folder / name)) <= SAVED_FILES


def check_clean(body: bytes) -> None:
    """No traceback or source path in a response body."""
    assert b"Traceback" not in body and b'File "/' not in body and str(ROOT).encode() not in body


def check_healthy(client: FlaskClient) -> None:
    response = client.get("/healthz")
    assert response.status_code == 200 and response.get_json() == {"status": "ok", "model_loaded": True,
                                                                    "backend": "torch"}


def flashed(body: bytes) -> list[str]:
    """The error messages flashed on a page, unescaped."""
    return [html.unescape(m) for m in re.findall(r'<li class="flash error">(.*?)</li>', body.decode(), re.S)]


def expected_message(case: Case, status: int) -> str:
    """read_xray's message (400) or imaging.sniff's message for another file type (415)."""
    return case.message if status == 400 else "unsupported file type ("


def test_the_doc_table_lists_every_corpus_kind():
    assert set(DOCUMENTED) == set(CORPUS), set(CORPUS) ^ set(DOCUMENTED)


# ---------------------------------------------------------------- the corpus through the JSON API and the page


@pytest.mark.parametrize("kind", list(CORPUS))
def test_api_on_the_corpus(client, app, kind):
    case = CORPUS[kind]
    results = Path(app.config["RESULTS_DIR"])
    response = client.post("/api/predict", data=file_field(case))
    check_clean(response.data)
    doc = response.get_json()
    assert response.mimetype == "application/json"
    assert response.status_code == DOCUMENTED[kind], doc  # the table in docs/RELIABILITY.md
    if case.valid:
        assert response.status_code == 200, doc
        assert len(doc["labels"]) == 14 and all(0 <= row["probability"] <= 1 for row in doc["labels"])
        assert entries(results) == [doc["id"]]
        check_result_folders(results)
    else:
        assert response.status_code in (400, 415)
        assert set(doc) == {"error"} and expected_message(case, response.status_code) in doc["error"]
        assert entries(results) == []
    check_healthy(client)


@pytest.mark.parametrize("kind", list(CORPUS))
def test_upload_page_on_the_corpus(client, app, kind):
    case = CORPUS[kind]
    results = Path(app.config["RESULTS_DIR"])
    response = client.post("/predict", data=file_field(case))
    check_clean(response.data)
    if case.valid:
        assert response.status_code == 303
        rid = response.headers["Location"].removeprefix("/results/")
        assert RESULT_ID.fullmatch(rid) and entries(results) == [rid]
        page = client.get(response.headers["Location"])
        assert page.status_code == 200 and b'id="heat"' in page.data
        check_clean(page.data)
    else:
        # Back to the upload page (a redirect, so a reload posts nothing), the API's message shown there.
        assert response.status_code == 303 and response.headers["Location"] == "/"
        page = client.get("/")
        check_clean(page.data)
        (message,) = flashed(page.data)
        assert message.startswith(f"{case.filename}: ") and expected_message(case, DOCUMENTED[kind]) in message
        assert entries(results) == []
    check_healthy(client)


def test_hostile_file_name_never_reaches_the_disk(client, app, tmp_path):
    results = Path(app.config["RESULTS_DIR"])
    ids = [client.post("/api/predict", data={"file": (io.BytesIO(png_bytes()), HOSTILE_NAME)}).get_json()["id"]]
    response = client.post("/predict", data={"file": (io.BytesIO(png_bytes()), HOSTILE_NAME)})
    ids.append(response.headers["Location"].removeprefix("/results/"))
    assert entries(results) == sorted(ids)
    check_result_folders(results)
    everything = list(tmp_path.rglob("*"))
    assert not any("passwd" in p.name or "\u4e2d" in p.name for p in everything)
    assert not any(b"passwd" in p.read_bytes() for p in everything if p.is_file())
    for rid in ids:  # the saved record holds no trace of the name (short byte strings would match binary noise)
        record = (results / rid / "result.json").read_text()
        assert "passwd" not in record and "\u4e2d" not in record and "../" not in record


def test_a_refused_file_is_named_cleanly_on_the_page(client, app):
    name = "../../\x00\u202e<img src=x onerror=alert(1)>\u4e2d.png"
    response = client.post("/predict", data={"file": (io.BytesIO(b"junk" * 64), name)})
    assert response.status_code == 303
    response = client.get(response.headers["Location"])
    body = response.data.decode()
    # The last path part only, without NUL or the right-to-left override, escaped.
    assert "&lt;img src=x onerror=alert(1)&gt;\u4e2d.png: not a readable image" in body
    assert flashed(response.data) == ["<img src=x onerror=alert(1)>\u4e2d.png: not a readable image: the file is "
                                      "named '.png' but does not hold PNG, JPEG or DICOM data"]
    assert "<img src=x" not in body and "\x00" not in body and "\u202e" not in body and "../" not in body
    assert entries(Path(app.config["RESULTS_DIR"])) == []


# ---------------------------------------------------------------- malformed requests (test client)


HTML_PAGE = CORPUS["HTML with script"].make()
MISSING_FIELD = "missing the multipart form field 'file'"


def _part(data: bytes, name: str = "x.png", content_type: str = "application/octet-stream",
          field: str = "file") -> dict:
    return {"data": {field: (io.BytesIO(data), name, content_type)}}


# name -> (fresh request keyword arguments, API status, a fragment of the API's error message)
HTTP_KINDS: dict[str, tuple[Callable[[], dict], int, str]] = {
    "PNG sent as text/plain": (lambda: _part(png_bytes(), content_type="text/plain"), 200, ""),
    "HTML page sent as image/png": (lambda: _part(HTML_PAGE, "x.html", "image/png"), 415,
                                    "unsupported file type ('.html')"),
    "not multipart: raw PNG body": (lambda: {"data": png_bytes(), "content_type": "image/png"}, 400, MISSING_FIELD),
    "not multipart: JSON body": (lambda: {"json": {"file": "iVBORw0KGgo="}}, 400, MISSING_FIELD),
    "multipart without a boundary": (lambda: {"data": b"--x\r\nnonsense", "content_type": "multipart/form-data"},
                                     400, MISSING_FIELD),
    "garbage multipart body": (lambda: {"data": b"garbage\r\n--b\r\nno headers",
                                        "content_type": "multipart/form-data; boundary=b"}, 400, MISSING_FIELD),
    "missing form field (image= instead of file=)": (lambda: _part(png_bytes(), field="image"), 400, MISSING_FIELD),
    "body over the size limit": (lambda: _part(b"\0" * (1024 * 1024 + 1)), 413,
                                 "The upload is too large: the limit is 1 MB in all."),
}


@pytest.mark.parametrize("kind", list(HTTP_KINDS))
def test_malformed_requests_get_a_clear_4xx(client, app, kind):
    _, status, message = HTTP_KINDS[kind]
    results = Path(app.config["RESULTS_DIR"])
    response = client.post("/api/predict", **HTTP_KINDS[kind][0]())
    check_clean(response.data)
    assert response.status_code == status and response.mimetype == "application/json"
    if status == 200:
        assert entries(results) == [response.get_json()["id"]]
    else:
        assert message in response.get_json()["error"] and entries(results) == []
    page = client.post("/predict", **HTTP_KINDS[kind][0]())
    check_clean(page.data)
    if status == 200:
        assert page.status_code == 303 and len(entries(results)) == 2
    else:
        # Back to the upload page, which names the missing field in its own words: "No file was chosen".
        assert page.status_code == 303 and page.headers["Location"] == "/"
        shown = client.get("/")
        check_clean(shown.data)
        page_message = "No file was chosen" if message == MISSING_FIELD else message
        assert any(page_message in m for m in flashed(shown.data)) and entries(results) == []
    check_healthy(client)


def test_cli_and_api_refuse_each_corpus_file_with_the_same_message(client, tiny_checkpoint, tmp_path, capsys):
    """One sniff and one reader for both: a PDF (or any refused kind) gets the same words on the command line."""
    invalid = {kind: case for kind, case in CORPUS.items() if not case.valid}
    paths = {}
    for i, (kind, case) in enumerate(invalid.items()):
        paths[kind] = tmp_path / f"{i:02d}{Path(case.filename).suffix}"
        paths[kind].write_bytes(case.make())
    args = predictions.get_args_parser().parse_args(
        [*map(str, paths.values()), "--checkpoint", str(tiny_checkpoint), "--device", "cpu"])
    assert predictions.main(args) == 1
    cli = {record["image"]: record["error"] for record in map(json.loads, capsys.readouterr().out.splitlines())}
    for kind, path in paths.items():
        case = invalid[kind]
        api = client.post("/api/predict", data={"file": (io.BytesIO(case.make()), path.name, case.content_type)})
        assert api.status_code in (400, 415) and api.get_json()["error"] == cli[str(path)], kind
    pdf = client.post("/api/predict", data=file_field(CORPUS["PDF"])).get_json()["error"]
    assert pdf == f"unsupported file type (PDF): expected {ACCEPTED}" == cli[str(paths["PDF"])]


# ---------------------------------------------------------------- hostile file names through predictions.py


def test_predictions_cli_keeps_overlays_inside_out_for_dotted_names(tiny_checkpoint, tmp_path, capsys):
    inputs, out = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    names = ["...png", "..png", "-\u00e9\u4e2d ..png", "image.png"]  # stems "..", ".", "-é中 .", "image"
    for name in names:
        (inputs / name).write_bytes(png_bytes())
    args = predictions.get_args_parser().parse_args(
        [str(inputs / n) for n in names] + ["--checkpoint", str(tiny_checkpoint), "--out", str(out),
                                            "--heatmaps", "positive", "--device", "cpu", "--allow-untrusted"])
    assert predictions.main(args) == 0  # (the tiny checkpoint has no trust data: without the flag nothing is called)
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(records) == len(names)
    folders = []
    for record in records:
        (folder,) = {Path(p).resolve().parent for p in record["heatmaps"].values()}
        assert folder.parent == out.resolve()
        folders.append(folder)
    assert len(set(folders)) == len(names)
    assert sorted(os.listdir(tmp_path)) == ["in", "out"] and sorted(os.listdir(inputs)) == sorted(names)


# ---------------------------------------------------------------- a real server: partial, slow and oversized uploads


@pytest.fixture(scope="module")
def live(tiny_checkpoint, tmp_path_factory) -> Iterator[LiveServer]:
    with serve(tiny_checkpoint, tmp_path_factory.mktemp("live")) as server:
        yield server


def open_post(server: LiveServer, length: int, path: str = "/api/predict") -> socket.socket:
    """A connection that has sent a POST's headers announcing `length` body bytes, and nothing of the body."""
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT)
    sock.sendall((f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\nContent-Length: {length}\r\n"
                  f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\nConnection: close\r\n\r\n").encode())
    return sock


def read_response(sock: socket.socket) -> tuple[int, bytes]:
    """(status, body) of the response on `sock`, within the socket's timeout."""
    response = http.client.HTTPResponse(sock)
    response.begin()
    return response.status, response.read()


def health(server: LiveServer) -> None:
    """/healthz answers ok (fails if it does not within TIMEOUT); how fast is for benchmarks/bench_load.py."""
    with urllib.request.urlopen(server.url("/healthz"), timeout=TIMEOUT) as response:
        answer = json.load(response)
        assert answer["status"] == "ok" and answer["model_loaded"] is True and answer["backend"]


def still_open(sock: socket.socket) -> bool:
    """The server has neither answered nor closed this connection (nothing to read yet)."""
    timeout = sock.gettimeout()
    sock.setblocking(False)
    try:
        sock.recv(1, socket.MSG_PEEK)  # an answer, or b"" for a closed connection
    except BlockingIOError:
        return True
    finally:
        sock.settimeout(timeout)
    return False


def check_server_clean(server: LiveServer) -> None:
    """Healthy, nothing in TMPDIR, only whole results, and no traceback in the server's console."""
    health(server)
    assert os.listdir(server.tmpdir) == []
    check_result_folders(server.results)
    assert "Traceback" not in server.log.read_text(errors="replace")


@pytest.mark.slow(5)
def test_live_upload_closed_mid_body_leaves_nothing(live):
    before = entries(live.results)
    body = multipart(png_bytes())
    for cut in (0, 40, len(body) // 2, len(body) - 1):  # nothing, inside the part headers, mid-image, last byte
        sock = open_post(live, len(body))
        sock.sendall(body[:cut])
        sock.close()
    sock = open_post(live, len(body) + 100_000)  # promises more than it will ever send
    sock.sendall(body)
    sock.shutdown(socket.SHUT_WR)
    sock.close()
    health(live)
    time.sleep(0.3)  # let the server notice the closed connections
    assert entries(live.results) == before
    check_server_clean(live)


def test_live_stalled_uploads_do_not_block_other_requests(live):
    before = set(entries(live.results))
    body = multipart(png_bytes())
    stalled = []
    try:
        for _ in range(8):  # more stalled clients than the server has worker threads (2)
            sock = open_post(live, len(body))
            sock.sendall(body[: len(body) // 2])
            stalled.append(sock)
        health(live)  # answers while every stalled upload is still being waited for
        assert all(still_open(sock) for sock in stalled)
        status, doc = post(live, body)
        assert status == 200 and set(entries(live.results)) == before | {doc["id"]}
    finally:
        for sock in stalled:
            sock.close()
    health(live)
    assert set(entries(live.results)) == before | {doc["id"]}
    check_server_clean(live)


def test_live_slow_trickle(live):
    before = set(entries(live.results))
    body = multipart(png_bytes())
    chunks = [body[i:i + len(body) // 20 + 1] for i in range(0, len(body), len(body) // 20 + 1)]
    # A slow but complete upload is served; the server answers others meanwhile.
    sock = open_post(live, len(body))
    for i, chunk in enumerate(chunks):
        sock.sendall(chunk)
        time.sleep(0.05)
        if i == len(chunks) // 2:
            health(live)  # answers while this upload is half sent
            assert still_open(sock)
    status, data = read_response(sock)
    sock.close()
    assert status == 200
    rid = json.loads(data)["id"]
    assert set(entries(live.results)) == before | {rid}
    # A slow upload abandoned half-way leaves nothing.
    sock = open_post(live, len(body))
    for chunk in chunks[: len(chunks) // 2]:
        sock.sendall(chunk)
        time.sleep(0.05)
    sock.close()
    health(live)
    time.sleep(0.3)
    assert set(entries(live.results)) == before | {rid}
    check_server_clean(live)


def test_live_body_over_the_limit(live):
    before = entries(live.results)
    # Far over the limit: refused from the headers alone, before any of the body is sent or spooled.
    sock = open_post(live, 200 * live.limit)
    status, data = read_response(sock)  # answered though not one byte of the body was sent
    sock.close()
    assert status == 413
    check_clean(data)
    # Just over the limit, and ten times it: the app's own 413 saying what the limit is.
    for size in (live.limit + 1, 10 * live.limit):
        status, doc = post(live, multipart(b"\0" * size))
        assert status == 413 and doc == {"error": "The upload is too large: the limit is 1 MB in all."}
    assert entries(live.results) == before
    check_server_clean(live)


def test_live_hostile_file_name_and_missing_field(live):
    before = set(entries(live.results))
    status, doc = post(live, multipart(png_bytes(), HOSTILE_NAME.encode("utf-8")))
    assert status == 200 and set(entries(live.results)) == before | {doc["id"]}
    assert not any("passwd" in p.name for p in live.results.parent.rglob("*"))
    body = multipart(png_bytes()).replace(b'name="file"', b'name="image"')
    status, doc = post(live, body)
    assert status == 400 and doc == {"error": f"missing the multipart form field 'file' ({ACCEPTED})"}
    request = urllib.request.Request(live.url("/api/predict"), data=png_bytes(), method="POST",
                                     headers={"Content-Type": "image/png"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(request, timeout=TIMEOUT)
    assert err.value.code == 400 and "missing the multipart form field" in json.load(err.value)["error"]
    check_server_clean(live)


def test_live_real_nih_images_still_predict_after_the_abuse(live):
    image = sorted((NIH_DIR / "images_64").glob("*.png"))[0]
    status, doc = post(live, multipart(image.read_bytes()))
    assert status == 200 and doc["format"] == "PNG"
    check_server_clean(live)
