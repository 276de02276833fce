"""The web app's API completeness and the result page's extras, through Flask's test client.

Several files in one API request, absolute URLs, the raw maps as .npy, the /api index, the HTML model card, deleting
a result, the PDF report route, the view in the URL, the secret key kept across app creations, and the page markup
that accessibility needs (skip link, alert role, a title naming the image and top call, the heatmap in words).
"""
from __future__ import annotations

import html
import io
import re
import stat

import numpy as np
import pytest
from pypdf import PdfReader
from support.data import DICOM_MONO2, NIH_PNG
from support.web import results_dir, saved_ids, upload

from chestxray.reporting.pdf import strongest_zone
from chestxray.results import label_names, ranked
from chestxray.trust.evidence import format_call
from chestxray.web import create_app


@pytest.fixture
def client(make_app):  # noqa: F811
    return make_app().test_client()


def post_api(client, *files: tuple[bytes, str]):
    return client.post("/api/predict", data={"file": [(io.BytesIO(data), name) for data, name in files]})


# ---------------------------------------------------------------- the API


def test_several_file_parts_are_all_analysed_in_order(client, tiny_predictor):
    response = post_api(client, (NIH_PNG.read_bytes(), "a.png"), (b"not an image", "b.txt"),
                        (DICOM_MONO2.read_bytes(), "c.dcm"))
    assert response.status_code == 200
    answers = response.get_json()
    assert [a["file"] for a in answers] == ["a.png", "b.txt", "c.dcm"]
    assert answers[1] == {"file": "b.txt", "error": answers[1]["error"], "status": 415}
    assert "unsupported file type" in answers[1]["error"]
    for answer, source in ((answers[0], NIH_PNG), (answers[2], DICOM_MONO2)):
        expected = tiny_predictor.predict(source).probabilities
        assert {row["label"]: row["probability"] for row in answer["labels"]} == pytest.approx(expected, abs=1e-6)
        assert client.get(answer["result"]).status_code == 200
    assert {answers[0]["id"], answers[2]["id"]} == saved_ids(client.application)


def test_one_file_part_still_answers_one_document(client):
    doc = post_api(client, (NIH_PNG.read_bytes(), "a.png")).get_json()
    assert isinstance(doc, dict) and "file" not in doc  # the single answer carries no file name


def test_more_file_parts_than_allowed_are_refused_not_truncated(make_app):  # noqa: F811
    client = make_app(MAX_FILES=2).test_client()
    response = post_api(client, *[(NIH_PNG.read_bytes(), f"{i}.png") for i in range(3)])
    assert response.status_code == 400 and "at most 2" in response.get_json()["error"]
    assert not saved_ids(client.application)


def test_result_urls_are_absolute_and_the_raw_maps_download_as_npy(client):
    doc = post_api(client, (NIH_PNG.read_bytes(), "a.png")).get_json()
    rid = doc["id"]
    urls = [doc["image"], doc["result"], doc["heatmaps_npy"], doc["report"], *doc["heatmaps"].values()]
    assert all(url.startswith("http://localhost/") for url in urls)
    response = client.get(doc["heatmaps_npy"])
    assert response.status_code == 200 and response.mimetype == "application/octet-stream"
    assert f"heatmaps-{rid}.npy" in response.headers["Content-Disposition"]
    maps = np.load(io.BytesIO(response.data))
    saved = np.load(results_dir(client.application) / rid / "heatmaps.npy")
    np.testing.assert_array_equal(maps, saved)
    assert maps.dtype == np.float32 and maps.shape[0] == len(doc["labels"])
    assert client.get(f"/results/{'0' * 32}/heatmaps.npy").status_code == 404


@pytest.mark.parametrize("path", ["/api", "/api/"])
def test_api_index_is_json(client, path):
    response = client.get(path)
    assert response.status_code == 200 and response.mimetype == "application/json"
    doc = response.get_json()
    listed = {(e["method"], e["path"]) for e in doc["endpoints"]}
    assert {("POST", "/api/predict"), ("GET", "/api/results/<id>"), ("DELETE", "/api/results/<id>"),
            ("GET", "/api/model"), ("GET", "/results/<id>/heatmaps.npy")} <= listed
    assert doc["model_loaded"] is True and "curl -F file=@" in doc["example"]
    assert client.get("/api/nothing").mimetype == "application/json"  # unknown API paths answer JSON too


