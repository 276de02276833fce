"""Trustworthy answers on every entry point: a photo and a CT slice are refused (no calls, the message says why),
a real NIH image is accepted, a label without validation evidence is never called, and a checkpoint without the
statistics still answers ("in-scope check: not available")."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pydicom.data
import pytest
import skimage.data
import torch
from PIL import Image
from support.trust import VALIDATED, make_trusted_checkpoint

from chestxray.imaging import read_xray
from chestxray.predictor import NOT_VALIDATED, Predictor
from chestxray.trust import TRUST_KEY

CT_SLICE = Path(pydicom.data.__file__).parent / "test_files" / "CT_small.dcm"


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def photo() -> bytes:
    return _png(skimage.data.astronaut())


@pytest.fixture(scope="module")
def held_out(nih_dir) -> Path:
    return sorted((nih_dir / "images").glob("*.png"))[0]


@pytest.fixture(scope="module")
def trusted_checkpoint(tmp_path_factory, tiny_checkpoint, nih_dir) -> Path:
    return make_trusted_checkpoint(tmp_path_factory.mktemp("trusted") / "model.pth", tiny_checkpoint, nih_dir)


@pytest.fixture(scope="module")
def predictor(trusted_checkpoint) -> Predictor:
    return Predictor.from_checkpoint(trusted_checkpoint, device="cpu")


def test_checkpoint_with_trust_loads_weights_only(trusted_checkpoint):
    assert TRUST_KEY in torch.load(trusted_checkpoint, weights_only=True)


@pytest.mark.parametrize("which", ["photo", "ct"])
def test_photo_and_ct_slice_are_out_of_scope_with_no_calls(predictor, photo, which):
    source = photo if which == "photo" else CT_SLICE.read_bytes()
    doc = predictor.predict(source).to_dict()
    assert doc["in_scope"] is False and doc["positive"] == []
    assert doc["scope_score"] > doc["scope_limit"]
    assert "does not look like a frontal chest radiograph" in doc["scope"]
    assert all(not row["positive"] for row in doc["labels"])


def test_a_batch_gets_the_verdicts_each_image_gets_alone(predictor, photo, held_out):
    # predict_batch scores the in-scope check for the whole batch at once; no image may borrow another's score.
    images = [read_xray(photo), read_xray(held_out), read_xray(CT_SLICE.read_bytes())]
    batch = predictor.predict_batch(images)
    alone = [predictor.predict_batch([image])[0] for image in images]
    assert [p.in_scope for p in batch] == [a.in_scope for a in alone] == [False, True, False]
    assert [p.positive for p in batch] == [a.positive for a in alone] == [[], [VALIDATED], []]
    for together, single in zip(batch, alone):
        assert together.scope_score == pytest.approx(single.scope_score, rel=1e-4)


def test_real_nih_image_is_in_scope_and_only_validated_labels_are_called(predictor, held_out):
    pred = predictor.predict(held_out)
    doc = pred.to_dict()
    assert doc["in_scope"] is True and doc["scope_score"] <= doc["scope_limit"]
    assert doc["positive"] == [VALIDATED]  # every label reaches its threshold 0; only Effusion is validated
    calls = {row["label"]: row["call"] for row in doc["labels"]}
    assert calls[VALIDATED] == "positive" and set(calls.values()) == {"positive", "not validated"}
    assert pred.ranked()[0] == VALIDATED  # called findings first
    row = next(r for r in doc["labels"] if r["label"] == VALIDATED)
    assert row["auroc_ci"] == [0.7, 0.9] and doc["calibrated"] is True
    # Calibrated probabilities are shown; the raw logits stay available.
    cal = predictor.trust.calibration
    z = np.array([r["logit"] for r in doc["labels"]])
    np.testing.assert_allclose([r["probability"] for r in doc["labels"]], cal.apply(z), rtol=1e-9)


def test_checkpoint_without_statistics_answers_but_calls_nothing(tiny_checkpoint, held_out):
    doc = Predictor.from_checkpoint(tiny_checkpoint, device="cpu").predict(held_out).to_dict()
    assert doc["in_scope"] is None and doc["scope"].startswith("in-scope check: not available")
    assert "no finding is called" in doc["scope"] and doc["warning"] is None
    assert doc["calibrated"] is False and doc["positive"] == []
    assert {row["call"] for row in doc["labels"]} == {NOT_VALIDATED}
    assert "no label is called" in doc["model"]["call_rule"]
    # The operator's explicit opt-out calls at the thresholds, and says so on every answer.
    doc = Predictor.from_checkpoint(tiny_checkpoint, device="cpu", allow_untrusted=True).predict(held_out).to_dict()
    assert doc["positive"] and "untrusted" in doc["warning"] and doc["model"]["untrusted"] is True
    assert {row["call"] for row in doc["labels"]} == {"positive", "negative"}


# ------------------------------------------------------------------ the other entry points: API, page, CLI


@pytest.fixture
def client(trusted_checkpoint, tmp_path):
    from chestxray.web import create_app

    app = create_app({"TESTING": True, "CHECKPOINT": str(trusted_checkpoint), "DEVICE": "cpu",
                      "SECRET_KEY": "test", "RESULTS_DIR": str(tmp_path / "results"), "WTF_CSRF_ENABLED": False,
                      "INSTANCE_PATH": str(tmp_path / "instance")})
    return app.test_client()


@pytest.mark.parametrize("which", ["photo", "ct"])
def test_api_and_page_refuse_out_of_scope(client, photo, which):
    data, name = (photo, "photo.png") if which == "photo" else (CT_SLICE.read_bytes(), "ct.dcm")
    doc = client.post("/api/predict", data={"file": (io.BytesIO(data), name)}).get_json()
    assert doc["in_scope"] is False and doc["positive"] == [] and "out of scope" in doc["scope"]
    page = client.get(doc["result"]).data.decode()
    assert "Out of scope." in page and "does not look like a frontal chest radiograph" in page
    assert 'id="show-anyway"' in page and "findings-table" not in page
    shown = client.get(doc["result"] + "?show=1").data.decode()
    assert "findings-table" in shown and "greyed" in shown and 'class="finding positive' not in shown
    table = shown.split('class="findings-table"')[1].split("</table>")[0]  # the review form repeats the calls
    assert table.count('<td class="call">out of scope</td>') == 14  # every label, validated or not


def test_page_says_not_validated(client, held_out):
    response = client.post("/predict", data={"file": (io.BytesIO(held_out.read_bytes()), "cxr.png")})
    page = client.get(response.headers["Location"]).data.decode()
    assert "Out of scope." not in page and "In scope:" in page
    table = page.split('class="findings-table"')[1].split("</table>")[0]  # the review form repeats the calls
    assert table.count(f'<td class="call">{NOT_VALIDATED}</td>') == 13 and page.count('class="finding positive') == 1


@pytest.mark.parametrize("which", ["photo", "ct"])
def test_cli_refuses_out_of_scope(trusted_checkpoint, tmp_path, photo, which, capsys):
    import predictions

    path = tmp_path / ("photo.png" if which == "photo" else "ct.dcm")
    path.write_bytes(photo if which == "photo" else CT_SLICE.read_bytes())
    args = predictions.get_args_parser().parse_args([str(path), "--checkpoint", str(trusted_checkpoint),
                                                     "--device", "cpu"])
    assert predictions.main(args) == 0
    out, err = capsys.readouterr()
    doc = json.loads(out.strip().splitlines()[-1])
    assert doc["in_scope"] is False and doc["positive"] == [] and "out of scope" in err
