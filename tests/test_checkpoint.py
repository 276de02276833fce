"""The checkpoint contract: round trip, strict loading, metadata errors, refusal of pickled objects, atomic save."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from conftest import make_checkpoint

from chestxray.checkpoint import (
    FORMAT,
    CheckpointError,
    Meta,
    load_checkpoint,
    model_from_meta,
    save_checkpoint,
)
from chestxray.labels import CHESTXRAY8_LABELS, LABELS
from chestxray.transforms import preprocess


def test_round_trip_gives_identical_logits_and_meta(tiny_checkpoint):
    model, meta, train = load_checkpoint(tiny_checkpoint)
    raw = torch.load(tiny_checkpoint, weights_only=True)
    assert raw["format"] == FORMAT and set(raw) == {"format", "model", "meta", "train"}
    assert meta.labels == LABELS and meta.image_size == 64 and meta.thresholds == (0.5,) * 14
    assert train == {"note": "test fixture"}
    fresh = model_from_meta(meta).eval()
    fresh.load_state_dict(raw["model"])
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), fresh(x))
    assert not model.training


def test_meta_survives_json_and_rebuilds_preprocessing(tmp_path):
    import json

    meta = Meta.new(arch="resnet18", labels=CHESTXRAY8_LABELS, image_size=96, mean=(0.5, 0.5, 0.5),
                    std=(0.25, 0.25, 0.25), thresholds=[0.1 * i for i in range(1, 9)],
                    training={"val_auroc": {"Mass": 0.8}, "epochs": 3})
    again = Meta.from_dict(json.loads(json.dumps(meta.to_dict())))
    assert again == meta
    x = preprocess(again, torch.zeros(40, 50).numpy())
    assert x.shape == (1, 3, 96, 96)
    torch.testing.assert_close(x, torch.full((1, 3, 96, 96), -2.0))  # (0 - 0.5) / 0.25


def _save_raw(path: Path, obj) -> Path:
    torch.save(obj, path)
    return path


def test_missing_and_unknown_meta_keys_are_named(tiny_checkpoint, tmp_path):
    raw = torch.load(tiny_checkpoint, weights_only=True)
    del raw["meta"]["image_size"]
    raw["meta"]["colour"] = "blue"
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(_save_raw(tmp_path / "m.pth", raw))
    assert "image_size" in str(err.value) and "colour" in str(err.value)


def test_label_weight_mismatch_is_refused(tiny_checkpoint, tmp_path):
    raw = torch.load(tiny_checkpoint, weights_only=True)
    raw["meta"]["labels"] = list(CHESTXRAY8_LABELS)
    raw["meta"]["thresholds"] = [0.5] * 8
    with pytest.raises(CheckpointError, match="classifier.weight"):
        load_checkpoint(_save_raw(tmp_path / "l.pth", raw))


def test_missing_weights_are_refused_not_silently_skipped(tiny_checkpoint, tmp_path):
    raw = torch.load(tiny_checkpoint, weights_only=True)
    del raw["model"]["classifier.bias"]
    with pytest.raises(CheckpointError, match="classifier.bias"):
        load_checkpoint(_save_raw(tmp_path / "w.pth", raw))


class Payload:
    """Unpickling this runs code: it creates the marker file."""

    marker = ""

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_pickled_object_is_refused_and_never_runs(tiny_checkpoint, tmp_path):
    raw = torch.load(tiny_checkpoint, weights_only=True)
    Payload.marker = str(tmp_path / "pwned")
    raw["train"] = {"hook": Payload()}
    path = _save_raw(tmp_path / "evil.pth", raw)
    with pytest.raises(CheckpointError, match="Python objects"):
        load_checkpoint(path)
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize(
    "content, message",
    [
        ({"state_dict": {}}, "not a checkpoint of this tool"),
        ([1, 2, 3], "not a checkpoint of this tool"),
    ],
)
def test_other_torch_files_are_not_checkpoints(tmp_path, content, message):
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(_save_raw(tmp_path / "o.pth", content))


def test_wrong_format_version(tiny_checkpoint, tmp_path):
    raw = torch.load(tiny_checkpoint, weights_only=True)
    raw["format"] = 99
    with pytest.raises(CheckpointError, match="format 99"):
        load_checkpoint(_save_raw(tmp_path / "f.pth", raw))


def test_truncated_garbage_and_missing_files(tiny_checkpoint, tmp_path):
    data = tiny_checkpoint.read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint at all")
    for name in ("cut.pth", "junk.pth"):
        with pytest.raises(CheckpointError, match="truncated or corrupt"):
            load_checkpoint(tmp_path / name)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "absent.pth")


def test_bad_meta_values_are_refused():
    with pytest.raises(CheckpointError, match="thresholds"):
        Meta.new(arch="resnet18", thresholds=[0.5] * 3)
    with pytest.raises(CheckpointError, match="unknown label"):
        Meta.new(arch="resnet18", labels=("Mass", "Tumour"))
    with pytest.raises(CheckpointError, match="unknown arch"):
        Meta.new(arch="vgg")


def test_save_is_atomic(tmp_path, monkeypatch):
    path = make_checkpoint(tmp_path / "c.pth")
    before = path.read_bytes()
    model, meta, _ = load_checkpoint(path)

    def crash(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="No space"):
        save_checkpoint(path, model, meta)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pth"]  # no temp file left behind
