"""A checkpoint with a trust entry for the tests of trustworthy answers (test_trust_answers, e2e)."""
from __future__ import annotations

from pathlib import Path

import torch

from chestxray.checkpoint import load_checkpoint, safe_torch_load
from chestxray.data import XrayDataset, collate_batch, load_index
from chestxray.transforms import build_normalize, build_transform
from chestxray.trust import TRUST_KEY, Trust
from chestxray.trust.calibration import fit_calibration
from chestxray.trust.evidence import MIN_POSITIVE_PATIENTS
from chestxray.trust.scope import collect_outputs, fit_scope

VALIDATED = "Effusion"  # the one label the evidence validates


def make_trusted_checkpoint(path: Path, tiny_checkpoint: Path, nih_dir: Path) -> Path:
    """The tiny checkpoint with a trust entry: scope (mahalanobis+image) fitted on 80 real small NIH images (limit:
    the largest score of 40 others), Platt calibration, evidence that validates only Effusion, thresholds 0 (so
    every probability reaches its threshold and only the rules can withhold a call).

    The 120 images are the 64 and 128 px copies (the transform resizes both to the checkpoint's 64 px): the bundled
    sample holds only 60 at 64 px, too few for 80 + 40. The full-size images/ are left out, so the tests' held-out
    image is never among them."""
    model, meta, _ = load_checkpoint(tiny_checkpoint)
    index = load_index(nih_dir, allow_missing=True)
    small = index[index["path"].astype(str).str.contains(r"[/\\]images_(?:64|128)[/\\]")]
    small = small.sort_values("path", kind="stable").iloc[:120].reset_index(drop=True)
    assert len(small) == 120, f"{nih_dir} has only {len(small)} images at 64/128 px; the trusted checkpoint needs 120"
    loader = torch.utils.data.DataLoader(XrayDataset(small, meta.labels, build_transform(meta)), batch_size=40,
                                         collate_fn=collate_batch)
    logits, pooled, y, _, thumbs = collect_outputs(model, loader, "cpu", build_normalize(meta))
    scope = fit_scope(pooled[:80], "mahalanobis+image", thumbs[:80], pooled[80:], thumbs[80:], 100.0)
    scope = scope.with_limit(scope.score(pooled[80:], thumbs[80:]), 100.0)
    evidence = {name: {"positives": 3, "negatives": 37, "auroc": 0.4, "auroc_ci": [0.2, 0.6], "threshold": 0.0,
                       "threshold_rule": "f1", "validated": False} for name in meta.labels}
    evidence[VALIDATED] = {"positives": MIN_POSITIVE_PATIENTS + 20, "negatives": 90,
                           "positive_patients": MIN_POSITIVE_PATIENTS + 20, "negative_patients": 90, "auroc": 0.8,
                           "auroc_ci": [0.7, 0.9], "sensitivity": 0.8, "sensitivity_ci": [0.6, 0.9],
                           "specificity": 0.85, "specificity_ci": [0.77, 0.91], "threshold": 0.0,
                           "threshold_rule": "f1", "validated": True}
    trust = Trust(scope, fit_calibration(logits, y, meta.labels), evidence, {})
    obj = safe_torch_load(tiny_checkpoint)
    obj["meta"]["thresholds"] = [0.0] * len(meta.labels)
    obj[TRUST_KEY] = trust.to_dict()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(obj, path)
    return path
