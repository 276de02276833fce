"""Fixtures and hooks only: the sample's folders, session checkpoints, the app factory, the shared-data marker.

The data paths, checkpoint builders and other helpers the tests import live in tests/support/ (see its
__init__); the `shared` marker's skip-or-fail rules are here (support/data.py says what it means).
Area-specific fixtures live in the test modules that use them.
"""
from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import pytest
from support.checkpoints import make_checkpoint
from support.data import HAVE_SHARED, METADATA_DIR, NIH_DIR, OTHER_CXR_DIR, REQUIRE_SHARED, SHARED_DATA, SHARED_REASON

# Threads per test process: the cores shared out over pytest-xdist's workers (one each when there are at least as
# many workers as cores, as under `make test`), also for the processes the tests start (OMP_NUM_THREADS), so
# parallel workers do not oversubscribe the cores.
THREADS = max(1, min(2, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))
if "PYTEST_XDIST_WORKER" in os.environ:
    os.environ["OMP_NUM_THREADS"] = str(THREADS)


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "shared: needs ../shared/data beyond the bundled sample (skipped without it)")
    if "PYTEST_XDIST_WORKER" in os.environ or not getattr(config.option, "numprocesses", None):
        import torch  # not in pytest-xdist's controller, which runs no test: its workers start ~2 s sooner

        torch.set_num_threads(THREADS)
    if REQUIRE_SHARED and not HAVE_SHARED:
        raise pytest.UsageError(f"CXR_REQUIRE_SHARED is set but the shared test data is missing: {SHARED_DATA} "
                                "(set CXR_SHARED_DATA to its folder)")


def pytest_collection_modifyitems(config, items) -> None:
    if not HAVE_SHARED:
        skip = pytest.mark.skip(reason=SHARED_REASON)
        for item in items:
            if "shared" in item.keywords:
                item.add_marker(skip)
    items[:] = costliest_files_first(items)


def costliest_files_first(items: list) -> list:
    """The tests in file order, the files with the most `slow(seconds)` first, then those with the most tests.

    `make test` hands whole files to pytest-xdist's workers in this order (`--dist loadfile --no-loadscope-reorder`):
    a long file started last would run alone at the end while the other core idles. Tests keep their order in a file.
    """
    def file_of(item) -> str:
        return item.nodeid.split("::")[0]

    seconds: Counter[str] = Counter()
    tests = Counter(file_of(item) for item in items)
    for item in items:
        mark = item.get_closest_marker("slow")
        seconds[file_of(item)] += float(mark.args[0]) if mark and mark.args else 0.0
    return sorted(items, key=lambda item: (-seconds[file_of(item)], -tests[file_of(item)]))


def pytest_sessionfinish(session, exitstatus) -> None:
    """Under CXR_REQUIRE_SHARED nothing may be skipped: a skip there means a check silently did not run."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if REQUIRE_SHARED and reporter and reporter.stats.get("skipped") and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    skipped = terminalreporter.stats.get("skipped", [])
    if REQUIRE_SHARED and skipped:
        terminalreporter.write_line(f"FAILED: {len(skipped)} test(s) skipped, and CXR_REQUIRE_SHARED forbids skips "
                                    "(their reasons are in the short test summary)", red=True, bold=True)


@pytest.fixture(scope="session")
def nih_dir() -> Path:
    return NIH_DIR


@pytest.fixture(scope="session")
def other_cxr_dir() -> Path:
    return OTHER_CXR_DIR


@pytest.fixture(scope="session")
def metadata_dir() -> Path:
    return METADATA_DIR


@pytest.fixture(scope="session")
def official_lists_dir(tmp_path_factory) -> Path:
    """A folder holding the official train_val_list.txt / test_list.txt as NIH ships them (from the bundle)."""
    import gzip

    folder = tmp_path_factory.mktemp("lists")
    for name in ("train_val_list.txt", "test_list.txt"):
        (folder / name).write_bytes(gzip.decompress((METADATA_DIR / f"{name}.gz").read_bytes()))
    return folder


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A ResNet-18 (same head) checkpoint at 64 px, random weights, biased head: fast and deterministic."""
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pth")


@pytest.fixture
def make_app(tiny_checkpoint, tmp_path):
    """make_app(**config) -> the web app on the tiny checkpoint, results in tmp_path, CSRF off; config overrides.

    The tiny checkpoint has no trust data, so the app is started as an operator who opted out would start it
    (ALLOW_UNTRUSTED: calls at the thresholds, with the warning); tests of the safe default pass ALLOW_UNTRUSTED=False.
    """
    from chestxray.web import create_app

    def make(**config):
        base = {"TESTING": True, "CHECKPOINT": str(tiny_checkpoint), "DEVICE": "cpu", "SECRET_KEY": "test",
                "ALLOW_UNTRUSTED": True,
                "RESULTS_DIR": str(tmp_path / "results"), "WTF_CSRF_ENABLED": False,
                "INSTANCE_PATH": str(tmp_path / "instance")}  # its own results database, not the project's
        return create_app({**base, **config})

    return make


@pytest.fixture(scope="session")
def tiny_predictor(tiny_checkpoint):
    """The tiny checkpoint's predictor with untrusted answers allowed (it has no trust data: by default it would call
    nothing), so renderers are tested on positive and negative calls."""
    from predictions import Predictor

    return Predictor.from_checkpoint(tiny_checkpoint, device="cpu", allow_untrusted=True)


def run_once(tmp_path_factory, name: str, make) -> Path:
    """A folder that `make(folder)` fills once per pytest run, shared by every test file and every pytest-xdist
    worker (a file lock makes the others wait for the first): one trained checkpoint, one image cache per run."""
    from filelock import FileLock

    # Under xdist each worker has its own base temp folder; their parent is the run's.
    root = tmp_path_factory.getbasetemp()
    if "PYTEST_XDIST_WORKER" in os.environ:
        root = root.parent
    folder, done = root / name, root / f"{name}.done"
    with FileLock(str(root / f"{name}.lock")):
        if not done.exists():
            folder.mkdir(exist_ok=True)
            make(folder)
            done.touch()
    return folder


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> dict:
    """One training run shared by the whole pytest run (test_train, test_evaluate), done in-process by whichever
    worker needs it first: ResNet-18 at 64 px, 2 epochs on 48 training + the 21 validation images of the sample,
    with a resized-image cache."""
    import json

    from support.training import run_quietly, small_run

    def train_into(tmp: Path) -> None:
        argv = small_run(NIH_DIR, "--run-dir", str(tmp / "run"), "--output", str(tmp / "best.pth"),
                         "--cache-dir", str(tmp / "cache"))
        rc, out, err = run_quietly(argv)
        (tmp / "outcome.json").write_text(json.dumps({"rc": rc, "out": out, "err": err, "argv": argv}))

    tmp = run_once(tmp_path_factory, "trained_run", train_into)
    outcome = json.loads((tmp / "outcome.json").read_text())
    return {**outcome, "run": tmp / "run", "best": tmp / "best.pth", "cache": tmp / "cache"}
