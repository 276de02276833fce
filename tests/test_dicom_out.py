"""chestxray.reporting.dicom: the Secondary Capture and the Comprehensive SR sent back to a PACS, read back with
pydicom."""
from __future__ import annotations

import io
import warnings

import numpy as np
import pydicom
import pytest
from pydicom.uid import ComprehensiveSRStorage, SecondaryCaptureImageStorage
from support.data import DICOM_MONO2

from chestxray.cam import overlay
from chestxray.imaging import read_xray
from chestxray.labels import LABELS
from chestxray.reporting import dicom
from chestxray.reporting.dicom import ReportContent, build_secondary_capture, build_structured_report

PATIENT_TAGS = ("PatientName", "PatientID", "PatientSex", "PatientBirthDate")


@pytest.fixture(scope="module")
def source() -> pydicom.Dataset:
    return pydicom.dcmread(DICOM_MONO2)


@pytest.fixture(scope="module")
def content(tiny_predictor) -> ReportContent:
    content = ReportContent.from_prediction(tiny_predictor.predict(DICOM_MONO2), model_name="resnet18 test model")
    assert len(content.positive) >= 2, "the biased tiny model calls several labels; the tests need at least two"
    return content


def roundtrip(ds: pydicom.Dataset) -> pydicom.Dataset:
    """Write as a Part 10 file and read it back, as a PACS would store it."""
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return pydicom.dcmread(io.BytesIO(buffer.getvalue()))


def test_content_from_a_prediction_orders_calls_and_takes_the_top_calls_heatmap(tiny_predictor):
    prediction = tiny_predictor.predict(DICOM_MONO2)
    content = ReportContent.from_prediction(prediction, model_name="m")
    assert content.calls == prediction.calls and set(content.positive) == set(prediction.positive)
    probs = [content.probabilities[name] for name in content.positive]
    assert probs == sorted(probs, reverse=True)
    np.testing.assert_array_equal(content.heatmap, prediction.heatmaps[LABELS.index(content.positive[0])])
    assert content.thresholds == prediction.thresholds


@pytest.mark.parametrize("change, message", [
    (dict(probabilities={"Atelectasis": 0.1}), "missing"),
    (dict(calls={"Not a label": "positive"}), "not among|missing"),
    (dict(calls={name: "maybe" for name in LABELS}), "unknown call words"),
    (dict(image=np.zeros((4, 4, 3), np.float32)), "grayscale"),
])
def test_content_refuses_inconsistent_input(content, change, message):
    fields = dict(model_name="m", labels=content.labels, probabilities=content.probabilities, calls=content.calls,
                  thresholds=content.thresholds, image=content.image, heatmap=content.heatmap) | change
    with pytest.raises(ValueError, match=message):
        ReportContent(**fields)


def test_secondary_capture_is_in_the_source_study_with_new_series_and_instance(source, content):
    sc = roundtrip(build_secondary_capture(source, content))
    assert sc.SOPClassUID == SecondaryCaptureImageStorage == sc.file_meta.MediaStorageSOPClassUID
    assert sc.StudyInstanceUID == source.StudyInstanceUID
    for tag in PATIENT_TAGS:
        assert sc.get(tag) == source.get(tag), tag
    assert sc.SeriesInstanceUID != source.SeriesInstanceUID and sc.SOPInstanceUID != source.SOPInstanceUID
    assert sc.SeriesInstanceUID.is_valid and sc.SOPInstanceUID.is_valid
    assert "resnet18 test model" in sc.SeriesDescription and "not for clinical use" in sc.SeriesDescription
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert sc.BurnedInAnnotation == "YES"  # the panel's text is drawn on the pixels
    # Two results of the same image are two new instances, never an overwrite of the first.
    again = build_secondary_capture(source, content)
    assert again.SOPInstanceUID != sc.SOPInstanceUID and again.SeriesInstanceUID != sc.SeriesInstanceUID


def test_secondary_capture_pixels_are_the_heatmap_overlay_plus_a_text_panel(source, content):
    sc = roundtrip(build_secondary_capture(source, content))
    pixels = sc.pixel_array  # decoded by pydicom from the stored bytes
    image = read_xray(DICOM_MONO2)
    h, w = image.shape
    assert sc.PhotometricInterpretation == "RGB" and pixels.dtype == np.uint8
    assert pixels.shape[0] == h and pixels.shape[1] > w and pixels.shape[2] == 3
    np.testing.assert_array_equal(pixels[:, :w], np.asarray(overlay(image, content.heatmap)))
    panel = pixels[:, w:]
    assert (panel > 0).mean() > 0.005, "the text panel is blank"


