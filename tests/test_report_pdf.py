"""The printable PDF report: made with matplotlib, read back with pypdf (an independent PDF reader).

One page per result at the paper size asked for, its text holding every label, the result id, the calls, the
model summary and the "not for clinical use" notice; the heatmap is drawn only when one is chosen.
"""
from __future__ import annotations

import io
from datetime import UTC, datetime

import numpy as np
import pytest
from pypdf import PdfReader
from support.data import NIH_PNG

from chestxray.cam import normalize_map
from chestxray.reporting.pdf import PAPER_SIZES, ReportPage, report_bytes, scaled_map, strongest_zone, write_report
from chestxray.trust.evidence import format_call

RESULT_ID = "0123456789abcdef0123456789abcdef"


@pytest.fixture(scope="module")
def prediction(tiny_predictor):
    return tiny_predictor.predict(NIH_PNG)


@pytest.fixture(scope="module")
def record(prediction) -> dict:
    """A record shaped like the web app's result.json."""
    return {"id": RESULT_ID, "created": "2026-11-27T02:00:00+00:00", **prediction.to_dict(), "display_size": [768, 768]}


def probability(record: dict, name: str) -> float:
    return next(row["probability"] for row in record["labels"] if row["label"] == name)


def threshold(record: dict, name: str) -> float:
    return next(row["threshold"] for row in record["labels"] if row["label"] == name)


def names(record: dict) -> list[str]:
    return [row["label"] for row in record["labels"]]


def read_pdf(data: bytes) -> PdfReader:
    assert data.startswith(b"%PDF-")
    return PdfReader(io.BytesIO(data))


def page_text(reader: PdfReader, index: int = 0) -> str:
    return " ".join(reader.pages[index].extract_text().split())  # table cells may break lines anywhere


def test_one_a4_page_with_labels_calls_id_model_and_notice(record, prediction):
    label = prediction.ranked()[0]
    page = ReportPage.from_record(record, prediction.image, prediction.heatmaps, label=label)
    reader = read_pdf(report_bytes([page], made=datetime(2026, 11, 27, 3, 4, tzinfo=UTC)))
    assert len(reader.pages) == 1
    width, height = (72 * side for side in PAPER_SIZES["a4"])
    assert float(reader.pages[0].mediabox.width) == pytest.approx(width, abs=1)
    assert float(reader.pages[0].mediabox.height) == pytest.approx(height, abs=1)
    text = page_text(reader)
    assert RESULT_ID in text
    assert "Not for clinical use" in text and "not a medical device" in text
    assert "Analysed 2026-11-27 02:00:00 UTC" in text and "report made 2026-11-27 03:04 UTC" in text
    for name in names(record):
        shown = name.replace("_", " ")
        call = "positive" if name in record["positive"] else "negative"
        p_text, t_text = format_call(probability(record, name), threshold(record, name))  # the page's rounding
        assert f"{shown} {p_text} {t_text} {call}" in text
    assert f"Heatmap of {label.replace('_', ' ')}" in text and "each map scaled to its own peak" in text
    assert f"Architecture: {record['model']['arch']}" in text
    assert f"Training data: {record['model']['training']['data']}" in text
    assert "Research tool" in (reader.metadata.subject or "")


def test_called_findings_are_listed_first(record, prediction):
    text = page_text(read_pdf(report_bytes([ReportPage.from_record(record, prediction.image, None)])))
    order = sorted(names(record), key=lambda n: (n not in record["positive"], -probability(record, n)))
    positions = [text.index(f"{n.replace('_', ' ')} {format_call(probability(record, n), threshold(record, n))[0]}")
                 for n in order]
    assert positions == sorted(positions)


def test_one_page_per_result_on_letter_paper(tmp_path, record, prediction):
    # the second record calls nothing: no row is positive, and its `call` says so (unvalidated rows keep theirs)
    unpositive = [{**row, "positive": False, "call": "negative" if row["call"] == "positive" else row["call"]}
                  for row in record["labels"]]
    other = {**record, "id": "f" * 32, "positive": [], "labels": unpositive}
    pages = [ReportPage.from_record(record, prediction.image, prediction.heatmaps, label=names(record)[0]),
             ReportPage.from_record(other, prediction.image, prediction.heatmaps, label=names(record)[1],
                                    scale="shared")]
    target = tmp_path / "report.pdf"
    write_report(target, pages, paper="letter")
    reader = PdfReader(target)
    assert len(reader.pages) == 2
    assert [float(p.mediabox.width) for p in reader.pages] == pytest.approx([612, 612], abs=1)
    assert RESULT_ID in page_text(reader, 0) and "f" * 32 not in page_text(reader, 0)
    assert "f" * 32 in page_text(reader, 1) and "one scale for all labels" in page_text(reader, 1)
    for index, shown in enumerate([record, other]):  # each row prints its record's call after the threshold
        text = page_text(reader, index)
        for call in ("positive", "negative", "not validated", "out of scope"):
            assert text.count(f"% {call}") == sum(row["call"] == call for row in shown["labels"]), (index, call)
    assert "% positive" not in page_text(reader, 1)
    assert page_text(reader, 1).count("% ") >= 2 * len(record["labels"])  # probability and threshold per row


