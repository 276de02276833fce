"""What makes an answer trustworthy, fitted once after training and stored in the checkpoint under "trust":

- scope: ScopeStats (scope.py), fitted on the training split, its limit chosen on the calibration split;
- calibration: per-label Platt parameters (calibration.py), fitted on the calibration split's logits;
- evidence: per-label evidence on the calibration split and whether the label may be called (evidence.py);
- orientation: the mirrored/rotated check (orientation.py), fitted on copies of training images;
- report: ECE and Brier per label on the calibration split before and after calibration;
- reference: the calibration split's distributions the drift monitor compares live analyses with (monitor.py).

The calibration split (data.make_splits) holds patients that neither fitted the weights nor chose the epoch, so the
thresholds, the evidence and the scope limit are not fitted on the images that selected the model. Checkpoints trained
before it existed had only a validation split, which then served both (data.rebuild_splits says so).

The checkpoint keeps its contract: {"format", "model", "meta", "train", "trust"} with tensors and plain data only,
so torch.load(weights_only=True) reads it. A checkpoint without "trust" (or with only some parts) still loads; what
is missing is reported as not available. Meta.thresholds are on the calibrated scale when calibration is present.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from ..meta import TRANSITION_CHANNELS
from ..metrics import choose_thresholds
from ..monitor import Reference, fit_reference
from .calibration import Calibration, calibration_report, fit_calibration
from .evidence import label_evidence
from .orientation import THUMBNAIL, Orientation, OrientationError, collect_orientation, fit_orientation
from .scope import DEFAULT_METHOD, DEFAULT_PERCENTILE, ScopeStats, collect_outputs, fit_scope

if TYPE_CHECKING:
    import torch

TRUST_KEY = "trust"
TRUST_FORMAT = 1


class TrustError(ValueError):
    """A checkpoint's "trust" entry is malformed; the message says what to refit."""


@dataclass(frozen=True)
class Trust:
    """The fitted trust parts of a checkpoint; any part may be None (not available)."""

    scope: ScopeStats | None = None
    calibration: Calibration | None = None
    evidence: dict[str, dict] | None = None
    report: dict = field(default_factory=dict, hash=False)
    orientation: Orientation | None = None
    reference: Reference | None = None

    def to_dict(self) -> dict:
        """Plain data (tensors only inside scope and orientation) for torch.save."""
        return {"format": TRUST_FORMAT,
                "scope": self.scope.to_dict() if self.scope is not None else None,
                "calibration": self.calibration.to_dict() if self.calibration is not None else None,
                "evidence": self.evidence, "report": dict(self.report),
                "orientation": self.orientation.to_dict() if self.orientation is not None else None,
                "reference": self.reference.to_dict() if self.reference is not None else None}

    @classmethod
    def from_checkpoint(cls, obj: Mapping, labels: Sequence[str]) -> Trust:
        """The "trust" entry of a loaded checkpoint dict; Trust() when absent. Raises TrustError when malformed."""
        d = obj.get(TRUST_KEY) if isinstance(obj, Mapping) else None
        if d is None:
            return cls()
        if not isinstance(d, Mapping) or d.get("format") != TRUST_FORMAT:
            raise TrustError(f"the checkpoint's '{TRUST_KEY}' entry is not format {TRUST_FORMAT}; refit it with "
                             "Model_Training/fit_trust.py")
        try:
            # The channel count is the model's: a scope of another shape would fail at the first prediction.
            scope = ScopeStats.from_dict(d["scope"], TRANSITION_CHANNELS) if d.get("scope") is not None else None
            calibration = Calibration.from_dict(d["calibration"]) if d.get("calibration") is not None else None
            orientation = Orientation.from_dict(d["orientation"]) if d.get("orientation") is not None else None
            reference = Reference.from_dict(d["reference"]) if d.get("reference") is not None else None
        except ValueError as exc:
            raise TrustError(f"{exc}") from None
        if calibration is not None and calibration.labels != tuple(labels):
            raise TrustError(f"the calibration's labels {list(calibration.labels)} differ from the model's "
                             f"{list(labels)}; refit it with Model_Training/fit_trust.py")
        if orientation is not None and orientation.dims != TRANSITION_CHANNELS + THUMBNAIL**2:
            raise TrustError(f"the orientation check reads {orientation.dims} features per image; this model gives "
                             f"{TRANSITION_CHANNELS + THUMBNAIL**2}; refit it with Model_Training/fit_trust.py")
        evidence = d.get("evidence")
        if evidence is not None and (not isinstance(evidence, Mapping) or set(evidence) != set(labels)):
            raise TrustError("the checkpoint's evidence does not cover exactly the model's labels; refit it with "
                             "Model_Training/fit_trust.py")
        return cls(scope=scope, calibration=calibration, evidence=dict(evidence) if evidence is not None else None,
                   report=dict(d.get("report") or {}), orientation=orientation, reference=reference)


