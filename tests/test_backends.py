"""Predictor on PyTorch and on ONNX Runtime gives the same Prediction; predictions.py scores in batches and under
torchrun with the same output as one image at a time; the web app serves either backend."""
from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from support.checkpoints import make_checkpoint
from support.data import NIH_DIR, NIH_PNG, OTHER_CXR_DIR, ROOT

import Model_Training.export as export
import predictions
from chestxray.checkpoint import CheckpointError
from chestxray.imaging import InvalidImage
from chestxray.predictor import Predictor
from chestxray.scoring import csv_header, find_images, merge_parts, part_path, shard_bounds


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny checkpoint with its ONNX export beside it (model.pth + model.onnx)."""
    ckpt = make_checkpoint(tmp_path_factory.mktemp("backends") / "model.pth")
    assert export.main(export.get_args_parser().parse_args(["--checkpoint", str(ckpt)])) == 0
    return ckpt


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Real sample images of three sizes, a DICOM, and a file that is not an image (its error keeps its place)."""
    root = tmp_path_factory.mktemp("scans")
    # images_256 in ../shared/data/nih, images_128 in the bundled sample
    middle = next(d for d in (NIH_DIR / "images_256", NIH_DIR / "images_128") if d.is_dir())
    picks = sorted((NIH_DIR / "images_64").glob("*.png"))[:5] + sorted(middle.glob("*.png"))[:2] + [NIH_PNG]
    for p in picks:
        shutil.copy(p, root / p.name)
    dicom = next(OTHER_CXR_DIR.glob("*.dcm"))
    shutil.copy(dicom, root / "zz_scan.dcm")
    (root / "00000000_bad.png").write_bytes(b"not a png at all")
    return root


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


@pytest.mark.slow(6)
def test_both_backends_give_the_same_prediction(exported, folder):
    torch_p = Predictor.from_checkpoint(exported, device="cpu", backend="torch")
    onnx_p = Predictor.from_checkpoint(exported, device="cpu", backend="onnx")  # finds model.onnx beside it
    assert onnx_p.backend == "onnx" and onnx_p.meta == torch_p.meta
    assert onnx_p.model_card()["backend"] == "onnx (fp32)" and torch_p.model_card()["backend"] == "torch"
    images = [p for p in sorted(folder.iterdir()) if "bad" not in p.name]
    deltas, corrs = [], []
    for path in images:
        a, b = torch_p.predict(path), onnx_p.predict(path)
        assert a.labels == b.labels and a.format == b.format and a.image.shape == b.image.shape
        deltas.append(max(abs(a.probabilities[k] - b.probabilities[k]) for k in a.labels))
        corrs += [_corr(a.heatmaps[i], b.heatmaps[i]) for i in range(len(a.labels))]
        # Calls agree except where a probability sits within the tolerance of its threshold.
        near = {k for k in a.labels if abs(a.probabilities[k] - a.thresholds[k]) <= 1e-4}
        assert set(a.positive) - near == set(b.positive) - near
    assert max(deltas) <= 1e-4
    assert min(corrs) >= 0.999


def test_onnx_backend_needs_the_export(tmp_path):
    ckpt = make_checkpoint(tmp_path / "lonely.pth")
    with pytest.raises(CheckpointError, match="Model_Training/export.py --checkpoint"):
        Predictor.from_checkpoint(ckpt, device="cpu", backend="onnx")


def test_export_of_another_checkpoint_is_refused(exported, tmp_path):
    other = make_checkpoint(tmp_path / "model.pth", thresholds=[0.2] * 14)
    shutil.copy(exported.with_suffix(".onnx"), tmp_path / "model.onnx")
    with pytest.raises(CheckpointError, match="another checkpoint"):
        Predictor.from_checkpoint(other, device="cpu", backend="onnx")


def _run_cli(argv: list[str], capsys) -> tuple[int, str]:
    rc = predictions.main(predictions.get_args_parser().parse_args(argv))
    return rc, capsys.readouterr().out


