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


def bound_update(update: AdapterState, sent: AdapterState, num_examples: int, client: str, max_examples: int,
                 max_ratio: float, action: str) -> tuple[AdapterState, int]:
    """Apply the robustness policy to one validated update: cap its example count, bound the norm of its change.

    The change theta_k - theta is measured in float64 against the adapter the client was sent; one over
    `max_ratio` * ||theta|| is scaled down onto the bound ("clip") or refused ("reject"). Either is logged with
    the client's name, so a client cannot buy the average with a huge count or a scaled-up update.
    """
    if num_examples > max_examples:
        log.warning("client %s: claimed %d examples, counted as federation.max_examples = %d", client, num_examples,
                    max_examples)
        num_examples = max_examples
    delta = {k: update[k].double() - sent[k].double() for k in sent}
    norm = torch.sqrt(sum((d * d).sum() for d in delta.values())).item()
    bound = max_ratio * torch.sqrt(sum((t.double() ** 2).sum() for t in sent.values())).item()
    if norm > bound:
        if action == "reject":
            raise InvalidUpdate(f"client {client}: update norm {norm:.4g} exceeds the bound {bound:.4g} "
                                f"(federation.max_update_ratio x ||adapter||)")
        log.warning("client %s: update norm %.4g clipped to %.4g (federation.max_update_ratio)", client, norm, bound)
        scale = bound / norm
        update = {k: (sent[k].double() + delta[k] * scale).to(sent[k].dtype) for k in sent}
    return update, num_examples


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
