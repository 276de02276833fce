"""The server on ONNX Runtime never imports torch: `--backend onnx` on an exported file, and `--backend auto` once the
export of the checkpoint exists. Each case runs in a fresh interpreter (this test process has torch loaded) that
builds the app, answers an upload with every part of the answer (in-scope and orientation checks, calibration,
heatmaps), then the result page, a heatmap, the PDF, /healthz and /monitor, and reports sys.modules."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from support.data import NIH_PNG, ROOT
from support.trust import make_trusted_checkpoint

from chestxray.auto_backend import checkpoint_digest, ensure_export, export_path
from chestxray.checkpoint import checkpoint_from_obj, safe_torch_load, write_checkpoint
from chestxray.data import XrayDataset, collate_batch, load_index
from chestxray.predictor import Predictor
from chestxray.transforms import build_normalize, build_transform
from chestxray.trust import TRUST_KEY
from chestxray.trust.orientation import collect_orientation, fit_orientation

SERVE = """
import io, json, sys
from pathlib import Path

from chestxray.web import create_app

checkpoint, backend, tmp, image = sys.argv[1:5]
app = create_app({"TESTING": True, "CHECKPOINT": checkpoint, "BACKEND": backend, "DEVICE": "auto",
                  "SECRET_KEY": "test", "WTF_CSRF_ENABLED": False, "RESULTS_DIR": tmp + "/results",
                  "INSTANCE_PATH": tmp + "/instance"})
# What a start loads: the DICOM node's libraries, matplotlib's figures (PDF, /monitor plots), onnx's parser (for a file
# checked before) and scipy are imported where they are used, not by every start.
at_start = sorted(m for m in sys.modules if m.split(".")[0] in {"torch", "torchvision", "onnx", "pynetdicom",
                                                                 "highdicom", "scipy"} or m == "matplotlib.figure")
client = app.test_client()
answer = client.post("/api/predict", data={"file": (io.BytesIO(Path(image).read_bytes()), "x.png")})
document = answer.get_json()
label = document["labels"][0]["label"]
status = {"predict": answer.status_code}
for name, url in (("page", document["result"]), ("heatmap", document["heatmaps"][label]),
                  ("pdf", document["report"]), ("healthz", "/healthz"), ("monitor", "/monitor")):
    status[name] = client.get(url).status_code
print(json.dumps({"status": status, "answer": document, "at_start": at_start,
                  "healthz": client.get("/healthz").get_json(),
                  "torch": sorted(m for m in sys.modules if m == "torch" or m.startswith(("torch.", "torchvision")))}))
"""


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny_checkpoint, nih_dir) -> Path:
    """The tiny checkpoint with every trust part the answers use: in-scope check (mahalanobis+image), calibration,
    evidence and the orientation check (fitted on 20 small NIH films: the check only has to run)."""
    path = make_trusted_checkpoint(tmp_path_factory.mktemp("torch_free") / "model.pth", tiny_checkpoint, nih_dir)
    obj = safe_torch_load(path)
    model, meta, _ = checkpoint_from_obj(obj, path)
    index = load_index(nih_dir, allow_missing=True)
    small = index[index["path"].astype(str).str.contains(r"[/\\]images_64[/\\]")].iloc[:20].reset_index(drop=True)
    loader = torch.utils.data.DataLoader(XrayDataset(small, meta.labels, build_transform(meta)), batch_size=20,
                                         collate_fn=collate_batch)
    features, classes, n = collect_orientation(model, loader, "cpu", build_normalize(meta))
    obj[TRUST_KEY]["orientation"] = fit_orientation(features, classes, n_images=n).to_dict()
    write_checkpoint(path, obj)
    return path


@pytest.fixture(scope="module")
def exported(checkpoint) -> Path:
    """The export backend "auto" makes on first start (checked against PyTorch), named by the checkpoint's digest."""
    model, meta, train = checkpoint_from_obj(safe_torch_load(checkpoint), checkpoint)
    path = ensure_export(checkpoint, safe_torch_load(checkpoint), model, meta, train, log=lambda line: None)
    assert path == export_path(checkpoint, checkpoint_digest(checkpoint))
    return path


def serve_once(checkpoint: Path, backend: str, tmp_path: Path) -> dict:
    """Build the app in a fresh interpreter, answer one upload and its pages -> what the child reported."""
    proc = subprocess.run([sys.executable, "-c", SERVE, str(checkpoint), backend, str(tmp_path), str(NIH_PNG)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def assert_same_answer(answer: dict, eager) -> None:
    """The served answer is PyTorch's: probabilities within the export's tolerance, the same calls and checks."""
    rows = {row["label"]: row for row in answer["labels"]}
    assert {k: rows[k]["probability"] for k in rows} == pytest.approx(eager.probabilities, abs=1e-4)
    assert {k: rows[k]["call"] for k in rows} == eager.calls
    assert answer["in_scope"] == eager.in_scope and answer["scope_score"] == pytest.approx(eager.scope_score, rel=1e-4)
    assert eager.orientation is not None and answer["orientation"] == eager.orientation
    assert answer["calibrated"] and answer["model"]["scope"] is not None


@pytest.fixture(scope="module")
def eager(checkpoint):
    return Predictor.from_checkpoint(checkpoint, device="cpu", backend="torch").predict(NIH_PNG)


def test_the_onnx_server_answers_without_importing_torch(exported, eager, tmp_path):
    report = serve_once(exported, "onnx", tmp_path)
    assert report["torch"] == []
    assert report["at_start"] == [], report["at_start"]  # the export was checked once, when it was made
    assert set(report["status"].values()) == {200}, report["status"]
    assert report["healthz"]["backend"] == "onnx"
    assert_same_answer(report["answer"], eager)


def test_auto_with_a_cached_export_serves_it_without_torch(checkpoint, exported, eager, tmp_path):
    report = serve_once(checkpoint, "auto", tmp_path)
    if not Path("/proc/driver/nvidia").exists():  # with an NVIDIA driver, auto asks torch whether CUDA is there
        assert report["torch"] == []
        assert report["healthz"]["backend"].startswith("auto: ONNX Runtime")
    assert set(report["status"].values()) == {200}, report["status"]
    assert_same_answer(report["answer"], eager)


def test_auto_serves_the_export_of_this_checkpoint_only(checkpoint, exported, tmp_path):
    """The cached export is found by the checkpoint's digest: another checkpoint under the same name never gets it,
    and the export's own metadata gives the same trust data as the checkpoint."""
    auto = Predictor.from_checkpoint(checkpoint, device="cpu", backend="auto")
    eager = Predictor.from_checkpoint(checkpoint, device="cpu", backend="torch")
    assert auto.backend == "onnx" and auto.onnx.path == exported
    assert auto.model_card()["scope"] == eager.model_card()["scope"]
    np.testing.assert_array_equal(auto.trust.scope.precision, eager.trust.scope.precision)
    np.testing.assert_array_equal(auto.trust.orientation.coef, eager.trust.orientation.coef)
    changed = tmp_path / checkpoint.name
    shutil.copyfile(checkpoint, changed)
    shutil.copyfile(exported, tmp_path / exported.name)  # the old version's export beside a changed checkpoint
    obj = safe_torch_load(changed)
    obj["meta"]["thresholds"] = [0.5] * len(obj["meta"]["labels"])
    write_checkpoint(changed, obj)
    again = Predictor.from_checkpoint(changed, device="cpu", backend="auto", log=lambda line: None)
    assert again.onnx.path == export_path(changed, checkpoint_digest(changed)) != tmp_path / exported.name
    assert list(again.thresholds) == [0.5] * len(again.labels)
