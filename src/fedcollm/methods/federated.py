"""The methods whose clients train: Standalone, FedAvg, FedCoLLM (FedAvg + server mutual distillation)."""

from __future__ import annotations

import logging

from fedcollm.aggregate import fedavg
from fedcollm.algorithms.training import mutual_distill, unit_seed
from fedcollm.errors import ModelError
from fedcollm.methods.base import (
    Budget,
    Method,
    States,
    Updates,
    evaluate_state,
    mean_over_clients,
)
from fedcollm.models.lora import AdapterState, adapter_state, load_adapter_state
from fedcollm.workbench import Workbench

log = logging.getLogger(__name__)


class Standalone(Method):
    """Each client fine-tunes its own adapter on its own shard; nothing is shared (same steps as FedAvg)."""

    name = "standalone"
    trains = True
    scores = ("slm",)

    def initial_states(self, clients: list[str]) -> States:
        return {c: self.wb.held(c).init for c in clients}

    def client_task(self, states: States, client: str) -> AdapterState | None:
        return states[client]

    def aggregate(self, states: States, updates: Updates, r: int) -> States:
        return states | {c: theta for c, (theta, _) in updates.items()}  # a rejected client keeps its adapter

    def evaluate(self, states: States, limit: int | None, r: int) -> dict:
        return evaluate_clients(self.wb, states, limit, r, self.name)


def evaluate_clients(wb: Workbench, states: States, limit: int | None, r: int, method: str) -> dict:
    """Each client's own SLM adapter (`states`: client -> adapter) and their mean, the SLM row of the tables."""
    if limit is not None and r < wb.cfg.federation.rounds:
        return {}  # K evaluations a round are too dear for a curve point; the last round is scored in full
    per_client = {c: evaluate_state(wb, c, s, limit, f"{method} r{r} {c}") for c, s in sorted(states.items())}
    return {"slm_clients": per_client, "slm": mean_over_clients(list(per_client.values()))}


class FedAvg(Method):
    """Clients fine-tune the broadcast SLM adapter; the server takes their sample-weighted mean."""

    name = "fedavg"
    trains = True
    scores = ("slm",)
    shared = "slm"

    def client_task(self, states: States, client: str) -> AdapterState | None:
        return states["slm"]

    def aggregate(self, states: States, updates: Updates, r: int) -> States:
        if not updates:
            log.warning("round %d: every client update was rejected; the global adapter is kept", r)
            return states
        return states | {"slm": fedavg(list(updates.values()))}


class FedCoLLM(FedAvg):
    """FedAvg, then R steps of mutual knowledge distillation between the LLM and the SLM on D^a (Eq. 3-6)."""

    name = "fedcollm"
    scores = ("llm", "slm")

    def __init__(self, wb: Workbench):
        super().__init__(wb)
        slm = wb.held("slm")
        if slm.tokenizer is not wb.tokenizer or wb.llm.config.vocab_size != slm.model.config.vocab_size:
            raise ModelError(f"fedcollm distils LLM and SLM on one encoding of D^a, so it needs one vocabulary, but "
                             f"LLM {wb.llm_name or wb.cfg.model.llm} ({wb.llm.config.vocab_size} ids) and SLM "
                             f"{wb.slm_name or wb.cfg.model.slm} ({slm.model.config.vocab_size} ids) use different "
                             f"tokenizers: run fedmkt for that pair")

    def server_update(self, states: States, r: int) -> tuple[States, dict, dict]:
        wb, d = self.wb, self.wb.cfg.distill
        steps = d.steps(len(wb.aux_data))
        if not steps:
            return states, {}, {}
        load_adapter_state(wb.llm, states["llm"])
        load_adapter_state(wb.slm, states["slm"])
        kd = mutual_distill(wb.llm, wb.slm, wb.aux_data, steps, d.kd_weight, d.temperature, d.kl_direction,
                            d.top_k, d.llm_lr, d.slm_lr, d.batch_size, unit_seed(wb.cfg.run.seed, r, -1))
        warm = kd.step_seconds[1:] or kd.step_seconds  # the first step pays one-off allocation costs
        return (states | {"llm": adapter_state(wb.llm), "slm": adapter_state(wb.slm)},
                {"kd_first": kd.stats[0], "kd_last": kd.stats[-1],
                 "budget": Budget(llm_steps=steps, slm_steps=steps, llm_examples=steps * d.batch_size,
                                  slm_examples=steps * d.batch_size)},
                {"server_kd_s": kd.seconds, "kd_step_s": sum(warm) / len(warm)})
