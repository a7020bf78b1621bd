"""Selection of the distribution each example learns from: rewards exp(-CE), ties, NaN and empty batches."""

import math

import torch

from fedcollm.alignment.selection import (
    rewards,
    select_dual_min_ce,
    select_greater,
    select_weighted_mean,
)
from fedcollm.alignment.sequence import soft_target_ce

NAN = float("nan")


def test_rewards_are_exp_minus_ce_and_nan_is_zero():
    assert torch.allclose(rewards(torch.tensor([0.0, math.log(2), NAN])), torch.tensor([1.0, 0.5, 0.0]))


def test_select_greater_lowest_ce_ties_to_lowest_index():
    ce = torch.tensor([[1.0, 2.0, 0.5, NAN],
                       [0.5, 2.0, 0.7, 3.0],
                       [2.0, 1.0, 0.5, 3.0]])
    # column 2: rows 0 and 2 tie at 0.5 -> row 0; column 3: row 0 is NaN -> rows 1 and 2 tie -> row 1
    assert select_greater(ce).tolist() == [1, 2, 0, 1]


def test_select_weighted_mean_is_softmax_over_rewards():
    ce = torch.tensor([[0.0, 1.0], [math.log(2), 1.0]])
    w = select_weighted_mean(ce)
    first = math.exp(1.0) / (math.exp(1.0) + math.exp(0.5))  # rewards 1 and 0.5
    assert torch.allclose(w[:, 0], torch.tensor([first, 1 - first]))
    assert torch.allclose(w[:, 1], torch.tensor([0.5, 0.5]))  # tied candidates weigh the same
    # even a hopeless candidate keeps weight: rewards 1 and 0 -> e : 1
    w = select_weighted_mean(torch.tensor([[0.0], [NAN]]))
    assert torch.allclose(w[:, 0], torch.tensor([math.e / (math.e + 1), 1 / (math.e + 1)]))


def test_select_dual_min_ce_keeps_only_strict_improvements():
    teacher = torch.tensor([[1.0, 3.0, 2.0, 0.5, NAN],
                            [1.5, 2.5, 2.0, 0.4, 1.0]])
    student = torch.tensor([2.0, 2.0, 2.0, NAN, 1.5])
    best, keep = select_dual_min_ce(teacher, student)
    assert best.tolist() == [0, 1, 0, 1, 1]
    # 1.0 < 2.0 kept; 2.5 > 2.0 rejected; 2.0 == 2.0 tie rejected; NaN student rejected; NaN teacher skipped
    assert keep.tolist() == [True, False, False, False, True]


def test_select_dual_min_ce_all_rejected_batch_gives_zero_loss():
    best, keep = select_dual_min_ce(torch.tensor([[3.0, 4.0], [5.0, 6.0]]), torch.tensor([1.0, 1.0]))
    assert best.tolist() == [0, 0] and not keep.any()
    logits = torch.randn(2, 3, 5, requires_grad=True)
    mask = torch.ones(2, 3) * keep.unsqueeze(-1)
    loss = soft_target_ce(logits, torch.zeros(2, 3, 1, dtype=torch.long), torch.ones(2, 3, 1), mask)
    loss.backward()
    assert loss.item() == 0.0 and logits.grad.abs().sum().item() == 0.0
