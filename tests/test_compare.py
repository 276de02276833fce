"""The compare page (/compare?id=A&id=B): two results side by side, the earlier first, the same label's heatmap on
both, the findings whose call changed listed first, and each change the difference of the two numbers shown; the
batch page and the worklist offer it; wrong links answer 400 or 404 with a clear message."""
from __future__ import annotations

import html
import io
import re
import time

import pytest
from support.data import NIH_DIR, NIH_PNG

from chestxray.reporting.formatting import change_text, percent
from chestxray.web.views import compare_changes

OTHER_PNG = NIH_DIR / "images" / "00000002_000.png"


@pytest.fixture
def client(make_app):
    return make_app().test_client()


def analyse(client, path) -> str:
    answer = client.post("/api/predict", data={"file": (io.BytesIO(path.read_bytes()), path.name)})
    assert answer.status_code == 200, answer.data[:300]
    return answer.get_json()["id"]


def record(created: str, rows: dict[str, tuple[float, str]]) -> dict:
    """A stored result's fields that the comparison reads: {label: (probability, call)}."""
    return {"created": created, "labels": [
        {"label": label, "probability": p, "threshold": 0.5, "call": call, "positive": call == "positive"}
        for label, (p, call) in rows.items()]}


@pytest.mark.parametrize("before, after", [(0.1234, 0.4567), (0.7529, 0.7001), (0.5, 0.5), (0.00049, 0.99999),
                                           (0.17499996, 0.175)])
def test_a_change_is_the_difference_of_the_two_numbers_shown(before, after):
    shown = [float(percent(p).split()[0]) for p in (before, after)]
    text = change_text(before, after)
    assert text.endswith(" pp") and float(text.split()[0]) == pytest.approx(shown[1] - shown[0], abs=1e-9)
    assert text == "0.0 pp" or text[0] in "+-"


def test_changed_calls_come_first_then_the_largest_changes():
    earlier = record("2026-01-01T00:00:00+00:00", {"Mass": (0.2, "negative"), "Effusion": (0.45, "negative"),
                                                   "Nodule": (0.1, "negative"), "Hernia": (0.3, "negative")})
    later = record("2026-02-01T00:00:00+00:00", {"Mass": (0.6, "negative"), "Effusion": (0.55, "positive"),
                                                 "Nodule": (0.15, "negative")})  # Hernia: not in the later model
    changes = compare_changes(earlier, later)
    assert [c.label for c in changes] == ["Effusion", "Mass", "Nodule"]
    assert [c.call_changed for c in changes] == [True, False, False]
    assert (changes[0].before.call, changes[0].after.call, changes[0].change) == ("negative", "positive", "+10.0 pp")
    assert changes[1].change == "+40.0 pp" and changes[2].change == "+5.0 pp"


def test_two_results_side_by_side_earlier_first_with_one_label(client):
    first = analyse(client, NIH_PNG)
    time.sleep(1.1)  # results record their time to the second
    second = analyse(client, OTHER_PNG)
    for ids in ((first, second), (second, first)):  # the order of the link does not matter: earlier on the left
        page = client.get(f"/compare?id={ids[0]}&id={ids[1]}&label=Effusion&opacity=30")
        assert page.status_code == 200
        body = page.get_data(as_text=True)
        assert body.index('id="viewport-earlier"') < body.index('id="viewport-later"')
        assert re.search(rf'id="xray-earlier" src="/results/{first}/image.png"', body)
        assert re.search(rf'id="xray-later" src="/results/{second}/image.png"', body)
        for rid in (first, second):
            assert f'src="/results/{rid}/heatmap/Effusion.png"' in body
        assert body.count('class="heat op-3"') == 2 and body.count("data-viewer") == 2
        assert 'id="viewer-tools"' in body and 'id="shortcuts"' in body
    api = {rid: client.get(f"/api/results/{rid}").get_json() for rid in (first, second)}
    rows = re.findall(r'<tr(?: class="changed")? data-label="(\w+)">.*?<span class="value">([^<]+)</span>.*?'
                      r'<span class="value">([^<]+)</span>.*?<td class="num change">([^<]+)</td>', body, re.S)
    assert len(rows) == len(api[first]["labels"])
    for label, before, after, change in rows:  # every number as the result pages show it
        p = [next(row["probability"] for row in api[rid]["labels"] if row["label"] == label) for rid in (first, second)]
        assert (html.unescape(before), html.unescape(after), change) == (percent(p[0]), percent(p[1]),
                                                                         change_text(*p))
    assert 'id="different-models"' not in body  # one model served both


def test_wrong_compare_links_are_clear(client):
    first, second = analyse(client, NIH_PNG), analyse(client, OTHER_PNG)
    for query in (f"id={first}", f"id={first}&id={first}", f"id={first}&id={second}&id={first}x", ""):
        answer = client.get(f"/compare?{query}")
        assert answer.status_code == 400 and b"Choose two different results" in answer.data, query
    missing = client.get(f"/compare?id={first}&id={'0' * 32}")
    assert missing.status_code == 404
    bogus = client.get(f"/compare?id={first}&id={second}&label=Bogus")
    assert bogus.status_code == 404 and "no label 'Bogus' in common" in html.unescape(bogus.get_data(as_text=True))


def test_the_batch_page_offers_two_of_its_results_side_by_side(client):
    ids = [analyse(client, NIH_PNG), analyse(client, OTHER_PNG)]
    body = client.get(f"/results?ids={','.join(ids)}").get_data(as_text=True)
    form = body[body.index('id="compare-form"'):]
    form = form[: form.index("</form>")]
    assert 'action="/compare"' in form and form.count('name="id"') == 2
    assert re.search(rf'<option value="{ids[0]}" selected>', form)
    assert re.search(rf'id="compare-second">\s*<option value="{ids[0]}" >.*<option value="{ids[1]}" selected>',
                     form, re.S)
    one = client.get(f"/results?ids={ids[0]}").get_data(as_text=True)
    assert 'id="compare-form"' not in one  # one result: nothing to compare
