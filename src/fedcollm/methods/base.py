"""A method is one row of the paper's tables: what the server sends each client, how it combines what comes back,
what it does after, and what is scored. Engines (in-process, Flower) drive these hooks and only move messages;
they never ask which method they run.
"""

from __future__ import annotations

import logging
from dataclasses import astuple, dataclass
from typing import ClassVar

import torch

from fedcollm.aggregate import bound_changes, combine, validate_update
from fedcollm.algorithms.training import client_update, unit_seed
from fedcollm.comm import AdapterState, Payload
from fedcollm.config import Config
from fedcollm.data.batching import SFTData
from fedcollm.evaluate import evaluate_tasks
from fedcollm.methods import REGISTRY
from fedcollm.models.lora import load_adapter_state
from fedcollm.workbench import Workbench

log = logging.getLogger(__name__)

States = dict[str, AdapterState]  # named adapters a method tracks: "slm", "llm", or one per client
Updates = dict[str, tuple[AdapterState, int]]  # accepted client uploads: name -> (adapter, example count)


def curve_items(cfg: Config) -> int | None:
    """Items per task behind every point of the per-round curves (None = every evaluated item)."""
    limits = [n for n in (cfg.run.round_eval_limit, cfg.data.eval_limit) if n is not None]
    return min(limits, default=None)


def evaluate_state(wb: Workbench, which: str, state: AdapterState, limit: int | None, label: str) -> dict:
    """Accuracy of the LLM, the SLM or a client's SLM (`which`: "llm", "slm", "client_K") under `state`, with its
    own tokenizer, on the first `limit` items (None = all), plus its curve point."""
    held = wb.held(which)
    load_adapter_state(held.model, state)
    sets = {t: exs[:limit] for t, exs in wb.eval_sets.items()}
    return evaluate_tasks(held.model, held.tokenizer, sets, wb.cfg, label, curve_items(wb.cfg))


def mean_over_clients(per_client: list[dict]) -> dict:
    """The paper's Table 2 'mean' column: each task's scores (and curve points) averaged over clients; "truncated"
    is the most items any client's evaluation cut (clients' tokenizers and context lengths may differ)."""
    def mean(blocks: list[dict]) -> dict:
        numbers = [m for m, v in blocks[0].items() if isinstance(v, float)]
        out = {m: sum(b[m] for b in blocks) / len(blocks) for m in numbers}
        if "truncated" in blocks[0]:
            out["truncated"] = max(b["truncated"] for b in blocks)
        if "generation" in blocks[0]:  # generation speed, averaged too
            out["generation"] = mean([b["generation"] for b in blocks]) | {"decoding": blocks[0]["generation"]["decoding"]}
        return out | {k: blocks[0][k] for k in ("n", "metric") if k in blocks[0]}

    return {t: mean([c[t] for c in per_client]) | {"curve": mean([c[t]["curve"] for c in per_client])}
            for t in per_client[0]}


