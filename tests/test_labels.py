import numpy as np
import pytest

from chestxray.labels import CHESTXRAY8_LABELS, LABELS, LabelError, check_labels, parse_findings


def test_canonical_order():
    assert LABELS == (
        "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia", "Pneumothorax",
        "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia",
    )
    assert CHESTXRAY8_LABELS == LABELS[:8]


@pytest.mark.parametrize(
    "text, positives",
    [
        ("No Finding", []),
        ("Cardiomegaly", ["Cardiomegaly"]),
        ("Cardiomegaly|Emphysema", ["Cardiomegaly", "Emphysema"]),
        ("Pleural_Thickening|Hernia|Atelectasis", ["Atelectasis", "Pleural_Thickening", "Hernia"]),
    ],
)
def test_parse_exact(text, positives):
    target = parse_findings(text)
    assert target.dtype == np.float32 and target.shape == (14,)
    assert [LABELS[i] for i in np.flatnonzero(target)] == [name for name in LABELS if name in positives]


@pytest.mark.parametrize("text", ["Infiltrate", "cardiomegaly", "Pleural Thickening", "Mass|Tumour", ""])
def test_unknown_label_is_named(text):
    with pytest.raises(LabelError) as err:
        parse_findings(text)
    assert repr(text.split("|")[-1]) in str(err.value)


def test_no_finding_cannot_be_combined():
    with pytest.raises(LabelError, match="No Finding"):
        parse_findings("No Finding|Mass")


def test_subset_keeps_model_order_and_ignores_other_known_labels():
    subset = ("Pneumothorax", "Atelectasis")
    target = parse_findings("Atelectasis|Hernia", subset)
    assert target.tolist() == [0.0, 1.0]


def test_every_row_of_the_full_data_entry_parses():
    import csv
    import gzip

    from support.data import DATA_ENTRY_CSV

    with gzip.open(DATA_ENTRY_CSV, "rt", newline="") as f:
        rows = list(csv.reader(f))[1:]
    targets = np.stack([parse_findings(r[1]) for r in rows])
    assert targets.shape == (112_120, 14)
    # "No Finding" is 60,361 of the 112,120 images in the NIH release: all-zero targets.
    assert int((targets.sum(1) == 0).sum()) == sum(r[1] == "No Finding" for r in rows) == 60_361


def test_check_labels():
    assert check_labels(list(CHESTXRAY8_LABELS)) == CHESTXRAY8_LABELS
    with pytest.raises(LabelError, match="Tumour"):
        check_labels(["Mass", "Tumour"])
    with pytest.raises(LabelError, match="duplicate"):
        check_labels(["Mass", "Mass"])
    with pytest.raises(LabelError, match="empty"):
        check_labels([])
