"""Combining client adapters: the checks each update passes on its own, then, over the whole round, the bound on
each change, the cap on each weight and the aggregator (weighted mean, coordinate-wise median or trimmed mean, Krum).

Median, trimmed mean and Krum are the few torch lines below rather than flwr.server.strategy.aggregate's: flwr is an
optional extra of this package (the in-process engine runs without it), and these work on float64 tensors.
"""

from __future__ import annotations

import logging

import torch

from fedcollm.comm import AdapterState
from fedcollm.config import FederationConfig
from fedcollm.errors import InvalidUpdate
from fedcollm.privacy import clip_change

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


def validate_update(update: AdapterState, reference: AdapterState, num_examples: int, client: str,
                    declared: int | None = None) -> None:
    """Refuse (InvalidUpdate naming `client`) an update unlike `reference` or a count that is not a positive int or
    exceeds the `declared` one, the count the client gave before training (None: none was, as for the secure
    aggregate): a client cannot buy weight by claiming more data than it said it holds."""
    if type(num_examples) is not int or num_examples <= 0:
        raise InvalidUpdate(f"client {client}: num_examples must be a positive int, got {num_examples!r}")
    if declared is not None and num_examples > declared:
        raise InvalidUpdate(f"client {client}: claims {num_examples} examples but declared {declared} before "
                            f"training")
    problem = state_problem(update, reference)
    if problem:
        raise InvalidUpdate(f"client {client}: {problem}")


def change_norm(update: AdapterState, sent: AdapterState) -> float:
    """L2 norm of theta_k - theta over every tensor, in float64."""
    return torch.sqrt(sum(((update[k].double() - sent[k].double()) ** 2).sum() for k in sent)).item()


def bound_changes(updates: dict[str, AdapterState], sent: AdapterState, max_norm: float, ratio: float,
                  action: str) -> dict[str, AdapterState]:
    """The round's updates with every change from `sent` held to one bound: `max_norm` if > 0, else `ratio` x the
    lower median of the round's change norms. The lower median is one client's norm, and while most clients are
    honest it lies between honest ones' (with two updates it is the smaller): one client cannot raise the bound,
    so unlike a multiple of ||theta|| it does not compound over rounds. A change over the bound is scaled onto it
    ("clip") or its update dropped ("reject"), logged with the client's name."""
    norms = {c: change_norm(u, sent) for c, u in updates.items()}
    ranked = sorted(norms.values())
    bound = max_norm if max_norm > 0 else ratio * ranked[(len(ranked) - 1) // 2]
    out = {}
    for client, update in updates.items():
        if norms[client] <= bound:
            out[client] = update
        elif action == "reject":
            log.warning("client %s: update norm %.4g exceeds the round's bound %.4g; rejected", client, norms[client],
                        bound)
        else:
            log.warning("client %s: update norm %.4g clipped to the round's bound %.4g", client, norms[client], bound)
            out[client] = clip_change(update, sent, bound)
    return out


def capped_weights(counts: list[int], max_share: float) -> list[float]:
    """Weights proportional to `counts`, summing to 1, none above `max_share`: water-filling cuts those over it to
    max_share and shares the rest among the others by count, until none is over. With fewer than 1 / max_share
    counts no cap can hold, so the weights are equal."""
    n = len(counts)
    if n * max_share < 1:
        return [1.0 / n] * n
    capped: set[int] = set()
    while True:
        free = sum(c for i, c in enumerate(counts) if i not in capped)
        rest = 1.0 - max_share * len(capped)
        weights = [max_share if i in capped else rest * c / free for i, c in enumerate(counts)]
        over = {i for i, w in enumerate(weights) if i not in capped and w > max_share}
        if not over:
            return weights
        capped |= over


def fedavg(updates: list[tuple[AdapterState, float]]) -> AdapterState:
    """Weighted mean: sum_k w_k * theta_k / sum_k w_k, accumulated in float64."""
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


def trimmed_mean(states: list[AdapterState], trim: int) -> AdapterState:
    """Coordinate-wise mean of what is left once the `trim` smallest and `trim` largest values are dropped."""
    n = len(states)
    return {key: torch.stack([s[key].double() for s in states]).sort(0).values[trim:n - trim].mean(0).to(ref.dtype)
            for key, ref in states[0].items()}


def coordinate_median(states: list[AdapterState]) -> AdapterState:
    """Coordinate-wise median (the mean of the two middle values for an even count)."""
    return trimmed_mean(states, (len(states) - 1) // 2)


def krum(states: list[AdapterState], byzantine: int) -> AdapterState:
    """Krum (Blanchard et al. 2017): the update whose summed squared distance to its n - byzantine - 2 nearest
    others is smallest. With n <= 2 x byzantine + 2 updates its guarantee does not hold (logged); it then scores
    by the nearest one, as flwr's aggregate_krum does."""
    n = len(states)
    if n <= 2 * byzantine + 2:
        log.warning("krum: %d updates, fewer than 2 x federation.byzantine + 3 = %d; it cannot tell out %d "
                    "malicious ones", n, 2 * byzantine + 3, byzantine)
    flat = torch.stack([torch.cat([s[k].double().flatten() for k in states[0]]) for s in states])
    dist = torch.cdist(flat, flat) ** 2
    closest = dist.sort(1).values[:, 1:1 + max(1, n - byzantine - 2)]  # column 0: each one's distance to itself
    return states[int(closest.sum(1).argmin())]


def combine(updates: list[tuple[AdapterState, int]], fed: FederationConfig) -> AdapterState:
    """The accepted updates of one adapter, combined as federation.aggregator says; fedavg weights are the
    example counts capped at federation.max_share (median, trimmed mean and Krum ignore counts)."""
    states = [s for s, _ in updates]
    if fed.aggregator == "median":
        return coordinate_median(states)
    if fed.aggregator == "trimmed_mean":
        return trimmed_mean(states, int(fed.trim_fraction * len(states)))
    if fed.aggregator == "krum":
        return krum(states, fed.byzantine)
    return fedavg(list(zip(states, capped_weights([n for _, n in updates], fed.max_share))))
