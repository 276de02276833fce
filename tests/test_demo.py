"""Model_Training/demo.py: the demo model is trained once on the bundled sample, marked as a demo, and reused."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from support.training import QUICK_DEMO as QUICK

from chestxray.checkpoint import load_checkpoint, save_checkpoint
from chestxray.messages import TRAIN_COMMAND
from Model_Training import demo


@pytest.fixture(scope="module")
def demo_checkpoint(tmp_path_factory):
    return demo.build_demo_model(tmp_path_factory.mktemp("demo") / "demo_model.pth", extra_args=QUICK,
                                 progress=False)


def test_demo_checkpoint_is_marked_with_its_images_and_minutes(demo_checkpoint):
    model, meta, _ = load_checkpoint(demo_checkpoint)
    summary = demo.demo_summary(meta)
    assert summary is not None and summary["images"] == meta.training["n_train"] == 16
    assert 0 <= summary["minutes"] < 60
    assert (meta.arch, meta.image_size) == ("resnet18", 32)
    assert meta.training["data_dir"] == "nih"  # trained on samples/nih


def test_a_cached_demo_is_reused_and_a_damaged_one_rebuilt(demo_checkpoint, tmp_path, monkeypatch):
    def refuse(argv):
        raise AssertionError("the demo model was trained again")

    monkeypatch.setattr(demo, "run_training", refuse)
    before = os.stat(demo_checkpoint).st_mtime_ns
    assert demo.build_demo_model(demo_checkpoint, extra_args=QUICK, progress=False) == demo_checkpoint
    assert os.stat(demo_checkpoint).st_mtime_ns == before

    damaged = tmp_path / "demo_model.pth"
    damaged.write_bytes(demo_checkpoint.read_bytes()[:5000])
    with pytest.raises(AssertionError, match="trained again"):
        demo.build_demo_model(damaged, extra_args=QUICK, progress=False)


def test_a_checkpoint_without_the_demo_mark_is_not_a_demo(demo_checkpoint, tmp_path):
    model, meta, summary = load_checkpoint(demo_checkpoint)
    real = {k: v for k, v in meta.training.items() if k != "demo"}
    save_checkpoint(tmp_path / "real.pth", model, meta.replace(training=real), summary)
    assert demo.demo_summary(load_checkpoint(tmp_path / "real.pth")[1]) is None


def test_a_failed_training_raises_demo_error(tmp_path, capsys):
    with pytest.raises(demo.DemoError, match="failed"):
        demo.build_demo_model(tmp_path / "d.pth", data_dir=tmp_path / "no-such-folder", extra_args=QUICK,
                              progress=False)
    assert not (tmp_path / "d.pth").exists()


# ---------------------------------------------------------------------------------------------------------------
# The web app: which checkpoint `python main.py` serves, and the banner


@pytest.fixture()
def demo_marked(tmp_path):
    from support.checkpoints import make_checkpoint

    return make_checkpoint(tmp_path / "demo.pth", training={"demo": {"images": 262, "minutes": 1.5}})


def serve_args(*argv: str):
    import main

    return main.get_args_parser().parse_args(list(argv))


@pytest.fixture()
def no_default(tmp_path, monkeypatch):
    """No $CXR_CHECKPOINT and no default checkpoint file; building the demo returns `built` and is recorded."""
    from chestxray.web import checkpoints

    monkeypatch.delenv("CXR_CHECKPOINT", raising=False)
    monkeypatch.setattr(checkpoints, "default_checkpoint", lambda: str(tmp_path / "absent.pth"))
    calls = []
    monkeypatch.setattr(checkpoints, "build_demo", lambda path=checkpoints.DEMO_CHECKPOINT: calls.append(path) or path)
    return tmp_path / "absent.pth", calls


def test_without_any_checkpoint_the_demo_is_served(no_default):
    from chestxray.web import checkpoints

    default, calls = no_default
    assert checkpoints.choose_checkpoint(serve_args()) == str(demo.DEMO_CHECKPOINT) and calls == [demo.DEMO_CHECKPOINT]


@pytest.mark.parametrize("how", ["flag", "environment", "default file"])
def test_a_real_checkpoint_always_wins(no_default, monkeypatch, tmp_path, how):
    from chestxray.web import checkpoints

    default, calls = no_default
    real = tmp_path / "real.pth"
    if how == "flag":
        chosen = checkpoints.choose_checkpoint(serve_args("--checkpoint", str(real)))
    elif how == "environment":
        monkeypatch.setenv("CXR_CHECKPOINT", str(real))
        monkeypatch.setattr(checkpoints, "default_checkpoint", lambda: str(real))
        chosen = checkpoints.choose_checkpoint(serve_args())
    else:
        default.write_bytes(b"x")  # present, even if broken: the app then says why it cannot load it
        real = default
        chosen = checkpoints.choose_checkpoint(serve_args())
    assert chosen == str(real) and calls == []


def test_the_app_builds_the_demo_where_the_script_writes_it_by_default():
    from chestxray.web import checkpoints

    assert checkpoints.DEMO_CHECKPOINT == demo.DEMO_CHECKPOINT


@pytest.mark.parametrize("exit_code", [0, 3])
def test_the_demo_is_built_by_running_the_script_in_its_own_process(tmp_path, monkeypatch, exit_code):
    from chestxray.web import checkpoints

    script = tmp_path / "demo.py"  # stands in for Model_Training/demo.py: writes --output, then exits
    script.write_text("import sys\nfrom pathlib import Path\n"
                      "Path(sys.argv[sys.argv.index('--output') + 1]).write_text(sys.executable)\n"
                      f"sys.exit({exit_code})\n")
    monkeypatch.setattr(checkpoints, "DEMO_SCRIPT", script)
    out = tmp_path / "built.pth"
    if exit_code:
        with pytest.raises(checkpoints.DemoUnavailable, match="exit code 3"):
            checkpoints.build_demo(out)
    else:
        assert checkpoints.build_demo(out) == out and out.read_text() == sys.executable  # the same interpreter


def test_no_demo_keeps_the_no_model_mode(no_default):
    from chestxray.web import checkpoints

    default, calls = no_default
    assert checkpoints.choose_checkpoint(serve_args("--no-demo")) == str(default) and calls == []


def test_every_page_and_the_api_say_demo(demo_marked, tiny_checkpoint, tmp_path):
    from chestxray.web import create_app

    app = create_app({"CHECKPOINT": str(demo_marked), "RESULTS_DIR": str(tmp_path / "r"), "DEVICE": "cpu",
                           "WTF_CSRF_ENABLED": False, "INSTANCE_PATH": str(tmp_path / "instance")})
    client = app.test_client()
    for page in ("/", "/no-such-page"):
        text = " ".join(re.sub(r"<[^>]+>", "", client.get(page).get_data(as_text=True)).split())
        assert ("Demo model: trained on 262 images for 1.5 minutes; its answers are meaningless — train a real one "
                f"with {TRAIN_COMMAND}") in text
    assert client.get("/api/model").get_json()["demo"] is True

    real = create_app({"CHECKPOINT": str(tiny_checkpoint), "RESULTS_DIR": str(tmp_path / "r2"),
                            "DEVICE": "cpu", "INSTANCE_PATH": str(tmp_path / "instance2")}).test_client()
    assert "Demo model" not in real.get("/").get_data(as_text=True)
    assert real.get("/api/model").get_json()["demo"] is False


def test_a_demo_checkpoint_with_its_export_beside_it_starts_without_the_child(tmp_path, monkeypatch):
    """Once the auto backend has exported the demo checkpoint (named by its SHA-256), a start finds it without running
    demo.py (whose torch import and load were most of every later start); other bytes still go to the child."""
    from chestxray.auto_backend import checkpoint_digest, export_path
    from chestxray.web import checkpoints

    runs = []
    monkeypatch.setattr(checkpoints.subprocess, "run",
                        lambda cmd, **kwargs: runs.append(cmd) or subprocess.CompletedProcess(cmd, 0))
    demo = tmp_path / "demo_model.pth"
    demo.write_bytes(b"the demo checkpoint")
    export_path(demo, checkpoint_digest(demo)).write_bytes(b"its export")
    assert checkpoints.build_demo(demo) == demo and runs == []
    other = tmp_path / "other.pth"
    other.write_bytes(b"another version")
    export_path(other, checkpoint_digest(demo)).write_bytes(b"an export of the first version's bytes")
    assert checkpoints.build_demo(other) == other and len(runs) == 1
