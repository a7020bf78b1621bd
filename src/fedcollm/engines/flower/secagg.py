"""One SecAgg+ round through Flower's own protocol (SecAggPlusWorkflow on the server, secaggplus_mod on the
clients). In flwr 1.42 SecAgg+ exists only on the legacy strategy path, so the round is run through a
LegacyContext whose strategy only picks the clients our loop sampled and receives the aggregate: Flower hands
`aggregate_fit` the dequantized weighted average, never an individual upload.

What is summed is each client's change from the adapter it was sent. Flower's arithmetic (flwr 1.42): a client
with weight w = round(num_examples / max_weight x Q) / Q (Q = quantization range) clips w x change to
+-clipping_range and quantizes it by stochastic rounding to an integer in [0, Q]; the weight element w x Q is an
integer in [0, Q] too. Everything is summed modulo the modulus, so the sum of n clients is right only while
n x Q < modulus: `modulus_range` picks the smallest power of two above that. The server decides each client's
weight element (its share of the round's weight, scaled so the largest is Q) and sends it as the count to report,
with max_weight = Q.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from flwr.app import ConfigRecord, Context
from flwr.common import FitIns, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.compat.common import recorddict_compat as compat
from flwr.server import LegacyContext, ServerConfig
from flwr.server.compat.app_utils import start_update_client_manager_thread
from flwr.server.strategy import FedAvg
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key

from fedcollm.comm import AdapterState
from fedcollm.config import SECAGG_MAX_MODULUS, SecAggConfig

log = logging.getLogger(__name__)
CLIPPED = "secagg_clipped"  # FitRes metric: how many entries the client's clip to +-clipping_range changed


def to_arrays(state: AdapterState) -> list[np.ndarray]:
    """Adapter tensors in sorted-name order: the order both sides agree on for unnamed legacy parameters."""
    return [state[k].detach().cpu().numpy() for k in sorted(state)]


def from_arrays(arrays: list[np.ndarray], like: AdapterState) -> AdapterState:
    return {k: torch.from_numpy(np.asarray(a)).to(like[k].dtype).reshape(like[k].shape)
            for k, a in zip(sorted(like), arrays)}


def modulus_range(clients: int, quantization_range: int) -> int:
    """The smallest power of two above clients x quantization_range: no sum of `clients` quantized values or weight
    elements (each at most quantization_range) wraps. Masks are uniform modulo it, so any such modulus hides as
    well; the smallest also limits how far a forged upload can move the decoded sum."""
    modulus = 1 << (clients * quantization_range).bit_length()
    if modulus > SECAGG_MAX_MODULUS:  # Config refuses such a federation; this guards direct callers
        raise ValueError(f"{clients} clients x quantization range {quantization_range} need a modulus above 2^62")
    return modulus


def weight_elements(weights: dict[int, float], quantization_range: int) -> dict[int, int]:
    """Each node's weight element: its weight scaled so that the largest is quantization_range (an integer, so the
    client reports it as its count and Flower's rounding leaves it unchanged)."""
    top = max(weights.values(), default=1.0)
    return {nid: max(1, round(w / top * quantization_range)) for nid, w in weights.items()}


def clipped_entries(change: list[np.ndarray], element: int, cfg: SecAggConfig) -> int:
    """How many entries of weight x change lie beyond +-clipping_range, i.e. are clipped by Flower's quantize."""
    w = element / cfg.quantization_range
    return int(sum(np.count_nonzero(np.abs(a * w) > cfg.clipping_range) for a in change))


def quantization_bound(cfg: SecAggConfig, elements: list[int]) -> float:
    """Largest error of any entry of the decoded weighted mean: each client's stochastic rounding is off by less
    than one step of 2 x clipping_range / quantization_range, and the sum is divided by the total weight."""
    return len(elements) * 2 * cfg.clipping_range / sum(elements) if elements else 0.0


class _Collect(FedAvg):
    """Sends FitIns to the chosen nodes only; keeps what aggregate_fit is given (the aggregate, per survivor)."""

    def __init__(self, elements: dict[int, int], round_idx: int):
        super().__init__(fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=1, min_available_clients=1)
        self.elements, self.round_idx = elements, round_idx
        self.received: list[tuple[int, list[np.ndarray], int | None]] = []  # clipped: None if not reported
        self.failures = 0

    def configure_fit(self, server_round, parameters, client_manager):
        return [(proxy, FitIns(parameters, {"round": self.round_idx, "weight": self.elements[proxy.node_id]}))
                for proxy in client_manager.all().values() if proxy.node_id in self.elements]

    def aggregate_fit(self, server_round, results, failures):
        self.received = [(proxy.node_id, parameters_to_ndarrays(res.parameters), res.metrics.get(CLIPPED))
                         for proxy, res in results]
        self.failures = len(failures)
        return (results[0][1].parameters, {}) if results else (None, {})


def secure_round(grid, context: Context, sent: AdapterState, weights: dict[int, float], round_idx: int,
                 cfg: SecAggConfig) -> tuple[AdapterState | None, dict]:
    """sent + the mean of the chosen nodes' changes under `weights` (node id -> relative weight), learned through
    SecAgg+; plus what the server saw: the contributors, the total of their clipped entries and the bound on each
    entry's quantization error.

    None where the decoded mean leaves the range honest clients can produce (n x clipping_range / total weight):
    the server cannot see an upload, but a client that forged its masked weight element or values so would
    otherwise scale the mean at will."""
    elements = weight_elements(weights, cfg.quantization_range)
    strategy = _Collect(elements, round_idx)
    legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=1), strategy=strategy)
    legacy.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({Key.CURRENT_ROUND: round_idx})
    legacy.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(
        ndarrays_to_parameters(to_arrays(sent)), True)
    thread, stop, ready = start_update_client_manager_thread(grid, legacy.client_manager)
    ready.wait()
    try:
        SecAggPlusWorkflow(num_shares=cfg.num_shares, reconstruction_threshold=cfg.reconstruction_threshold,
                           max_weight=float(cfg.quantization_range), clipping_range=float(cfg.clipping_range),
                           quantization_range=cfg.quantization_range,
                           modulus_range=modulus_range(len(elements), cfg.quantization_range))(grid, legacy)
    finally:
        stop.set()
        thread.join()
    received = strategy.received
    bound = quantization_bound(cfg, [elements[nid] for nid, _, _ in received])
    seen = {"secagg_results": len(received), "secagg_failures": strategy.failures,
            "secagg_all_results_identical": all(
                all(np.array_equal(a, b) for a, b in zip(received[0][1], arrays)) for _, arrays, _ in received),
            "secagg_contributors": sorted(nid for nid, _, _ in received),
            "secagg_clipped_entries": None if any(c is None for *_, c in received) else sum(c for *_, c in received),
            "secagg_quantization_bound": bound}
    if not received:
        return None, seen
    limit = bound * cfg.quantization_range / 2 + bound  # n x clipping_range / total weight, plus the rounding
    seen["secagg_out_of_range"] = not all(np.abs(a).max(initial=0.0) <= limit for a in received[0][1])
    if seen["secagg_out_of_range"]:
        log.warning("round %d: the securely aggregated mean change leaves +-%.4g, the range honest clients can "
                    "produce: a client forged its masked upload; the round's aggregate is refused", round_idx, limit)
        return None, seen
    change = from_arrays(received[0][1], {k: v.double() for k, v in sent.items()})
    return {k: (sent[k].double() + change[k]).to(sent[k].dtype) for k in sent}, seen
