"""End to end in headless Chromium, the workflows of a radiologist who keeps the app open.

No sideways scrolling at a phone's 390 px or a desktop's 1400 px and zero axe-core violations on every page
(including error states); a batch with the files' names, a sortable summary, its CSV and per-file progress; one
printed page and the PDF report; a form that still submits after a server restart and an expired form that lists
the chosen files; the size limit checked before sending and the app's own 413; the view kept in the URL and copied
by the permalink; deleting a result. Chromium and axe-core come from `make browser`.
"""
from __future__ import annotations

import csv
import io
import json
import os
import re
import unicodedata
from pathlib import Path

import pytest
from livesite import (
    browser_fixture,
    chromium_fixture,
    free_port,
    open_page,
    require,
    run_server,
)
from pypdf import PdfReader
from support import forked
from support.data import DICOM_MONO2, NIH_PNG, ROOT

pytestmark = pytest.mark.e2e

AXE = Path(os.environ.get("CXR_AXE", ROOT / ".cache" / "axe" / "node_modules" / "axe-core" / "axe.min.js"))
WIDTHS = (390, 1400)
ODD_NAME = '<img src=x onerror=alert(1)> & "odd".png'  # must be shown as text, never as markup
MAX_UPLOAD_MB = 3  # a small limit, so the size checks need no large files


chromium = pytest.fixture(scope="module", name="chromium")(chromium_fixture)


@pytest.fixture(scope="module")
def axe() -> Path:
    return require(AXE, "`make browser` installs axe-core from npm")


@pytest.fixture(scope="module")
def site(chromium, tiny_checkpoint, tmp_path_factory):
    """(base URL, results folder, instance folder, port) of a live server with a 3 MB upload limit."""
    root = tmp_path_factory.mktemp("workflows")
    results, instance, port = root / "results", root / "instance", free_port()
    args = ["--max-upload-mb", str(MAX_UPLOAD_MB), "--instance-dir", str(instance), "--allow-untrusted"]
    with run_server(tiny_checkpoint, results, port=port, extra_args=args, launch=forked.popen) as base:
        yield base, results, instance, port, args


browser = pytest.fixture(scope="module", name="browser")(browser_fixture)


def png_bytes(size: int = 96) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.open(NIH_PNG).convert("L").resize((size, size)).save(buffer, "PNG")
    return buffer.getvalue()


def upload_batch(page, base: str) -> None:
    """Upload the NIH PNG (under an odd name), the DICOM and a text file through the page; wait for the batch page."""
    page.goto(base + "/")
    page.set_input_files("#file", [
        {"name": ODD_NAME, "mimeType": "image/png", "buffer": NIH_PNG.read_bytes()},
        {"name": DICOM_MONO2.name, "mimeType": "application/dicom", "buffer": DICOM_MONO2.read_bytes()},
        {"name": "notes.txt", "mimeType": "text/plain", "buffer": b"not an image"},
    ])
    with page.expect_navigation():
        page.click("#submit")
    page.wait_for_selector("#summary-table")


def result_json(results: Path, rid: str) -> dict:
    return json.loads((results / rid / "result.json").read_text())


def probabilities(record: dict) -> dict[str, float]:
    return {row["label"]: row["probability"] for row in record["labels"]}


def axe_violations(page, axe: Path) -> list[str]:
    page.add_script_tag(path=str(axe))
    found = page.evaluate("""async () => (await axe.run(document)).violations.map(
        v => `${v.id} (${v.impact}): ${v.nodes.map(n => n.target.join(" ")).join(", ")}`)""")
    return found


