"""Helpers for the browser tests and the screenshot script: run `python main.py` on a free port, launch Chromium.

Playwright cannot download its own browser here, so it drives Debian's /usr/bin/chromium.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = Path(os.environ.get("CXR_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-quic", "--no-first-run", "--disable-sync",
]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def popen_logged(cmd: list[str], *, cwd: Path, stdout: Path, env: dict | None = None) -> subprocess.Popen:
    """subprocess.Popen with stdout and stderr appended to the file `stdout` (the signature of tests/support/forked.popen)."""
    with open(stdout, "ab") as log:
        return subprocess.Popen(cmd, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, env=env)


@contextlib.contextmanager
def run_server(checkpoint: Path, results_dir: Path, timeout: float = 90.0, port: int | None = None,
               extra_args: Sequence[str] = (), launch: Callable = popen_logged) -> Iterator[str]:
    """Start `python main.py --checkpoint CKPT --port PORT` (waitress; a free port by default) in a process of its
    own, with its secret key in a folder beside `results_dir` unless `extra_args` name another; yield its base URL.
    `launch` starts it: a fresh interpreter by default (benchmarks, screenshots), tests/support/forked.popen in the tests."""
    port = port or free_port()
    cmd = [sys.executable, str(ROOT / "main.py"), "--checkpoint", str(checkpoint), "--port", str(port),
           "--results-dir", str(results_dir), "--device", "cpu"]
    if "--instance-dir" not in extra_args:  # keep the test's key out of the project's own instance folder
        cmd += ["--instance-dir", str(Path(results_dir).parent / "instance")]
    cmd += list(extra_args)
    log_path = Path(results_dir).parent / f"server-{port}.log"
    log_path.write_bytes(b"")
    proc = launch(cmd, cwd=ROOT, stdout=log_path)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited with {proc.returncode}:\n{log_path.read_text()}")
            try:
                with urllib.request.urlopen(base + "/healthz", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server did not answer within {timeout:.0f} s:\n{log_path.read_text()}")
            time.sleep(0.2)
        yield base
    finally:
        stop_server(proc)


def stop_server(proc: subprocess.Popen) -> None:
    """Terminate a server process, killing it if it does not stop within 10 s."""
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def chromium_fixture() -> Path:
    """The `chromium` fixture of the browser tests: Debian's Chromium, or a skip (a failure under $CI)."""
    return require(CHROMIUM, "apt-get install chromium, or `make browser`")


def browser_fixture(chromium: Path) -> Iterator:
    """The `browser` fixture of the browser tests: one headless Chromium for a test module."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = launch_chromium(playwright)
        yield browser
        browser.close()


def launch_chromium(playwright):
    """Headless Debian Chromium through Playwright (sync API)."""
    return playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)


def require(path: Path, how: str) -> Path:
    """The path of a tool a browser test needs (Chromium, axe-core); missing, the test is skipped with `how` to get
    it, or fails where $CI is set."""
    import pytest

    if not path.exists():
        message = f"{path} is missing ({how})"
        if "CI" in os.environ:
            pytest.fail(message)
        pytest.skip(message)
    return path


def open_page(browser, width: int = 1280, failed_responses: bool = True, **options):
    """(context, page): a page in a fresh context (`options` go to new_context) whose `page.errors` records console
    errors (CSP violations land there), page errors and, with `failed_responses`, every response of 400 or more."""
    context = browser.new_context(viewport={"width": width, "height": 900}, **options)
    page = context.new_page()
    page.errors = []
    page.on("console", lambda message: message.type == "error" and page.errors.append(message.text))
    page.on("pageerror", lambda exc: page.errors.append(str(exc)))
    if failed_responses:
        page.on("response", lambda resp: resp.status >= 400 and page.errors.append(f"{resp.status} {resp.url}"))
    return context, page


def load_module(path: Path, name: str) -> ModuleType:
    """Import a file by path: how scripts run outside pytest (benchmarks) reach this file, since tests/ is not an
    installed package."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while a class is built
    spec.loader.exec_module(module)
    return module


def import_support() -> ModuleType:
    """The tests' support package with its data paths and checkpoint builder loaded (`support.data`,
    `support.checkpoints`), for scripts run outside pytest: tests/ goes on sys.path as pytest's `pythonpath` puts it."""
    if str(ROOT / "tests") not in sys.path:
        sys.path.insert(0, str(ROOT / "tests"))
    import support.checkpoints
    import support.data

    return support
