"""Untrusted checkpoints: a `.pth` crafted to run code when unpickled is refused by every entry point that loads one
(predictions.py, Model_Training/test.py, Model_Training/train.py --resume, the web app), and its payload never runs.

The payload creates a marker folder (os.mkdir, as in test_checkpoint.Payload); a control test shows that an unsafe
load of the very same files does create it, so its absence elsewhere means the code was not run.
"""
from __future__ import annotations

import io
import os
import pickle
import sys
from pathlib import Path

import pytest
import torch
from support import forked
from support.data import NIH_DIR, ROOT

import predictions
from chestxray.web import create_app
from Model_Training import test as evaluation
from Model_Training import train


class Payload:
    """Unpickling this calls os.mkdir(marker): the side effect the tests look for."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


REFUSED_OBJECTS = "holds Python objects that a safe load refuses"
NOT_A_TORCH_FILE = "is truncated or corrupt, or not a PyTorch checkpoint file"
# kind -> the message fragment the loader gives for it
KINDS = {
    "payload inside a real checkpoint": REFUSED_OBJECTS,
    "payload as the whole file": REFUSED_OBJECTS,
    "legacy (non-zip) torch.save with a payload": NOT_A_TORCH_FILE,
    "plain pickle named .pth": NOT_A_TORCH_FILE,
}


def make_evil(kind: str, path: Path, marker: Path, checkpoint: Path) -> Path:
    """Write a checkpoint-looking file of `kind` whose unpickling runs os.mkdir(marker)."""
    if kind == "plain pickle named .pth":
        path.write_bytes(pickle.dumps({"format": 1, "model": {}, "meta": Payload(marker)}))
        return path
    raw = torch.load(checkpoint, weights_only=True)
    raw["train"] = {"note": "looks like any checkpoint", "hook": Payload(marker)}
    if kind == "payload inside a real checkpoint":
        torch.save(raw, path)
    elif kind == "payload as the whole file":
        torch.save(Payload(marker), path)
    else:
        torch.save(raw, path, _use_new_zipfile_serialization=False)
    return path


@pytest.fixture(params=list(KINDS))
def evil(request, tmp_path, tiny_checkpoint) -> tuple[Path, Path, str]:
    """(checkpoint file, marker path that must not appear, expected message fragment) for one kind."""
    marker = tmp_path / "payload-ran"
    path = make_evil(request.param, tmp_path / "model.pth", marker, tiny_checkpoint)
    return path, marker, KINDS[request.param]


@pytest.mark.parametrize("kind", list(KINDS))
def test_the_payload_is_live_when_loaded_unsafely(kind, tmp_path, tiny_checkpoint):
    marker = tmp_path / "control-ran"
    path = make_evil(kind, tmp_path / "control.pth", marker, tiny_checkpoint)
    if kind == "plain pickle named .pth":
        pickle.loads(path.read_bytes())
    else:
        torch.load(path, weights_only=False)
    assert marker.is_dir()


@pytest.mark.slow(5)
def test_predictions_cli_refuses_it(tmp_path, tiny_checkpoint):
    marker = tmp_path / "payload-ran"
    path = make_evil("payload inside a real checkpoint", tmp_path / "model.pth", marker, tiny_checkpoint)
    image = sorted((NIH_DIR / "images_64").glob("*.png"))[0]
    result = forked.run([sys.executable, "predictions.py", str(image), "--checkpoint", str(path), "--device",
                             "cpu", "--out", str(tmp_path / "out")],
                            cwd=ROOT, timeout=120)
    assert result.returncode == 2 and result.stdout == ""
    assert f"error: {path} {REFUSED_OBJECTS}" in result.stderr and "Traceback" not in result.stderr
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_predictions_main_refuses_every_kind(evil, capsys):
    path, marker, message = evil
    image = sorted((NIH_DIR / "images_64").glob("*.png"))[0]
    args = predictions.get_args_parser().parse_args([str(image), "--checkpoint", str(path), "--device", "cpu"])
    assert predictions.main(args) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and message in captured.err and "Train a model with" in captured.err
    assert not marker.exists()


def test_evaluation_refuses_it(evil, tmp_path, capsys):
    path, marker, message = evil
    out = tmp_path / "eval"
    args = evaluation.get_args_parser().parse_args(["--checkpoint", str(path), "--data-dir", str(NIH_DIR),
                                                    "--out", str(out), "--device", "cpu", "--bootstrap", "0"])
    assert evaluation.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}") and message in err
    assert not out.exists()
    assert not marker.exists()


def test_training_resume_refuses_it(evil, tmp_path, capsys):
    path, marker, message = evil
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    state = run_dir / train.STATE_FILE  # where --resume looks: <run-dir>/last.pth
    os.replace(path, state)
    args = train.get_args_parser().parse_args(["--resume", "--run-dir", str(run_dir), "--device", "cpu",
                                               "--output", str(tmp_path / "best.pth")])
    assert train.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {state}") and message in err
    assert os.listdir(run_dir) == [train.STATE_FILE] and not (tmp_path / "best.pth").exists()
    assert not marker.exists()


def test_web_app_refuses_it_and_runs_without_a_model(evil, tmp_path):
    path, marker, message = evil
    app = create_app({"TESTING": True, "CHECKPOINT": str(path), "DEVICE": "cpu", "SECRET_KEY": "test",
                      "RESULTS_DIR": str(tmp_path / "results"), "WTF_CSRF_ENABLED": False,
                      "INSTANCE_PATH": str(tmp_path / "instance")})
    state = app.extensions["chestxray"]
    assert state.predictor is None and message in state.error
    client = app.test_client()
    assert client.get("/healthz").get_json() == {"status": "ok", "model_loaded": False}
    page = client.get("/").data.decode()
    assert "No model is loaded" in page and message in page
    image = sorted((NIH_DIR / "images_64").glob("*.png"))[0]
    response = client.post("/api/predict", data={"file": (io.BytesIO(image.read_bytes()), image.name)})
    assert response.status_code == 503 and message in response.get_json()["error"]
    assert client.get("/api/model").status_code == 503
    page = client.post("/predict", data={"file": (io.BytesIO(image.read_bytes()), image.name)})
    assert page.status_code == 303 and page.headers["Location"] == "/"  # the upload page, saying why
    assert "No model is loaded" in client.get("/").data.decode()
    assert os.listdir(tmp_path / "results") == []
    assert not marker.exists()
