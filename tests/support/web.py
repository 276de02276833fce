"""Helpers shared by the web tests: multipart data for Flask's test client, the results folder, and `python main.py`
as a live waitress server with raw multipart bodies for it."""
from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from e2e.livesite import free_port, stop_server
from flask import Flask

from chestxray.results import RESULT_ID
from support import forked
from support.data import ROOT
from support.hostile import Case

BOUNDARY = "hostile-boundary-7d1f"


def upload(source: Path | bytes, name: str | None = None) -> dict:
    """Multipart data for the field `file` from a path or bytes."""
    data = source.read_bytes() if isinstance(source, Path) else source
    return {"file": (io.BytesIO(data), name or (source.name if isinstance(source, Path) else "x.png"))}


def results_dir(app: Flask) -> Path:
    return Path(app.config["RESULTS_DIR"])


def saved_ids(app: Flask) -> set[str]:
    return {p.name for p in results_dir(app).iterdir() if RESULT_ID.fullmatch(p.name)}


def file_field(case: Case) -> dict:
    """The multipart field `file` holding the case's bytes, under its file name and Content-Type."""
    return {"file": (io.BytesIO(case.make()), case.filename, case.content_type)}


@dataclass(frozen=True)
class LiveServer:
    """`python main.py` on 127.0.0.1:port with its own results folder, TMPDIR and console log."""

    port: int
    results: Path
    tmpdir: Path
    log: Path
    limit: int  # --max-upload-mb in bytes

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"


@contextlib.contextmanager
def serve(checkpoint: Path, root: Path, limit_mb: int = 1, timeout: float = 60.0) -> Iterator[LiveServer]:
    """Start the waitress server in a process of its own (support/forked.py), wait for /healthz; stop it on exit."""
    root.mkdir(parents=True, exist_ok=True)
    server = LiveServer(free_port(), root / "results", root / "tmp", root / "server.log", limit_mb * 1024 * 1024)
    server.tmpdir.mkdir()
    cmd = [sys.executable, str(ROOT / "main.py"), "--checkpoint", str(checkpoint), "--port", str(server.port),
           "--results-dir", str(server.results), "--device", "cpu", "--max-upload-mb", str(limit_mb),
           "--threads", "2", "--instance-dir", str(root / "instance")]
    env = {**os.environ, "TMPDIR": str(server.tmpdir)}  # waitress spools large bodies here
    proc = forked.popen(cmd, cwd=ROOT, stdout=server.log, env=env)
    try:
        deadline = time.monotonic() + timeout
        while True:
            assert proc.poll() is None, f"the server exited with {proc.returncode}:\n{server.log.read_text()}"
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(server.url("/healthz"), timeout=2) as response:
                    if response.status == 200:
                        break
            assert time.monotonic() < deadline, f"no answer within {timeout:.0f} s:\n{server.log.read_text()}"
            time.sleep(0.1)
        yield server
    finally:
        stop_server(proc)


def multipart(data: bytes, filename: bytes = b"x.png") -> bytes:
    """A multipart/form-data body with one part, `file`, holding `data`."""
    head = (f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="'.encode() + filename
            + b'"\r\nContent-Type: application/octet-stream\r\n\r\n')
    return head + data + f"\r\n--{BOUNDARY}--\r\n".encode()


def post(server: LiveServer, body: bytes) -> tuple[int, dict]:
    request = urllib.request.Request(server.url("/api/predict"), data=body, method="POST",
                                     headers={"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as exc:
        return exc.code, json.load(exc)