@dataclass
class Budget:
    """Optimizer steps and training examples (an example seen twice counts twice) of each model, so that methods
    are compared at stated budgets. SLM counts add up every client's and the server's training of an SLM."""

    llm_steps: int = 0
    slm_steps: int = 0
    llm_examples: int = 0
    slm_examples: int = 0

    @classmethod
    def slm_epochs(cls, epochs: int, examples: int, batch_size: int) -> "Budget":
        """Whole epochs of an SLM over `examples` in batches (the last one partial), as SFTData runs them."""
        return cls(slm_steps=epochs * -(-examples // batch_size), slm_examples=epochs * examples)

    def __add__(self, other: "Budget") -> "Budget":
        return Budget(*(a + b for a, b in zip(astuple(self), astuple(other))))


@dataclass
class ClientResources:
    """What one client holds, on any engine: its SLM (LoRA-wrapped), its tokenizer, private shard, public set."""

    cfg: Config
    index: int
    slm: torch.nn.Module
    tokenizer: object  # the SLM's
    data: SFTData  # the private shard
    public: SFTData | None = None  # the public set D^a in the SLM's tokenization; only where a method needs_public

    @property
    def name(self) -> str:
        return f"client_{self.index}"


class Method:
    """The no-training row (Zero-Shot) and the defaults every other method overrides."""

    name: ClassVar[str] = "zero_shot"
    trains: ClassVar[bool] = False  # False: evaluated once, no rounds
    shared: ClassVar[str | None] = None  # the state every client trains and the server averages (DP noise goes here)
    needs_public: ClassVar[bool] = False  # True: clients must also hold the public set D^a (ClientResources.public)
    needs_client_data: ClassVar[bool] = False  # True: the server trains on the clients' shards (so not on Flower)

    def __init__(self, wb: Workbench):
        self.wb = wb

    @property
    def scores(self) -> tuple[str, ...]:
        """The models this method is scored on, as registered (the report's rows)."""
        return REGISTRY[self.name].scores

    def initial_states(self, clients: list[str]) -> States:
        return {"slm": self.wb.slm_init, "llm": self.wb.llm_init}

    def client_task(self, states: States, client: str) -> AdapterState | None:
        """The tensors `client` is sent this round (None: the client is not asked to train)."""
        return None

    @classmethod
    def client_fit(cls, res: ClientResources, task: Payload, round_idx: int) -> Payload:
        """What a client computes from its task, run on the client's side of any engine (so it sees only
        `res` and the task, never the server). Default: E local epochs of SFT from the adapter it was sent."""
        fed = res.cfg.federation
        theta, n, step_log = client_update(res.slm, task.tensors, res.data, fed.local_epochs, fed.client_lr,
                                           fed.batch_size, unit_seed(res.cfg.run.seed, round_idx, res.index),
                                           train=res.cfg.train)
        log.debug("%s round %d: loss %.4f", res.name, round_idx, step_log.mean_loss)
        return Payload(theta, n)

    def check_reply(self, task: Payload, reply: Payload, client: str, declared: int) -> tuple[AdapterState, int]:
        """One client's decoded reply, checked on its own (InvalidUpdate naming `client` when it is refused): an
        adapter shaped like the one sent, with an example count no larger than the `declared` one (what the client
        said it holds before training), counted at most federation.max_examples."""
        fed = self.wb.cfg.federation
        validate_update(reply.tensors, task.tensors, reply.num_examples, client, declared)
        if reply.num_examples > fed.max_examples:
            log.warning("client %s: claimed %d examples, counted as federation.max_examples = %d", client,
                        reply.num_examples, fed.max_examples)
        return reply.tensors, min(reply.num_examples, fed.max_examples)

    def client_budget(self, task: Payload, num_examples: int) -> Budget:
        """The optimizer steps and examples of one client's training on `task`, counted by the server from the
        reply's example count (it never sees the training). Default: E local epochs of SFT."""
        fed = self.wb.cfg.federation
        return Budget.slm_epochs(fed.local_epochs, num_examples, fed.batch_size)

    def aggregate(self, states: States, updates: Updates, r: int) -> States:
        """Combine the accepted uploads of round `r` (already decoded and validated one by one)."""
        return states

    def average(self, sent: AdapterState, updates: Updates, r: int) -> AdapterState:
        """The shared adapter after round `r`: every change from `sent` held to the round's norm bound (see
        `bound_changes`), then combined by federation.aggregator; `sent` itself where no update is left. (Under
        DP the engine releases the noised mean of the clipped changes instead.)"""
        fed = self.wb.cfg.federation
        states = bound_changes({c: theta for c, (theta, _) in updates.items()}, sent, fed.max_update_norm,
                               fed.max_update_ratio, fed.norm_action)
        if not states:
            log.warning("round %d: every update was over the norm bound; the global adapter is kept", r)
            return sent
        return combine([(theta, updates[c][1]) for c, theta in states.items()], fed)

    def server_update(self, states: States, r: int) -> tuple[States, dict, dict]:
        """What the server computes after aggregation: (new states, record fields, timing in seconds). The record
        fields carry the server's own training under "budget" (a Budget)."""
        return states, {}, {}

    def evaluate(self, states: States, limit: int | None, r: int) -> dict:
        return {which: evaluate_state(self.wb, which, states[which], limit, f"{self.name} r{r} {which.upper()}")
                for which in self.scores}
