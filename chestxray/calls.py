"""The one call vocabulary: every renderer (page, JSON, CLI, CSV, PDF, DICOM SR, worklist) shows these words, decided
once in the core by `Prediction.call` and never re-derived.

- positive: the label is validated, the image is in scope and its calibrated probability reaches the threshold;
- negative: the label is validated, the image is in scope and the probability is below the threshold;
- not validated: no call, because the label lacks validation evidence, or the checkpoint has no trust data;
- out of scope: no call, because the image does not look like the radiographs the model was validated on.
"""
from __future__ import annotations

from collections.abc import Collection, Mapping

POSITIVE = "positive"
NEGATIVE = "negative"
NOT_VALIDATED = "not validated"
OUT_OF_SCOPE = "out of scope"
CALLS = (POSITIVE, NEGATIVE, NOT_VALIDATED, OUT_OF_SCOPE)


def ranked_labels(probabilities: Mapping[str, float], positive: Collection[str]) -> list[str]:
    """The one order every renderer lists findings in: the labels called positive first, then the rest, each group
    most probable first (ties keep the labels' order)."""
    return sorted(probabilities, key=lambda name: (name not in positive, -probabilities[name]))


def statements(answer: Mapping) -> dict[str, str | None]:
    """The sentences every rendering of one answer carries (page, PDF, SR text): {"scope", "warning", "demo",
    "evidence"}, each a sentence or None. `answer` is Prediction.to_dict() (or a stored result holding it)."""
    card = answer.get("model") or {}
    demo = (card.get("training") or {}).get("demo") if card.get("demo") else None
    rule = card.get("call_rule")
    return {
        "scope": _sentence(answer.get("scope")),
        "warning": answer.get("warning") or None,
        "demo": (f"Demo model: trained on {demo.get('images', '?')} images for {demo.get('minutes', '?')} minutes; "
                 "its answers are meaningless." if isinstance(demo, Mapping) else None),
        "evidence": f"Calls: {rule}." if rule else None,
    }


def _sentence(text: str | None) -> str | None:
    return (text[0].upper() + text[1:] + ("" if text.endswith(".") else ".")) if text else None
