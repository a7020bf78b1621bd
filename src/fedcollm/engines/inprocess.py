"""In-process engine: clients and server in one process, every message serialized as it would be on a wire.

The engine only moves bytes, keeps time and checkpoints; what is computed lives in the method objects
(`fedcollm.methods`) and the pure training code they call. It never asks which method it runs.
"""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import asdict
from typing import Protocol

from fedcollm.aggregate import validate_update
from fedcollm.algorithms.training import unit_seed
from fedcollm.comm import Payload, pack, unpack
from fedcollm.errors import FederationError, InvalidUpdate
from fedcollm.methods import method_class
from fedcollm.methods.base import Budget, ClientResources, Method, States, curve_items
from fedcollm.privacy import (
    clipped_sum,
    dp_record,
    expected_clients,
    private_release,
    private_sample,
    round_seed,
    sum_noise_std,
)
from fedcollm.runs import RunDir
from fedcollm.workbench import Workbench

log = logging.getLogger(__name__)


class Client(Protocol):
    name: str
    examples: int  # the example count it declares before training (its shard's size)

    def fit(self, blob: bytes, round_idx: int, method: str) -> bytes: ...


class Transport(Protocol):
    """How the server reaches its clients: send each named client its task and the name of the method whose
    `client_fit` it runs, return what came back.

    A reply is a decoded Payload, or the InvalidUpdate that decoding it raised; a client that did not answer
    (dropped, timed out) is simply missing. Byte counts are of what crossed the wire, each way.
    """

    client_names: list[str]
    examples: dict[str, int]  # each client's example count, declared before training: no reply may claim more

    def fit(self, tasks: dict[str, Payload], round_idx: int,
            method: str) -> tuple[dict[str, Payload | InvalidUpdate], int, int]: ...


class SimulatedClient:
    """Client k in this process: receives the task bytes, runs the named method's client hook on its own shard
    (and the public set, which this process holds anyway), returns bytes."""

    def __init__(self, wb: Workbench, k: int):
        self.wb, self.k, self.name = wb, k, f"client_{k}"
        held = wb.held(self.name)
        self.resources = ClientResources(wb.cfg, k, held.model, held.tokenizer, wb.client_data[k], held.public)
        self.examples = len(wb.client_data[k])

    def fit(self, blob: bytes, round_idx: int, method: str) -> bytes:
        return pack(method_class(method).client_fit(self.resources, unpack(blob, "server"), round_idx))


class InProcessTransport:
    """Clients in this process, called one after another; every message is serialized as on a wire."""

    def __init__(self, clients: list[Client]):
        self.clients = {c.name: c for c in clients}
        self.client_names = list(self.clients)
        self.examples = {c.name: c.examples for c in clients}

    def fit(self, tasks: dict[str, Payload], round_idx: int,
            method: str) -> tuple[dict[str, Payload | InvalidUpdate], int, int]:
        replies: dict[str, Payload | InvalidUpdate] = {}
        down = up = 0
        for name, task in tasks.items():
            blob = pack(task)
            down += len(blob)
            try:
                reply = self.clients[name].fit(blob, round_idx, method)
                up += len(reply)
                replies[name] = unpack(reply, name)
            except InvalidUpdate as err:
                replies[name] = err
            except ValueError as err:  # the client's own computation failed (e.g. logits past fp16): as on Flower
                replies[name] = InvalidUpdate(f"client {name}: failed this round ({err})")
        return replies, down, up


def sample_clients(names: list[str], fraction: float, minimum: int, seed: int, round_idx: int) -> list[str]:
    """The clients asked to train in a round without DP: max(minimum, ceil(fraction * K)) of them, seeded by the
    public (seed, round), so every engine and method sample alike. Under DP `privacy.private_sample` draws them."""
    k = min(len(names), max(minimum, math.ceil(fraction * len(names) - 1e-9)))
    if k == len(names):
        return list(names)
    chosen = set(random.Random(unit_seed(seed, round_idx, -2)).sample(names, k))
    return [n for n in names if n in chosen]


def _eval_due(cfg, r: int) -> bool:
    every = cfg.run.eval_every
    return r == cfg.federation.rounds or (every > 0 and r % every == 0)