def test_model_card_page_is_html_and_the_json_stays(client, tiny_predictor):
    page = client.get("/model")
    assert page.status_code == 200 and page.mimetype == "text/html"
    body = html.unescape(page.data.decode())
    card = tiny_predictor.model_card()
    assert card["arch"] in body and card["training"]["data"] in body and "Validation AUROC per label" in body
    cells = tiny_predictor.meta.image_size // tiny_predictor.meta.output_stride
    assert card["heatmap_cells"] == cells and f"heatmaps of {cells} × {cells} cells" in body
    assert 'href="/model"' in client.get("/").data.decode()  # the header's "Model card" opens the page
    assert client.get("/api/model").get_json() == card


def test_model_card_page_without_a_model_is_503(make_app, tmp_path):  # noqa: F811
    client = make_app(CHECKPOINT=str(tmp_path / "missing.pth")).test_client()
    assert client.get("/model").status_code == 503


# ---------------------------------------------------------------- delete


def test_delete_from_the_page_and_through_the_api(make_app):  # noqa: F811
    app = make_app(WTF_CSRF_ENABLED=True)
    client = app.test_client()
    first, second = (post_api(client, (NIH_PNG.read_bytes(), "a.png")).get_json()["id"] for _ in range(2))
    page = client.get(f"/results/{first}").data.decode()
    token = re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)
    assert f'action="/results/{first}/delete"' in page
    refused = client.post(f"/results/{first}/delete")  # no token
    assert refused.status_code == 400 and b"reload the page and try again" in refused.data
    assert first in saved_ids(app)
    response = client.post(f"/results/{first}/delete", data={"csrf_token": token})
    assert response.status_code == 303 and response.headers["Location"] == "/"
    assert "The result was deleted" in client.get("/").data.decode()
    assert saved_ids(app) == {second} and client.get(f"/results/{first}").status_code == 404
    assert client.delete(f"/api/results/{second}").get_json() == {"deleted": second}  # scripts need no token
    assert saved_ids(app) == set() and list(results_dir(app).iterdir()) == []
    missing = client.delete(f"/api/results/{second}")
    assert missing.status_code == 404 and "does not exist" in missing.get_json()["error"]
    assert client.delete("/api/results/..%2F..").status_code == 404


# ---------------------------------------------------------------- the PDF report


def test_pdf_report_of_a_result_and_of_a_batch(client):
    ids = [post_api(client, (p.read_bytes(), p.name)).get_json()["id"] for p in (NIH_PNG, DICOM_MONO2)]
    response = client.get(f"/results/{ids[0]}/report.pdf?label=Mass&scale=shared")
    assert response.status_code == 200 and response.mimetype == "application/pdf"
    reader = PdfReader(io.BytesIO(response.data))
    text = " ".join(reader.pages[0].extract_text().split())
    assert len(reader.pages) == 1 and ids[0] in text and "Heatmap of Mass" in text and "one scale for all" in text
    plain = " ".join(PdfReader(io.BytesIO(client.get(f"/results/{ids[0]}/report.pdf?plain=1").data))
                     .pages[0].extract_text().split())
    assert "Plain image" in plain
    batch = PdfReader(io.BytesIO(client.get(f"/results/report.pdf?ids={','.join(ids)}").data))
    assert len(batch.pages) == 2 and ids[1] in batch.pages[1].extract_text()
    assert client.get(f"/results/{'0' * 32}/report.pdf").status_code == 404


# ---------------------------------------------------------------- the result page


def test_the_view_is_in_the_permalink_and_the_report_link(client):
    rid = post_api(client, (NIH_PNG.read_bytes(), "a.png")).get_json()["id"]
    page = client.get(f"/results/{rid}?label=Mass&opacity=30&plain=1&scale=shared").data.decode()
    permalink = html.unescape(re.search(r'href="([^"]+)" id="permalink"', page).group(1))
    report = html.unescape(re.search(r'href="([^"]+)" id="report-link"', page).group(1))
    for link in (permalink, report):
        assert all(part in link for part in ("label=Mass", "opacity=30", "plain=1", "scale=shared")), link
    assert 'id="plain" value="1" checked' in page
    assert client.get(f"/results/{rid}?label=Nope").status_code == 404  # never another label's map under its name
    fallback = client.get(f"/results/{rid}?scale=odd&opacity=x").data.decode()
    assert "scale=" not in re.search(r'href="([^"]+)" id="permalink"', fallback).group(1)


