"""Client-level differential privacy on the shared adapter.

Each sampled client's change is clipped to L2 norm C and the server releases
    sent + (sum of the accepted clipped changes + N(0, sum_noise_std^2)) / expected_clients:
a fixed denominator, so a rejected or missing client is a zero change and never lowers the noise. Under DP the noise
and the client sample are drawn from generators keyed by a secret only the server holds (`RunDir.server_secret`),
never from the public run.seed, and dp-accounting's RDP accountant prices the sampled Gaussian mechanism at the
sensitivity of the sum under the neighbouring relation its sampling scheme admits (`dp_event`).

central: the server sees the clipped updates before its noise (SecAgg+ with dp.mode = distributed hides them). The
server's mutual distillation on D^a runs after the noise and touches no client data: post-processing.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import random

import torch

from fedcollm.comm import AdapterState
from fedcollm.config import DPConfig
from fedcollm.errors import ConfigError


def clip_change(update: AdapterState, sent: AdapterState, clip_norm: float) -> AdapterState:
    """`update` with its change from `sent` scaled down (if needed) to L2 norm <= clip_norm, in float64."""
    delta = {k: update[k].double() - sent[k].double() for k in sent}
    norm = torch.sqrt(sum((d * d).sum() for d in delta.values())).item()
    scale = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    return {k: (sent[k].double() + delta[k] * scale).to(sent[k].dtype) for k in sent}


def add_noise(state: AdapterState, std: float, seed: int) -> AdapterState:
    """`state` plus N(0, std^2) on every entry, from a generator seeded by `seed` (so a resumed run repeats it)."""
    gen = torch.Generator().manual_seed(seed)
    return {k: (v.double() + torch.randn(v.shape, generator=gen, dtype=torch.float64) * std).to(v.dtype)
            for k, v in state.items()}


def round_seed(secret: bytes, purpose: str, round_idx: int) -> int:
    """A 64-bit seed for one round's `purpose` ("sampling", "noise"): HMAC-SHA256 under the server's secret, so it
    cannot be predicted without the secret, yet a resumed run derives the same one."""
    digest = hmac.new(secret, f"{purpose}:{round_idx}".encode(), hashlib.sha256).digest()
    return int.from_bytes(digest[:8], "big")


def expected_clients(dp: DPConfig, population: int, fraction: float, minimum: int) -> float:
    """The fixed denominator of the private mean: the number of clients sampled (fixed) or its expectation
    (poisson). Dividing by this, never by the number that answered, keeps the sensitivity what the accountant
    assumes whoever drops out or is rejected."""
    if dp.sampling == "poisson":
        return fraction * population
    return float(min(population, max(minimum, math.ceil(fraction * population - 1e-9))))


def sum_sensitivity(dp: DPConfig, population: int, sampled: float) -> float:
    """L2 sensitivity of the sum of clipped changes under the accounted neighbouring relation: replacing one
    client (fixed-size sampling of fewer than all) moves it by up to 2C; adding or removing one by C."""
    return (2.0 if _replace_one(dp, population, sampled) else 1.0) * dp.clip_norm


def sum_noise_std(dp: DPConfig, population: int, sampled: float) -> float:
    """Std of the Gaussian noise on the clipped sum: z x sensitivity (dp-accounting's noise multiplier)."""
    return dp.noise_multiplier * sum_sensitivity(dp, population, sampled)


def client_noise_std(dp: DPConfig, population: int, sampled: float) -> float:
    """Distributed DP: the std each sampled client adds to its own clipped change, so that any
    dp.min_noising_clients (default: all sampled) honest shares add up to the central noise on the sum."""
    honest = dp.min_noising_clients or sampled
    return sum_noise_std(dp, population, sampled) / math.sqrt(honest)


def _replace_one(dp: DPConfig, population: int, sampled: float) -> bool:
    return dp.sampling == "fixed" and sampled < population


def private_sample(dp: DPConfig, names: list[str], fraction: float, minimum: int, secret: bytes,
                   round_idx: int) -> list[str]:
    """The clients of round `round_idx` under DP, drawn from the server's secret: fixed = expected_clients of them
    without replacement, poisson = each independently with probability `fraction`. Kept secret, the sample is
    what the accountant's amplification by sampling assumes."""
    rng = random.Random(round_seed(secret, "sampling", round_idx))
    if dp.sampling == "poisson":
        return [n for n in names if rng.random() < fraction]
    chosen = set(rng.sample(names, int(expected_clients(dp, len(names), fraction, minimum))))
    return [n for n in names if n in chosen]


def clipped_sum(sent: AdapterState, updates: list[AdapterState], clip_norm: float) -> AdapterState:
    """The sum, in float64, of each update's change from `sent` clipped to L2 norm clip_norm (zero for none)."""
    total = {k: torch.zeros(v.shape, dtype=torch.float64) for k, v in sent.items()}
    for update in updates:
        clipped = clip_change(update, sent, clip_norm)
        for k in total:
            total[k] += clipped[k].double() - sent[k].double()
    return total


def private_release(sent: AdapterState, change_sum: AdapterState, denominator: float, noise_std: float,
                    seed: int) -> AdapterState:
    """sent + (change_sum + N(0, noise_std^2)) / denominator, in `sent`'s dtypes (noise_std 0: no noise, as when
    the clients added it)."""
    noisy = add_noise(change_sum, noise_std, seed) if noise_std > 0 else change_sum
    return {k: (sent[k].double() + noisy[k].double() / denominator).to(sent[k].dtype) for k in sent}


def dp_event(dp: DPConfig, population: int, sampled: float):
    """One round as a dp-accounting event and the neighbouring relation it is accounted under: fixed m < K is a
    sample without replacement (replace-one), fixed m = K a plain Gaussian (add-or-remove-one, no amplification),
    poisson a Poisson-sampled Gaussian (add-or-remove-one). The noise multiplier is z because the noise is
    z x the sum's sensitivity under that relation (`sum_noise_std`)."""
    try:
        import dp_accounting
    except ImportError as err:
        raise ConfigError('dp.noise_multiplier > 0 needs the accountant: pip install -e ".[flower]"') from err
    gaussian = dp_accounting.GaussianDpEvent(dp.noise_multiplier)
    relation = dp_accounting.NeighboringRelation
    if _replace_one(dp, population, sampled):
        return (dp_accounting.SampledWithoutReplacementDpEvent(population, int(sampled), gaussian),
                relation.REPLACE_ONE)
    if dp.sampling == "poisson":
        return dp_accounting.PoissonSampledDpEvent(sampled / population, gaussian), relation.ADD_OR_REMOVE_ONE
    return gaussian, relation.ADD_OR_REMOVE_ONE


def epsilon(dp: DPConfig, population: int, sampled: float, rounds: int) -> float:
    """Epsilon at dp.delta after `rounds` rounds, from dp-accounting's RDP accountant."""
    from dp_accounting import SelfComposedDpEvent
    from dp_accounting.rdp import RdpAccountant

    event, relation = dp_event(dp, population, sampled)
    return float(RdpAccountant(neighboring_relation=relation).compose(SelfComposedDpEvent(event, rounds))
                 .get_epsilon(dp.delta))


def dp_record(dp: DPConfig, population: int, sampled: float, round_idx: int) -> dict:
    """A round's privacy, for its metrics: epsilon at delta after this round (cumulative) and for this round alone,
    and the terms the accountant was given; noise_std_mean is the noise on each entry of the released adapter.
    Names no client."""
    return {"dp": {"epsilon": epsilon(dp, population, sampled, round_idx),
                   "epsilon_round": epsilon(dp, population, sampled, 1), "delta": dp.delta, "sampling": dp.sampling,
                   "neighbouring": "replace_one" if _replace_one(dp, population, sampled) else "add_or_remove_one",
                   "sum_sensitivity": sum_sensitivity(dp, population, sampled),
                   "sum_noise_std": sum_noise_std(dp, population, sampled),
                   "noise_std_mean": sum_noise_std(dp, population, sampled) / sampled,
                   "noise_multiplier": dp.noise_multiplier,
                   "clip_norm": dp.clip_norm, "expected_clients": sampled, "population": population,
                   "mode": dp.mode}}
