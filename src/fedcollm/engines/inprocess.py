"""In-process engine: clients and server in one process, every message serialized as it would be on a wire.

The engine only moves bytes and keeps time; what is computed lives in `fedcollm.algorithms`.
Methods (rows of the paper's tables) share this one loop with pieces switched off:
  fedcollm     client SFT -> FedAvg -> server mutual distillation (LLM <-> SLM)
  fedavg       client SFT -> FedAvg
  standalone   client SFT only, each client keeps its own adapter (same steps as fedavg)
  centralized  the LLM's LoRA fine-tuned on all client shards + D^a (E epochs a round)
  zero_shot    no training: base LLM and SLM evaluated
"""

from __future__ import annotations

import logging
import time
from typing import Protocol

from fedcollm.aggregate import fedavg, validate_update
from fedcollm.algorithms.training import client_update, mutual_distill, sft_steps, unit_seed
from fedcollm.comm import Payload, pack, unpack
from fedcollm.errors import InvalidUpdate
from fedcollm.data.batching import SFTData
from fedcollm.evaluate import evaluate_tasks
from fedcollm.models.lora import AdapterState, adapter_state, load_adapter_state
from fedcollm.runs import RunDir
from fedcollm.workbench import Workbench

log = logging.getLogger(__name__)


class Client(Protocol):
    name: str

    def fit(self, blob: bytes, round_idx: int) -> bytes: ...


class SimulatedClient:
    """Client k in this process: receives the broadcast bytes, trains on its own shard, returns bytes."""

    def __init__(self, wb: Workbench, k: int):
        self.wb, self.k, self.name = wb, k, f"client_{k}"

    def fit(self, blob: bytes, round_idx: int) -> bytes:
        fed = self.wb.cfg.federation
        theta, n, step_log = client_update(self.wb.slm, unpack(blob, "server").tensors, self.wb.client_data[self.k],
                                           fed.local_epochs, fed.client_lr, fed.batch_size,
                                           unit_seed(self.wb.cfg.run.seed, round_idx, self.k))
        log.debug("%s round %d: loss %.4f", self.name, round_idx, step_log.mean_loss)
        return pack(Payload(theta, n))


def curve_items(cfg) -> int | None:
    """Items per task behind every point of the per-round curves (None = every evaluated item)."""
    limits = [n for n in (cfg.run.round_eval_limit, cfg.data.eval_limit) if n is not None]
    return min(limits, default=None)


def evaluate_state(wb: Workbench, which: str, state: AdapterState, limit: int | None, label: str) -> dict:
    """Accuracy of the LLM or SLM under `state` on the first `limit` items (None = all), plus its curve point."""
    model = wb.llm if which == "llm" else wb.slm
    load_adapter_state(model, state)
    sets = {t: exs[:limit] for t, exs in wb.eval_sets.items()}
    return evaluate_tasks(model, wb.tokenizer, sets, wb.cfg.model.max_length, wb.cfg.run.eval_batch_size, label,
                          curve_items(wb.cfg))


def _eval_due(cfg, r: int) -> bool:
    every = cfg.run.eval_every
    return r == cfg.federation.rounds or (every > 0 and r % every == 0)


def run_method(wb: Workbench, method: str, run: RunDir, clients: list[Client] | None = None) -> dict:
    """Run one method to completion (resuming after its last completed round); returns its final evaluation."""
    cfg = wb.cfg
    final = run.read_final(method)
    if final is not None:
        return final
    if method == "zero_shot":
        final = {"llm": evaluate_state(wb, "llm", wb.llm_init, None, "zero-shot LLM"),
                 "slm": evaluate_state(wb, "slm", wb.slm_init, None, "zero-shot SLM")}
        run.write_final(method, final)
        return final

    clients = clients or [SimulatedClient(wb, k) for k in range(cfg.federation.clients)]
    states = {"slm": wb.slm_init, "llm": wb.llm_init}
    if method == "standalone":
        states = {c.name: wb.slm_init for c in clients}
    start = run.last_completed_round(method, cfg.federation.rounds)
    if start:
        states = run.load_round(method, start, states)
        log.info("%s: resuming after round %d", method, start)
    run.rebuild_metrics(method)

    union = None
    if method == "centralized":
        union = SFTData([ex for shard in wb.split.clients for ex in shard] + wb.split.aux, wb.tokenizer,
                        cfg.model.max_length)

    last_eval: dict = {}
    for r in range(start + 1, cfg.federation.rounds + 1):
        t_round = time.perf_counter()
        timing: dict[str, float] = {}
        record: dict = {"round": r, "method": method}
        if method in ("fedavg", "fedcollm"):
            states, info = _federated_round(wb, method, clients, states, r, timing)
            record.update(info)
        elif method == "standalone":
            t0 = time.perf_counter()
            for c in clients:  # no server: each client continues from its own adapter
                try:
                    payload = unpack(c.fit(pack(Payload(states[c.name])), r), c.name)
                    validate_update(payload.tensors, states[c.name], payload.num_examples, c.name)
                    states[c.name] = payload.tensors
                except InvalidUpdate as err:
                    log.warning("round %d: %s keeps its previous adapter: %s", r, c.name, err)
            timing["client_train_s"] = time.perf_counter() - t0
        elif method == "centralized":
            load_adapter_state(wb.llm, states["llm"])
            step_log = sft_steps(wb.llm, union, cfg.federation.local_epochs * union.steps_per_epoch(
                cfg.federation.batch_size), cfg.federation.client_lr, cfg.federation.batch_size,
                unit_seed(cfg.run.seed, r, -1), f"centralized LLM SFT r{r}")
            states["llm"] = adapter_state(wb.llm)
            timing["server_train_s"] = step_log.seconds
            record["train_loss"] = step_log.mean_loss
        else:
            raise ValueError(f"unknown method {method!r}")

        if _eval_due(cfg, r):
            t0 = time.perf_counter()
            limit = None if r == cfg.federation.rounds else curve_items(cfg)
            last_eval = _evaluate_round(wb, method, states, limit, r)
            timing["eval_s"] = time.perf_counter() - t0
            record["eval"] = last_eval
        t0 = time.perf_counter()
        run.save_round(method, r, states, {"slm": wb.slm, "llm": wb.llm, "client": wb.slm})
        timing["checkpoint_s"] = time.perf_counter() - t0
        timing["round_s"] = time.perf_counter() - t_round
        record["timing"] = timing
        run.mark_done(method, r, record)
        log.info("%s round %d/%d done in %.1f s", method, r, cfg.federation.rounds, timing["round_s"])

    if not last_eval:  # resumed after the final round had been trained but before final.json was written
        last_eval = _evaluate_round(wb, method, states, None, cfg.federation.rounds)
    run.write_final(method, last_eval)
    return last_eval