@pytest.mark.slow(5)
def test_no_sideways_scroll_and_no_axe_violations_on_any_page(site, browser, axe):
    base, results, *_ = site
    context, page = open_page(browser, 1400, failed_responses=False)
    upload_batch(page, base)
    batch = page.url
    result = base + page.locator("a.result-link").first.get_attribute("href")
    context.close()
    pages = {
        "upload": lambda p: p.goto(base + "/"),
        "upload with a refused file": lambda p: refused_upload(p, base),
        "upload with a size error": lambda p: too_large_choice(p, base),
        "result": lambda p: p.goto(result),
        "result, plain image": lambda p: p.goto(result + "?plain=1&opacity=30"),
        "batch": lambda p: p.goto(batch),
        "model card": lambda p: p.goto(base + "/model"),
        "not found": lambda p: p.goto(base + "/results/" + "0" * 32),
    }
    problems = []
    for width in WIDTHS:
        # bypass_csp lets the test add axe's script tag; the app's own pages never need it
        context, page = open_page(browser, width, failed_responses=False, bypass_csp=True)
        for name, open_it in pages.items():
            open_it(page)
            page.wait_for_load_state("load")
            scroll, inner = page.evaluate("[document.documentElement.scrollWidth, window.innerWidth]")
            if scroll > inner:
                problems.append(f"{name} at {width} px scrolls sideways: {scroll} > {inner}")
            problems += [f"{name} at {width} px: {v}" for v in axe_violations(page, axe)]
        context.close()
    assert problems == []


def refused_upload(page, base: str) -> None:
    page.goto(base + "/")
    page.set_input_files("#file", {"name": "notes.txt", "mimeType": "text/plain", "buffer": b"plain text"})
    with page.expect_navigation():
        page.click("#submit")
    assert page.url == base + "/" and page.locator(".flash.error").count() == 1


def too_large_choice(page, base: str) -> None:
    page.goto(base + "/")
    page.set_input_files("#file", {"name": "big.png", "mimeType": "image/png",
                                   "buffer": b"\x89PNG" + bytes(MAX_UPLOAD_MB * 1048576 + 10)})
    page.wait_for_selector("#upload-error:not([hidden])")


def test_batch_shows_names_progress_sortable_summary_and_csv(site, browser, tmp_path):
    base, results, *_ = site
    context, page = open_page(browser, 1400, failed_responses=False)
    page.goto(base + "/")
    held = []

    def hold_the_first(route):  # the first file's request waits until the progress has been checked
        if held:
            route.continue_()
        else:
            held.append(route)

    page.route("**/api/predict", hold_the_first)
    page.set_input_files("#file", [
        {"name": ODD_NAME, "mimeType": "image/png", "buffer": NIH_PNG.read_bytes()},
        {"name": DICOM_MONO2.name, "mimeType": "application/dicom", "buffer": DICOM_MONO2.read_bytes()},
        {"name": "notes.txt", "mimeType": "text/plain", "buffer": b"not an image"},
    ])
    page.click("#submit")
    page.wait_for_function("() => document.getElementById('progress-status').textContent.startsWith("
                           "'Analysing 1 of 3')")
    items = page.locator("#progress-list li").all_inner_texts()
    assert items == [f"{ODD_NAME}: analysing…", f"{DICOM_MONO2.name}: waiting", "notes.txt: waiting"]
    with page.expect_navigation():
        held[0].continue_()
    page.wait_for_selector("#summary-table")
    assert re.search(r"/results\?ids=[0-9a-f]{32}(%2C|,)[0-9a-f]{32}$", page.url)  # a reload posts nothing

    # The names, in upload order, as text; the failed file keeps its place and says why.
    rows = page.locator("#summary-table tbody tr")
    assert rows.count() == 3
    assert page.locator("#summary-table .file-name").all_inner_texts() == [ODD_NAME, DICOM_MONO2.name, "notes.txt"]
    assert page.locator("#summary-table img").count() == 0
    assert "unsupported file type" in rows.nth(2).inner_text()
    ids = [re.search(r"/results/([0-9a-f]{32})", rows.nth(i).locator("a").get_attribute("href")).group(1)
           for i in range(2)]
    records = [result_json(results, rid) for rid in ids]
    for folder in results.iterdir():  # the names are never written
        for path in folder.rglob("*"):
            if path.is_file():
                data = path.read_bytes()
                assert b"onerror" not in data and DICOM_MONO2.stem.encode() not in data, path

    # Sorting by any finding puts the analysed files in that finding's order, failures last.
    for label in ("Mass", "Effusion"):
        page.select_option("#sort-by", label)
        shown = page.locator("#summary-table .file-name").all_inner_texts()
        order = sorted(range(2), key=lambda i: -probabilities(records[i])[label])
        assert shown == [[ODD_NAME, DICOM_MONO2.name][i] for i in order] + ["notes.txt"]

    # The CSV holds the same rows, names included, with every label's probability.
    with page.expect_download() as download:
        page.click("#csv-button")
    target = tmp_path / "summary.csv"
    download.value.save_as(target)
    table = list(csv.DictReader(target.open()))
    assert [row["file"] for row in table] == [ODD_NAME, DICOM_MONO2.name, "notes.txt"]
    for row, record in zip(table, records):
        assert row["result"].endswith(f"/results/{record['id']}")
        for label, p in probabilities(record).items():
            assert float(row[label]) == pytest.approx(p, abs=1e-6)
        assert row["called_findings"].split("|") == (record["positive"] or [""])
    assert "unsupported file type" in table[2]["error"]
    assert [e for e in page.errors if "status of 415" not in e] == []  # the text file's refusal is expected
    context.close()


