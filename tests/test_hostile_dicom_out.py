"""The results sent to a PACS copy the same patient and study attributes, and only those (reporting.dicom.COPIED), and
the picture says it carries text drawn on its pixels (docs/RELIABILITY.md, "Round 3")."""
from __future__ import annotations

import pydicom
import pytest
from support.data import DICOM_MONO2

from chestxray.reporting.dicom import COPIED, ReportContent, build_secondary_capture, build_structured_report

# What a source may carry beyond what a PACS needs to file the results: none of it may travel with them.
EXTRA = {"PatientComments": "COMMENT-X", "StudyDescription": "STUDY-DESC-X", "AdmissionID": "ADMISSION-X",
         "OtherPatientIDs": "OTHER-ID-X", "InstitutionName": "INSTITUTION-X", "PatientAge": "045Y",
         "PatientWeight": "70", "PhysiciansOfRecord": "Record^Doctor", "PatientAddress": "1 Secret Street",
         "EthnicGroup": "GROUP-X", "AdditionalPatientHistory": "HISTORY-X", "RequestingPhysician": "Asking^Doctor"}
FILED = {"StudyID": "SID-7", "AccessionNumber": "ACC-7", "PatientBirthDate": "19010203", "StudyDate": "20260101",
         "StudyTime": "120000", "PatientSex": "F", "PatientID": "PID-7", "PatientName": "Doe^Jane",
         "ReferringPhysicianName": "Referring^Doctor"}


@pytest.fixture(scope="module")
def results(tiny_predictor):
    source = pydicom.dcmread(DICOM_MONO2)
    for keyword, value in (EXTRA | FILED).items():
        setattr(source, keyword, value)
    content = ReportContent.from_prediction(tiny_predictor.predict(DICOM_MONO2), model_name="test model")
    return source, build_secondary_capture(source, content), build_structured_report(source, content)


def from_source(dataset: pydicom.Dataset, source: pydicom.Dataset) -> set[str]:
    """The patient and study attributes of `dataset` whose value is the source's."""
    keywords = set(EXTRA) | set(FILED) | {"StudyInstanceUID"}
    return {kw for kw in keywords if kw in dataset and str(dataset[kw].value) == str(source[kw].value)}


def test_the_sc_and_the_sr_copy_the_same_attributes_from_the_source_and_only_those(results):
    source, sc, sr = results
    assert from_source(sc, source) == from_source(sr, source) == set(COPIED) & (set(FILED) | {"StudyInstanceUID"})
    for dataset in (sc, sr):
        assert not [kw for kw in EXTRA if kw in dataset]
        text = str(dataset)  # nor anywhere deeper (sequences, the SR's content)
        assert not [value for value in EXTRA.values() if "-X" in value and value in text]


def test_the_picture_declares_its_burned_in_text_and_the_sr_has_no_pixels(results):
    _, sc, sr = results
    assert sc.BurnedInAnnotation == "YES"
    assert "PixelData" not in sr and "BurnedInAnnotation" not in sr
