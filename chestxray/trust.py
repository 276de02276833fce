"""What makes an answer trustworthy, fitted once after training and stored in the checkpoint under "trust":

- scope: ScopeStats (scope.py), fitted on the training split, its limit chosen on the validation split;
- calibration: per-label Platt parameters (calibration.py), fitted on the validation split's logits;
- evidence: per-label validation evidence and whether the label may be called (evidence.py);
- report: ECE and Brier per label on the validation split before and after calibration.

The checkpoint keeps its contract: {"format", "model", "meta", "train", "trust"} with tensors and plain data only,
so torch.load(weights_only=True) reads it. A checkpoint without "trust" (or with only some parts) still loads; what
is missing is reported as not available. Meta.thresholds are on the calibrated scale when calibration is present.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from .calibration import Calibration, calibration_report, fit_calibration
from .evidence import label_evidence
from .metrics import choose_thresholds
from .model import TRANSITION_CHANNELS
from .scope import DEFAULT_METHOD, DEFAULT_PERCENTILE, ScopeStats, collect_outputs, fit_scope

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

    def to_dict(self) -> dict:
        """Plain data (tensors only inside scope) for torch.save."""
        return {"format": TRUST_FORMAT,
                "scope": self.scope.to_dict() if self.scope is not None else None,
                "calibration": self.calibration.to_dict() if self.calibration is not None else None,
                "evidence": self.evidence, "report": dict(self.report)}

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
        except ValueError as exc:
            raise TrustError(f"{exc}") from None
        if calibration is not None and calibration.labels != tuple(labels):
            raise TrustError(f"the calibration's labels {list(calibration.labels)} differ from the model's "
                             f"{list(labels)}; refit it with Model_Training/fit_trust.py")
        evidence = d.get("evidence")
        if evidence is not None and (not isinstance(evidence, Mapping) or set(evidence) != set(labels)):
            raise TrustError("the checkpoint's evidence does not cover exactly the model's labels; refit it with "
                             "Model_Training/fit_trust.py")
        return cls(scope, calibration, dict(evidence) if evidence is not None else None, dict(d.get("report") or {}))


def fit_trust(
    model: torch.nn.Module,
    labels: Sequence[str],
    train_loader,
    val_loader,
    val_patients: np.ndarray,
    device: torch.device | str,
    normalize,
    threshold_rule: str = "f1",
    scope_method: str = DEFAULT_METHOD,
    percentile: float = DEFAULT_PERCENTILE,
    n_boot: int = 1000,
    seed: int = 0,
    progress: bool = False,
) -> tuple[Trust, np.ndarray]:
    """Fit scope (train), its limit, calibration, thresholds and evidence (validation) -> (Trust, thresholds (L,)).

    One eval pass over each loader. val_patients: (N_val,) patient id per validation dataset index. Thresholds are
    chosen on the calibrated scale by `threshold_rule`.
    """
    _, train_pooled, _, _, train_images = collect_outputs(model, train_loader, device, normalize, progress)
    val_logits, val_pooled, y_val, val_idx, val_images = collect_outputs(model, val_loader, device, normalize,
                                                                         progress)
    scope = fit_scope(train_pooled, scope_method, train_images, val_pooled, val_images, percentile)
    scope = scope.with_limit(scope.score(val_pooled, val_images), percentile)
    calibration = fit_calibration(val_logits, y_val, labels)
    raw = Calibration.identity(labels).apply(val_logits)
    calibrated = calibration.apply(val_logits)
    thresholds = choose_thresholds(y_val, calibrated, threshold_rule)
    patients = np.asarray(val_patients)[val_idx]
    evidence = label_evidence(y_val, calibrated, labels, patients, thresholds, threshold_rule, n_boot, seed)
    report = {"split": "validation", "n_images": int(len(y_val)), "n_train_images": int(len(train_pooled)),
              "before": calibration_report(y_val, raw, labels), "after": calibration_report(y_val, calibrated, labels)}
    return Trust(scope, calibration, evidence, report), thresholds