def run_method(wb: Workbench, name: str, run: RunDir, transport: Transport | None = None) -> dict:
    """Run one method to completion (resuming after its last completed round); returns its final evaluation."""
    cfg = wb.cfg
    final = run.read_final(name)
    if final is not None:
        return final
    method = method_class(name)(wb)
    if not method.trains:
        final = method.evaluate(method.initial_states([]), None, 0)
        run.write_final(name, final)
        return final

    transport = transport or InProcessTransport([SimulatedClient(wb, k) for k in range(cfg.federation.clients)])
    secret = run.server_secret() if cfg.dp.noise_multiplier > 0 and method.shared is not None else None
    states = method.initial_states(transport.client_names)
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
        states = _client_phase(method, transport, states, r, timing, record, secret)
        states, info, server_timing = method.server_update(states, r)
        record["budget"] = asdict(record.pop("budget", Budget()) + info.pop("budget", Budget()))
        record.update(info)
        timing.update(server_timing)
        if _eval_due(cfg, r):
            t0 = time.perf_counter()
            last_eval = method.evaluate(states, None if r == cfg.federation.rounds else curve_items(cfg), r)
            timing["eval_s"] = time.perf_counter() - t0
            record["eval"] = last_eval
        t0 = time.perf_counter()
        run.save_round(name, r, states, {state: wb.held(state).model for state in states})
        timing["checkpoint_s"] = time.perf_counter() - t0
        timing["round_s"] = time.perf_counter() - t_round
        record["timing"] = timing
        run.mark_done(name, r, record)
        log.info("%s round %d/%d done in %.1f s", name, r, cfg.federation.rounds, timing["round_s"])

    if not last_eval:  # resumed after the final round had been trained but before final.json was written
        last_eval = method.evaluate(states, None, cfg.federation.rounds)
    run.write_final(name, last_eval)
    return last_eval


