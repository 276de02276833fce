"""The checkpoint contract on every path that writes or re-writes one: training, the demo model, fit_trust, the ONNX
export and a plain re-save keep every field (format, model, meta, train, trust); write_checkpoint is the one writer
and refuses to drop or invent a field."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from support.training import QUICK_DEMO
from support.trust import make_trusted_checkpoint

from chestxray.checkpoint import CHECKPOINT_KEYS, CheckpointError, safe_torch_load, write_checkpoint
from chestxray.fitting import fit_checkpoint
from chestxray.predictor import Predictor
from Model_Training import demo, export, fit_trust


def _same(a, b) -> bool:
    """Deep equality of checkpoint data (tensors compared by value)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


@pytest.fixture(scope="module")
def full(tmp_path_factory, tiny_checkpoint, nih_dir) -> Path:
    """A checkpoint holding every field, with a "train" entry of its own to follow through the re-saves."""
    path = make_trusted_checkpoint(tmp_path_factory.mktemp("contract") / "full.pth", tiny_checkpoint, nih_dir)
    obj = safe_torch_load(path)
    obj["train"] = {"history": [{"epoch": 1, "val_mean_auroc": 0.61}], "run_config": "runs/x/args.json"}
    obj["meta"]["training"] = {**obj["meta"]["training"],
                               "split": {"val_fraction": 0.3, "seed": 0, "official": True, "limit": 24}}
    write_checkpoint(path, obj)
    assert set(safe_torch_load(path)) == set(CHECKPOINT_KEYS)
    return path


def test_a_re_save_keeps_every_field_and_refuses_to_drop_or_invent_one(full, tmp_path):
    obj = safe_torch_load(full)
    write_checkpoint(tmp_path / "again.pth", obj)
    assert _same(safe_torch_load(tmp_path / "again.pth"), obj)
    with pytest.raises(CheckpointError, match="unknown fields"):
        write_checkpoint(tmp_path / "x.pth", {**obj, "optimizer": {}})
    with pytest.raises(CheckpointError, match="missing fields"):
        write_checkpoint(tmp_path / "x.pth", {k: v for k, v in obj.items() if k != "meta"})
    assert not (tmp_path / "x.pth").exists()


def test_the_demo_re_save_keeps_trust_and_train(full, tmp_path, monkeypatch):
    def fake_train(argv):  # training itself is tested elsewhere; here only what demo.py does with its output
        shutil.copyfile(full, argv[argv.index("--output") + 1])
        return 0

    monkeypatch.setattr(demo, "run_training", fake_train)
    built = demo.build_demo_model(tmp_path / "demo.pth", extra_args=QUICK_DEMO, progress=False)
    before, after = safe_torch_load(full), safe_torch_load(built)
    assert set(after) == set(before)
    for key in ("model", "train", "trust", "format"):
        assert _same(after[key], before[key]), key
    assert after["meta"]["training"]["demo"]["minutes"] >= 0
    assert _same({**after["meta"], "training": {}}, {**before["meta"], "training": {}})


@pytest.mark.slow(8)
def test_fit_trust_keeps_the_other_fields(full, tmp_path, nih_dir):
    path = tmp_path / "model.pth"
    shutil.copyfile(full, path)
    args = fit_trust.get_args_parser().parse_args(
        ["--checkpoint", str(path), "--data-dir", str(nih_dir), "--n-boot", "20", "--device", "cpu",
         "--orientation-images", "16"])
    fit_checkpoint(**vars(args), log=lambda line: None)
    before, after = safe_torch_load(full), safe_torch_load(path)
    assert set(after) == set(CHECKPOINT_KEYS)
    assert _same(after["model"], before["model"]) and _same(after["train"], before["train"])
    assert after["trust"]["scope"] is not None and after["trust"]["evidence"] is not None


def test_the_onnx_export_carries_the_trust_data(full, tmp_path):
    out = tmp_path / "full.onnx"
    assert export.main(export.get_args_parser().parse_args(["--checkpoint", str(full), "--out", str(out)])) == 0
    eager = Predictor.from_checkpoint(full, device="cpu")
    onnx = Predictor.from_checkpoint(out, device="cpu", backend="onnx")
    assert onnx.trust.evidence == eager.trust.evidence
    assert onnx.trust.calibration.to_dict() == eager.trust.calibration.to_dict()
    assert onnx.trust.scope.limit == pytest.approx(eager.trust.scope.limit)
    assert onnx.validated == eager.validated and not onnx.untrusted


def test_training_writes_every_field(trained_run):
    assert trained_run["rc"] == 0, trained_run["err"]
    obj = safe_torch_load(trained_run["best"])
    assert set(obj) == set(CHECKPOINT_KEYS)
    assert obj["trust"]["scope"] is not None and obj["trust"]["evidence"] is not None
