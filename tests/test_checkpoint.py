"""The checkpoint contract: round trip, strict loading, metadata errors, refusal of pickled objects, atomic save."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from support.checkpoints import make_checkpoint

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
    # Built on the meta device and given the saved tensors: none is left without storage or differs.
    state = model.state_dict()
    assert state.keys() == raw["model"].keys()
    assert all(t.device.type == "cpu" and torch.equal(t, raw["model"][k]) for k, t in state.items())
    assert all(p.requires_grad for p in model.parameters())


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


def test_meta_module_imports_no_torch():
    import subprocess
    import sys

    code = "import sys, chestxray.meta; assert 'torch' not in sys.modules and 'torchvision' not in sys.modules"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    # The old import place keeps working.
    from chestxray import checkpoint, meta
    assert checkpoint.Meta is meta.Meta and checkpoint.CheckpointError is meta.CheckpointError


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize(
    "field, value",
    [
        ("image_size", "abc"), ("image_size", 100000), ("image_size", 16), ("image_size", 64.5), ("image_size", True),
        ("lse_r", 0), ("lse_r", NAN), ("lse_r", INF), ("lse_r", -1.0), ("lse_r", "10"),
        ("transition_kernel", 2), ("transition_kernel", 0), ("transition_kernel", 3.0), ("transition_kernel", "3"),
        ("output_stride", 4), ("output_stride", 64), ("output_stride", 8.0), ("output_stride", "16"),
        ("labels", 5), ("labels", "Mass"), ("labels", [1, 2]), ("labels", ["Mass", "Tumour"]), ("labels", []),
        ("thresholds", "0.5"), ("thresholds", [0.5] * 13), ("thresholds", [NAN] * 14), ("thresholds", [1.5] * 14),
        ("thresholds", ["0.5"] * 14),
        ("mean", [NAN, 0.5, 0.5]), ("mean", [0.5, 0.5]), ("mean", "abc"), ("std", [0.2, 0.0, 0.2]),
        ("std", [INF, 0.2, 0.2]), ("arch", 7), ("arch", "vgg"),
        ("training", "free text"), ("training", {"val_mean_auroc": "high"}), ("training", {"val_loss": NAN}),
        ("training", {"val_auroc": {"Mass": "0.8"}}), ("training", {"epochs": [1]}),
        ("training", {"split": {"official": "yes"}}), ("training", {"split": {"official": False, "seed": 0.5}}),
        ("training", {"split": {"official": False, "val_fraction": 1.5}}), ("training", {"split": [1]}),
        ("training", {"nested": {"deep": INF}}),
    ],
)
def test_every_bad_meta_field_is_refused_naming_it(tiny_checkpoint, tmp_path, field, value):
    raw = torch.load(tiny_checkpoint, weights_only=True)
    raw["meta"][field] = value
    with pytest.raises(CheckpointError, match=rf"['\"]?{field}"):
        load_checkpoint(_save_raw(tmp_path / "bad.pth", raw))


def test_tensor_inside_training_is_refused(tiny_checkpoint, tmp_path):
    raw = torch.load(tiny_checkpoint, weights_only=True)
    raw["meta"]["training"]["val_auroc"] = torch.tensor([0.5])
    with pytest.raises(CheckpointError, match="training.val_auroc.*Tensor"):
        load_checkpoint(_save_raw(tmp_path / "t.pth", raw))


@pytest.mark.parametrize("bad", [NAN, INF, -INF])
def test_non_finite_weights_are_refused(tiny_checkpoint, tmp_path, bad):
    raw = torch.load(tiny_checkpoint, weights_only=True)
    raw["model"]["classifier.weight"][0, 0] = bad
    with pytest.raises(CheckpointError, match="'model'.*classifier.weight.*NaN or infinite"):
        load_checkpoint(_save_raw(tmp_path / "n.pth", raw))


def test_valid_split_spec_round_trips(tiny_checkpoint, tmp_path):
    from chestxray.meta import SplitSpec

    spec = SplitSpec(official=False, val_fraction=0.2, seed=3, limit=10, data_entry_sha256="ab" * 32)
    raw = torch.load(tiny_checkpoint, weights_only=True)
    raw["meta"]["training"]["split"] = spec.to_dict()
    _, meta, _ = load_checkpoint(_save_raw(tmp_path / "s.pth", raw))
    assert meta.split == spec
    # Checkpoints written before the spec had these four keys; the rest take their defaults.
    raw["meta"]["training"]["split"] = {"val_fraction": 0.1, "seed": 0, "official": True, "limit": None}
    _, meta, _ = load_checkpoint(_save_raw(tmp_path / "s.pth", raw))
    assert meta.split == SplitSpec(official=True)
