"""Helpers shared by the training tests (test_train, test_faults, test_evaluate): argument lists and run files."""
from __future__ import annotations

import csv
import io
import signal
import time
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

from Model_Training import train
from support.data import ROOT

TRAIN_PY = ROOT / "Model_Training" / "train.py"


# The demo model's own recipe (ResNet-18, 128 px, 2 epochs) shrunk to seconds; the last value of a flag wins.
QUICK_DEMO = ("--image-size", "32", "--epochs", "1", "--limit", "16", "--device", "cpu")


def small_run(data_dir: Path, *extra: str, limit: int = 48, epochs: int = 2) -> list[str]:
    """train.py arguments for a short CPU run: ResNet-18 at 64 px, no ImageNet weights, no workers."""
    return ["--data-dir", str(data_dir), "--arch", "resnet18", "--image-size", "64", "--epochs", str(epochs),
            "--no-pretrained", "--device", "cpu", "--limit", str(limit), "--batch-size", "8", "--workers", "0",
            "--no-progress", *extra]


def run_main(argv: list[str], capsys) -> tuple[int, str, str]:
    """train.main in this process -> (exit code, stdout, stderr)."""
    rc = train.main(train.get_args_parser().parse_args(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def run_quietly(argv: list[str]) -> tuple[int, str, str]:
    """train.main in this process, its output caught without capsys (for module and session fixtures)."""
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        rc = train.main(train.get_args_parser().parse_args(argv))
    return rc, out.getvalue(), err.getvalue()


def read_history(run_dir: Path) -> list[dict]:
    """The rows of <run_dir>/history.csv."""
    with (run_dir / "history.csv").open() as f:
        return list(csv.DictReader(f))


def linked_data(nih_dir: Path, root: Path, names: list[str], lists: bool = True) -> Path:
    """A data folder: labels.csv rows of `names`, links to their images, official lists with an empty test list."""
    root.mkdir(parents=True)
    lines = (nih_dir / "labels.csv").read_text().splitlines()
    (root / "labels.csv").write_text("\n".join([lines[0]] + [ln for ln in lines[1:] if ln.split(",")[0] in names]))
    for name in names:
        (root / name).symlink_to(nih_dir / "images_64" / name)
    if lists:
        (root / "train_val_list.txt").write_text("\n".join(names))
        (root / "test_list.txt").write_text("")
    return root


def kill_once_written(proc, path: Path, log: Path, timeout: float = 240) -> None:
    """SIGKILL `proc` as soon as `path` exists (a file written atomically at the end of an epoch); its console
    (`log`) is the message when it ends first or takes longer than `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, log.read_text()
        assert time.monotonic() < deadline, f"{path.name} was not written in time"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