@pytest.mark.parametrize("backend", ["torch", "onnx"])
def test_batched_scoring_equals_one_at_a_time(exported, folder, tmp_path, capsys, backend):
    ckpt = str(exported)
    rc, stdout = _run_cli([str(folder), "--checkpoint", ckpt, "--device", "cpu", "--backend", backend,
                           "--batch-size", "3", "--workers", "2", "--csv", str(tmp_path / "out.csv")], capsys)
    assert rc == 1  # the bad file
    batched = [json.loads(line) for line in stdout.splitlines()]
    # Today's path, independently: one Predictor.predict per file, in find_images order.
    predictor = Predictor.from_checkpoint(exported, device="cpu", backend=backend)
    expected = []
    for path in find_images([str(folder)]):
        try:
            expected.append({"image": str(path), **predictor.predict(path, heatmaps=False).to_dict()})
        except InvalidImage as exc:
            expected.append({"image": str(path), "error": str(exc)})
    assert [r["image"] for r in batched] == [r["image"] for r in expected]
    for got, want in zip(batched, expected):
        if "error" in want:
            assert got == want
            continue
        # Same document; probabilities may differ in the last float bits between a batch and a batch of one.
        for key in ("probability", "logit"):
            got_p = [item.pop(key) for item in got["labels"]]
            want_p = [item.pop(key) for item in want["labels"]]
            np.testing.assert_allclose(got_p, want_p, rtol=0, atol=1e-5)
        assert got == want
    with open(tmp_path / "out.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == csv_header(predictor.labels)
    assert [r[0] for r in rows[1:]] == [r["image"] for r in expected]
    for row, line in zip(rows[1:], stdout.splitlines()):
        record = json.loads(line)
        if "error" in record:
            assert row[-1] == record["error"] and row[2] == ""
        else:
            assert [float(v) for v in row[2:2 + len(record["labels"])]] == pytest.approx([i["probability"] for i in record["labels"]],
                                                                  abs=1e-6)
            assert row[-2] == "|".join(record["positive"])


@pytest.mark.slow(10)
def test_batched_overlays_match(exported, folder, tmp_path, capsys):
    out_a, out_b = tmp_path / "a", tmp_path / "b"
    common = [str(folder), "--checkpoint", str(exported), "--device", "cpu", "--heatmaps", "positive", "--allow-untrusted"]
    _run_cli([*common, "--out", str(out_a), "--batch-size", "1", "--workers", "0"], capsys)
    _run_cli([*common, "--out", str(out_b), "--batch-size", "4", "--workers", "2"], capsys)
    files_a = sorted(p.relative_to(out_a) for p in out_a.rglob("*.png"))
    assert files_a and files_a == sorted(p.relative_to(out_b) for p in out_b.rglob("*.png"))
    for name in files_a:  # the same pictures, not only the same names (a batch may differ in the last float bits)
        a, b = (np.asarray(Image.open(out / name).convert("RGB"), dtype=np.int16) for out in (out_a, out_b))
        assert a.shape == b.shape and np.abs(a - b).max() <= 2, name
        assert a.std() > 0, name  # an image, not a blank that would match any other blank


@pytest.mark.parametrize("argv, message", [
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--workers", "-1"], "--workers must be 0 or more"),
])
def test_bad_batch_arguments(exported, folder, capsys, argv, message):
    rc = predictions.main(predictions.get_args_parser().parse_args([str(folder), "--checkpoint", str(exported),
                                                                    *argv]))
    assert rc == 2 and message in capsys.readouterr().err


def test_shards_cover_the_list_in_order(tmp_path):
    for n in (0, 1, 5, 16, 17):
        for world in (1, 2, 3, 8):
            blocks = [shard_bounds(n, r, world) for r in range(world)]
            assert [i for a, b in blocks for i in range(a, b)] == list(range(n))
            assert max(b - a for a, b in blocks) - min(b - a for a, b in blocks) <= 1
    target = tmp_path / "merged.csv"
    for rank, body in enumerate(["h\n1\n2\n", "h\n3\n", "h\n"]):
        part_path(target, rank).write_text(body)
    merge_parts(target, 3, header_lines=1)
    assert target.read_text() == "h\n1\n2\n3\n"
    assert not list(tmp_path.glob(".merged.csv.part-*"))
    with pytest.raises(FileNotFoundError, match="part-00001"):
        part_path(target, 0).write_text("x\n")
        merge_parts(target, 2)


@pytest.mark.slow(15)
def test_torchrun_two_ranks_merge_to_the_single_process_output(exported, folder, tmp_path, capsys):
    common = [str(folder), "--checkpoint", str(exported), "--device", "cpu", "--batch-size", "1", "--workers", "0"]
    single_jsonl, single_csv = tmp_path / "single.jsonl", tmp_path / "single.csv"
    assert _run_cli([*common, "--jsonl", str(single_jsonl), "--csv", str(single_csv)], capsys)[0] == 1
    merged_jsonl, merged_csv = tmp_path / "merged.jsonl", tmp_path / "merged.csv"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "predictions.py", *common, "--jsonl", str(merged_jsonl), "--csv", str(merged_csv)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0, proc.stderr  # the bad file fails the run on every rank's exit code
    assert merged_jsonl.read_text() == single_jsonl.read_text()
    assert merged_csv.read_text() == single_csv.read_text()
    assert len(single_jsonl.read_text().splitlines()) == 10
    assert not list(tmp_path.glob(".merged*"))  # the parts are gone


def test_torchrun_without_an_output_file_is_refused(exported, folder, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    rc = predictions.main(predictions.get_args_parser().parse_args([str(folder), "--checkpoint", str(exported)]))
    assert rc == 2 and "under torchrun give --jsonl FILE" in capsys.readouterr().err


def test_web_app_serves_the_onnx_backend(exported, tmp_path):
    from chestxray.web import create_app

    answers = {}
    for backend in ("torch", "onnx"):
        app = create_app({"CHECKPOINT": str(exported), "DEVICE": "cpu", "BACKEND": backend,
                                 "RESULTS_DIR": str(tmp_path / backend), "TESTING": True,
                                 "INSTANCE_PATH": str(tmp_path / "instance")})
        response = app.test_client().post("/api/predict", data={"file": (io.BytesIO(NIH_PNG.read_bytes()),
                                                                         NIH_PNG.name)},
                                          content_type="multipart/form-data")
        assert response.status_code == 200, response.get_data(as_text=True)
        answers[backend] = response.get_json()
    probs = {b: [item["probability"] for item in answers[b]["labels"]] for b in answers}
    assert np.abs(np.subtract(probs["torch"], probs["onnx"])).max() <= 1e-4
    assert answers["onnx"]["model"]["backend"] == "onnx (fp32)"


@pytest.mark.slow(8)
def test_evaluation_on_the_onnx_backend_matches_torch(exported, tmp_path):
    import pandas as pd

    import Model_Training.test as evaluation

    frames = {}
    for backend in ("torch", "onnx"):
        out = tmp_path / backend
        argv = ["--checkpoint", str(exported), "--data-dir", str(NIH_DIR), "--split", "val", "--in-sample",
                "--limit", "12", "--bootstrap", "10", "--device", "cpu", "--workers", "0", "--no-progress",
                "--backend", backend, "--out", str(out)]
        assert evaluation.main(evaluation.get_args_parser().parse_args(argv)) == 0
        frames[backend] = pd.read_csv(out / "predictions.csv")
        assert json.loads((out / "metrics.json").read_text())["run"]["backend"] == backend
    torch_f, onnx_f = frames["torch"], frames["onnx"]
    assert list(torch_f["image"]) == list(onnx_f["image"])
    prob_cols = [c for c in torch_f.columns if c.endswith("_prob")]
    assert prob_cols
    assert np.abs(torch_f[prob_cols].to_numpy() - onnx_f[prob_cols].to_numpy()).max() <= 1e-4
    # Both backends go through the app's Predictor: the same calls and in-scope verdicts.
    call_cols = [c for c in torch_f.columns if c.endswith("_call")] + ["in_scope"]
    assert len(call_cols) == len(prob_cols) + 1
    assert torch_f[call_cols].equals(onnx_f[call_cols])
