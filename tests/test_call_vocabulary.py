"""One call vocabulary, decided once: for every kind of answer (in scope, out of scope, not validated, no trust data,
untrusted answers allowed, the demo model) the page, the JSON, the batch CSV, the PDF text and the DICOM SR carry
the same call for every label, and the PDF and SR carry the page's scope, warning, demo and evidence statements."""
from __future__ import annotations

import csv
import html
import io
import re
from pathlib import Path

import numpy as np
import pydicom
import pytest
import skimage.data
import torch
from PIL import Image
from pypdf import PdfReader
from support.training import QUICK_DEMO
from support.trust import VALIDATED, make_trusted_checkpoint

from chestxray.calls import CALLS, NEGATIVE, NOT_VALIDATED, OUT_OF_SCOPE, POSITIVE, statements
from chestxray.checkpoint import safe_torch_load, write_checkpoint
from chestxray.predictor import Predictor
from chestxray.reporting.dicom import ReportContent, build_structured_report
from Model_Training import demo

DICOM_SOURCE = Path(pydicom.data.get_testdata_file("MR_small.dcm"))  # only its UIDs serve as the SR's source


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tiny_checkpoint, nih_dir) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("vocabulary")
    trusted = make_trusted_checkpoint(folder / "trusted.pth", tiny_checkpoint, nih_dir)
    # The same trust data with the validated label's threshold out of reach: its call is "negative".
    obj = safe_torch_load(trusted)
    labels = obj["meta"]["labels"]
    obj["meta"]["thresholds"][labels.index(VALIDATED)] = 1.0
    write_checkpoint(folder / "negative.pth", obj)
    built = demo.build_demo_model(folder / "demo.pth", extra_args=QUICK_DEMO, progress=False)
    return {"trusted": trusted, "negative": folder / "negative.pth", "tiny": tiny_checkpoint, "demo": built}


CASES = {  # case: (checkpoint, image, allow untrusted, the calls expected)
    "in scope, positive": ("trusted", "nih", False, {POSITIVE, NOT_VALIDATED}),
    "in scope, negative": ("negative", "nih", False, {NEGATIVE, NOT_VALIDATED}),
    "out of scope": ("trusted", "photo", False, {OUT_OF_SCOPE}),
    "no trust data": ("tiny", "nih", False, {NOT_VALIDATED}),
    "untrusted allowed": ("tiny", "nih", True, {POSITIVE, NEGATIVE}),
    "demo model": ("demo", "nih", False, None),  # whatever its evidence says, rendered alike
}


def _image(which: str, nih_dir: Path) -> tuple[bytes, str]:
    if which == "photo":
        return _png(skimage.data.astronaut()), "photo.png"
    return sorted((nih_dir / "images").glob("*.png"))[0].read_bytes(), "cxr.png"


def page_calls(page: str) -> dict[str, str]:
    """{label: call} from the findings table of a result page."""
    rows = re.findall(r'<tr class="finding.*?</tr>', page, flags=re.S)
    return {re.search(r'data-label="([^"]+)"', row).group(1): re.search(r'<td class="call">([^<]*)</td>', row).group(1)
            for row in rows}


def pdf_text(data: bytes) -> str:
    reader = PdfReader(io.BytesIO(data))
    return " ".join(" ".join(page.extract_text() for page in reader.pages).split())


def sr_calls(sr: pydicom.Dataset) -> tuple[dict[str, str], list[str]]:
    """({label: call}, [statements]) from a structured report's content items."""
    calls, said = {}, []
    for item in sr.ContentSequence:
        name = item.ConceptNameCodeSequence[0].CodeMeaning
        if name == "Statement":
            said.append(item.TextValue)
        elif "ContentSequence" in item:
            calls[name] = next(c.TextValue for c in item.ContentSequence
                               if c.ConceptNameCodeSequence[0].CodeMeaning == "Call")
    return calls, said


@pytest.mark.slow(12)
@pytest.mark.parametrize("case", list(CASES))
def test_every_renderer_carries_the_same_calls_and_statements(case, checkpoints, nih_dir, tmp_path):
    from chestxray.web import create_app

    which, image, allow, expected = CASES[case]
    data, name = _image(image, nih_dir)
    app = create_app({"TESTING": True, "CHECKPOINT": str(checkpoints[which]), "DEVICE": "cpu", "SECRET_KEY": "t",
                      "RESULTS_DIR": str(tmp_path / "results"), "WTF_CSRF_ENABLED": False,
                      "ALLOW_UNTRUSTED": allow, "INSTANCE_PATH": str(tmp_path / "instance")})
    client = app.test_client()
    doc = client.post("/api/predict", data={"file": (io.BytesIO(data), name)}).get_json()
    labels = [row["label"] for row in doc["labels"]]
    calls = {row["label"]: row["call"] for row in doc["labels"]}
    assert set(calls.values()) <= set(CALLS)
    if expected is not None:
        assert set(calls.values()) == expected, calls
    assert doc["positive"] == [label for label in labels if calls[label] == POSITIVE]
    said = [text for text in statements(doc).values() if text]
    assert said, "every answer states at least its scope and its call rule"

    page = html.unescape(client.get(doc["result"] + "?show=1").data.decode())
    assert page_calls(page) == calls
    flat_page = " ".join(page.split())
    for text in said:
        assert " ".join(text.split()) in flat_page, text

    rid = doc["id"]
    rows = list(csv.DictReader(io.StringIO(client.get(f"/results.csv?ids={rid}").data.decode())))
    assert {label: rows[0][f"{label} call"] for label in labels} == calls

    text = pdf_text(client.get(f"/results/{rid}/report.pdf").data)
    for label in labels:
        shown = label.replace("_", " ")
        assert re.search(rf"{re.escape(shown)} [\d.]+ ?% [\d.]+ ?% {re.escape(calls[label])}", text), (label, text)
    for statement in said:
        assert " ".join(statement.split()) in text, statement

    predictor = Predictor.from_checkpoint(checkpoints[which], device="cpu", allow_untrusted=allow)
    prediction = predictor.predict(data, filename=name)
    sr = build_structured_report(pydicom.dcmread(DICOM_SOURCE), ReportContent.from_prediction(prediction, "m"))
    sr = pydicom.dcmread(io.BytesIO(_saved(sr)))
    sr_by_label, sr_said = sr_calls(sr)
    assert sr_by_label == calls and sr_said == said
    assert statements(prediction.to_dict()) == statements(doc)


def _saved(ds: pydicom.Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def test_the_demo_model_keeps_its_trust_data(checkpoints):
    """The demo checkpoint carries what any trained checkpoint carries: scope, calibration and evidence."""
    obj = torch.load(checkpoints["demo"], weights_only=True)
    assert obj["meta"]["training"]["demo"]["images"] == 16
    trust = obj["trust"]
    assert trust["scope"] is not None and trust["calibration"] is not None
    assert set(trust["evidence"]) == set(obj["meta"]["labels"])
    predictor = Predictor.from_checkpoint(checkpoints["demo"], device="cpu")
    assert predictor.trust.scope is not None and not predictor.untrusted
