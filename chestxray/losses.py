"""Multi-label losses on logits (N, L) and 0/1 targets (N, L); each returns a scalar float32 tensor.

`weighted_bce` is Wang et al. 2017's weighted cross-entropy (W-CEL, ChestX-ray8 paper, eq. 1):
    beta_P = (|P| + |N|) / |P|,  beta_N = (|P| + |N|) / |N|,
with |P| and |N| the counts of 1s and 0s in the batch's whole label matrix, and
    loss = 1/(N*L) * sum_ij [ beta_P * y_ij * -log p_ij + beta_N * (1 - y_ij) * -log(1 - p_ij) ],  p = sigmoid(logit).
Averaging over the N*L entries makes it the mean -log p over positives plus the mean -log(1-p) over negatives, so
the rare positives weigh as much as the negatives whatever their frequency. A batch without positives (or without
negatives) has no such term: its beta is guarded (never a division by zero) and multiplies only zeros.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

LOSSES = ("wbce", "wbce-per-label", "bce", "pos-weight")
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def wang_betas(targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(beta_P, beta_N) counted over the whole (N, L) target matrix; each guarded to be finite (0-d tensors)."""
    targets = targets.float()
    total = torch.tensor(float(targets.numel()), device=targets.device)
    positives = targets.sum()
    negatives = total - positives
    return total / positives.clamp(min=1.0), total / negatives.clamp(min=1.0)


def weighted_bce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Wang et al.'s weighted cross-entropy, betas over the batch's whole label matrix (module docstring)."""
    logits, targets = logits.float(), targets.float()
    beta_p, beta_n = wang_betas(targets)
    weight = targets * beta_p + (1.0 - targets) * beta_n
    return F.binary_cross_entropy_with_logits(logits, targets, weight=weight, reduction="mean")


def weighted_bce_per_label(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-label variant: beta_P,c = N/|P_c|, beta_N,c = N/|N_c| counted in each column of the batch."""
    logits, targets = logits.float(), targets.float()
    n = float(targets.shape[0])
    positives = targets.sum(dim=0)
    beta_p = n / positives.clamp(min=1.0)
    beta_n = n / (n - positives).clamp(min=1.0)
    weight = targets * beta_p + (1.0 - targets) * beta_n
    return F.binary_cross_entropy_with_logits(logits, targets, weight=weight, reduction="mean")


def pos_weight_from_targets(train_targets: np.ndarray) -> torch.Tensor:
    """(L,) negatives/positives per label over the training targets (N, L); a label without positives gets 1."""
    y = np.asarray(train_targets, dtype=np.float64)
    if y.ndim != 2 or y.shape[0] == 0:
        raise ValueError(f"expected a non-empty (N, L) target matrix, got shape {y.shape}")
    positives = y.sum(axis=0)
    negatives = y.shape[0] - positives
    ratio = np.divide(negatives, positives, out=np.ones_like(positives), where=positives > 0)
    return torch.as_tensor(ratio, dtype=torch.float32)


def build_loss(name: str, train_targets: np.ndarray | None = None) -> LossFn:
    """The loss called `name` (one of LOSSES); 'pos-weight' needs the training split's targets (N, L)."""
    if name == "wbce":
        return weighted_bce
    if name == "wbce-per-label":
        return weighted_bce_per_label
    if name == "bce":
        return lambda logits, targets: F.binary_cross_entropy_with_logits(logits.float(), targets.float())
    if name == "pos-weight":
        if train_targets is None:
            raise ValueError("the pos-weight loss needs the training targets to count positives and negatives")
        pos_weight = pos_weight_from_targets(train_targets)

        def loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            return F.binary_cross_entropy_with_logits(
                logits.float(), targets.float(), pos_weight=pos_weight.to(logits.device)
            )

        return loss
    raise ValueError(f"unknown loss {name!r}; choose one of {LOSSES}")