def _client_phase(method: Method, transport: Transport, states: States, r: int, timing: dict, record: dict,
                  secret: bytes | None) -> States:
    """Send each sampled client its task, check every reply on its own, let the method combine the accepted ones.

    Under DP (`secret`, the server's, given) the clients are sampled from the secret, every round is accounted, and
    the shared adapter becomes the Gaussian mechanism's release over the accepted clipped changes (`_release`),
    whatever number was accepted: keeping the adapter instead would publish a choice that depends on client data.
    """
    cfg = method.wb.cfg
    fed, dp, names = cfg.federation, cfg.dp, transport.client_names
    if secret is None:
        sampled = sample_clients(names, fed.fraction_fit, fed.min_fit_clients, cfg.run.seed, r)
    else:
        sampled = private_sample(dp, names, fed.fraction_fit, fed.min_fit_clients, secret, r)
        record.update(dp_record(dp, len(names), expected_clients(dp, len(names), fed.fraction_fit,
                                                                 fed.min_fit_clients), r))
    tasks = {name: method.client_task(states, name) for name in sampled}
    tasks = {name: Payload(task) for name, task in tasks.items() if task is not None}
    if not tasks and secret is None:
        return states
    if getattr(transport, "secure", False) and tasks:
        return _secure_client_phase(method, transport, states, tasks, r, timing, record, secret)
    t0 = time.perf_counter()
    replies, bytes_down, bytes_up = transport.fit(tasks, r, method.name) if tasks else ({}, 0, 0)
    timing["client_train_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    accepted = {}
    for name in tasks:  # one bad client is one rejected update, never a lost round
        reply = replies.get(name)
        if reply is None:  # a dropout, which the transport has reported
            continue
        try:
            if isinstance(reply, InvalidUpdate):
                raise reply
            accepted[name] = method.check_reply(tasks[name], reply, name, transport.examples[name])
        except InvalidUpdate as err:
            log.warning("round %d: rejected update: %s", r, err)
    record["budget"] = sum((method.client_budget(tasks[name], n) for name, (_, n) in accepted.items()), Budget())
    if secret is not None:  # a rejected or missing client is a zero change; the noise is the server's
        sent = states[method.shared]
        states = _release(method, states, clipped_sum(sent, [theta for theta, _ in accepted.values()], dp.clip_norm),
                          len(names), r, secret, record, server_noise=True)
    elif len(accepted) < fed.min_fit_clients:
        log.warning("round %d: %d accepted update(s), fewer than federation.min_fit_clients = %d; the adapters "
                    "are kept", r, len(accepted), fed.min_fit_clients)
    else:
        states = method.aggregate(states, accepted, r)
    timing["aggregate_s"] = time.perf_counter() - t0
    record.update(_participation(sampled, set(tasks) - set(replies), secret) |
                  {"accepted": len(accepted), "rejected": len(set(tasks) & set(replies)) - len(accepted),
                   "bytes_down": bytes_down, "bytes_up": bytes_up})
    return states


def _participation(sampled: list[str], dropped: set[str], secret: bytes | None) -> dict:
    """Who was asked and who did not answer: names without DP, only counts under DP, where the sample's secrecy is
    what the accountant's amplification by sampling assumes."""
    if secret is None:
        return {"sampled": sampled, "dropped": sorted(dropped, key=sampled.index)}
    return {"sampled": len(sampled), "dropped": len(dropped)}


def _secure_client_phase(method: Method, transport: Transport, states: States, tasks: dict[str, Payload], r: int,
                         timing: dict, record: dict, secret: bytes | None) -> States:
    """Under SecAgg+ the server only ever holds the average of the sampled clients' adapters: it checks that
    aggregate (shape, finite values) and treats it as the one update; per-client checks ran on the clients. Under
    DP the equal-weight average gives the clipped sum, (average - sent) x contributors, for `_release`; with
    dp.mode = distributed the clients already noised it and the server adds nothing."""
    first = next(iter(tasks.values()))
    if any(task.tensors is not first.tensors for task in tasks.values()):
        raise FederationError(f"method {method.name} sends each client its own adapter, which SecAgg+ cannot sum; "
                              f"turn secagg.enabled off for it")
    fed, dp = method.wb.cfg.federation, method.wb.cfg.dp
    t0 = time.perf_counter()
    average, contributors, seen = transport.fit_secure(first, list(tasks), r)
    timing["client_train_s"] = time.perf_counter() - t0
    record.update(seen | _participation(list(tasks), set(tasks) - set(contributors), secret))
    if secret is None:
        record["contributors"] = contributors
    t0 = time.perf_counter()
    try:
        if average is None:
            raise InvalidUpdate("secure aggregate: none this round (SecAgg+ halted for too few clients, or its "
                                "mean was out of range: see the line before and secagg_out_of_range)")
        validate_update(average.tensors, first.tensors, max(average.num_examples, 1), "secure aggregate")
    except InvalidUpdate as err:
        log.warning("round %d: %s; the adapters are kept", r, err)
        return states
    if secret is not None:
        change = {k: (average.tensors[k].double() - first.tensors[k].double()) * len(contributors)
                  for k in first.tensors}
        states = _release(method, states, change, len(transport.client_names), r, secret, record,
                          server_noise=dp.mode == "central")
    elif len(contributors) < fed.min_fit_clients:
        log.warning("round %d: %d client(s) in the secure aggregate, fewer than federation.min_fit_clients = %d; "
                    "the adapters are kept", r, len(contributors), fed.min_fit_clients)
        return states
    else:
        states = method.aggregate(states, {"secure aggregate": (average.tensors, average.num_examples)}, r)
    record["budget"] = method.client_budget(first, average.num_examples)  # from the summed count: approximate
    timing["aggregate_s"] = time.perf_counter() - t0
    record["accepted"] = len(contributors)
    return states


def _release(method: Method, states: States, change_sum: dict, population: int, r: int, secret: bytes,
             record: dict, server_noise: bool) -> States:
    """The Gaussian mechanism on the shared adapter: sent + (clipped sum + noise) / expected clients, the noise
    (when the server adds it) keyed by the server's secret and round."""
    cfg = method.wb.cfg
    m = expected_clients(cfg.dp, population, cfg.federation.fraction_fit, cfg.federation.min_fit_clients)
    std = sum_noise_std(cfg.dp, population, m) if server_noise else 0.0
    record["dp"]["noised_by"] = "server" if server_noise else "clients"
    released = private_release(states[method.shared], change_sum, m, std, round_seed(secret, "noise", r))
    return states | {method.shared: released}
