"""Faults in training: killed while writing a checkpoint, a truncated state, a full disk. Nothing complete is lost."""
from __future__ import annotations

import errno
import os
import shutil
import signal
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from support import forked
from support.data import shared, shared_path
from support.training import read_history, run_main, run_quietly, small_run

from chestxray.checkpoint import load_checkpoint
from chestxray.trainstate import NoTrainingState, load_resume_state

ROOT = Path(__file__).resolve().parents[1]

# Runs train.main in a child process whose torch.save writes half of the N-th file with key `match` (counting only
# once `require` exists), then SIGKILLs itself: a crash in the middle of a checkpoint write.
DYING_TRAINER = textwrap.dedent("""
    import os, signal, sys
    import torch
    from Model_Training import train

    real_save, calls = torch.save, [0]

    def dying_save(obj, f, *args, **kwargs):
        if {match!r} in obj and os.path.exists({require!r}):
            calls[0] += 1
            if calls[0] == {kill_at}:
                real_save(obj, f, *args, **kwargs)
                f.flush()
                f.truncate(f.tell() // 2)
                f.flush()
                os.fsync(f.fileno())
                os.kill(os.getpid(), signal.SIGKILL)
        return real_save(obj, f, *args, **kwargs)

    torch.save = dying_save
    sys.exit(train.main(train.get_args_parser().parse_args({argv!r})))
""")


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# "kind" marks a training state (killed writing epoch 2's); "meta" a best checkpoint (killed writing the first one
# after epoch 1's state: the next epoch that improves on epoch 1, or the final save with trust data).
# The "meta" case reads the shared 937-image sample, whose 48 validation images can give a run that improves after
# epoch 1 (the bundled sample's 21 do not).
@pytest.mark.parametrize("match, what", [("kind", "training state"),
                                         pytest.param("meta", "best checkpoint", marks=shared)])