def test_result_prints_on_one_page_and_downloads_a_pdf_report(site, browser):
    base, results, *_ = site
    context, page = open_page(browser, 1400, failed_responses=False)
    page.goto(base + "/")
    page.set_input_files("#file", str(NIH_PNG))
    with page.expect_navigation():
        page.click("#submit")
    rid = re.search(r"/results/([0-9a-f]{32})", page.url).group(1)
    page.emulate_media(media="print")
    for hidden in ("#opacity", "#delete-button", "#permalink", ".site-header nav"):
        assert page.locator(hidden).is_hidden(), hidden
    printed = PdfReader(io.BytesIO(page.pdf(format="A4", print_background=True)))
    assert len(printed.pages) == 1, [p.extract_text() for p in printed.pages]
    # NFKC: the PDF's text layer sets "ff", "fi" and "fl" as ligatures (U+FB00...), and a random result id often holds
    # "ff"; this test failed about one run in ten before the text was normalised.
    text = unicodedata.normalize("NFKC", printed.pages[0].extract_text())
    assert "Not for clinical use" in text and "Findings" in text and rid in text, text

    report = page.request.get(base + page.get_attribute("#report-link", "href"))
    assert report.status == 200 and report.headers["content-type"] == "application/pdf"
    reader = PdfReader(io.BytesIO(report.body()))
    assert len(reader.pages) == 1 and rid in unicodedata.normalize("NFKC", reader.pages[0].extract_text())
    context.close()


@pytest.mark.slow(9)
def test_a_form_opened_before_a_restart_submits_after_it(chromium, browser, tiny_checkpoint, tmp_path):
    results, instance, port = tmp_path / "results", tmp_path / "instance", free_port()
    args = ["--instance-dir", str(instance)]
    context, page = open_page(browser, 1400, failed_responses=False)
    with run_server(tiny_checkpoint, results, port=port, extra_args=args, launch=forked.popen) as base:
        page.goto(base + "/")
        page.set_input_files("#file", str(NIH_PNG))
    key_file = instance / "secret_key"
    assert key_file.is_file() and key_file.stat().st_mode & 0o777 == 0o600
    key = key_file.read_text()
    with run_server(tiny_checkpoint, results, port=port, extra_args=args,
                    launch=forked.popen) as base:  # the restart
        with page.expect_navigation():
            page.click("#submit")
        assert re.search(r"/results/[0-9a-f]{32}$", page.url), page.url
        assert page.locator(".flash").count() == 0
    assert key_file.read_text() == key
    context.close()


def test_an_expired_form_lists_the_chosen_files(site, browser):
    base, *_ = site
    context, page = open_page(browser, 1400, failed_responses=False)
    page.goto(base + "/")
    page.set_input_files("#file", [str(NIH_PNG), str(DICOM_MONO2)])
    page.evaluate("document.querySelector('input[name=csrf_token]').value = 'expired'")
    # The plain form post, as without a script (the token is checked on the form's own post).
    page.evaluate("HTMLFormElement.prototype.submit.call(document.getElementById('upload-form'))")
    page.wait_for_load_state()
    assert page.url == base + "/"
    message = page.inner_text(".flash.error")
    assert "choose the files again" in message and NIH_PNG.name in message and DICOM_MONO2.name in message
    context.close()


