"""Weighted FedAvg of adapter state dicts, and the checks every client update must pass first."""

from __future__ import annotations

import logging

import torch

from fedcollm.models.lora import AdapterState

log = logging.getLogger(__name__)


class InvalidUpdate(ValueError):
    """A client update does not match the global adapter (keys, shapes, dtypes) or holds non-finite values."""


def validate_update(update: AdapterState, reference: AdapterState, num_examples: int, client: str) -> None:
    if not isinstance(num_examples, int) or num_examples <= 0:
        raise InvalidUpdate(f"client {client}: num_examples must be a positive int, got {num_examples!r}")
    missing, extra = set(reference) - set(update), set(update) - set(reference)
    if missing or extra:
        raise InvalidUpdate(f"client {client}: adapter keys differ (missing {sorted(missing)[:3]}, "
                            f"unexpected {sorted(extra)[:3]})")
    for key, ref in reference.items():
        got = update[key]
        if not isinstance(got, torch.Tensor):
            raise InvalidUpdate(f"client {client}: {key} is not a tensor")
        if got.shape != ref.shape:
            raise InvalidUpdate(f"client {client}: {key} has shape {tuple(got.shape)}, expected {tuple(ref.shape)}")
        if got.dtype != ref.dtype:
            raise InvalidUpdate(f"client {client}: {key} has dtype {got.dtype}, expected {ref.dtype}")
        if not torch.isfinite(got).all():
            raise InvalidUpdate(f"client {client}: {key} holds NaN or Inf")


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


def accept_valid(updates: dict[str, tuple[AdapterState, int]], reference: AdapterState) -> list[tuple[AdapterState, int]]:
    """The updates that pass validation; each rejected one is logged with its client's name."""
    accepted = []
    for client, (state, n) in updates.items():
        try:
            validate_update(state, reference, n, client)
        except InvalidUpdate as err:
            log.warning("rejected update: %s", err)
            continue
        accepted.append((state, n))
    return accepted
