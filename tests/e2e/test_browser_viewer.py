"""End to end in headless Chromium, the image viewer on the result and compare pages: window/level by presets, mouse
drag and keys redraws the canvas with the DICOM linear window applied to the stored pixels; invert flips them; zoom
(buttons, keys, Ctrl + wheel, a two-finger pinch) scales the image and its heat layer together; arrow keys pan;
reset restores all; `?` opens the list of shortcuts; no sideways scrolling at 320 to 1920 px and no axe-core
violations with the tools shown; without JavaScript the plain image and heat layer remain. The compare page, opened
from a batch, links zoom, pan and window across its two images."""
from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from livesite import browser_fixture, chromium_fixture, free_port, open_page, require, run_server
from support import forked
from support.data import NIH_PNG
from test_browser_workflows import AXE, axe_violations

pytestmark = pytest.mark.e2e

WIDTHS = (320, 390, 768, 1400, 1920)
# Every 7th pixel of the canvas and of the stored image (red channel: both are gray), as two lists.
PIXELS = """async (viewport) => {
  const img = viewport.querySelector("img.xray");
  await img.decode();
  const copy = document.createElement("canvas");
  copy.width = img.naturalWidth;
  copy.height = img.naturalHeight;
  copy.getContext("2d").drawImage(img, 0, 0);
  await new Promise(requestAnimationFrame);  // the viewer redraws on the next frame
  const sample = (canvas) => {
    const data = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
    const out = [];
    for (let i = 0; i < data.length; i += 4 * 7) out.push(data[i]);
    return out;
  };
  return [sample(viewport.querySelector(".xray-canvas")), sample(copy)];
}"""
OVERFLOW = "() => document.documentElement.scrollWidth - document.documentElement.clientWidth"
OUTSIDE = """() => [...document.body.querySelectorAll("*")]
  .filter(e => e.getBoundingClientRect().right > document.documentElement.clientWidth + 0.5)
  .map(e => `${e.tagName}#${e.id}.${e.className.baseVal ?? e.className}`).slice(-4).join("; ")"""
INSIDE = """(section) => {
  // Tools of the viewer not drawn in full inside the viewer's panel.
  const box = section.getBoundingClientRect();
  return [...section.querySelectorAll("#viewer-tools *, #shortcuts *")].filter(e => {
    const r = e.getBoundingClientRect();
    return r.width > 0 && (r.left < box.left - 1 || r.right > box.right + 1);
  }).map(e => `${e.tagName}#${e.id}.${e.className}`);
}"""

chromium = pytest.fixture(scope="module", name="chromium")(chromium_fixture)
browser = pytest.fixture(scope="module", name="browser")(browser_fixture)


@pytest.fixture(scope="module")
def site(chromium, tiny_checkpoint, tmp_path_factory):
    """(base URL, DICOM port) of a live server of this module with its DICOM node listening."""
    folder = tmp_path_factory.mktemp("viewer")
    port = free_port()
    args = ["--allow-untrusted", "--dicom-port", str(port)]
    with run_server(tiny_checkpoint, folder / "results", extra_args=args, launch=forked.popen) as base:
        yield base, port


@pytest.fixture(scope="module")
def result(site, browser):
    """The URL of one result page (the NIH PNG, uploaded)."""
    context, page = open_page(browser)
    page.goto(site[0] + "/")
    page.set_input_files("#file", str(NIH_PNG))
    with page.expect_navigation():
        page.click("#submit")
    assert "/results/" in page.url
    yield page.url
    context.close()


def open_viewer(browser, url: str, width: int = 1280, **options):
    context, page = open_page(browser, width, **options)
    page.goto(url)
    page.wait_for_selector("#viewport.tools-ready")
    return context, page


