"""Backend "auto", the default of the app and the CLI: on a CPU, ONNX Runtime from an export made once per checkpoint
version and checked against PyTorch; PyTorch with a warning when the export cannot be used."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from support.checkpoints import make_checkpoint
from support.data import NIH_PNG

import main
import predictions
from chestxray import auto_backend
from chestxray.auto_backend import checkpoint_digest, export_path
from chestxray.predictor import Predictor


@pytest.fixture()
def checkpoint(tiny_checkpoint, tmp_path):
    """A private copy of the tiny checkpoint (its folder gets the export)."""
    path = tmp_path / "model.pth"
    shutil.copyfile(tiny_checkpoint, path)
    return path


def _exports(folder):
    return sorted(p.name for p in folder.glob("*.onnx"))


def test_auto_on_a_cpu_exports_once_and_answers_as_pytorch_does(checkpoint):
    lines: list[str] = []
    auto = Predictor.from_checkpoint(checkpoint, device="cpu", backend="auto", log=lines.append)
    assert auto.backend == "onnx" and auto.choice.startswith("auto: ONNX Runtime")
    target = export_path(checkpoint, checkpoint_digest(checkpoint))
    assert _exports(checkpoint.parent) == [target.name]
    assert "exporting" in lines[0] and "checked against PyTorch" in lines[-1]
    # The same answers as PyTorch: probabilities, calls and heatmaps.
    eager = Predictor.from_checkpoint(checkpoint, device="cpu", backend="torch", allow_untrusted=False)
    a, e = auto.predict(NIH_PNG), eager.predict(NIH_PNG)
    assert a.probabilities == pytest.approx(e.probabilities, abs=1e-4) and a.calls == e.calls
    np.testing.assert_allclose(a.heatmaps, e.heatmaps, atol=1e-3 * float(np.ptp(e.heatmaps)))
    # A second start reuses the export: nothing is exported again.
    mtime, again = target.stat().st_mtime_ns, []
    assert Predictor.from_checkpoint(checkpoint, device="cpu", backend="auto", log=again.append).backend == "onnx"
    assert again == [] and target.stat().st_mtime_ns == mtime


def test_a_changed_checkpoint_gets_a_new_export_and_the_old_one_goes(checkpoint):
    Predictor.from_checkpoint(checkpoint, device="cpu", backend="auto", log=lambda line: None)
    old = _exports(checkpoint.parent)
    make_checkpoint(checkpoint, seed=1)  # other weights under the same name
    predictor = Predictor.from_checkpoint(checkpoint, device="cpu", backend="auto", log=lambda line: None)
    new = _exports(checkpoint.parent)
    assert predictor.backend == "onnx" and len(new) == 1 and new != old
    assert new == [export_path(checkpoint, checkpoint_digest(checkpoint)).name]


def test_an_export_that_disagrees_with_pytorch_falls_back_with_one_warning(checkpoint, monkeypatch):
    real = auto_backend.export_onnx

    def wrong_export(model, meta, path, train=None, extra=None):
        bias = model.classifier.bias
        saved = bias.detach().clone()
        bias.data += 1.0  # a graph whose logits are off by one
        try:
            return real(model, meta, path, train, extra)
        finally:
            bias.data.copy_(saved)

    monkeypatch.setattr(auto_backend, "export_onnx", wrong_export)
    lines: list[str] = []
    predictor = Predictor.from_checkpoint(checkpoint, device="cpu", backend="auto", log=lines.append)
    assert predictor.backend == "torch" and "disagrees with PyTorch" in predictor.choice
    assert [line for line in lines if line.startswith("warning:")] == [lines[-1]]
    assert "serving with PyTorch instead" in lines[-1]
    assert _exports(checkpoint.parent) == [] and not list(checkpoint.parent.glob(".*.tmp"))  # nothing half-kept


def test_a_folder_that_cannot_take_the_export_falls_back_to_pytorch(checkpoint, monkeypatch):
    def no_room(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(auto_backend.tempfile, "mkstemp", no_room)
    predictor = Predictor.from_checkpoint(checkpoint, device="cpu", backend="auto", log=lambda line: None)
    assert predictor.backend == "torch" and "cannot write the export" in predictor.choice
    assert "No space left on device" in predictor.choice


def test_the_cli_and_the_app_default_to_auto_and_say_what_they_chose(checkpoint, tmp_path, capsys):
    assert main.get_args_parser().parse_args([]).backend == "auto"
    rc = predictions.main(predictions.get_args_parser().parse_args(
        [str(NIH_PNG), "--checkpoint", str(checkpoint), "--device", "cpu", "--out", str(tmp_path / "out")]))
    out, err = capsys.readouterr()
    assert rc == 0 and "exporting it to ONNX Runtime" in err
    record = json.loads(out.splitlines()[0])
    assert record["model"]["backend"] == "onnx (fp32)" and record["model"]["backend_choice"].startswith("auto: ONNX")
    from chestxray.web import create_app

    app = create_app({"CHECKPOINT": str(checkpoint), "DEVICE": "cpu", "BACKEND": "auto", "TESTING": True,
                      "RESULTS_DIR": str(tmp_path / "results"), "INSTANCE_PATH": str(tmp_path / "instance")})
    client = app.test_client()
    assert client.get("/healthz").get_json()["backend"].startswith("auto: ONNX Runtime")
    assert b"auto: ONNX Runtime on the CPU" in client.get("/model").data
