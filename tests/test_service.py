"""chestxray.service.analyse_and_store, the one path from an image to a stored result (web uploads and the DICOM
node): the same answer as the predictor, one saved result, one recorded row per outcome, and its errors."""
from __future__ import annotations

import errno

import numpy as np
import pytest
from support.data import DICOM_MONO2, NIH_PNG

from chestxray.imaging import InvalidImage, UnsupportedFormat, read_dicom
from chestxray.results import ResultStore
from chestxray.service import ParsedDicom, ResultNotSaved, analyse_and_store


class Recorder:
    """Stands in for chestxray.web.monitoring.Monitor: what was recorded, in order."""

    def __init__(self):
        self.rows = []

    def answered(self, prediction, source, started, data, result_id):
        self.rows.append(("answered", source, type(data).__name__, result_id))

    def refused(self, source, started, exc):
        self.rows.append(("refused", source, type(exc).__name__))


def test_bytes_are_predicted_saved_and_recorded_once(tiny_predictor, tmp_path):
    store, monitor = ResultStore(tmp_path / "results", 10), Recorder()
    stored = analyse_and_store(tiny_predictor, store, NIH_PNG.read_bytes(), source="s", channel="web",
                               filename="x.png", monitor=monitor)
    expected = tiny_predictor.predict(NIH_PNG)
    assert np.allclose([r["probability"] for r in stored.record["labels"]],
                       [r["probability"] for r in expected.to_dict()["labels"]])
    assert store.load(stored.record["id"])["id"] == stored.record["id"]
    assert monitor.rows == [("answered", "web", "bytes", stored.record["id"])]


def test_a_parsed_dicom_gives_the_same_answer_as_its_bytes(tiny_predictor, tmp_path):
    data = DICOM_MONO2.read_bytes()
    monitor = Recorder()
    header, image = read_dicom(data)
    parsed = analyse_and_store(tiny_predictor, ResultStore(tmp_path / "a", 10), ParsedDicom(header, image),
                               source="dicom-node", channel="dicom", monitor=monitor)
    from_bytes = analyse_and_store(tiny_predictor, ResultStore(tmp_path / "b", 10), data, source="s", channel="web")
    assert parsed.prediction.to_dict() == from_bytes.prediction.to_dict()  # "format": "DICOM" in both
    assert monitor.rows[0][2] == "FileDataset"  # the facts come from the header already read, not from bytes


@pytest.mark.parametrize("data, filename, error", [(b"GIF89a" + b"\0" * 64, "x.gif", UnsupportedFormat),
                                                   (b"\x89PNG\r\n\x1a\n broken", "x.png", InvalidImage)])
def test_bad_input_is_recorded_as_a_refusal_and_raised(tiny_predictor, tmp_path, data, filename, error):
    store, monitor = ResultStore(tmp_path / "results", 10), Recorder()
    with pytest.raises(error):
        analyse_and_store(tiny_predictor, store, data, source="s", channel="api", filename=filename, monitor=monitor)
    assert monitor.rows == [("refused", "api", error.__name__)]
    assert not list((tmp_path / "results").glob("*/result.json"))


def test_a_result_that_cannot_be_written_raises_result_not_saved_and_records_nothing(tiny_predictor, tmp_path,
                                                                                     monkeypatch):
    store, monitor = ResultStore(tmp_path / "results", 10), Recorder()

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store, "save", full)
    with pytest.raises(ResultNotSaved) as caught:
        analyse_and_store(tiny_predictor, store, NIH_PNG.read_bytes(), source="s", channel="web", monitor=monitor)
    assert caught.value.errno == errno.ENOSPC and isinstance(caught.value, OSError)
    assert monitor.rows == []
