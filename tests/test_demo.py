"""Model_Training/demo.py: the demo model is trained once on the bundled sample, marked as a demo, and reused."""
from __future__ import annotations

import os

import pytest

from chestxray.checkpoint import load_checkpoint, save_checkpoint
from Model_Training import demo, train

# The demo's own recipe (ResNet-18, 128 px, 2 epochs) shrunk to seconds; the last value of a flag wins.
QUICK = ("--image-size", "32", "--epochs", "1", "--limit", "16", "--device", "cpu")


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
    def refuse(args):
        raise AssertionError("the demo model was trained again")

    monkeypatch.setattr(train, "main", refuse)
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