def dicom_window(values: np.ndarray, width: float, level: float, invert: bool = False) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2.1 linear VOI function on 0..255 values, rounded to 0..255 (the reference for the
    canvas)."""
    shown = np.clip(((values - (level - 0.5)) / (width - 1) + 0.5) * 255, 0, 255)
    return np.round(255 - shown if invert else shown)


def drawn(page, viewport: str = "#viewport") -> tuple[np.ndarray, np.ndarray]:
    """(canvas, stored image) samples of one viewer as float arrays."""
    canvas, stored = page.locator(viewport).evaluate(PIXELS)
    return np.array(canvas, float), np.array(stored, float)


def window_of(page) -> tuple[int, int]:
    box = page.locator("#viewport")
    return int(box.get_attribute("data-width")), int(box.get_attribute("data-level"))


def zoom_of(page) -> float:
    """The drawn scale: the stage's width over the viewport's."""
    return page.evaluate("""() => document.getElementById("stage").getBoundingClientRect().width
                                  / document.getElementById("viewport").getBoundingClientRect().width""")


@pytest.mark.slow(8)
def test_window_level_presets_drag_keys_invert_and_reset_redraw_the_pixels(browser, result):
    context, page = open_viewer(browser, result)
    canvas, stored = drawn(page)
    assert stored.std() > 10, "the sample image should not be flat"
    assert np.array_equal(canvas, stored), "Original must draw the stored pixels unchanged (the DICOM window kept)"
    assert window_of(page) == (256, 128) and page.get_attribute('[data-preset="original"]', "aria-pressed") == "true"

    for key, preset in enumerate(("lung", "mediastinum", "bone"), start=2):
        button = page.locator(f'[data-preset="{preset}"]')
        if key % 2:
            button.click()
        else:
            page.keyboard.press(str(key))
        width, level = int(button.get_attribute("data-width")), int(button.get_attribute("data-level"))
        assert window_of(page) == (width, level) and button.get_attribute("aria-pressed") == "true"
        canvas, stored = drawn(page)
        assert np.array_equal(canvas, dicom_window(stored, width, level)), preset
        assert f"Window {width} · level {level}" in page.inner_text("#viewer-readout")

    # A mouse drag: to the right widens the window, upwards raises the level.
    page.keyboard.press("1")
    box = page.locator("#viewport").bounding_box()
    x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(x, y)
    page.mouse.down()
    page.mouse.move(x - box["width"] / 4, y - box["width"] / 8, steps=5)
    page.mouse.up()
    width, level = window_of(page)
    assert width == pytest.approx(256 - 64, abs=2) and level == pytest.approx(128 + 32, abs=2)
    canvas, stored = drawn(page)
    assert np.array_equal(canvas, dicom_window(stored, width, level)) and not np.array_equal(canvas, stored)

    # Shift + arrow keys on the focused image: width and level in steps of 8.
    page.focus("#viewport")
    page.keyboard.press("Shift+ArrowRight")
    page.keyboard.press("Shift+ArrowDown")
    assert window_of(page) == (width + 8, level - 8)

    before, _ = drawn(page)
    page.keyboard.press("i")
    inverted, stored = drawn(page)
    assert np.array_equal(inverted, 255 - before) and page.get_attribute("#invert", "aria-pressed") == "true"
    page.click("#invert")
    assert np.array_equal(drawn(page)[0], before)

    page.keyboard.press("+")
    page.click("#invert")
    page.keyboard.press("r")
    canvas, stored = drawn(page)
    assert np.array_equal(canvas, stored) and window_of(page) == (256, 128) and zoom_of(page) == pytest.approx(1)
    assert page.get_attribute("#invert", "aria-pressed") == "false"
    assert page.inner_text("#viewer-readout") == "Window 256 · level 128 · zoom 100 %"
    assert not page.errors, page.errors
    context.close()


@pytest.mark.slow(6)
def test_zoom_pan_touch_opacity_and_shortcut_list(browser, result):
    context, page = open_viewer(browser, result, has_touch=True)
    heat_box = lambda: page.locator("#heat").bounding_box()  # noqa: E731
    assert zoom_of(page) == pytest.approx(1)
    page.keyboard.press("+")
    page.click("#zoom-in")
    assert zoom_of(page) == pytest.approx(1.5625, abs=1e-3)
    assert page.get_attribute("#viewport", "data-zoom") == "1.5625"
    stage, heat = page.locator("#stage").bounding_box(), heat_box()
    assert (heat["x"], heat["width"]) == pytest.approx((stage["x"], stage["width"]), abs=1), "heat layer off its image"
    assert "zoom 156 %" in page.inner_text("#viewer-readout")

    # Arrow keys on the focused image pan it; the image never leaves the viewport's edges.
    page.focus("#viewport")
    viewport = page.locator("#viewport").bounding_box()
    stage = page.locator("#stage").bounding_box()
    page.keyboard.press("ArrowRight")
    page.keyboard.press("ArrowDown")
    moved = page.locator("#stage").bounding_box()
    assert moved["x"] < stage["x"] - 5 and moved["y"] < stage["y"] - 5
    for _ in range(40):
        page.keyboard.press("ArrowRight")
    moved = page.locator("#stage").bounding_box()
    assert moved["x"] + moved["width"] == pytest.approx(viewport["x"] + viewport["width"], abs=1)

    # Dragging in pan mode (key M) moves the image, not the window.
    page.keyboard.press("m")
    assert page.is_checked('input[name="drag"][value="pan"]')
    x, y = viewport["x"] + viewport["width"] / 2, viewport["y"] + viewport["height"] / 2
    page.mouse.move(x, y)
    page.mouse.down()
    page.mouse.move(x + 60, y, steps=3)
    page.mouse.up()
    assert page.locator("#stage").bounding_box()["x"] == pytest.approx(moved["x"] + 60, abs=1)
    assert window_of(page) == (256, 128)

    # Ctrl + wheel zooms; the zoom-out button zooms back down to no less than 1.
    page.mouse.move(x, y)
    page.keyboard.down("Control")
    page.mouse.wheel(0, -200)
    page.keyboard.up("Control")
    assert zoom_of(page) > 1.6
    for _ in range(12):
        page.click("#zoom-out")
    assert zoom_of(page) == pytest.approx(1)

    # A two-finger pinch (real touch events through the DevTools protocol) zooms in.
    cdp = context.new_cdp_session(page)
    touch = lambda kind, points: cdp.send("Input.dispatchTouchEvent", {  # noqa: E731
        "type": kind, "touchPoints": [{"x": px, "y": y, "id": i} for i, px in enumerate(points)]})
    touch("touchStart", [x - 20, x + 20])
    for spread in (30, 45, 60):
        touch("touchMove", [x - spread, x + spread])
    touch("touchEnd", [])
    assert zoom_of(page) == pytest.approx(3, rel=0.05)
    page.keyboard.press("r")
    assert zoom_of(page) == pytest.approx(1)

    # The heatmap's opacity ([ and ]) and visibility (H) are the form's own controls, so the URL follows.
    start = int(page.input_value("#opacity"))
    page.keyboard.press("]")
    assert int(page.input_value("#opacity")) == min(100, start + 10)
    page.keyboard.press("[")
    page.keyboard.press("[")
    assert int(page.input_value("#opacity")) == max(0, start - 10)
    assert float(page.eval_on_selector("#heat", "h => h.style.opacity")) == pytest.approx((start - 10) / 100)
    assert f"opacity={start - 10}" in page.url
    page.keyboard.press("h")
    assert page.is_checked("#plain") and page.locator("#heat").is_hidden() and "plain=1" in page.url
    page.keyboard.press("h")
    assert page.locator("#heat").is_visible()

    # ? lists the shortcuts, Esc hides them; keys typed in a text field are text, not shortcuts.
    assert not page.locator("#shortcuts dl").is_visible()
    page.keyboard.press("?")
    assert page.locator("#shortcuts dl").is_visible()
    assert "invert" in page.inner_text("#shortcuts") and "window presets" in page.inner_text("#shortcuts")
    page.keyboard.press("Escape")
    assert not page.locator("#shortcuts dl").is_visible()
    field = page.locator("textarea, input[type='text']").first
    if field.count():
        field.focus()
        page.keyboard.type("+i?")
        assert zoom_of(page) == pytest.approx(1) and not page.locator("#shortcuts dl").is_visible()
    assert not page.errors, page.errors
    context.close()


@pytest.mark.slow(10)
def test_viewer_fits_every_width_without_axe_violations(browser, result):
    context, page = open_page(browser, bypass_csp=True)  # lets the test inject axe-core; the app's CSP stays
    problems = []
    for width in WIDTHS:
        page.set_viewport_size({"width": width, "height": 900})
        page.goto(result)
        page.wait_for_selector("#viewport.tools-ready")
        page.keyboard.press("+")
        page.keyboard.press("?")
        if (overflow := page.evaluate(OVERFLOW)) > 0:
            problems.append(f"{width} px: the page scrolls sideways by {overflow} px")
        if outside := page.locator("section.viewer").evaluate(INSIDE):
            problems.append(f"{width} px: viewer tools outside their panel: {outside}")
        if AXE.exists():
            problems += [f"{width} px: {v}" for v in axe_violations(page, Path(AXE))]
    assert not problems, "\n".join(problems)
    assert not page.errors, page.errors
    context.close()


@pytest.mark.slow(2)
def test_without_javascript_the_plain_image_and_heat_layer_remain(browser, result):
    context, page = open_page(browser, java_script_enabled=False)
    page.goto(result)
    assert page.locator("#xray").is_visible() and page.locator("#heat").is_visible()
    assert page.locator("#viewer-tools").is_hidden() and page.locator("#shortcuts").is_hidden()
    assert page.locator(".xray-canvas").count() == 0
    assert page.locator("#opacity").is_visible()
    context.close()


@pytest.mark.slow(10)
def test_worklist_with_a_received_image_fits_every_width(site, browser, tmp_path):
    """A received image's row (badges, send status, result link) stacks on a phone; its result opens in the viewer."""
    base, port = site
    storescu = require(Path(shutil.which("storescu") or "/usr/bin/storescu"), "apt-get install dcmtk, or `make pacs`")
    from support.pacs import radiograph  # needs dcmtk and Orthanc, like the PACS tests

    radiograph(tmp_path / "chest.dcm", size=96)
    sent = subprocess.run([str(storescu), "-aet", "XRAY_ROOM_1", "-aec", "CXR_AI", "127.0.0.1", str(port),
                            str(tmp_path / "chest.dcm")], capture_output=True, text=True, timeout=120)
    assert sent.returncode == 0, sent.stderr
    context, page = open_page(browser, bypass_csp=True)  # lets the test inject axe-core; the app's CSP stays
    deadline = time.monotonic() + 120
    while True:
        page.goto(base + "/worklist")
        if page.locator("table.worklist a[href*='/results/']").count():
            break
        assert time.monotonic() < deadline, page.inner_text("table.worklist")
        time.sleep(0.5)
    problems = []
    for width in WIDTHS:
        page.set_viewport_size({"width": width, "height": 900})
        for sort in ("newest", "probability"):
            page.goto(f"{base}/worklist?sort={sort}")
            if (overflow := page.evaluate(OVERFLOW)) > 0:
                problems.append(f"{width} px, {sort}: /worklist scrolls sideways by {overflow} px")
            cut = page.locator("table.worklist").evaluate(
                "t => [...t.querySelectorAll('td')].filter(c => c.getBoundingClientRect().right"
                " > document.documentElement.clientWidth + 0.5).map(c => c.dataset.head)")
            if cut:
                problems.append(f"{width} px, {sort}: cells past the edge: {cut}")
        if AXE.exists():
            problems += [f"{width} px: {v}" for v in axe_violations(page, Path(AXE))]
    assert not problems, "\n".join(problems)
    page.set_viewport_size({"width": 390, "height": 900})
    page.click("table.worklist a[href*='/results/']")
    page.wait_for_selector("#viewport.tools-ready")
    canvas, stored = drawn(page)
    assert np.array_equal(canvas, stored)  # the received DICOM as stored: its own window kept
    assert not page.errors, page.errors
    context.close()


