"""End to end in headless Chromium: `python main.py` (waitress) on a free loopback port, driven by Playwright.

Upload a real NIH PNG and the JPEG-compressed DICOM together, read every label's probability, switch the heatmap
to another label and see the overlay change, open the permalink; and the same basic flow with JavaScript off.
Skipped only when Chromium is missing and CI is unset; in CI a missing browser fails the test.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from livesite import browser_fixture, chromium_fixture, open_page, run_server
from support import forked
from support.data import DICOM_MONO2, NIH_DIR, NIH_PNG
from support.trust import VALIDATED, make_trusted_checkpoint

from chestxray.trust.evidence import format_call

pytestmark = pytest.mark.e2e

PIXEL_HASH = """async (img) => {
  await img.decode();
  const canvas = document.createElement("canvas");
  canvas.width = img.naturalWidth;
  canvas.height = img.naturalHeight;
  const context = canvas.getContext("2d");
  context.drawImage(img, 0, 0);
  const data = context.getImageData(0, 0, canvas.width, canvas.height).data;
  let hash = 0;
  for (let i = 0; i < data.length; i++) hash = (hash * 31 + data[i]) >>> 0;
  return `${canvas.width}x${canvas.height}:${hash}`;
}"""
DROP_FILE = """(zone, name) => {
  const transfer = new DataTransfer();
  transfer.items.add(new File([new Uint8Array([137, 80, 78, 71])], name, {type: "image/png"}));
  zone.dispatchEvent(new DragEvent("drop", {dataTransfer: transfer, bubbles: true, cancelable: true}));
}"""
HEAT_LOADED = """(label) => {
  const heat = document.getElementById("heat");
  return heat.src.endsWith(`/heatmap/${label}.png`) && heat.complete && heat.naturalWidth > 0;
}"""


chromium = pytest.fixture(scope="module", name="chromium")(chromium_fixture)


@pytest.fixture(scope="module")
def server(chromium, tiny_checkpoint, tmp_path_factory):
    results = tmp_path_factory.mktemp("e2e") / "results"
    # The tiny checkpoint has no trust data: started as an operator who opted out, so the page shows calls.
    with run_server(tiny_checkpoint, results, extra_args=["--allow-untrusted"], launch=forked.popen) as base:
        yield base, results


browser = pytest.fixture(scope="module", name="browser")(browser_fixture)


def shown_findings(page) -> list[tuple[str, str]]:
    """(label, probability text) of every row of the findings table, top to bottom."""
    labels = page.locator(".findings-table .label-link").evaluate_all("links => links.map(a => a.dataset.label)")
    return list(zip(labels, page.locator(".findings-table td.probability").all_inner_texts()))


def expected_findings(results: Path, rid: str) -> list[tuple[str, str]]:
    """Called findings first, then by probability; probability texts that agree with the call."""
    record = json.loads((results / rid / "result.json").read_text())
    ranked = sorted(record["labels"], key=lambda row: (not row["positive"], -row["probability"]))
    return [(row["label"], format_call(row["probability"], row["threshold"], call=row.get("call"))[0])
            for row in ranked]


@pytest.mark.slow(19)
def test_upload_png_and_dicom_switch_heatmap_open_permalink(server, browser):
    base, results = server
    context, page = open_page(browser)
    page.goto(base + "/")
    assert "not for clinical use" in page.inner_text("body").lower()
    page.locator("#dropzone").evaluate(DROP_FILE, "dropped.png")  # drag and drop fills the file input
    assert page.locator("#file").evaluate("input => input.files[0].name") == "dropped.png"
    assert "dropped.png" in page.inner_text("#file-list")
    page.set_input_files("#file", [str(NIH_PNG), str(DICOM_MONO2)])
    assert "2 file(s)" in page.inner_text("#file-list")
    with page.expect_navigation():
        page.click("#submit")
    assert "/results?ids=" in page.url
    links = page.locator("a.result-link")
    assert links.count() == 2
    list_url = page.url

    # The NIH PNG: every label with its probability, most probable first.
    with page.expect_navigation():
        links.nth(0).click()
    rid = re.search(r"/results/([0-9a-f]{32})", page.url).group(1)
    findings = shown_findings(page)
    assert findings == expected_findings(results, rid) and len(findings) == 14
    assert page.locator(".finding.positive").count() >= 1 and page.locator(".finding line.threshold").count() == 14
    first = page.get_attribute("#heat", "src")
    page.wait_for_function(HEAT_LOADED, arg=first.rsplit("/", 1)[1][:-4])
    first_pixels = page.locator("#heat").evaluate(PIXEL_HASH)

    # Switch the heatmap to another label (one whose map is not all zero, so the overlay must change).
    record = json.loads((results / rid / "result.json").read_text())
    maps = np.load(results / rid / "heatmaps.npy")
    current = first.rsplit("/", 1)[1][:-4]
    other = next(row["label"] for row, m in zip(record["labels"], maps) if row["label"] != current and m.max() > 0)
    page.click(f'a.label-link[data-label="{other}"]')
    page.wait_for_function(HEAT_LOADED, arg=other)
    assert page.get_attribute("#heat", "src") != first
    assert page.locator("#heat").evaluate(PIXEL_HASH) != first_pixels
    assert page.get_attribute(f'a.label-link[data-label="{other}"]', "aria-current") == "true"
    assert f"label={other}" in page.url and page.inner_text("#heat-label") == other.replace("_", " ")

    # Opacity control and the plain image.
    page.fill("#opacity", "20")
    page.wait_for_function("() => getComputedStyle(document.getElementById('heat')).opacity === '0.2'")
    page.check("#plain")
    assert page.locator("#heat").is_hidden() and page.locator("#xray").is_visible()
    page.uncheck("#plain")
    assert page.locator("#heat").is_visible()

    # The permalink, in a fresh browser context (no cookies, no history), opens the view on screen.
    permalink = base + page.get_attribute("#permalink", "href")
    other_context, other_page = open_page(browser)
    other_page.goto(permalink)
    assert shown_findings(other_page) == findings
    other_page.wait_for_function(HEAT_LOADED, arg=other)
    assert other_page.input_value("#opacity") == "20"
    json_doc = other_page.request.get(base + other_page.get_attribute("#json-link", "href")).json()
    assert json_doc["id"] == rid and json_doc["labels"] == record["labels"]

    # The DICOM's result.
    page.goto(list_url)
    with page.expect_navigation():
        page.locator("a.result-link").nth(1).click()
    dicom_id = re.search(r"/results/([0-9a-f]{32})", page.url).group(1)
    assert dicom_id != rid and "DICOM" in page.inner_text(".result-head")
    assert shown_findings(page) == expected_findings(results, dicom_id)
    page.wait_for_function(HEAT_LOADED, arg=default_shown(page))

    assert page.errors == [] and other_page.errors == []
    other_context.close()
    context.close()


def default_shown(page) -> str:
    return page.get_attribute("#heat", "src").rsplit("/", 1)[1][:-4]


def test_basic_flow_works_without_javascript(server, browser):
    base, results = server
    context, page = open_page(browser, java_script_enabled=False)
    page.goto(base + "/")
    page.set_input_files("#file", str(NIH_PNG))
    with page.expect_navigation():
        page.click("#submit")
    rid = re.search(r"/results/([0-9a-f]{32})$", page.url).group(1)
    assert shown_findings(page) == expected_findings(results, rid)
    first = page.get_attribute("#heat", "src")
    other = next(label for label, _ in shown_findings(page) if not first.endswith(f"/{label}.png"))
    with page.expect_navigation():
        page.click(f'a.label-link[data-label="{other}"]')  # a plain link: the server renders the new label
    assert f"label={other}" in page.url and page.get_attribute("#heat", "src").endswith(f"/heatmap/{other}.png")
    page.check("#plain")
    with page.expect_navigation():
        page.click("button.no-js")  # the Apply button of the viewer form
    assert "plain=1" in page.url and page.locator("#heat").is_hidden()
    assert page.errors == []
    context.close()


@pytest.fixture(scope="module")
def trusted_server(chromium, tiny_checkpoint, tmp_path_factory):
    folder = tmp_path_factory.mktemp("e2e-trust")
    checkpoint = make_trusted_checkpoint(folder / "model.pth", tiny_checkpoint, NIH_DIR)
    with run_server(checkpoint, folder / "results", launch=forked.popen) as base:
        yield base


@pytest.mark.slow(19)
def test_out_of_scope_upload_and_not_validated_label(trusted_server, browser, tmp_path):

    import skimage.data
    from PIL import Image

    photo = tmp_path / "photo.png"
    Image.fromarray(skimage.data.astronaut()).save(photo)
    context, page = open_page(browser)
    page.goto(trusted_server + "/")
    page.set_input_files("#file", str(photo))
    with page.expect_navigation():
        page.click("#submit")
    alert = page.inner_text("#scope")
    assert "Out of scope." in alert and "does not look like a frontal chest radiograph" in alert
    assert page.locator(".findings-table").count() == 0 and page.locator(".badge").count() == 0
    with page.expect_navigation():
        page.click("#show-anyway")
    assert page.locator(".findings-table td.probability").count() == 14  # shown on request, greyed, no badges
    assert page.locator(".findings.greyed").count() == 1 and page.locator(".findings-table .badge").count() == 0

    page.goto(trusted_server + "/")
    page.set_input_files("#file", str(NIH_PNG))
    with page.expect_navigation():
        page.click("#submit")
    assert "In scope" in page.inner_text("#scope")
    calls = page.locator(".findings-table td.call").all_inner_texts()
    assert calls.count("not validated") == 13 and calls[0] == "positive"
    assert page.locator(".finding.positive .label-link").get_attribute("data-label") == VALIDATED
    assert not page.errors, page.errors
    context.close()