@pytest.mark.slow(20)
def test_killed_during_a_checkpoint_write_resumes_from_the_last_complete_state(nih_dir, tmp_path, capsys, match,
                                                                             what):
    run, best = tmp_path / "run", tmp_path / "best.pth"
    data_dir = shared_path("nih") if match == "meta" else nih_dir
    argv = small_run(data_dir, "--run-dir", str(run), "--output", str(best), epochs=3)
    require = str(tmp_path) if match == "kind" else str(run / "last.pth")
    script = DYING_TRAINER.format(match=match, kill_at=2 if match == "kind" else 1,
                                  require=require, argv=argv)
    killed = forked.run([sys.executable, "-c", script], cwd=ROOT, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    # The interrupted write left only a temporary file; every complete file still loads.
    leftovers = [name for name in _files(run) + _files(tmp_path) if name.endswith(".tmp")]
    assert len(leftovers) == 1, (what, leftovers)
    state = torch.load(run / "last.pth", weights_only=True)
    # A best checkpoint is written before the epoch's state, so the state on disk is the one before the killed epoch;
    # which epoch improves first depends on the seeded run (and on the machine's float arithmetic). When none after
    # epoch 1 does, the killed write is the final save of the best checkpoint with its trust data, after epoch 3's
    # state.
    assert state["epoch"] == 1 if match == "kind" else state["epoch"] in (1, 2, 3)
    if best.exists():
        load_checkpoint(best)

    rc, out, err = run_main([*argv, "--resume"], capsys)  # the resume itself needs no process of its own
    assert rc == 0, out + err
    assert "partial" in out
    assert [row["epoch"] for row in read_history(run)] == ["1", "2", "3"]
    assert torch.load(run / "last.pth", weights_only=True)["epoch"] == 3
    assert not [name for name in _files(run) + _files(tmp_path) if name.endswith(".tmp")]
    model, meta, _ = load_checkpoint(best)
    assert meta.training["epochs"] in (1, 2, 3)


# Runs train.main in a child process that SIGKILLs itself just before history.csv would get its second row: after
# epoch 2's state, or, were the order reversed, after the history and before the state.
KILLED_BEFORE_HISTORY = textwrap.dedent("""
    import os, signal, sys
    from Model_Training import train

    real_write_history = train.write_history

    def dying_write_history(path, history):
        if len(history) == 2:
            os.kill(os.getpid(), signal.SIGKILL)
        return real_write_history(path, history)

    train.write_history = dying_write_history
    sys.exit(train.main(train.get_args_parser().parse_args({argv!r})))
""")


@pytest.mark.slow(12)
def test_a_kill_between_the_state_and_the_history_leaves_no_epoch_resume_cannot_find(nih_dir, tmp_path, capsys):
    run, best = tmp_path / "run", tmp_path / "best.pth"
    argv = small_run(nih_dir, "--run-dir", str(run), "--output", str(best), epochs=2)
    killed = forked.run([sys.executable, "-c", KILLED_BEFORE_HISTORY.format(argv=argv)], cwd=ROOT, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    # The state is ahead of the history, never behind it: every epoch history.csv lists can be resumed from.
    assert torch.load(run / "last.pth", weights_only=True)["epoch"] == 2
    assert [row["epoch"] for row in read_history(run)] == ["1"]

    rc, out, err = run_main([*argv, "--resume"], capsys)  # the last epoch is done: resuming catches the files up
    assert rc == 0, out + err
    assert [row["epoch"] for row in read_history(run)] == ["1", "2"]
    load_checkpoint(best)


@pytest.fixture(scope="module")
def two_epochs_once(nih_dir, tmp_path_factory) -> Path:
    """A run of two epochs, trained once for this module: last.pth holds epoch 2, last.prev.pth epoch 1."""
    folder = tmp_path_factory.mktemp("two_epochs")
    argv = small_run(nih_dir, "--run-dir", str(folder / "run"), "--output", str(folder / "best.pth"), epochs=2)
    rc, _, err = run_quietly(argv)
    assert rc == 0, err
    assert torch.load(folder / "run" / "last.pth", weights_only=True)["epoch"] == 2
    assert torch.load(folder / "run" / "last.prev.pth", weights_only=True)["epoch"] == 1
    return folder


@pytest.fixture()
def two_epochs(two_epochs_once, nih_dir, tmp_path):
    """A copy of the two-epoch run for one test to damage -> (run folder, best checkpoint, its train.py arguments)."""
    shutil.copytree(two_epochs_once, tmp_path, dirs_exist_ok=True)
    run, best = tmp_path / "run", tmp_path / "best.pth"
    return run, best, small_run(nih_dir, "--run-dir", str(run), "--output", str(best), epochs=2)


@pytest.mark.slow(8)
def test_truncated_state_is_detected_and_resume_falls_back(two_epochs, capsys):
    run, best, argv = two_epochs
    data = (run / "last.pth").read_bytes()
    (run / "last.pth").write_bytes(data[: len(data) // 2])
    rc, out, err = run_main([*argv, "--resume", "--epochs", "3"], capsys)
    assert rc == 0, err
    assert "last.pth is truncated or corrupt" in out and "falling back" in out and "epoch 1" in out
    assert [row["epoch"] for row in read_history(run)] == ["1", "2", "3"]
    assert torch.load(run / "last.pth", weights_only=True)["epoch"] == 3
    load_checkpoint(best)


def test_both_states_damaged_is_a_clear_error(two_epochs, capsys):
    run, _, argv = two_epochs
    for name in ("last.pth", "last.prev.pth"):
        (run / name).write_bytes(b"\x00" * 100)
    rc, _, err = run_main([*argv, "--resume", "--epochs", "3"], capsys)
    assert rc == 2 and "neither training state can be used" in err


@pytest.mark.slow(13)
def test_full_disk_during_a_state_write_is_reported_and_the_previous_survives(nih_dir, tmp_path, capsys,
                                                                             monkeypatch):
    run, best = tmp_path / "run", tmp_path / "best.pth"
    argv = small_run(nih_dir, "--run-dir", str(run), "--output", str(best), epochs=2)
    real_save, calls = torch.save, [0]

    def full_disk(obj, f, *args, **kwargs):
        if "kind" in obj:
            calls[0] += 1
            if calls[0] == 2:
                f.write(b"partial")
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    rc, _, err = run_main(argv, capsys)
    assert rc == 1
    assert "No space left on device" in err and "last.pth" in err and "--resume" in err
    assert torch.load(run / "last.pth", weights_only=True)["epoch"] == 1  # the previous state survives
    load_checkpoint(best)
    assert not [name for name in _files(run) if name.endswith(".tmp")]

    monkeypatch.setattr(torch, "save", real_save)  # space freed: the run continues
    rc, _, err = run_main([*argv, "--resume"], capsys)
    assert rc == 0, err
    assert torch.load(run / "last.pth", weights_only=True)["epoch"] == 2


def test_load_resume_state_without_any_state(tmp_path, capsys):
    with pytest.raises(NoTrainingState, match="no last.pth"):
        load_resume_state(tmp_path)
    rc, _, err = run_main(["--resume", "--run-dir", str(tmp_path), "--device", "cpu"], capsys)
    assert rc == 2 and "--resume: no last.pth" in err and "drop --resume" in err