def pictures(reader: PdfReader) -> list[np.ndarray]:
    """The raster images of page 1 as (H, W, 3) int arrays, largest first."""
    arrays = [np.asarray(image.image.convert("RGB")).astype(int) for image in reader.pages[0].images]
    return sorted(arrays, key=lambda a: -a.size)


def colourfulness(rgb: np.ndarray) -> int:
    return int(np.abs(rgb - rgb.mean(axis=2, keepdims=True)).max())


def test_heatmap_is_drawn_only_when_chosen(record, prediction):
    label = next(n for n, m in zip(prediction.labels, prediction.heatmaps) if m.max() > 0)
    with_map = read_pdf(report_bytes([ReportPage.from_record(record, prediction.image, prediction.heatmaps, label)]))
    plain = read_pdf(report_bytes([ReportPage.from_record(record, prediction.image, prediction.heatmaps, None)]))
    xray, legend = pictures(with_map)  # the X-ray with its overlay, and the colour legend
    assert colourfulness(xray) > 60 and colourfulness(legend) > 60
    assert legend.shape[1] > 10 * legend.shape[0]  # a horizontal bar
    (plain_xray,) = pictures(plain)
    assert colourfulness(plain_xray) <= 1  # grey only: no overlay, no legend
    assert min(plain_xray.shape[:2]) >= 600  # printed sharp enough (~200 dpi)
    assert "Plain image" in page_text(plain) and "Heatmap of" not in page_text(plain)


def test_map_without_evidence_says_so(record, prediction):
    maps = np.array(prediction.heatmaps, copy=True)
    label = names(record)[3]
    maps[3] = -np.abs(maps[3]) - 1.0  # no positive value anywhere
    text = page_text(read_pdf(report_bytes([ReportPage.from_record(record, prediction.image, maps, label)])))
    assert "no region supports this finding" in text and "strongest" not in text


def test_a_records_own_call_words_are_printed(record, prediction):
    rows = [{**row, "call": "not validated"} if i % 2 else row for i, row in enumerate(record["labels"])]
    text = page_text(read_pdf(report_bytes([ReportPage.from_record({**record, "labels": rows}, prediction.image,
                                                                   None)])))
    assert text.count("not validated") == len(rows) // 2


def test_custom_calls_and_notes_are_printed(record, prediction):
    page = ReportPage(
        result_id=RESULT_ID, created=record["created"], labels=prediction.labels,
        probabilities=prediction.probabilities, thresholds=prediction.thresholds,
        calls={name: "not validated" for name in prediction.labels}, model=record["model"],
        image=(prediction.image * 255).astype(np.uint8),
        notes=("Out of scope: this does not look like a chest X-ray.",),
    )
    text = page_text(read_pdf(report_bytes([page])))
    assert text.count("not validated") == len(prediction.labels)
    assert "Out of scope: this does not look like a chest X-ray." in text


@pytest.mark.parametrize("change, message", [
    ({"label": "Unicorn"}, "unknown label"),
    ({"scale": "log"}, "unknown heatmap scale"),
    ({"heatmaps": np.zeros((2, 4, 4))}, "heatmaps must be"),
    ({"heatmaps": None, "label": "Effusion"}, "no heatmaps were given"),
    ({"image": np.zeros((4, 4, 3))}, "2-D grayscale"),
])
def test_inconsistent_input_is_refused(record, prediction, change, message):
    args = {"record": record, "image": prediction.image, "heatmaps": prediction.heatmaps, "label": None, **change}
    scale = args.pop("scale", "own")
    with pytest.raises(ValueError, match=message):
        ReportPage.from_record(**args, scale=scale)


def test_bad_paper_and_empty_report_are_refused(record, prediction):
    page = ReportPage.from_record(record, prediction.image, None)
    with pytest.raises(ValueError, match="unknown paper"):
        report_bytes([page], paper="a5")
    with pytest.raises(ValueError, match="at least one result"):
        report_bytes([])


def test_scaled_map_own_matches_normalize_map_and_shared_uses_the_global_peak(prediction):
    maps = prediction.heatmaps
    for index in range(len(maps)):
        own, peak = scaled_map(maps, index, "own")
        np.testing.assert_allclose(own, normalize_map(maps[index]), rtol=1e-6)
        assert peak == pytest.approx(max(0.0, float(maps[index].max())))
    shared = [scaled_map(maps, index, "shared") for index in range(len(maps))]
    global_peak = float(np.maximum(maps, 0).max())
    assert all(peak == pytest.approx(global_peak) for _, peak in shared)
    assert max(float(m.max()) for m, _ in shared) == pytest.approx(1.0)
    np.testing.assert_allclose(shared[0][0], np.maximum(maps[0], 0) / global_peak, rtol=1e-6)


@pytest.mark.parametrize("row, col, expected", [
    (0, 0, "the upper zone, on the image's left"),
    (4, 4, "the middle zone, centrally"),
    (3, 2, "the middle zone, on the image's left"),  # column 2.5/8 of the width: the left third
    (8, 7, "the lower zone, on the image's right"),
])
def test_strongest_zone_names_the_peak(row, col, expected):
    cam = np.zeros((9, 8), dtype=np.float32)
    cam[row, col] = 1.0
    assert strongest_zone(cam) == expected


def test_strongest_zone_is_empty_without_evidence():
    assert strongest_zone(-np.ones((4, 4))) == ""
