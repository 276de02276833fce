"""End to end in headless Chromium, the result page at a phone's 320 and 390 px, a tablet's 768 px, laptops' 1024, 1280
and 1366 px and desktops' 1400 and 1920 px: no sideways scrolling, no word of the findings list or the review form
broken across lines, every column of every finding inside its panel, no review form cell spilling over its neighbour,
the worklist inside 320 px; and axe-core's serious violations stay at zero."""
from __future__ import annotations

from pathlib import Path

import pytest
from livesite import browser_fixture, chromium_fixture, open_page, run_server
from support import forked
from support.data import NIH_DIR, NIH_PNG
from support.trust import make_trusted_checkpoint
from test_browser_workflows import AXE, axe_violations

pytestmark = pytest.mark.e2e

WIDTHS = (320, 390, 768, 1024, 1280, 1366, 1400, 1920)
BROKEN_WORDS = """(root) => {
  // Every word of the findings list: a word whose glyphs sit on two lines was broken inside.
  const broken = [];
  const walker = document.createTreeWalker(root, NodeFilter.SHOW_TEXT);
  for (let node = walker.nextNode(); node; node = walker.nextNode()) {
    const pattern = /\\S+/g;
    let match;
    while ((match = pattern.exec(node.textContent))) {
      const range = document.createRange();
      range.setStart(node, match.index);
      range.setEnd(node, match.index + match[0].length);
      const tops = new Set([...range.getClientRects()].filter(r => r.width > 0).map(r => Math.round(r.top)));
      if (tops.size > 1) broken.push(match[0]);
    }
  }
  return broken;
}"""
HIDDEN_CELLS = """(panel) => {
  // Cells of the findings that are not drawn in full inside their panel (cut off or scrolled away).
  const box = panel.getBoundingClientRect();
  const narrow = window.innerWidth <= 640;  // the header is visually hidden there; each cell carries its heading
  const cells = [...panel.querySelectorAll(narrow ? "tr.finding > *" : "tr > *")];
  return cells.filter(cell => {
    const r = cell.getBoundingClientRect();
    return r.width <= 0 || r.height <= 0 || r.left < box.left - 1 || r.right > box.right + 1;
  }).map(cell => cell.className || cell.textContent.trim().slice(0, 30));
}"""
WIDEST = """(panel) => [...panel.querySelectorAll("*")].filter(e => e.scrollWidth > e.clientWidth + 1 && e.clientWidth)
  .map(e => `${e.tagName}.${e.className.baseVal ?? e.className} ${e.scrollWidth}>${e.clientWidth}`).slice(0, 6).join("; ")"""
CROWDED_CELLS = """(table) => [...table.querySelectorAll("tbody th, tbody td")]
  // Cells whose content is wider than the cell itself: it spills over its neighbour (a long label over the call).
  .filter(cell => cell.scrollWidth > cell.clientWidth + 1).map(cell => cell.textContent.trim().slice(0, 30))"""
OUTSIDE = """() => [...document.body.querySelectorAll("*")]
  .filter(e => e.getBoundingClientRect().right > document.documentElement.clientWidth + 0.5)
  .map(e => `${e.tagName}#${e.id}.${e.className.baseVal ?? e.className}`).slice(-4).join("; ")"""
OVERFLOW = "() => document.documentElement.scrollWidth - document.documentElement.clientWidth"


chromium = pytest.fixture(scope="module", name="chromium")(chromium_fixture)
browser = pytest.fixture(scope="module", name="browser")(browser_fixture)


@pytest.fixture(scope="module")
def site(chromium, tiny_checkpoint, tmp_path_factory):
    folder = tmp_path_factory.mktemp("reading-room")
    checkpoint = make_trusted_checkpoint(folder / "model.pth", tiny_checkpoint, NIH_DIR)  # AUROCs with their CI
    with run_server(checkpoint, folder / "results", launch=forked.popen) as base:
        yield base


@pytest.mark.slow(20)
def test_findings_list_reads_at_every_width(site, browser):
    context, page = open_page(browser, bypass_csp=True)  # lets the test inject axe-core; the app's CSP stays
    page.goto(site + "/")
    page.set_input_files("#file", str(NIH_PNG))
    with page.expect_navigation():
        page.click("#submit")
    result = page.url
    assert "/results/" in result
    problems = []
    for width in WIDTHS:
        page.set_viewport_size({"width": width, "height": 900})
        page.goto(result)
        panel = page.locator("section.findings")
        assert page.locator("tr.finding").count() == 14
        if (overflow := page.evaluate(OVERFLOW)) > 0:
            problems.append(f"{width} px: the page scrolls sideways by {overflow} px: " + page.evaluate(OUTSIDE))
        if panel.evaluate("p => p.scrollWidth - p.clientWidth") > 0:
            problems.append(f"{width} px: the findings panel scrolls sideways " + panel.evaluate(WIDEST))
        if broken := panel.evaluate(BROKEN_WORDS):
            problems.append(f"{width} px: words broken across lines: {broken}")
        if hidden := panel.evaluate(HIDDEN_CELLS):
            problems.append(f"{width} px: cells not shown in full: {hidden}")
        review = page.locator("table.feedback-table")
        if crowded := review.evaluate(CROWDED_CELLS):
            problems.append(f"{width} px: review form cells spill over: {crowded}")
        if broken := review.evaluate(BROKEN_WORDS):
            problems.append(f"{width} px: review form words broken across lines: {broken}")
        names = page.locator(".label-link").all_inner_texts()
        if "Pleural Thickening" not in names or any("_" in name for name in names):
            problems.append(f"{width} px: labels not shown by their display names: {names}")
        if AXE.exists():
            problems += [f"{width} px: {v}" for v in axe_violations(page, Path(AXE))]
        page.goto(site + "/worklist")
        if (overflow := page.evaluate(OVERFLOW)) > 0:
            problems.append(f"{width} px: /worklist scrolls sideways by {overflow} px")
    assert not problems, "\n".join(problems)
    assert not page.errors, page.errors
    context.close()