def fit_trust(
    model: torch.nn.Module,
    labels: Sequence[str],
    train_loader,
    calibration_loader,
    calibration_patients: np.ndarray,
    device: torch.device | str,
    normalize,
    threshold_rule: str = "f1",
    scope_method: str = DEFAULT_METHOD,
    percentile: float = DEFAULT_PERCENTILE,
    n_boot: int = 1000,
    seed: int = 0,
    progress: bool = False,
    orientation_loader=None,
    split_name: str = "calibration",
) -> tuple[Trust, np.ndarray]:
    """Fit scope (train), its limit, calibration, thresholds and evidence (calibration split), and the orientation
    check (orientation_loader: training images, when given) -> (Trust, thresholds (L,)).

    One eval pass over each loader. calibration_patients: (N,) patient id per calibration dataset index. Thresholds
    are chosen on the calibrated scale by `threshold_rule`. split_name: what the calibration loader holds, as
    recorded in the report and the evidence ("validation" for a checkpoint without a calibration split).
    """
    _, train_pooled, _, _, train_images = collect_outputs(model, train_loader, device, normalize, progress)
    cal_logits, cal_pooled, y_cal, cal_idx, cal_images = collect_outputs(model, calibration_loader, device,
                                                                         normalize, progress)
    scope = fit_scope(train_pooled, scope_method, train_images, cal_pooled, cal_images, percentile)
    scope = scope.with_limit(scope.score(cal_pooled, cal_images), percentile)
    calibration = fit_calibration(cal_logits, y_cal, labels)
    raw = Calibration.identity(labels).apply(cal_logits)
    calibrated = calibration.apply(cal_logits)
    thresholds = choose_thresholds(y_cal, calibrated, threshold_rule)
    patients = np.asarray(calibration_patients)[cal_idx]
    evidence = label_evidence(y_cal, calibrated, labels, patients, thresholds, threshold_rule, n_boot, seed,
                              split=split_name)
    report = {"split": split_name, "n_images": int(len(y_cal)), "n_patients": int(len(np.unique(patients))),
              "n_train_images": int(len(train_pooled)),
              "before": calibration_report(y_cal, raw, labels), "after": calibration_report(y_cal, calibrated, labels)}
    orientation = None
    if orientation_loader is not None:
        try:
            features, classes, n_images = collect_orientation(model, orientation_loader, device, normalize,
                                                              progress=progress)
            orientation = fit_orientation(features, classes, n_images=n_images)
        except OrientationError as exc:  # e.g. no readable image: the rest of the trust data still holds
            report["orientation_error"] = str(exc)
    reference = fit_reference(calibrated, labels, y_cal, thresholds, scope.score(cal_pooled, cal_images), scope.limit,
                              cal_images, normalize.mean[0], normalize.std[0], split=split_name)
    return Trust(scope=scope, calibration=calibration, evidence=evidence, report=report,
                 orientation=orientation, reference=reference), thresholds
