"""The 14 NIH ChestX-ray14 labels in canonical order, and parsing of the "Finding Labels" column."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# NIH order (Wang et al. 2017, Data_Entry_2017 README). Every label list in the project is this one or a subset
# of it, recorded in order in the checkpoint.
LABELS: tuple[str, ...] = (
    "Atelectasis",
    "Cardiomegaly",
    "Effusion",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pneumonia",
    "Pneumothorax",
    "Consolidation",
    "Edema",
    "Emphysema",
    "Fibrosis",
    "Pleural_Thickening",
    "Hernia",
)
# The 8 labels of ChestX-ray8 (the CVPR 2017 paper's benchmark).
CHESTXRAY8_LABELS: tuple[str, ...] = LABELS[:8]
NO_FINDING = "No Finding"


class LabelError(ValueError):
    """A label string or label list that the project does not know."""


def check_labels(labels: Sequence[str]) -> tuple[str, ...]:
    """Validate a model's label list (a non-empty, duplicate-free subset of LABELS); returns it as a tuple."""
    labels = tuple(labels)
    if not labels:
        raise LabelError("the label list is empty")
    unknown = [name for name in labels if name not in LABELS]
    if unknown:
        raise LabelError(f"unknown label(s) {unknown}; known labels are {list(LABELS)}")
    if len(set(labels)) != len(labels):
        raise LabelError(f"duplicate label(s) in {list(labels)}")
    return labels


def parse_findings(text: str, labels: Sequence[str] = LABELS) -> np.ndarray:
    """Parse a pipe-separated "Finding Labels" value into a (len(labels),) float32 0/1 target.

    Names match exactly (case and underscores included). "No Finding" is the all-zero target. A known NIH label
    that the model does not use is ignored; a name that is not an NIH label raises LabelError naming it.
    """
    index = {name: i for i, name in enumerate(labels)}
    target = np.zeros(len(labels), dtype=np.float32)
    names = [part.strip() for part in str(text).split("|")]
    for name in names:
        if name == NO_FINDING:
            if len(names) > 1:
                raise LabelError(f"'{NO_FINDING}' combined with other labels in {text!r}")
            continue
        if name not in LABELS:
            raise LabelError(f"unknown label {name!r} in {text!r}; known labels are {list(LABELS)} and '{NO_FINDING}'")
        if name in index:
            target[index[name]] = 1.0
    return target
