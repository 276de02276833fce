"""Losses against hand-worked values (Wang et al. 2017's weighted cross-entropy and its variants)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from chestxray.losses import (
    LOSSES,
    build_loss,
    pos_weight_from_targets,
    wang_betas,
    weighted_bce,
    weighted_bce_per_label,
)


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _hand_wbce(logits: list[list[float]], targets: list[list[int]]) -> float:
    """W-CEL written out entry by entry: betas over the whole matrix, averaged over its N*L entries."""
    flat = [(x, y) for row_x, row_y in zip(logits, targets) for x, y in zip(row_x, row_y)]
    n_pos = sum(y for _, y in flat)
    n_neg = len(flat) - n_pos
    total = 0.0
    for x, y in flat:
        p = _sigmoid(x)
        total += (len(flat) / n_pos) * -math.log(p) if y == 1 else (len(flat) / n_neg) * -math.log(1 - p)
    return total / len(flat)


def test_weighted_bce_equals_hand_worked_batch():
    logits = [[0.0, 2.0, -1.0], [1.5, -0.5, 0.25]]
    targets = [[1, 0, 0], [1, 0, 1]]
    # |P| = 3, |N| = 3: beta_P = beta_N = 2. Entry losses: -ln sigma(0) = ln 2, -ln(1 - sigma(2)), ...
    by_hand = (2 * math.log(2) + 2 * -math.log(1 - _sigmoid(2.0)) + 2 * -math.log(1 - _sigmoid(-1.0))
               + 2 * -math.log(_sigmoid(1.5)) + 2 * -math.log(1 - _sigmoid(-0.5)) + 2 * -math.log(_sigmoid(0.25))) / 6
    loss = weighted_bce(torch.tensor(logits), torch.tensor(targets, dtype=torch.float32))
    assert loss.item() == pytest.approx(by_hand, rel=1e-6)
    assert loss.item() == pytest.approx(_hand_wbce(logits, targets), rel=1e-6)


def test_weighted_bce_unbalanced_batch_betas():
    logits = [[0.3, -1.2, 2.0, 0.0], [-0.7, 0.9, -2.5, 1.1]]
    targets = [[0, 0, 1, 0], [0, 0, 0, 0]]  # |P| = 1, |N| = 7
    beta_p, beta_n = wang_betas(torch.tensor(targets, dtype=torch.float32))
    assert beta_p.item() == pytest.approx(8.0)
    assert beta_n.item() == pytest.approx(8.0 / 7.0)
    loss = weighted_bce(torch.tensor(logits), torch.tensor(targets, dtype=torch.float32))
    assert loss.item() == pytest.approx(_hand_wbce(logits, targets), rel=1e-6)
    # Averaged over N*L entries it is the mean positive term plus the mean negative term.
    p = torch.sigmoid(torch.tensor(logits))
    y = torch.tensor(targets, dtype=torch.bool)
    assert loss.item() == pytest.approx((-torch.log(p[y])).mean().item() + (-torch.log(1 - p[~y])).mean().item(),
                                        rel=1e-6)


def test_weighted_bce_without_positives_is_finite_and_plain_negative_term():
    logits = torch.tensor([[0.5, -1.0], [2.0, 0.0]], requires_grad=True)
    targets = torch.zeros(2, 2)
    loss = weighted_bce(logits, targets)
    # beta_N = (0 + 4) / 4 = 1: the mean of -ln(1 - p) over the four entries.
    by_hand = sum(-math.log(1 - _sigmoid(x)) for x in (0.5, -1.0, 2.0, 0.0)) / 4
    assert loss.item() == pytest.approx(by_hand, rel=1e-6)
    loss.backward()
    assert torch.isfinite(logits.grad).all()


def test_weighted_bce_without_negatives_is_finite():
    logits = torch.tensor([[0.5, -1.0]], requires_grad=True)
    loss = weighted_bce(logits, torch.ones(1, 2))
    assert loss.item() == pytest.approx((-math.log(_sigmoid(0.5)) - math.log(_sigmoid(-1.0))) / 2, rel=1e-6)
    loss.backward()
    assert torch.isfinite(logits.grad).all()


def test_weighted_bce_is_float32_for_half_logits():
    loss = weighted_bce(torch.tensor([[0.5, -1.0]], dtype=torch.float16), torch.tensor([[1.0, 0.0]]))
    assert loss.dtype == torch.float32


def test_per_label_variant_hand_worked():
    logits = [[0.0, 1.0], [2.0, -1.0], [-0.5, 0.5]]
    targets = [[1, 0], [0, 0], [1, 1]]
    # column 0: |P| = 2, |N| = 1 of N = 3 -> beta_P = 1.5, beta_N = 3; column 1: |P| = 1, |N| = 2 -> 3, 1.5
    beta = {(0, 1): 1.5, (0, 0): 3.0, (1, 1): 3.0, (1, 0): 1.5}
    total = 0.0
    for i in range(3):
        for j in range(2):
            p, y = _sigmoid(logits[i][j]), targets[i][j]
            total += beta[(j, y)] * (-math.log(p) if y else -math.log(1 - p))
    loss = weighted_bce_per_label(torch.tensor(logits), torch.tensor(targets, dtype=torch.float32))
    assert loss.item() == pytest.approx(total / 6, rel=1e-6)


def test_pos_weight_from_training_targets():
    y = np.array([[1, 0, 0], [0, 0, 1], [0, 0, 1], [0, 0, 0]], dtype=np.float32)
    # label 0: 3 negatives / 1 positive; label 1: no positives -> 1; label 2: 2 / 2
    assert pos_weight_from_targets(y).tolist() == [3.0, 1.0, 1.0]
    loss = build_loss("pos-weight", y)
    logits = torch.tensor([[0.2, -0.3, 1.0]])
    target = torch.tensor([[1.0, 0.0, 1.0]])
    expected = (3.0 * -math.log(_sigmoid(0.2)) - math.log(1 - _sigmoid(-0.3)) - math.log(_sigmoid(1.0))) / 3
    assert loss(logits, target).item() == pytest.approx(expected, rel=1e-6)


def test_build_loss_names_and_errors():
    logits, target = torch.tensor([[0.2, -0.3]]), torch.tensor([[1.0, 0.0]])
    assert build_loss("bce")(logits, target).item() == pytest.approx(
        F.binary_cross_entropy_with_logits(logits, target).item())
    for name in LOSSES:
        fn = build_loss(name, np.array([[1.0, 0.0], [0.0, 0.0]]))
        assert torch.isfinite(fn(logits, target))
    with pytest.raises(ValueError, match="unknown loss 'focal'"):
        build_loss("focal")
    with pytest.raises(ValueError, match="training targets"):
        build_loss("pos-weight")
