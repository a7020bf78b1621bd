"""In-process engine: clients and server in one process, every message serialized as it would be on a wire.

The engine only moves bytes, keeps time and checkpoints; what is computed lives in the method objects
(`fedcollm.methods`) and the pure training code they call. It never asks which method it runs.
"""

from __future__ import annotations

import logging
import time
from typing import Protocol

from fedcollm.aggregate import validate_update
from fedcollm.algorithms.training import client_update, unit_seed
from fedcollm.comm import Payload, pack, unpack
from fedcollm.errors import InvalidUpdate
from fedcollm.methods import METHOD_CLASSES, Method
from fedcollm.methods.base import States, curve_items
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


def _eval_due(cfg, r: int) -> bool:
    every = cfg.run.eval_every
    return r == cfg.federation.rounds or (every > 0 and r % every == 0)


def run_method(wb: Workbench, name: str, run: RunDir, clients: list[Client] | None = None) -> dict:
    """Run one method to completion (resuming after its last completed round); returns its final evaluation."""
    cfg = wb.cfg
    final = run.read_final(name)
    if final is not None:
        return final
    method = METHOD_CLASSES[name](wb)
    if not method.trains:
        final = method.evaluate(method.initial_states([]), None, 0)
        run.write_final(name, final)
        return final

    clients = clients or [SimulatedClient(wb, k) for k in range(cfg.federation.clients)]
    states = method.initial_states([c.name for c in clients])
    start = run.last_completed_round(name, cfg.federation.rounds)
    if start:
        states = run.load_round(name, start, states)
        log.info("%s: resuming after round %d", name, start)
    run.rebuild_metrics(name)

    last_eval: dict = {}
    for r in range(start + 1, cfg.federation.rounds + 1):
        t_round = time.perf_counter()
        timing: dict[str, float] = {}
        record: dict = {"round": r, "method": name}
        states = _client_phase(method, clients, states, r, timing, record)
        states, info, server_timing = method.server_update(states, r)
        record.update(info)
        timing.update(server_timing)
        if _eval_due(cfg, r):
            t0 = time.perf_counter()
            last_eval = method.evaluate(states, None if r == cfg.federation.rounds else curve_items(cfg), r)
            timing["eval_s"] = time.perf_counter() - t0
            record["eval"] = last_eval
        t0 = time.perf_counter()
        run.save_round(name, r, states, {"slm": wb.slm, "llm": wb.llm, "client": wb.slm})
        timing["checkpoint_s"] = time.perf_counter() - t0
        timing["round_s"] = time.perf_counter() - t_round
        record["timing"] = timing
        run.mark_done(name, r, record)
        log.info("%s round %d/%d done in %.1f s", name, r, cfg.federation.rounds, timing["round_s"])

    if not last_eval:  # resumed after the final round had been trained but before final.json was written
        last_eval = method.evaluate(states, None, cfg.federation.rounds)
    run.write_final(name, last_eval)
    return last_eval


def _client_phase(method: Method, clients: list[Client], states: States, r: int, timing: dict,
                  record: dict) -> States:
    """Send each client its task, decode and check every upload on its own, let the method combine the rest."""
    tasks = {c.name: method.client_task(states, c.name) for c in clients}
    called = [c for c in clients if tasks[c.name] is not None]
    if not called:
        return states
    t0 = time.perf_counter()
    downs = {c.name: pack(Payload(tasks[c.name])) for c in called}
    uploads = {c.name: c.fit(downs[c.name], r) for c in called}
    timing["client_train_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    accepted = {}
    for name, blob in uploads.items():  # one bad client is one rejected update, never a lost round
        try:
            payload = unpack(blob, name)
            validate_update(payload.tensors, tasks[name], payload.num_examples, name)
        except InvalidUpdate as err:
            log.warning("round %d: rejected update: %s", r, err)
            continue
        accepted[name] = (payload.tensors, payload.num_examples)
    states = method.aggregate(states, accepted, r)
    timing["aggregate_s"] = time.perf_counter() - t0
    record.update({"accepted": len(accepted), "rejected": len(uploads) - len(accepted),
                   "bytes_down": sum(map(len, downs.values())), "bytes_up": sum(map(len, uploads.values()))})
    return states
