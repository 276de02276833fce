"""Connection-level abuse against a real `python main.py` (waitress) on 127.0.0.1:
half-open connections (slowloris), silent connections, and where an upload in flight is kept.

Every wait is bounded; nothing here asserts a duration, only what the server does within a generous bound.
"""
from __future__ import annotations

import contextlib
import os
import socket
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from e2e.livesite import free_port, stop_server
from support import forked
from support.data import ROOT

BOUNDARY = "server-boundary-3c9a"


@dataclass
class Server:
    port: int
    proc: forked.Forked
    tmpdir: Path
    log: Path

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"


@contextlib.contextmanager
def serve(checkpoint: Path, root: Path, *flags: str, timeout: float = 60.0) -> Iterator[Server]:
    """`python main.py` with `flags` in a process of its own (tests/support/forked.py), TMPDIR inside `root`; waits for
    /healthz, stops it on exit."""
    root.mkdir(parents=True, exist_ok=True)
    tmpdir = root / "tmp"
    tmpdir.mkdir()
    port, log = free_port(), root / "server.log"
    cmd = [sys.executable, str(ROOT / "main.py"), "--checkpoint", str(checkpoint), "--port", str(port),
           "--results-dir", str(root / "results"), "--instance-dir", str(root / "instance"), "--device", "cpu",
           "--threads", "2", *flags]
    proc = forked.popen(cmd, cwd=ROOT, stdout=log, env={**os.environ, "TMPDIR": str(tmpdir)})
    server = Server(port, proc, tmpdir, log)
    try:
        deadline = time.monotonic() + timeout
        while not healthy(server):
            assert proc.poll() is None, f"the server exited with {proc.returncode}:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"no answer within {timeout:.0f} s:\n{log.read_text()}"
            time.sleep(0.1)
        yield server
    finally:
        stop_server(proc)


def healthy(server: Server, timeout: float = 2.0) -> bool:
    with contextlib.suppress(OSError):
        with urllib.request.urlopen(server.url("/healthz"), timeout=timeout) as response:
            return response.status == 200
    return False


def connect(server: Server) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    sock.settimeout(10)
    return sock


def closed_by_server(sock: socket.socket, within: float) -> bool:
    """True once the server closes `sock` (recv gives b"" or a reset) within `within` seconds."""
    sock.settimeout(within)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


@pytest.mark.slow(8)
def test_a_silent_connection_is_closed(tiny_checkpoint, tmp_path):
    with serve(tiny_checkpoint, tmp_path, "--channel-timeout", "2", "--cleanup-interval", "1") as server:
        idle, half = connect(server), connect(server)
        half.sendall(b"POST /api/predict HTTP/1.1\r\nHost: x\r\n")  # headers never finished
        assert closed_by_server(idle, within=15) and closed_by_server(half, within=15)
        assert healthy(server)


@pytest.mark.slow(5)
def test_half_open_connections_beyond_the_old_limit_do_not_block_healthz(tiny_checkpoint, tmp_path):
    # Slowloris: 110 requests whose headers never end (waitress's default connection_limit was 100).
    with serve(tiny_checkpoint, tmp_path) as server:
        held = []
        try:
            for _ in range(110):
                sock = connect(server)
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
                held.append(sock)
            for sock in held[::10]:
                sock.sendall(b"X-Trickle: 1\r\n")  # still alive: a header line now and then
            assert healthy(server, timeout=5)
        finally:
            for sock in held:
                sock.close()


def _open_files_in(pid: int, folder: Path) -> list[str]:
    """Targets of the process's open file descriptors that lie in `folder` (unlinked ones included)."""
    found = []
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith(str(folder)):
                found.append(target)
    return found


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs Linux /proc to see the server's open files")
@pytest.mark.slow(7)
def test_an_upload_in_flight_never_touches_disk(tiny_checkpoint, tmp_path):
    # Waitress spooled a request body over 512 KB to an unlinked temporary file holding the DICOM header.
    with serve(tiny_checkpoint, tmp_path, "--max-upload-mb", "4") as server:
        body = b"\0" * (3 * 2**20)
        sock = connect(server)
        try:
            sock.sendall(f"POST /api/predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; "
                         f"boundary={BOUNDARY}\r\nContent-Length: {len(body) + 1}\r\n\r\n".encode() + body)
            deadline = time.monotonic() + 3  # the 3 MB arrive over loopback in milliseconds
            while time.monotonic() < deadline:  # waitress has read all but the last byte once the fds settle
                assert _open_files_in(server.proc.pid, server.tmpdir) == []
                time.sleep(0.2)
            assert list(server.tmpdir.iterdir()) == []
        finally:
            sock.close()
        assert healthy(server)