def test_page_title_names_the_image_and_its_top_call(client):
    rid = post_api(client, (NIH_PNG.read_bytes(), "a.png")).get_json()["id"]
    record = client.get(f"/api/results/{rid}").get_json()
    title = html.unescape(re.search(r"<title>(.*?)</title>", client.get(f"/results/{rid}").data.decode(), re.S)
                          .group(1))
    top = next(row for row in ranked(record) if row["positive"])
    p_text = format_call(top["probability"], top["threshold"])[0]  # the findings table's string
    assert title.startswith(f"{top['label'].replace('_', ' ')} positive ({p_text})")
    # "X-ray" only once the in-scope check has accepted the image; the tiny model has no scope statistics.
    kind = "X-ray" if record.get("in_scope") is True else "image"
    assert f"PNG {record['original_size'][0]}×{record['original_size'][1]} {kind}, result {rid[:8]}" in title


def test_heatmap_descriptions_name_where_each_map_peaks(client):
    rid = post_api(client, (NIH_PNG.read_bytes(), "a.png")).get_json()["id"]
    page = html.unescape(client.get(f"/results/{rid}?label=Mass").data.decode())
    maps = np.load(results_dir(client.application) / rid / "heatmaps.npy")
    record = client.get(f"/api/results/{rid}").get_json()
    described = dict(re.findall(r'data-label="([^"]+)"[^>]*?data-description="([^"]+)"', page, re.S))
    assert set(described) == set(label_names(record))
    for label, cam in zip(label_names(record), maps):
        zone = strongest_zone(cam)
        assert described[label] == (f"Heatmap of {label.replace('_', ' ')}: "
                                    + (f"strongest in {zone}." if zone else "no region supports this finding."))
    live = re.search(r'<span class="heat-description" id="heat-description" aria-live="polite">(.*?)</span>', page)
    assert live.group(1) == described["Mass"]


def test_skip_link_and_flashed_messages_in_an_alert_region(client):
    client.post("/predict", data=upload(b"text", "notes.txt"))
    page = client.get("/").data.decode()
    assert '<a class="skip-link" href="#main">' in page and '<main id="main" tabindex="-1">' in page
    region = re.search(r'<div class="flashes" role="alert">\s*<ul>(.*?)</ul>', page, re.S)
    assert region and "notes.txt" in region.group(1)
    assert '<ul class="flashes" role="alert">' not in page  # a list may not take the alert role (axe)


# ---------------------------------------------------------------- the secret key


def test_secret_key_is_kept_across_app_creations(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.delenv("CXR_SECRET_KEY", raising=False)
    config = {"CHECKPOINT": str(tiny_checkpoint), "DEVICE": "cpu", "RESULTS_DIR": str(tmp_path / "results"),
              "INSTANCE_PATH": str(tmp_path / "instance")}
    first, second = create_app(dict(config)), create_app(dict(config))
    key_file = tmp_path / "instance" / "secret_key"
    assert first.config["SECRET_KEY"] == second.config["SECRET_KEY"] == key_file.read_text().strip()
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    # A form token made by the first app is accepted by the second: the restart case.
    client = first.test_client()
    token = re.search(r'name="csrf_token" value="([^"]+)"', client.get("/").data.decode()).group(1)
    cookie = client.get_cookie("session")
    after = second.test_client()
    after.set_cookie("session", cookie.value)
    response = after.post("/predict", data={**upload(NIH_PNG), "csrf_token": token})
    assert response.status_code == 303 and response.headers["Location"].startswith("/results/")
    monkeypatch.setenv("CXR_SECRET_KEY", "k" * 40)
    assert create_app(dict(config)).config["SECRET_KEY"] == "k" * 40  # the environment wins