def stage_box(page, side: str) -> dict:
    """The stage of one compare viewer relative to its viewport, in fractions of the viewport's size."""
    return page.evaluate("""(side) => {
      const v = document.getElementById(`viewport-${side}`).getBoundingClientRect();
      const s = document.querySelector(`#viewport-${side} .stage`).getBoundingClientRect();
      return {x: (s.left - v.left) / v.width, y: (s.top - v.top) / v.height, zoom: s.width / v.width};
    }""", side)


@pytest.mark.slow(12)
def test_compare_from_a_batch_links_zoom_pan_and_window(site, browser):
    base, _ = site
    context, page = open_page(browser, 1400, bypass_csp=True)  # bypass: lets the test inject axe-core
    page.goto(base + "/")
    page.set_input_files("#file", [str(NIH_PNG), str(NIH_PNG.with_name("00000002_000.png"))])
    with page.expect_navigation(url="**/results*"):
        page.click("#submit")
    page.select_option("#compare-second", index=1)
    with page.expect_navigation(url="**/compare?*"):
        page.click("#compare-button")
    page.wait_for_selector("#viewport-earlier.tools-ready")
    page.wait_for_selector("#viewport-later.tools-ready")
    label = page.input_value("#compare-label")
    assert page.get_attribute("#heat-earlier", "src").endswith(f"/heatmap/{label}.png")
    assert page.get_attribute("#heat-later", "src").endswith(f"/heatmap/{label}.png")

    page.keyboard.press("+")
    page.keyboard.press("+")
    page.focus("#viewport-later")
    page.keyboard.press("ArrowRight")
    page.keyboard.press("ArrowDown")
    earlier, later = stage_box(page, "earlier"), stage_box(page, "later")
    assert earlier["zoom"] == pytest.approx(1.5625, abs=1e-3) and earlier == pytest.approx(later, abs=1e-3)
    assert earlier["x"] < -0.01 and earlier["y"] < -0.01, "the arrow keys did not pan"
    page.keyboard.press("4")  # the bone window on both
    for side in ("earlier", "later"):
        canvas, stored = drawn(page, f"#viewport-{side}")
        assert np.array_equal(canvas, dicom_window(stored, 110, 200)), side

    # Another label: both heat layers follow (the select submits the form at once).
    other = page.locator("#compare-label option").nth(1).get_attribute("value")
    if other == label:
        other = page.locator("#compare-label option").nth(0).get_attribute("value")
    with page.expect_navigation():
        page.select_option("#compare-label", other)
    assert f"label={other}" in page.url
    assert page.get_attribute("#heat-later", "src").endswith(f"/heatmap/{other}.png")
    assert page.locator("#changed-calls").count() == 1
    assert page.locator(".compare-table tbody tr").count() == 14

    problems = []
    for width in WIDTHS:
        page.set_viewport_size({"width": width, "height": 900})
        page.reload()
        page.wait_for_selector("#viewport-later.tools-ready")
        page.keyboard.press("+")
        if (overflow := page.evaluate(OVERFLOW)) > 0:
            problems.append(f"{width} px: the compare page scrolls sideways by {overflow} px: " + page.evaluate(OUTSIDE))
        if AXE.exists():
            problems += [f"{width} px: {v}" for v in axe_violations(page, Path(AXE))]
    assert not problems, "\n".join(problems)
    assert not page.errors, page.errors
    context.close()
