"""How a result's names and numbers are written, in one place: the result page, its tab title, the PDF report, the
worklist and the batch page all print a label, a probability, a threshold or an AUROC through these functions, so
the same quantity reads as the same string everywhere.

The rounding rule: percentages are rounded *down* (chestxray.trust.evidence.format_call), because rounding down is
monotone and a positive call then never reads "p < threshold"; digits are added only when a negative call would read
equal (a label without a call, not validated or out of scope, keeps one decimal).
AUROCs are given to two decimals with their 95% interval.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from ..trust.evidence import format_call

NO_VALUE = "–"  # shown where a number was not recorded
SCALES = {
    "own": "each map scaled to its own peak",
    "shared": "one scale for all labels (the peak over every label's map)",
}


def label_name(label: str) -> str:
    """A label as people write it: "Pleural_Thickening" -> "Pleural Thickening"."""
    return label.replace("_", " ")


def percent(value: float) -> str:
    """A probability or threshold alone, as a percentage rounded down to one decimal: 0.7529 -> "75.2 %"."""
    return format_call(value, value)[0]


def change_text(before: float, after: float) -> str:
    """The change between two probabilities in percentage points, from each one rounded as `percent` shows it (so the
    change is the difference of the two numbers on screen): (0.1234, 0.4567) -> "+33.3 pp"; "0.0 pp" when equal."""
    shown = [math.floor(float(p) * 1000) / 10 for p in (before, after)]
    change = round(shown[1] - shown[0], 1)
    return "0.0 pp" if change == 0 else f"{change:+.1f} pp"


def auroc_text(auroc: float | None, ci: list | tuple | None = None) -> str:
    """"0.81 (0.74–0.88)": the AUROC and its 95% interval to two decimals; "0.81" without an interval; "–" without an
    AUROC (not recorded, or not estimable)."""
    if not _finite(auroc):
        return NO_VALUE
    if ci and len(ci) == 2 and all(_finite(end) for end in ci):
        return f"{auroc:.2f} ({ci[0]:.2f}–{ci[1]:.2f})"
    return f"{auroc:.2f}"


@dataclass(frozen=True)
class FindingText:
    """One label row of a result as every renderer prints it."""

    label: str  # the identifier, e.g. Pleural_Thickening (URLs, CSV headers)
    name: str  # the display name, e.g. Pleural Thickening
    call: str  # the core's word (chestxray.calls), never re-derived here
    probability: str
    threshold: str
    auroc: str  # the evidence AUROC (calibration split) with its 95% interval, or "–"


def finding_text(row: Mapping) -> FindingText:
    """The texts of one row of Prediction.to_dict()["labels"] (label, probability, threshold, call, auroc, auroc_ci);
    the probability and threshold texts never contradict the call (see format_call)."""
    call = row.get("call") or ("positive" if row.get("positive") else "negative")
    probability, threshold = format_call(row["probability"], row["threshold"], call=call)
    return FindingText(label=row["label"], name=label_name(row["label"]), call=call, probability=probability,
                       threshold=threshold, auroc=auroc_text(row.get("auroc"), row.get("auroc_ci")))


def finding_texts(record: Mapping) -> dict[str, FindingText]:
    """{label: FindingText} for every row of a result (Prediction.to_dict() or a stored record)."""
    return {row["label"]: finding_text(row) for row in record["labels"]}


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def strongest_zone(cam: np.ndarray, in_scope: bool = True) -> str:
    """Where a raw (h, w) map peaks, in words: "the lower zone, on the image's right"; "" for a map with no evidence.

    Zones are thirds of the image; sides are the image's (on a PA view the image's right is the patient's left).
    For an image out of scope (in_scope False) the words are the picture's, not a chest's: "the lower third of the
    image, towards its right".
    """
    cam = np.asarray(cam, dtype=np.float32)
    if cam.size == 0 or float(cam.max()) <= 0:
        return ""
    row, col = np.unravel_index(int(np.argmax(cam)), cam.shape)
    third, across = min(2, 3 * int(row) // cam.shape[0]), min(2, 3 * int(col) // cam.shape[1])
    if not in_scope:
        return (f"the {('upper', 'middle', 'lower')[third]} third of the image, "
                f"{('towards its left', 'in its middle', 'towards its right')[across]}")
    side = ("on the image's left", "centrally", "on the image's right")[across]
    return f"the {('upper', 'middle', 'lower')[third]} zone, {side}"