def test_size_limit_is_checked_before_sending_and_the_app_answers_413(site, browser):
    base, *_ = site
    context, page = open_page(browser, 1400, failed_responses=False)
    sent = []
    page.on("request", lambda request: request.method == "POST" and sent.append(request.url))
    too_large_choice(page, base)
    message = page.inner_text("#upload-error")
    assert f"the limit is {MAX_UPLOAD_MB:.1f} MB" in message
    page.click("#submit")
    assert page.inner_text("#upload-error") == message and sent == []  # refused before sending

    body = bytes(2 * MAX_UPLOAD_MB * 1048576)  # over the app's limit, far under waitress's
    api = page.request.post(base + "/api/predict", multipart={"file": {"name": "x.png", "mimeType": "image/png",
                                                                         "buffer": body}})
    assert api.status == 413 and f"limit is {MAX_UPLOAD_MB} MB" in api.json()["error"]
    form = page.request.post(base + "/predict", multipart={"file": {"name": "x.png", "mimeType": "image/png",
                                                                      "buffer": body}}, max_redirects=0)
    assert form.status == 303 and form.headers["location"] == "/"  # back to the upload page, not /predict
    context.close()


def test_after_an_error_the_address_is_the_upload_page(site, browser):
    base, *_ = site
    context, page = open_page(browser, 1400, failed_responses=False, java_script_enabled=False)
    refused_upload(page, base)
    assert "unsupported file type" in page.inner_text(".flash.error")
    context.close()


def test_view_is_in_the_url_and_the_permalink_copies_it(site, browser):
    base, results, *_ = site
    context, page = open_page(browser, 1400, failed_responses=False)
    context.grant_permissions(["clipboard-read", "clipboard-write"], origin=base)
    page.goto(base + "/")
    page.set_input_files("#file", str(NIH_PNG))
    with page.expect_navigation():
        page.click("#submit")
    rid = re.search(r"/results/([0-9a-f]{32})", page.url).group(1)
    record = result_json(results, rid)
    label = sorted(probabilities(record), key=probabilities(record).get)[0]  # not the default label
    page.click(f'a.label-link[data-label="{label}"]')
    page.fill("#opacity", "30")
    page.dispatch_event("#opacity", "change")
    page.check("#plain")
    for part in (f"label={label}", "opacity=30", "plain=1"):
        assert part in page.url
    assert "Plain image shown" in page.inner_text("#heat-description")
    page.reload()
    assert page.is_checked("#plain") and page.locator("#heat").is_hidden()
    assert page.input_value("#opacity") == "30"
    assert page.get_attribute(f'a.label-link[data-label="{label}"]', "aria-current") == "true"
    page.uncheck("#plain")
    assert f"Heatmap of {label.replace('_', ' ')}" in page.inner_text("#heat-description")
    page.click("#permalink")
    page.wait_for_function("() => document.getElementById('permalink-status').textContent === 'Link copied'")
    copied = page.evaluate("navigator.clipboard.readText()")
    assert copied == page.url and f"label={label}" in copied and "opacity=30" in copied and "plain" not in copied
    assert page.errors == []
    context.close()


def test_delete_a_result_from_its_page_and_through_the_api(site, browser):
    base, results, *_ = site
    context, page = open_page(browser, 1400, failed_responses=False)
    ids = []
    for _ in range(2):
        page.goto(base + "/")
        page.set_input_files("#file", {"name": "x.png", "mimeType": "image/png", "buffer": png_bytes()})
        with page.expect_navigation():
            page.click("#submit")
        ids.append(re.search(r"/results/([0-9a-f]{32})", page.url).group(1))
    with page.expect_navigation():
        page.click("#delete-button")
    assert page.url == base + "/" and "The result was deleted" in page.inner_text(".flash.info")
    assert not (results / ids[1]).exists()
    assert page.request.get(f"{base}/results/{ids[1]}").status == 404
    api = page.request.delete(f"{base}/api/results/{ids[0]}")
    assert api.status == 200 and api.json() == {"deleted": ids[0]} and not (results / ids[0]).exists()
    assert page.request.delete(f"{base}/api/results/{ids[0]}").status == 404
    context.close()
