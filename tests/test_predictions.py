"""chestxray.predictor (probabilities, calls, heatmaps, preprocessing from the checkpoint, to_dict) and the
predictions.py CLI over it."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from support.checkpoints import make_checkpoint
from support.data import DICOM_MONO2, NIH_DIR, NIH_PNG, ROOT

import predictions
from chestxray import predictor as predictor_module
from chestxray.imaging import InvalidImage, UnsupportedFormat, read_xray
from chestxray.labels import CHESTXRAY8_LABELS, LABELS
from predictions import Predictor


def test_probabilities_are_a_single_sigmoid_of_the_logits(tiny_predictor):
    pred = tiny_predictor.predict(NIH_PNG)
    with torch.no_grad():
        logits = tiny_predictor.model(tiny_predictor.preprocess(read_xray(NIH_PNG)))[0]
    expected = torch.sigmoid(logits).numpy()
    np.testing.assert_allclose([pred.probabilities[n] for n in LABELS], expected, rtol=1e-5, atol=1e-6)
    probs = np.array(list(pred.probabilities.values()))
    # A double sigmoid squeezes everything into (0.5, 0.73); the biased head spreads these over (0, 1).
    assert probs.min() < 0.2 and probs.max() > 0.8


def test_keys_follow_the_checkpoint_label_order_and_thresholds(tmp_path):
    labels = tuple(reversed(CHESTXRAY8_LABELS))
    thresholds = [0.05, 0.95, 0.5, 0.5, 0.5, 0.5, 0.5, 0.99]
    path = make_checkpoint(tmp_path / "c8.pth", labels=labels, thresholds=thresholds, bias_spread=0.0)
    predictor = Predictor.from_checkpoint(path, device="cpu", allow_untrusted=True)
    pred = predictor.predict(NIH_PNG)
    assert list(pred.probabilities) == list(labels) == list(pred.thresholds)
    assert pred.thresholds[labels[1]] == 0.95
    for name, t in zip(labels, thresholds):
        assert (name in pred.positive) == (pred.probabilities[name] >= t)
    assert labels[0] in pred.positive  # threshold 0.05 against p ~ 0.5
    assert pred.heatmaps.shape == (8, 2, 2)


def test_preprocessing_comes_from_the_checkpoint(tmp_path):
    path = make_checkpoint(tmp_path / "c96.pth", image_size=96)
    predictor = Predictor.from_checkpoint(path, device="cpu")
    assert predictor.preprocess(read_xray(NIH_PNG)).shape == (1, 3, 96, 96)
    pred = predictor.predict(NIH_PNG)
    assert pred.heatmaps.shape == (14, 3, 3)


def test_prediction_overlay_and_ranking(tiny_predictor):
    pred = tiny_predictor.predict(DICOM_MONO2)
    ranked = pred.ranked()
    assert sorted(ranked) == sorted(LABELS)
    called = [name for name in ranked if name in pred.positive]
    assert ranked[: len(called)] == sorted(pred.positive, key=lambda n: -pred.probabilities[n])  # called first
    rest = [pred.probabilities[name] for name in ranked[len(called):]]
    assert rest == sorted(rest, reverse=True)
    image = pred.overlay(ranked[0])
    assert image.size == (1024, 1024)
    with pytest.raises(KeyError, match="unknown label"):
        pred.overlay("Tumour")
    assert tiny_predictor.predict(NIH_PNG, heatmaps=False).heatmaps is None


def test_invalid_image_propagates(tiny_predictor):
    with pytest.raises(InvalidImage):
        tiny_predictor.predict(b"not an image")


def test_predictions_reexports_the_core_predictor():
    assert predictions.Predictor is predictor_module.Predictor
    assert predictions.Prediction is predictor_module.Prediction


def test_to_dict_is_plain_json_in_model_order(tmp_path):
    labels = tuple(reversed(CHESTXRAY8_LABELS))
    thresholds = [0.05, 0.95, 0.5, 0.5, 0.5, 0.5, 0.5, 0.99]
    predictor = Predictor.from_checkpoint(make_checkpoint(tmp_path / "c8.pth", labels=labels, thresholds=thresholds),
                                          device="cpu")
    pred = predictor.predict(DICOM_MONO2)
    doc = pred.to_dict()
    assert json.loads(json.dumps(doc, allow_nan=False)) == doc  # plain, strict JSON
    assert list(doc) == ["labels", "positive", "in_scope", "scope_score", "scope_limit", "scope", "warning",
                         "calibrated", "format", "original_size", "orientation", "model"]
    assert doc["in_scope"] is None and doc["scope"].startswith("in-scope check: not available")
    assert doc["positive"] == [] and doc["warning"] is None  # no trust data, no opt-out: nothing is called
    assert {row["call"] for row in doc["labels"]} == {"not validated"}
    predictor = Predictor(predictor.model, predictor.meta, allow_untrusted=True)
    pred = predictor.predict(DICOM_MONO2)
    doc = pred.to_dict()
    assert doc["warning"] and "untrusted" in doc["warning"] and "not available" in doc["scope"]
    assert [row["label"] for row in doc["labels"]] == list(labels)
    for row, t in zip(doc["labels"], thresholds):
        assert set(row) == {"label", "probability", "logit", "threshold", "positive", "call", "validated", "auroc",
                            "auroc_ci", "has_support"}
        assert row["probability"] == pytest.approx(1 / (1 + np.exp(-row["logit"])), rel=1e-12)  # no calibration
        assert row["probability"] == pred.probabilities[row["label"]] and row["threshold"] == t
        assert row["positive"] == (row["probability"] >= t) == (row["label"] in doc["positive"])
    assert doc["positive"] == [row["label"] for row in doc["labels"] if row["positive"]]
    image = read_xray(DICOM_MONO2)
    assert doc["format"] == "DICOM" and doc["original_size"] == [image.shape[1], image.shape[0]]
    assert doc["model"] == predictor.model_card()
    assert predictor.predict(image).to_dict()["format"] is None  # an array has no file format


def test_calls_go_through_metrics_binarize(tiny_predictor, monkeypatch):
    seen = []

    def spy(y_prob, thresholds):
        seen.append((np.asarray(y_prob).copy(), np.asarray(thresholds).copy()))
        return np.ones(len(thresholds), dtype=int)

    monkeypatch.setattr(predictor_module, "binarize", spy)
    pred = tiny_predictor.predict(NIH_PNG, heatmaps=False)
    assert pred.positive == list(LABELS) and len(seen) == 1
    np.testing.assert_allclose(seen[0][0], [pred.probabilities[n] for n in LABELS])


@pytest.mark.parametrize("data, name, error, message", [
    (b"%PDF-1.4\n1 0 obj", "scan.pdf", UnsupportedFormat, "unsupported file type (PDF)"),
    (b"%PDF-1.4\n1 0 obj", "scan.png", UnsupportedFormat, "unsupported file type (PDF)"),
    (b"plain text", "notes.txt", UnsupportedFormat, "unsupported file type ('.txt')"),
    (b"plain text", "notes.png", InvalidImage, "the file is named '.png'"),
    (b"", "empty.png", InvalidImage, "the file is empty"),
])
def test_predict_sniffs_the_content_first(tiny_predictor, tmp_path, data, name, error, message):
    path = tmp_path / name
    path.write_bytes(data)
    for source, filename in ((path, ""), (data, name)):  # a path's own name, or the name given with bytes
        with pytest.raises(error) as err:
            tiny_predictor.predict(source, filename=filename)
        assert message in str(err.value)


def test_model_card(tiny_predictor):
    card = tiny_predictor.model_card()
    assert card["arch"] == "resnet18" and card["image_size"] == 64 and card["labels"] == list(LABELS)
    json.dumps(card)


def test_full_size_resnet50_at_512(tmp_path):
    """The seed architecture at its real input size, on a real 1024-px image."""
    path = make_checkpoint(tmp_path / "r50.pth", arch="resnet50", image_size=512)
    predictor = Predictor.from_checkpoint(path, device="cpu")
    pred = predictor.predict(NIH_PNG)
    assert pred.heatmaps.shape == (14, 16, 16)
    assert pred.overlay(pred.ranked()[0]).size == (1024, 1024)
    assert all(0 <= p <= 1 for p in pred.probabilities.values()) and np.isfinite(pred.heatmaps).all()


# ---- command line --------------------------------------------------------------------------------------------------


@pytest.fixture()
def mixed_folder(tmp_path):
    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    shutil.copy(NIH_PNG, folder / "a.png")
    shutil.copy(NIH_DIR / "images_64" / "00000001_001.png", folder / "sub" / "a.png")  # same stem, other folder
    shutil.copy(DICOM_MONO2, folder / "sub" / "scan.dcm")
    (folder / "empty.png").write_bytes(b"")
    (folder / "notes.jpg").write_text("not a picture")
    (folder / "readme.txt").write_text("ignored: not an image suffix")
    return folder


def _run_cli(capsys, *argv) -> tuple[int, list[dict], str]:
    code = predictions.main(predictions.get_args_parser().parse_args([str(a) for a in argv]))
    out, err = capsys.readouterr()
    return code, [json.loads(line) for line in out.splitlines()], err


@pytest.mark.slow(8)
def test_cli_on_a_mixed_folder(tiny_checkpoint, mixed_folder, tmp_path, capsys):
    out_dir = tmp_path / "maps"
    code, records, err = _run_cli(capsys, mixed_folder, "--checkpoint", tiny_checkpoint, "--out", out_dir)
    assert code == 1
    by_name = {r["image"].split(str(mixed_folder) + "/")[1]: r for r in records}
    assert set(by_name) == {"a.png", "sub/a.png", "sub/scan.dcm", "empty.png", "notes.jpg"}
    assert "empty" in by_name["empty.png"]["error"]
    assert "not a readable image" in by_name["notes.jpg"]["error"]
    for name in ("a.png", "sub/a.png", "sub/scan.dcm"):
        record = by_name[name]
        assert [row["label"] for row in record["labels"]] == list(LABELS)
        assert set(record["heatmaps"]) == set(LABELS)
        for path in record["heatmaps"].values():
            with Image.open(path) as im:
                assert im.format == "PNG"
    # Two images with the stem "a" do not overwrite each other's heatmaps.
    assert by_name["a.png"]["heatmaps"]["Mass"] != by_name["sub/a.png"]["heatmaps"]["Mass"]
    assert "5/5" in err  # progress bar on stderr


def test_cli_heatmaps_positive_and_none(tmp_path, capsys):
    path = make_checkpoint(tmp_path / "t.pth", thresholds=[0.99] * 13 + [0.0])
    code, (record,), _ = _run_cli(capsys, NIH_PNG, "--checkpoint", path, "--out", tmp_path / "o",
                                  "--heatmaps", "positive", "--allow-untrusted")
    assert code == 0 and record["positive"] == ["Hernia"] and list(record["heatmaps"]) == ["Hernia"]
    code, (record,), _ = _run_cli(capsys, NIH_PNG, "--checkpoint", path, "--heatmaps", "none")
    assert code == 0 and "heatmaps" not in record


def test_cli_without_a_usable_checkpoint(tmp_path, capsys):
    code, records, err = _run_cli(capsys, NIH_PNG, "--checkpoint", tmp_path / "missing.pth")
    assert code == 2 and records == []
    assert "not found" in err and "Model_Training/train.py" in err


@pytest.mark.slow(6)
def test_cli_as_a_subprocess(tiny_checkpoint):
    result = subprocess.run(
        [sys.executable, "predictions.py", str(NIH_PNG), "--checkpoint", str(tiny_checkpoint), "--device", "cpu"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    record = json.loads(result.stdout)
    assert record["image"] == str(NIH_PNG) and len(record["labels"]) == 14
