"""Results as DICOM objects a PACS stores beside the source image: a Secondary Capture picture and a Comprehensive SR.

Both go into the source's study (same Study Instance UID, patient and study modules copied from the source by
highdicom), each in a new series named after the model. The Secondary Capture shows the radiograph with the heatmap of
the top called finding and a text panel (called findings, probabilities, "AI result — not for clinical use"); the SR
lists every label's probability, call and threshold and references the source image. Built with highdicom, the
well-kept library for writing DICOM objects; nothing here sends, logs or prints.
"""
from __future__ import annotations

from dataclasses import dataclass

import highdicom as hd
import numpy as np
from matplotlib import font_manager
from PIL import Image, ImageDraw, ImageFont
from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from chestxray.calls import CALLS, NOT_VALIDATED, OUT_OF_SCOPE, POSITIVE, ranked_labels, statements
from chestxray.cam import overlay

DISCLAIMER = "AI result — not for clinical use"
MANUFACTURER = "chestxray (open source)"
MAX_SIDE = 2048  # the picture is for reading beside the source, not for measuring; keeps an SC under ~13 MB
SC_SERIES_NUMBER = 9901  # high numbers keep the AI series after the acquisition series in a viewer's series list
SR_SERIES_NUMBER = 9902
UTF8 = "ISO_IR 192"  # the disclaimer's dash and label names are written as UTF-8

