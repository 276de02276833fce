"""The result page as a radiologist reads it: one rounding rule for every number (page, tab title, model panel, PDF
text, batch CSV), display names, `?label=` with an unknown label answered 404, and an out-of-scope image called an
image and described without anatomy."""
from __future__ import annotations

import csv
import html
import io
import re

import pytest
import skimage.data
from PIL import Image
from pypdf import PdfReader
from support.trust import make_trusted_checkpoint

from chestxray.reporting.formatting import auroc_text, label_name, percent
from chestxray.trust.evidence import format_call


def _png(array) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def client(tmp_path_factory, tiny_checkpoint, nih_dir):
    from chestxray.web import create_app

    folder = tmp_path_factory.mktemp("reading-room")
    checkpoint = make_trusted_checkpoint(folder / "trusted.pth", tiny_checkpoint, nih_dir)
    app = create_app({"TESTING": True, "CHECKPOINT": str(checkpoint), "DEVICE": "cpu", "SECRET_KEY": "t",
                      "RESULTS_DIR": str(folder / "results"), "WTF_CSRF_ENABLED": False,
                      "INSTANCE_PATH": str(folder / "instance")})
    return app.test_client()


def _analyse(client, data: bytes, name: str) -> dict:
    return client.post("/api/predict", data={"file": (io.BytesIO(data), name)}).get_json()


def _cell(row: str, name: str) -> str:
    found = re.search(rf'<td class="[^"]*\b{name}\b[^"]*">(.*?)</td>', row, flags=re.S)
    return " ".join(re.sub(r"<[^>]+>", " ", found.group(1)).split())


def page_findings(page: str) -> dict[str, dict[str, str]]:
    """{label: {name, probability, threshold, call, auroc}} as the findings table prints them."""
    out = {}
    for row in re.findall(r'<tr class="finding.*?</tr>', page, flags=re.S):
        label = re.search(r'data-label="([^"]+)"', row).group(1)
        name = re.search(r'class="label-link"[^>]*>([^<]*)</a>', row, flags=re.S).group(1).strip()
        out[label] = {"name": name, "probability": _cell(row, "probability"), "threshold": _cell(row, "threshold"),
                      "call": _cell(row, "call"), "auroc": _cell(row, "validation-auroc")}
    return out


def test_every_number_reads_the_same_on_page_title_panel_pdf_and_csv(client, nih_dir):
    image = sorted((nih_dir / "images").glob("*.png"))[0]
    doc = _analyse(client, image.read_bytes(), "cxr.png")
    rid, rows = doc["id"], doc["labels"]
    page = html.unescape(client.get(doc["result"]).data.decode())
    shown = page_findings(page)
    assert list(shown) == [row["label"] for row in sorted(rows, key=lambda r: (not r["positive"], -r["probability"]))]
    assert any(" (" in texts["auroc"] for texts in shown.values()), "the trusted checkpoint's AUROCs carry a CI"
    for row in rows:
        texts = shown[row["label"]]
        p_text, t_text = format_call(row["probability"], row["threshold"], call=row["call"])
        assert texts == {"name": label_name(row["label"]), "probability": p_text, "threshold": t_text,
                         "call": row["call"], "auroc": auroc_text(row["auroc"], row["auroc_ci"])}
        assert "_" not in texts["name"]

    # The tab title quotes the top call with the table's string.
    title = re.search(r"<title>(.*?)</title>", page, flags=re.S).group(1)
    top = next(row for row in rows if row["positive"])
    assert f"{label_name(top['label'])} positive ({shown[top['label']]['probability']})" in title

    # The model panel's thresholds: the same rule (rounded down), the same string as the findings' threshold.
    panel = page[page.index('id="model"'):]
    for row in rows:
        if format_call(row["probability"], row["threshold"], call=row["call"])[1] == percent(row["threshold"]):
            assert re.search(rf"{re.escape(label_name(row['label']))}</th>\s*<td[^>]*>[^<]*</td>\s*"
                             rf"<td[^>]*>{re.escape(percent(row['threshold']))}</td>", panel), row["label"]

    # The PDF prints each row as the page does, in the page's order.
    reader = PdfReader(io.BytesIO(client.get(f"/results/{rid}/report.pdf").data))
    text = " ".join(" ".join(p.extract_text() for p in reader.pages).split())
    positions = []
    for label, texts in shown.items():
        line = " ".join(texts[key] for key in ("name", "probability", "threshold", "call", "auroc"))
        assert line in text, (line, text)
        positions.append(text.index(line))
    assert positions == sorted(positions)
    assert f"Heatmap of {label_name(top['label'])} ({shown[top['label']]['probability']})" in text

    # The batch CSV holds the numbers (6 decimals, for analysis) and the calls; written with the shared rule, its
    # numbers give the page's strings.
    csv_row = next(csv.DictReader(io.StringIO(client.get(f"/results.csv?ids={rid}").data.decode())))
    for row in rows:
        value = float(csv_row[row["label"]])
        assert format_call(value, row["threshold"], call=row["call"])[0] == shown[row["label"]]["probability"]
        assert csv_row[f"{row['label']} call"] == shown[row["label"]]["call"]


def test_unknown_label_is_404_with_a_clear_message(client, nih_dir):
    image = sorted((nih_dir / "images").glob("*.png"))[0]
    doc = _analyse(client, image.read_bytes(), "cxr.png")
    answer = client.get(doc["result"] + "?label=Bogus")
    body = html.unescape(answer.data.decode())
    assert answer.status_code == 404
    assert "no label 'Bogus'" in body and "Pleural_Thickening" in body
    assert client.get(doc["result"] + "?label=Pleural_Thickening").status_code == 200


def test_out_of_scope_image_is_an_image_described_without_anatomy(client):
    doc = _analyse(client, _png(skimage.data.astronaut()), "photo.png")
    assert doc["in_scope"] is False
    page = html.unescape(client.get(doc["result"] + "?show=1").data.decode())
    title = re.search(r"<title>(.*?)</title>", page, flags=re.S).group(1)
    assert "X-ray," not in title and " image, result" in title
    described = re.findall(r'data-description="([^"]*)"', page)
    assert described and not [d for d in described if "zone" in d]
    assert any("third of the image" in d for d in described)
    assert 'alt="The uploaded image"' in page
