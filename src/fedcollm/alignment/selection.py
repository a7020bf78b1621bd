"""Which candidate distribution an example learns from (FedMKT, after FuseLLM): pure functions on CE tensors.

A candidate's reward on an example is exp(-CE) of its distribution against the example's gold tokens, so the
lower the CE the better the fit. A NaN CE (a broken candidate) counts as +inf: reward 0, never chosen.
"""

from __future__ import annotations

import torch


def rewards(candidate_ce: torch.Tensor) -> torch.Tensor:
    """exp(-CE), elementwise; NaN CE gives reward 0."""
    return torch.exp(-candidate_ce.nan_to_num(nan=float("inf")))


def select_greater(candidate_ce: torch.Tensor) -> torch.Tensor:
    """LongTensor[B]: for each example the candidate (rows of [N, B]) with the highest reward, i.e. lowest CE.

    The learner's own distribution is one of the candidates. Ties go to the lowest index, so a learner that
    puts its own distribution at row 0 keeps it on a tie (FuseLLM's argmax does the same).
    """
    return candidate_ce.nan_to_num(nan=float("inf")).argmin(dim=0)


def select_weighted_mean(candidate_ce: torch.Tensor) -> torch.Tensor:
    """Weights [N, B], summing to 1 over candidates: softmax over the rewards exp(-CE), as FuseLLM/FATE-LLM.

    The softmax is over rewards in [0, 1], not over -CE: weights stay within a factor e of each other, so this
    is a mild tilt towards better-fitting candidates, never a hard choice. Tied candidates weigh the same.
    """
    return torch.softmax(rewards(candidate_ce), dim=0)


def select_dual_min_ce(teacher_ce: torch.Tensor, student_ce: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(best teacher index [B], keep mask [B]): keep an example only where the best teacher beats the student.

    The best teacher is the one with the lowest CE (ties to the lowest index); it must be strictly below the
    student's own CE, so a tie (or a NaN student CE) rejects the example. A batch can come back with nothing
    kept: the caller's loss then sees an all-zero mask.
    """
    best = select_greater(teacher_ce)
    best_ce = teacher_ce.nan_to_num(nan=float("inf")).gather(0, best.unsqueeze(0)).squeeze(0)
    return best, best_ce < student_ce
