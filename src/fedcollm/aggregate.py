"""Weighted FedAvg of adapter state dicts, and the checks every client update must pass first."""

from __future__ import annotations

import logging

import torch

from fedcollm.errors import InvalidUpdate
from fedcollm.models.lora import AdapterState

log = logging.getLogger(__name__)


def state_problem(state: AdapterState, reference: AdapterState | None) -> str | None:
    """What makes `state` unusable where `reference` is expected (keys, shapes, dtypes, finite values), or None."""
    if reference is not None:
        missing, extra = sorted(set(reference) - set(state)), sorted(set(state) - set(reference))
        if missing or extra:
            return f"adapter keys differ (missing {missing[:3]}, unexpected {extra[:3]})"
    for key, got in state.items():
        if not isinstance(got, torch.Tensor):
            return f"{key} is not a tensor"
        ref = reference[key] if reference is not None else None
        if ref is not None and got.shape != ref.shape:
            return f"{key} has shape {tuple(got.shape)}, expected {tuple(ref.shape)}"
        if ref is not None and got.dtype != ref.dtype:
            return f"{key} has dtype {got.dtype}, expected {ref.dtype}"
        if not got.is_floating_point():
            return f"{key} has dtype {got.dtype}, expected a floating-point tensor"
        if not torch.isfinite(got).all():
            return f"{key} holds NaN or Inf"
    return None


def validate_update(update: AdapterState, reference: AdapterState, num_examples: int, client: str) -> None:
    if type(num_examples) is not int or num_examples <= 0:
        raise InvalidUpdate(f"client {client}: num_examples must be a positive int, got {num_examples!r}")
    problem = state_problem(update, reference)
    if problem:
        raise InvalidUpdate(f"client {client}: {problem}")


def fedavg(updates: list[tuple[AdapterState, int]]) -> AdapterState:
    """Sample-weighted mean: sum_k n_k * theta_k / sum_k n_k, accumulated in float64."""
    if not updates:
        raise ValueError("fedavg needs at least one update")
    total = sum(n for _, n in updates)
    out = {}
    for key, ref in updates[0][0].items():
        acc = torch.zeros(ref.shape, dtype=torch.float64)
        for state, n in updates:
            acc += state[key].to(torch.float64) * n
        out[key] = (acc / total).to(ref.dtype)
    return out
