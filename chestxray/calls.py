"""The one call vocabulary: every renderer (page, JSON, CLI, CSV, PDF, DICOM SR, worklist) shows these words, decided
once in the core by `Prediction.call` and never re-derived.

- positive: the label is validated, the image is in scope and its calibrated probability reaches the threshold;
- negative: the label is validated, the image is in scope and the probability is below the threshold;
- not validated: no call, because the label lacks validation evidence, or the checkpoint has no trust data;
- out of scope: no call, because the image does not look like the radiographs the model was validated on.
"""
from __future__ import annotations

POSITIVE = "positive"
NEGATIVE = "negative"
NOT_VALIDATED = "not validated"
OUT_OF_SCOPE = "out of scope"
CALLS = (POSITIVE, NEGATIVE, NOT_VALIDATED, OUT_OF_SCOPE)
