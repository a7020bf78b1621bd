"""One SecAgg+ round through Flower's own protocol (SecAggPlusWorkflow on the server, secaggplus_mod on the
clients). In flwr 1.42 SecAgg+ exists only on the legacy strategy path, so the round is run through a
LegacyContext whose strategy only picks the clients our loop sampled and receives the aggregate: Flower hands
`aggregate_fit` the dequantized weighted average, never an individual adapter.
"""

from __future__ import annotations

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
from flwr.serverapp import Grid

from fedcollm.config import SecAggConfig
from fedcollm.models.lora import AdapterState


def to_arrays(state: AdapterState) -> list[np.ndarray]:
    """Adapter tensors in sorted-name order: the order both sides agree on for unnamed legacy parameters."""
    return [state[k].detach().cpu().numpy() for k in sorted(state)]


def from_arrays(arrays: list[np.ndarray], like: AdapterState) -> AdapterState:
    return {k: torch.from_numpy(np.asarray(a)).to(like[k].dtype).reshape(like[k].shape)
            for k, a in zip(sorted(like), arrays)}


class _Collect(FedAvg):
    """Sends FitIns to the chosen nodes only; keeps what aggregate_fit is given (the aggregate, per survivor)."""

    def __init__(self, node_ids: set[int], round_idx: int):
        super().__init__(fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=1, min_available_clients=1)
        self.node_ids, self.round_idx = node_ids, round_idx
        self.received: list[tuple[int, list[np.ndarray], int]] = []
        self.failures = 0

    def configure_fit(self, server_round, parameters, client_manager):
        ins = FitIns(parameters, {"round": self.round_idx})
        return [(proxy, ins) for proxy in client_manager.all().values() if proxy.node_id in self.node_ids]

    def aggregate_fit(self, server_round, results, failures):
        self.received = [(proxy.node_id, parameters_to_ndarrays(res.parameters), res.num_examples)
                         for proxy, res in results]
        self.failures = len(failures)
        return (results[0][1].parameters, {}) if results else (None, {})


def secure_round(grid: Grid, context: Context, sent: AdapterState, node_ids: set[int], round_idx: int,
                 cfg: SecAggConfig, max_weight: float) -> tuple[AdapterState | None, dict]:
    """The weighted average of the chosen clients' adapters, learned through SecAgg+; plus what the server saw."""
    strategy = _Collect(node_ids, round_idx)
    legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=1), strategy=strategy)
    legacy.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({Key.CURRENT_ROUND: round_idx})
    legacy.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(
        ndarrays_to_parameters(to_arrays(sent)), True)
    thread, stop, ready = start_update_client_manager_thread(grid, legacy.client_manager)
    ready.wait()
    try:
        SecAggPlusWorkflow(num_shares=cfg.num_shares, reconstruction_threshold=cfg.reconstruction_threshold,
                           max_weight=float(max_weight), clipping_range=float(cfg.clipping_range),
                           quantization_range=cfg.quantization_range, modulus_range=2**32)(grid, legacy)
    finally:
        stop.set()
        thread.join()
    seen = {"secagg_results": len(strategy.received), "secagg_failures": strategy.failures,
            "secagg_all_results_identical": all(
                all(np.array_equal(a, b) for a, b in zip(strategy.received[0][1], arrays))
                for _, arrays, _ in strategy.received),
            "secagg_contributors": sorted(nid for nid, _, _ in strategy.received)}
    if not strategy.received:
        return None, seen
    return from_arrays(strategy.received[0][1], sent), seen
