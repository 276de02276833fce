"""End to end in headless Chromium on the demo model, the path `make run` walks on a fresh clone: the demo checkpoint
(built by Model_Training/demo.py, its recipe shrunk to seconds) carries its trust data, so a photo is refused as out
of scope with every label "out of scope", and a chest X-ray it accepts shows its labels as "not validated"."""
from __future__ import annotations

import json
import urllib.request

import pytest
import skimage.data
from livesite import browser_fixture, chromium_fixture, open_page, run_server
from PIL import Image
from support import forked
from support.data import NIH_DIR
from support.training import QUICK_DEMO

from Model_Training import demo

pytestmark = pytest.mark.e2e

chromium = pytest.fixture(scope="module", name="chromium")(chromium_fixture)
browser = pytest.fixture(scope="module", name="browser")(browser_fixture)


@pytest.fixture(scope="module")
def demo_server(chromium, tmp_path_factory):
    folder = tmp_path_factory.mktemp("e2e-demo")
    checkpoint = demo.build_demo_model(folder / "demo_model.pth", extra_args=QUICK_DEMO, progress=False)
    with run_server(checkpoint, folder / "results", launch=forked.popen) as base:
        yield base


def _accepted_chest_xray(base: str):
    """A real NIH image of the bundle that the demo model's in-scope check accepts (asked through the API)."""
    for path in sorted((NIH_DIR / "images").glob("*.png")):
        with urllib.request.urlopen(f"{base}/api/model") as response:
            assert json.load(response)["demo"] is True
        request = urllib.request.Request(f"{base}/api/predict", data=_multipart(path.read_bytes(), path.name),
                                         headers={"Content-Type": "multipart/form-data; boundary=XyZ"})
        with urllib.request.urlopen(request) as response:
            if json.load(response)["in_scope"]:
                return path
    pytest.fail("the demo model accepts none of the bundled full-size NIH images")


def _multipart(data: bytes, name: str) -> bytes:
    return (f'--XyZ\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
            "Content-Type: image/png\r\n\r\n").encode() + data + b"\r\n--XyZ--\r\n"


@pytest.mark.slow(25)
def test_demo_model_refuses_a_photo_and_shows_not_validated_labels(demo_server, browser, tmp_path):
    photo = tmp_path / "photo.png"
    Image.fromarray(skimage.data.astronaut()).save(photo)
    context, page = open_page(browser)
    page.goto(demo_server + "/")
    assert "Demo model" in page.inner_text("body")
    page.set_input_files("#file", str(photo))
    with page.expect_navigation():
        page.click("#submit")
    assert "Out of scope." in page.inner_text("#scope")
    assert page.locator(".findings-table").count() == 0 and page.locator(".badge").count() == 0
    assert "Demo model" in page.inner_text("#statements")
    with page.expect_navigation():
        page.click("#show-anyway")
    assert set(page.locator(".findings-table td.call").all_inner_texts()) == {"out of scope"}

    page.goto(demo_server + "/")
    page.set_input_files("#file", str(_accepted_chest_xray(demo_server)))
    with page.expect_navigation():
        page.click("#submit")
    assert "In scope" in page.inner_text("#scope")
    calls = page.locator(".findings-table td.call").all_inner_texts()
    assert len(calls) == 14 and set(calls) == {"not validated"}  # 16 training images validate nothing
    assert page.locator(".finding.positive").count() == 0
    assert "Calls: called only when" in page.inner_text("#statements")
    assert not page.errors, page.errors
    context.close()