def test_the_panel_lists_what_is_called(source, content):
    none_called = ReportContent(model_name=content.model_name, labels=content.labels,
                                probabilities=content.probabilities, calls=dict.fromkeys(content.labels, "negative"),
                                thresholds=content.thresholds, image=content.image)
    assert any("No finding called" in line for line in dicom.summary_lines(none_called))
    for word, said in (("out of scope", "Out of scope"), ("not validated", "none is validated")):
        lines = dicom.summary_lines(ReportContent(**{**vars(none_called),
                                                         "calls": dict.fromkeys(content.labels, word)}))
        assert any(said in line for line in lines) and not any("No finding called above" in line for line in lines)
    lines = dicom.summary_lines(content)
    assert lines[0] == "AI result — not for clinical use"
    for name in content.positive:
        assert f"  {name}: {content.probabilities[name]:.0%}" in lines
    uncalled = [name for name in content.labels if name not in content.positive]
    assert not any(name in line for name in uncalled for line in lines)
    # Without a call the radiograph is shown as it is, without a heatmap.
    plain = build_secondary_capture(source, none_called).pixel_array[:, :content.image.shape[1]]
    expected = np.round(content.image * 255).astype(np.uint8)
    for channel in range(3):
        np.testing.assert_array_equal(plain[..., channel], expected)


def test_a_large_radiograph_is_scaled_down_in_the_picture(source, content):
    big = ReportContent(model_name="m", labels=content.labels, probabilities=content.probabilities,
                        calls=content.calls, thresholds=content.thresholds,
                        image=np.resize(content.image, (3000, 2500)), heatmap=content.heatmap)
    pixels = dicom.render_picture(big)
    assert pixels.shape[0] == dicom.MAX_SIDE


def _items_by_name(sequence) -> dict[str, pydicom.Dataset]:
    return {item.ConceptNameCodeSequence[0].CodeMeaning: item for item in sequence}


def test_structured_report_lists_every_label_and_references_the_source(source, content):
    sr = roundtrip(build_structured_report(source, content))
    assert sr.SOPClassUID == ComprehensiveSRStorage and sr.Modality == "SR"
    assert sr.StudyInstanceUID == source.StudyInstanceUID
    for tag in PATIENT_TAGS:
        assert sr.get(tag) == source.get(tag), tag
    assert sr.SeriesInstanceUID != source.SeriesInstanceUID and sr.SOPInstanceUID != source.SOPInstanceUID
    assert "resnet18 test model" in sr.SeriesDescription

    items = _items_by_name(sr.ContentSequence)
    assert items["Comment"].TextValue == "AI result — not for clinical use"
    assert items["Algorithm name"].TextValue == "resnet18 test model"
    image = items["Source of Measurement"].ReferencedSOPSequence[0]
    assert image.ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert image.ReferencedSOPClassUID == source.SOPClassUID
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0]
    assert evidence.StudyInstanceUID == source.StudyInstanceUID
    assert evidence.ReferencedSeriesSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == \
        source.SOPInstanceUID

    for name in LABELS:
        finding = _items_by_name(items[name].ContentSequence)
        probability = float(finding["Probability"].MeasuredValueSequence[0].NumericValue)
        threshold = float(finding["Decision threshold"].MeasuredValueSequence[0].NumericValue)
        call = finding["Call"].TextValue
        assert probability == pytest.approx(content.probabilities[name], abs=1e-6)
        assert threshold == pytest.approx(content.thresholds[name], abs=1e-6)
        assert call == content.calls[name]
        assert (call == "positive") == (probability >= threshold)


def test_building_warns_nothing_with_patient_data_and_leaves_the_source_as_it_is(source, content):
    before = source.to_json_dict()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        build_secondary_capture(source, content)
        build_structured_report(source, content)
    patient = str(source.PatientID)
    assert patient and not [w for w in caught if patient in str(w.message)]
    assert source.to_json_dict() == before


def test_a_source_without_patient_or_study_details_still_gives_valid_objects(source, content):
    bare = pydicom.Dataset()
    for keyword in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "Modality"):
        setattr(bare, keyword, source[keyword].value)
    for build in (build_secondary_capture, build_structured_report):
        out = roundtrip(build(bare, content))
        assert out.StudyInstanceUID == source.StudyInstanceUID
        for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber"):
            assert keyword in out and not out[keyword].value, keyword  # Type 2: present, empty