def _federated_round(wb: Workbench, method: str, clients: list[Client], states: dict, r: int,
                     timing: dict) -> tuple[dict, dict]:
    """One FedCoLLM/FedAvg round; only bytes cross between `clients` and the server part below."""
    cfg = wb.cfg
    t0 = time.perf_counter()
    down = pack(Payload(states["slm"]))
    uploads = {c.name: c.fit(down, r) for c in clients}
    timing["client_train_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    accepted = []
    for name, blob in uploads.items():  # each payload decoded and checked alone: one bad client, one rejection
        try:
            payload = unpack(blob, name)
            validate_update(payload.tensors, states["slm"], payload.num_examples, name)
        except InvalidUpdate as err:
            log.warning("round %d: rejected update: %s", r, err)
            continue
        accepted.append((payload.tensors, payload.num_examples))
    info = {"accepted": len(accepted), "rejected": len(clients) - len(accepted),
            "bytes_down": len(down) * len(clients), "bytes_up": sum(len(b) for b in uploads.values())}
    new_states = dict(states)
    if accepted:
        new_states["slm"] = fedavg(accepted)
    else:
        log.warning("round %d: every client update was rejected; the global adapter is kept", r)
    timing["aggregate_s"] = time.perf_counter() - t0

    if method == "fedcollm" and cfg.distill.steps:
        d = cfg.distill
        load_adapter_state(wb.llm, new_states["llm"])
        load_adapter_state(wb.slm, new_states["slm"])
        kd = mutual_distill(wb.llm, wb.slm, wb.aux_data, d.steps, d.kd_weight, d.temperature, d.kl_direction,
                            d.top_k, d.llm_lr, d.slm_lr, d.batch_size, unit_seed(cfg.run.seed, r, -1))
        new_states["llm"], new_states["slm"] = adapter_state(wb.llm), adapter_state(wb.slm)
        timing["server_kd_s"] = kd.seconds
        warm = kd.step_seconds[1:] or kd.step_seconds  # the first step pays one-off allocation costs
        timing["kd_step_s"] = sum(warm) / len(warm)
        info["kd_first"], info["kd_last"] = kd.stats[0], kd.stats[-1]
    return new_states, info


def _evaluate_round(wb: Workbench, method: str, states: dict, limit: int | None, r: int) -> dict:
    out = {}
    if method in ("fedcollm", "centralized"):
        out["llm"] = evaluate_state(wb, "llm", states["llm"], limit, f"{method} r{r} LLM")
    if method in ("fedcollm", "fedavg"):
        out["slm"] = evaluate_state(wb, "slm", states["slm"], limit, f"{method} r{r} SLM")
    if method == "standalone":
        if r == wb.cfg.federation.rounds or limit is None:
            clients = {name: evaluate_state(wb, "slm", s, limit, f"standalone r{r} {name}")
                       for name, s in sorted(states.items())}
            out["slm_clients"] = clients
            out["slm"] = mean_over_clients(list(clients.values()))
    return out


def mean_over_clients(per_client: list[dict]) -> dict:
    """The paper's Table 2 'mean' column: task metrics (and curve points) averaged over clients."""
    def mean(blocks: list[dict]) -> dict:
        return {m: sum(b[m] for b in blocks) / len(blocks) for m in ("acc", "acc_norm")} | {"n": blocks[0]["n"]}

    return {t: mean([c[t] for c in per_client]) | {"curve": mean([c[t]["curve"] for c in per_client])}
            for t in per_client[0]}
