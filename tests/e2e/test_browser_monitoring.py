"""End to end in headless Chromium: a reader reviews a result with the keyboard only, the review is stored and shown
again, and /monitor shows its plots and tables; both pages without sideways scrolling or axe-core violations."""
from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import pytest
from livesite import browser_fixture, chromium_fixture, open_page, run_server
from support import forked
from support.data import NIH_PNG
from test_browser_workflows import AXE, WIDTHS, axe_violations

from chestxray.labels import LABELS

pytestmark = pytest.mark.e2e

chromium = pytest.fixture(scope="module", name="chromium")(chromium_fixture)
browser = pytest.fixture(scope="module", name="browser")(browser_fixture)
REVIEWED = "Effusion"  # with --allow-untrusted every label has a call to agree with


@pytest.fixture(scope="module")
def site(chromium, tiny_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("monitoring")
    args = ["--instance-dir", str(root / "instance"), "--allow-untrusted"]
    with run_server(tiny_checkpoint, root / "results", extra_args=args, launch=forked.popen) as base:
        yield base


def upload(page, base: str) -> str:
    page.goto(base + "/")
    page.set_input_files("#file", {"name": "x.png", "mimeType": "image/png", "buffer": NIH_PNG.read_bytes()})
    with page.expect_navigation():
        page.click("#submit")
    page.wait_for_selector("#feedback-form")
    return page.url.split("?")[0]


@pytest.mark.slow(6)
def test_a_review_by_keyboard_is_stored_and_the_monitor_shows_it(site, browser):
    context, page = open_page(browser, 1400)
    result = upload(page, site)
    rid = result.rsplit("/", 1)[1]
    # Keyboard only: the radio group by arrow key, the true label's list by arrow key, the name, Enter submits.
    page.focus(f'input[name="agree_{REVIEWED}"][value="agree"]')
    page.keyboard.press("ArrowDown")  # moves the choice (and the focus) to "wrong" within the group
    assert page.evaluate("document.activeElement.value") == "disagree"
    page.focus("#truth-Mass")
    page.keyboard.press("ArrowDown")  # "not assessed" -> the first true label, "present"
    page.focus("#reader")
    page.keyboard.type("Dr Keys")
    with page.expect_navigation():
        page.keyboard.press("Enter")
    assert page.url == result + "#feedback"
    assert "Feedback saved: 2 findings reviewed." in page.inner_text(".flashes")
    assert page.is_checked(f'input[name="agree_{REVIEWED}"][value="disagree"]')
    assert page.input_value("#truth-Mass") == "present"
    with urllib.request.urlopen(f"{site}/api/results?reviewed=1") as response:
        rows = json.load(response)["analyses"]
    assert [r["result_id"] for r in rows] == [rid]
    feedback = {a["label"]: a["feedback"] for a in rows[0]["labels"] if a["feedback"]}
    assert feedback[REVIEWED]["agree"] is False and feedback["Mass"]["truth"] == "present"
    assert feedback["Mass"]["reader"] == "Dr Keys" and len(feedback) == 2
    page.goto(site + "/monitor")
    assert page.locator("#agreement-table tbody tr").count() == len(LABELS)
    row = page.locator("#agreement-table tbody tr", has_text=REVIEWED.replace("_", " "))
    assert "0 / 1" in row.inner_text()  # one disagreement
    widths = page.evaluate("[...document.querySelectorAll('.monitor-plots img')].map(i => i.naturalWidth)")
    assert len(widths) == 4 and all(w > 0 for w in widths)
    assert page.errors == []  # no failed response, no CSP violation
    context.close()


@pytest.mark.slow(5)
def test_review_form_and_monitor_have_no_sideways_scroll_or_axe_violations(site, browser):
    axe = AXE if AXE.exists() else pytest.skip(f"{AXE} is missing (`make browser` installs axe-core)")
    context, page = open_page(browser, 1400)
    result = upload(page, site)
    context.close()
    problems = []
    for width in WIDTHS:
        context, page = open_page(browser, width, failed_responses=False, bypass_csp=True)
        for name, url in (("result", result), ("monitor", site + "/monitor"),
                          ("monitor per week", site + "/monitor?period=week")):
            page.goto(url)
            page.wait_for_load_state("load")
            scroll, inner = page.evaluate("[document.documentElement.scrollWidth, window.innerWidth]")
            if scroll > inner:
                problems.append(f"{name} at {width} px scrolls sideways: {scroll} > {inner}")
            problems += [f"{name} at {width} px: {v}" for v in axe_violations(page, Path(axe))]
        context.close()
    assert problems == []
