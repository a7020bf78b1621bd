"""Client-level differential privacy on the shared adapter: each client's change is clipped to an L2 norm C, the
server averages the clipped changes with equal weights and adds Gaussian noise of std z * C / m (m = clients
sampled), and Flower's RDP accountant turns (z, m, K, rounds) into epsilon at a given delta.

This is central DP: the server sees the clipped updates before the noise (add SecAgg+ to hide them). The server's
mutual distillation on D^a runs after the noise and touches no client data, so it is post-processing and keeps
the guarantee.
"""

from __future__ import annotations

import math

import torch

from fedcollm.config import DPConfig
from fedcollm.errors import ConfigError
from fedcollm.models.lora import AdapterState


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
    replace_one = dp.sampling == "fixed" and sampled < population
    return (2.0 if replace_one else 1.0) * dp.clip_norm


def sum_noise_std(dp: DPConfig, population: int, sampled: float) -> float:
    """Std of the Gaussian noise on the clipped sum: z x sensitivity (dp-accounting's noise multiplier)."""
    return dp.noise_multiplier * sum_sensitivity(dp, population, sampled)


def client_noise_std(dp: DPConfig, population: int, sampled: float) -> float:
    """Distributed DP: the std each sampled client adds to its own clipped change, so that any
    dp.min_noising_clients (default: all sampled) honest shares add up to the central noise on the sum."""
    honest = dp.min_noising_clients or sampled
    return sum_noise_std(dp, population, sampled) / math.sqrt(honest)


def epsilon(rounds: int, noise_multiplier: float, sampled: int, population: int, delta: float) -> float:
    """Epsilon after `rounds` noisy averages, from Flower's RDP accountant (which wraps Google's dp-accounting).

    Sampling a fixed number of clients without replacement is accounted as such (replace-one neighbours); when
    every client takes part, there is no amplification (add-or-remove-one neighbours).
    """
    try:
        from flwr.serverapp import (
            GaussianPrivacyEvent,
            NeighboringRelation,
            PrivacyConfig,
            RdpAccountant,
            SamplingMethod,
        )
    except ImportError as err:
        raise ConfigError('dp.noise_multiplier > 0 needs the accountant: pip install -e ".[flower]"') from err
    full = sampled >= population
    accountant = RdpAccountant(PrivacyConfig(
        target_delta=delta, population_size=population,
        neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE if full else NeighboringRelation.REPLACE_ONE,
        sampling_method=SamplingMethod.NO_AMPLIFICATION if full else SamplingMethod.WITHOUT_REPLACEMENT))
    accountant.compose(GaussianPrivacyEvent(noise_multiplier=noise_multiplier, sample_size=sampled,
                                            population_size=population), count=rounds)
    return float(accountant.get_privacy_spent().epsilon)