# Concepts without a standard code get codes of our own: "99" coding schemes are local by definition (PS3.16 8.2).
SCHEME = "99CXRAI"
PERSON_NAMES = ("PatientName", "ReferringPhysicianName")  # the PN attributes highdicom copies from a source
# Type 2 attributes (present, maybe empty) of the patient and general study modules that highdicom copies.
TYPE2_COPIED = PERSON_NAMES + ("PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                               "AccessionNumber", "StudyID")
# The one list of what both results take from the source: what a PACS needs to file them in the patient's study,
# nothing more (no comments, study description, admission or other IDs). Plus the UIDs that reference the source.
COPIED = TYPE2_COPIED + ("StudyInstanceUID",)
REFERENCE = ("SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID")


def _local(value: str, meaning: str) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(value=value, scheme_designator=SCHEME, meaning=meaning)


REPORT_TITLE = hd.sr.CodedConcept(value="18748-4", scheme_designator="LN", meaning="Diagnostic imaging report")
PROBABILITY = _local("PROB", "Probability")
THRESHOLD = _local("THRESH", "Decision threshold")
STATEMENT = _local("STMT", "Statement")  # the page's scope, warning, demo and evidence sentences
CALL = _local("CALL", "Call")  # the core's call word: positive, negative, not validated or out of scope
MODEL = _local("MODEL", "Algorithm name")
NO_UNITS = hd.sr.CodedConcept(value="1", scheme_designator="UCUM", meaning="no units")


@dataclass(frozen=True)
class ReportContent:
    """What one analysis puts into DICOM. image: (H, W) float32 in [0, 1]; heatmap: (h, w) raw map of positive[0].

    calls: every label's call word as the core decided it (chestxray.calls); positive: the labels called positive,
    highest probability first; heatmap is None when nothing is called. statements: the answer's sentences (scope,
    warning, demo, evidence; chestxray.calls.statements), written as they are on the page and in the PDF.
    """

    model_name: str
    labels: tuple[str, ...]
    probabilities: dict[str, float]
    calls: dict[str, str]
    thresholds: dict[str, float]
    image: np.ndarray
    heatmap: np.ndarray | None = None
    statements: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        missing = [name for name in self.labels if name not in self.probabilities or name not in self.thresholds
                   or name not in self.calls]
        if missing:
            raise ValueError(f"probabilities, thresholds and calls are needed for every label; missing for {missing}")
        unknown = [name for name in self.calls if name not in self.labels]
        if unknown:
            raise ValueError(f"called labels {unknown} are not among this model's labels {list(self.labels)}")
        words = {word for word in self.calls.values() if word not in CALLS}
        if words:
            raise ValueError(f"unknown call words {sorted(words)}; a call is one of {list(CALLS)}")
        if self.image.ndim != 2:
            raise ValueError(f"the image must be one (H, W) grayscale array, got shape {self.image.shape}")

    @property
    def positive(self) -> tuple[str, ...]:
        """The labels called positive, highest probability first."""
        called = {name for name in self.labels if self.calls[name] == POSITIVE}
        return tuple(ranked_labels({name: self.probabilities[name] for name in self.labels}, called)[:len(called)])

    @classmethod
    def from_prediction(cls, prediction, model_name: str) -> ReportContent:
        """From a predictor's Prediction (labels, probabilities, calls, thresholds, image, heatmaps)."""
        positive = prediction.ranked()[:len(prediction.positive)]
        heatmap = None
        if positive and prediction.heatmaps is not None:
            heatmap = prediction.heatmaps[list(prediction.labels).index(positive[0])]
        said = statements(prediction.to_dict())
        return cls(model_name=model_name, labels=tuple(prediction.labels),
                   probabilities=dict(prediction.probabilities), calls=dict(prediction.calls),
                   thresholds=dict(prediction.thresholds), image=prediction.image, heatmap=heatmap,
                   statements=tuple(text for text in said.values() if text))


def summary_lines(content: ReportContent) -> list[str]:
    """The text panel's lines: the disclaimer, the model, then each called finding with its probability."""
    lines = [DISCLAIMER, f"Model: {content.model_name}", ""]
    positive = content.positive
    if positive:
        lines.append(f"Called findings (heatmap: {positive[0]}):")
        lines += [f"  {name}: {content.probabilities[name]:.0%}" for name in positive]
    elif set(content.calls.values()) == {OUT_OF_SCOPE}:
        lines.append("Out of scope: no finding is called.")
    elif set(content.calls.values()) == {NOT_VALIDATED}:
        lines.append("No finding is called: none is validated.")
    else:
        lines.append("No finding called above its threshold.")
    return lines


def render_picture(content: ReportContent) -> np.ndarray:
    """The Secondary Capture's pixels: (H, W + panel, 3) uint8 RGB, radiograph (+ heatmap) left, text panel right."""
    image = content.image
    if content.heatmap is not None:
        picture = overlay(image, content.heatmap)
    else:
        picture = Image.fromarray(np.round(np.clip(image, 0, 1) * 255).astype(np.uint8)).convert("RGB")
    scale = min(1.0, MAX_SIDE / max(picture.size))
    if scale < 1.0:
        picture = picture.resize((max(1, round(picture.width * scale)), max(1, round(picture.height * scale))),
                                 Image.Resampling.LANCZOS)
    height = picture.height
    font_size = max(10, height // 40)
    # matplotlib's bundled DejaVu Sans (a runtime dependency already): no system font, and it has the dash.
    font = ImageFont.truetype(font_manager.findfont("DejaVu Sans", fallback_to_default=True), font_size)
    lines = summary_lines(content)
    line_height = round(font_size * 1.4)
    width = max(font.getbbox(line)[2] for line in lines) + 2 * font_size
    # Keep the radiograph's height; a panel taller than the image (many calls on a small image) makes the canvas taller.
    canvas = Image.new("RGB", (picture.width + width, max(height, (len(lines) + 1) * line_height)), "black")
    canvas.paste(picture, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(lines):
        fill = (255, 200, 0) if i == 0 else (255, 255, 255)  # the disclaimer stands out
        draw.text((picture.width + font_size, font_size // 2 + i * line_height), line, fill=fill, font=font)
    return np.asarray(canvas)


def _series_description(content: ReportContent, kind: str) -> str:
    # LO: at most 64 characters; the model name leads so it survives the cut.
    return f"{content.model_name} AI {kind} (not for clinical use)"[:64]


def build_secondary_capture(source: Dataset, content: ReportContent) -> Dataset:
    """RGB Secondary Capture in the source's study (patient/study modules copied), new series and instance UIDs.

    Raises ValueError (from highdicom) when the source lacks the study or patient attributes a DICOM image needs.
    """
    orientation = [str(v) for v in (source.get("PatientOrientation") or [])]
    # highdicom needs an orientation for a patient image; the picture keeps the source's pixel layout, so the
    # source's orientation is right. Unknown stays unknown: a placeholder is passed, then emptied (Type 2).
    known = len(orientation) == 2 and all(orientation)
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=_with_placeholder_names(source),
        pixel_array=render_picture(content),
        photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
        bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        series_instance_uid=generate_uid(),
        series_number=SC_SERIES_NUMBER,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer=MANUFACTURER,
        patient_orientation=tuple(orientation) if known else ("L", "F"),
        transfer_syntax_uid=ExplicitVRLittleEndian,
        series_description=_series_description(content, "heatmap"),
        manufacturer_model_name=content.model_name[:64],
        content_qualification=hd.ContentQualificationValues.RESEARCH,
        specific_character_set=UTF8,
    )
    _copy_names(source, sc)
    if not known:
        sc.PatientOrientation = ""
    # The panel's text (findings, disclaimer) is drawn into the pixels. It names no patient, but de-identification
    # pipelines decide from this flag whether pixels need scrubbing or review: text on pixels says YES.
    sc.BurnedInAnnotation = "YES"
    sc.ImageComments = "AI result - not for clinical use"
    _reference_source(sc, source)
    return sc


def _reference_source(dataset: Dataset, source: Dataset) -> None:
    # Source Image Sequence: a viewer links the picture to the radiograph it was derived from.
    item = Dataset()
    item.ReferencedSOPClassUID = source.SOPClassUID
    item.ReferencedSOPInstanceUID = source.SOPInstanceUID
    dataset.SourceImageSequence = [item]


def build_structured_report(source: Dataset, content: ReportContent) -> Dataset:
    """Comprehensive SR in the source's study: per label probability, threshold and call; references the source.

    Raises ValueError (from highdicom) when the source lacks the UIDs needed to reference it.
    """
    items: list[hd.sr.ContentItem] = [
        hd.sr.TextContentItem(name=codes.DCM.Comment, value=DISCLAIMER, relationship_type="CONTAINS"),
        hd.sr.TextContentItem(name=MODEL, value=content.model_name, relationship_type="CONTAINS"),
        *(hd.sr.TextContentItem(name=STATEMENT, value=text, relationship_type="CONTAINS")
          for text in content.statements),
        hd.sr.ImageContentItem(name=codes.DCM.SourceOfMeasurement, referenced_sop_class_uid=source.SOPClassUID,
                               referenced_sop_instance_uid=source.SOPInstanceUID, relationship_type="CONTAINS"),
    ]
    for name in content.labels:
        finding = hd.sr.ContainerContentItem(name=_local(_label_code(name), name), relationship_type="CONTAINS")
        finding.ContentSequence = hd.sr.ContentSequence([
            hd.sr.NumContentItem(name=PROBABILITY, value=round(float(content.probabilities[name]), 6), unit=NO_UNITS,
                                 relationship_type="CONTAINS"),
            hd.sr.NumContentItem(name=THRESHOLD, value=round(float(content.thresholds[name]), 6), unit=NO_UNITS,
                                 relationship_type="CONTAINS"),
            hd.sr.TextContentItem(name=CALL, value=content.calls[name], relationship_type="CONTAINS"),
        ])
        items.append(finding)
    root = hd.sr.ContainerContentItem(name=REPORT_TITLE)
    root.ContentSequence = hd.sr.ContentSequence(items)
    sr = hd.sr.ComprehensiveSR(
        evidence=[_with_placeholder_names(source)],
        content=root,
        series_instance_uid=generate_uid(),
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer=MANUFACTURER,
        series_description=_series_description(content, "findings"),
        content_qualification=hd.ContentQualificationValues.RESEARCH,
        specific_character_set=UTF8,
    )
    _copy_names(source, sr)
    return sr


def _with_placeholder_names(source: Dataset) -> Dataset:
    """A shallow copy for highdicom: placeholder person names, empty Type 2 patient/study attributes where missing.

    highdicom warns about a name without a caret and puts the name in the warning text, which would reach a console
    or a log; the placeholder passes its check and _copy_names puts the source's names back unchanged. A source
    without e.g. a Patient ID (allowed for some senders) still gives valid results: the attribute is present, empty.
    """
    # A new element dict (Dataset(source) and copy.copy share the source's dict): replacing an element here leaves
    # the source untouched, and the elements themselves, pixel data included, are shared, not copied.
    ref = Dataset()
    for element in source:
        if element.keyword in COPIED or element.keyword in REFERENCE:
            ref.add(element)
    for keyword in TYPE2_COPIED:
        if keyword not in ref:
            setattr(ref, keyword, "")
    for keyword in PERSON_NAMES:
        ref[keyword] = DataElement(ref[keyword].tag, "PN", "^")
    return ref


def _copy_names(source: Dataset, target: Dataset) -> None:
    """The source's COPIED attributes into `target` as they are (names unchanged, Type 2 ones empty when missing),
    so the SC and the SR carry exactly the same patient and study attributes."""
    for keyword in COPIED:
        if keyword in source:
            target[keyword] = DataElement(tag_for_keyword(keyword), source[keyword].VR, source[keyword].value)
        elif keyword in TYPE2_COPIED:
            setattr(target, keyword, "")


def _label_code(name: str) -> str:
    # SH code values: at most 16 characters, no backslash; label names are ASCII words ("Pleural_Thickening").
    return name.replace(" ", "_").replace("\\", "_")[:16]
