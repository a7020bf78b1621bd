"""FedMKT (Fan et al., arXiv 2406.02224): mutual knowledge transfer between the server's LLM and the clients'
SLMs through top-k logits on the public set D^a, across tokenizers, in FATE-LLM's round protocol.

Each client may run its own model family and tokenizer (model.client_slms). The server holds every tokenizer, so
it does all the aligning, both ways; a client needs only its own model and tokenizer.

A round, in FATE-LLM's order (fedmkt.slm_when = after_llm). Each client (`client_fit`, from its adapter):
fine-tunes on its private shard and uploads its top-k logits and per-example CE on D^a. The server aligns each
client's top-k into the LLM's vocabulary, selects per example by CE (the LLM's own start-of-round distribution is
a candidate; every candidate's CE is the server's `topk_ce` of its logits, the CE a client reports is never
trusted) and distils the LLM. Then each SLM distils from the LLM just updated (`teach_slms`): the server runs it
for the client from the adapter it holds for it, on D^a (public) only, towards the LLM's top-k moved onto the
client's rows and vocabulary (fedmkt.target = tokens, selected per example against the client's upload) or its
distribution over each item's choices (target = choices), then on the unlabelled pool if there is one. So the
last round's LLM reaches the scored SLMs. With slm_when = next_round (the order before issue 27), the client
distils at the start of the next round from the LLM's top-k carried in its task, before its fine-tuning, and the
last round's LLM never reaches the SLMs.

What crosses the network, all of it in the byte figures: down, the client's SLM adapter and, with next_round,
(after round 1) the LLM's top-k on D^a in the client's rows and vocabulary (plus an `aligned` flag per row when the
tokenizers differ); up, the adapter and the client's top-k and CEs. The adapter travels because a client here is
stateless (on Flower a client process may be new each round): the server holds each client's adapter for it and
scores it, as for Standalone (with fedmkt.share_adapters, their FedAvg instead). The LLM's adapter stays on the
server. The logits describe D^a, which is public, but they are a function of the client's private fine-tuning.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace

import torch

from fedcollm.algorithms.training import (
    PLAIN,
    StepLog,
    choice_distill_steps,
    client_update,
    distill_steps,
    public_topk,
    unit_seed,
)
from fedcollm.alignment.exchange import PREFIX, TopK, from_tensors, to_tensors
from fedcollm.alignment.sequence import SparseTargets, aligned_fraction
from fedcollm.alignment.transfer import Sender, moved, row_targets, select_targets
from fedcollm.comm import AdapterState, Payload
from fedcollm.config import FedMKTConfig, TrainConfig, epoch_steps
from fedcollm.data.batching import SFTData
from fedcollm.errors import InvalidUpdate
from fedcollm.evaluate import choice_logprobs
from fedcollm.methods.base import (
    Budget,
    ClientResources,
    Method,
    States,
    Updates,
    evaluate_state,
)
from fedcollm.methods.federated import evaluate_clients
from fedcollm.models.lora import adapter_state, load_adapter_state

log = logging.getLogger(__name__)
def adapter_part(tensors: dict[str, torch.Tensor]) -> AdapterState:
    """The adapter tensors of a payload that may also hold top-k tensors."""
    return {k: v for k, v in tensors.items() if not k.startswith(PREFIX)}


def covering(top: TopK, data: SFTData, sender: str) -> TopK:
    """`top`, refused (naming `sender`) unless it holds every example of `data` in order, one row per answer token."""
    lengths = [n for _, n in data.encoded]
    if top.example_ids.tolist() != list(range(len(lengths))) or top.offsets.diff().tolist() != lengths:
        raise InvalidUpdate(f"top-k from {sender}: does not cover the {len(lengths)} public examples' answer tokens "
                            f"in order ({top.example_ids.numel()} examples, {top.values.shape[0]} rows)")
    return top


def topk_ce(top: TopK, data: SFTData) -> torch.Tensor:
    """Each example's mean CE on its gold answer tokens as the server scores it from a top-k alone (`top` covers
    `data`, whose encoding holds the gold ids): where the gold id is among the k, -log of its softmax over the k;
    where it is not, that of the smallest kept logit, since the sender gave the gold token at most that. Both are
    lower bounds on the sender's full-vocabulary CE (the k logits hold only part of the mass), so a sender cannot
    score better than its own logits show, whatever CE it reports."""
    gold = torch.cat([torch.tensor(ids[len(ids) - n:], dtype=torch.long) for ids, n in data.encoded])
    values, hit = top.values.float(), top.ids.long() == gold[:, None]
    picked = torch.where(hit.any(1), values.masked_fill(~hit, -torch.inf).amax(1), values.amin(1))
    token_ce = (torch.logsumexp(values, 1) - picked).double()
    lengths = top.offsets.diff()
    example = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
    total = torch.zeros(len(lengths), dtype=torch.float64).index_add_(0, example, token_ce)
    return (total / lengths.clamp(min=1)).float()


def transfer_targets(sender: Sender, dst: SFTData, dst_tokenizer, temperature: float) -> list[SparseTargets]:
    """A sender's top-k on D^a as sparse targets on the receiver's answer rows, example by example."""
    return row_targets(moved(sender, dst, dst_tokenizer), dst.encoded, temperature)


def distil_from(model, public: SFTData, own: TopK, teachers: list[TopK], mkt: FedMKTConfig, epochs: int, lr: float,
                seed: int, desc: str, slm: bool, train: TrainConfig = PLAIN) -> tuple[StepLog, dict]:
    """Distil `model` on D^a towards the teachers' top-k (already on its answer rows and in its vocabulary), chosen
    per example by `mkt.selection` against its own start-of-round top-k `own`, with the SLM side's or the LLM
    side's weight and temperature; returns the step log and what the record shows (aligned and distilled shares)."""
    weight, temperature = ((mkt.slm_weight, mkt.slm_temp) if slm else (mkt.kd_weight, mkt.temperature))
    targets = [row_targets(t, public.encoded, temperature) for t in teachers]
    own_targets = row_targets(own, public.encoded, temperature)
    chosen = select_targets(mkt.selection, own.ce, own_targets, torch.stack([t.ce for t in teachers]), targets)
    steps = distill_steps(model, public, chosen, epochs, lr, mkt.batch_size, weight, seed, desc, train=train)
    aligned = [aligned_fraction(torch.cat([t.aligned for t in per_example])) for per_example in targets]
    return steps, {"aligned_fraction": sum(aligned) / len(aligned),
                   "distilled_fraction": sum(t is not None for t in chosen) / len(chosen)}


class FedMKT(Method):
    """Clients and server exchange top-k logits on D^a and distil from each other (see the module docstring)."""

    name = "fedmkt"
    trains = True
    needs_public = True

    def __init__(self, wb):
        super().__init__(wb)
        self.mkt = wb.cfg.fedmkt
        self._llm_view: tuple[AdapterState, TopK] | None = None
        self._sent: dict[int, TopK] = {}  # the LLM view's top-k moved onto each client tokenizer's rows (by id)
        self._uploads: dict[str, TopK] = {}  # this round's accepted client top-k, from aggregate to server_update

    def _llm_topk(self, states: States) -> TopK:
        """The LLM's top-k on D^a under states["llm"], computed once per LLM adapter (again after a resume)."""
        if self._llm_view is None or self._llm_view[0] is not states["llm"]:
            load_adapter_state(self.wb.llm, states["llm"])
            top = public_topk(self.wb.llm, self.wb.aux_data, self.mkt.top_k, len(self.wb.tokenizer),
                              self.mkt.batch_size)
            self._llm_view, self._sent = (states["llm"], top), {}
        return self._llm_view[1]

    def _llm_topk_for(self, states: States, client: str) -> TopK:
        """The LLM's top-k as `client` receives it: on its answer rows of D^a, in its vocabulary. The server aligns
        (it holds every tokenizer), so a client needs only its own model."""
        top, held = self._llm_topk(states), self.wb.held(client)
        key = id(held.tokenizer)
        if key not in self._sent:
            self._sent[key] = moved((top, self.wb.aux_data, self.wb.tokenizer), held.public, held.tokenizer)
        return self._sent[key]

    def initial_states(self, clients: list[str]) -> States:
        if self.mkt.share_adapters:
            return {"llm": self.wb.llm_init, "slm": self.wb.slm_init}
        return {"llm": self.wb.llm_init} | {c: self.wb.held(c).init for c in clients}

    def client_task(self, states: States, client: str) -> AdapterState | None:
        adapter = states["slm" if self.mkt.share_adapters else client]
        if self.mkt.slm_when == "after_llm" or states["llm"] is self.wb.llm_init:
            return adapter  # after_llm: the server has taught the adapter already; first round: nothing learned yet
        return adapter | to_tensors(self._llm_topk_for(states, client))

    @classmethod
    def client_fit(cls, res: ClientResources, task: Payload, round_idx: int) -> Payload:
        cfg = res.cfg
        mkt, fed = cfg.fedmkt, cfg.federation
        seed = unit_seed(cfg.run.seed, round_idx, res.index)
        load_adapter_state(res.slm, adapter_part(task.tensors))
        if mkt.slm_epochs and any(k.startswith(PREFIX) for k in task.tensors):
            llm_top = covering(from_tensors(task.tensors, "server", len(res.tokenizer), mkt.top_k), res.public,
                               "server")
            own = public_topk(res.slm, res.public, mkt.top_k, len(res.tokenizer), mkt.batch_size)
            steps, info = distil_from(res.slm, res.public, own, [llm_top], mkt, mkt.slm_epochs, mkt.slm_lr, seed,
                                      f"{res.name} FedMKT distil", slm=True, train=cfg.train)
            log.debug("%s round %d: distilled on %.0f%% of D^a, loss %.4f", res.name, round_idx,
                      100 * info["distilled_fraction"], steps.mean_loss)
        theta, n, _ = client_update(res.slm, adapter_state(res.slm), res.data, fed.local_epochs, fed.client_lr,
                                    fed.batch_size, seed, train=cfg.train)
        top = public_topk(res.slm, res.public, mkt.top_k, len(res.tokenizer), mkt.batch_size)
        return Payload(theta | to_tensors(top), n)

    def client_budget(self, task: Payload, num_examples: int) -> Budget:
        """SFT on the shard, plus distillation on D^a in the rounds whose task carries the LLM's top-k."""
        budget = super().client_budget(task, num_examples)
        if self.mkt.slm_epochs and any(k.startswith(PREFIX) for k in task.tensors):
            public = len(self.wb.aux_data)
            budget += Budget.slm_epochs(self.mkt.slm_epochs, public, self.mkt.batch_size)
        return budget

    def check_reply(self, task: Payload, reply: Payload, client: str, declared: int) -> tuple[AdapterState, int]:
        """The adapter as any adapter upload, plus a top-k that covers D^a with ids in the client's vocabulary; the
        CE it reports is replaced by the server's `topk_ce` of its logits (a client reporting 0 would otherwise
        win every example's selection)."""
        held = self.wb.held(client)
        top = covering(from_tensors(reply.tensors, client, len(held.tokenizer), self.mkt.top_k), held.public, client)
        theta, n = super().check_reply(Payload(adapter_part(task.tensors)),
                                       Payload(adapter_part(reply.tensors), reply.num_examples), client, declared)
        return theta | to_tensors(replace(top, ce=topk_ce(top, held.public))), n

    def aggregate(self, states: States, updates: Updates, r: int) -> States:
        self._uploads = {c: from_tensors(t, c, len(self.wb.held(c).tokenizer)) for c, (t, _) in updates.items()}
        adapters = {c: (adapter_part(t), n) for c, (t, n) in updates.items()}
        if self.mkt.share_adapters:
            return states | {"slm": self.average(states["slm"], adapters, r)}
        return states | {c: theta for c, (theta, _) in adapters.items()}  # a rejected client keeps its adapter

    def server_update(self, states: States, r: int) -> tuple[States, dict, dict]:
        uploads, self._uploads = self._uploads, {}
        if not uploads:
            log.warning("round %d: no client top-k was accepted; the LLM is not distilled", r)
            return states, {}, {}
        wb, mkt = self.wb, self.mkt
        own = self._llm_topk(states)
        own = replace(own, ce=topk_ce(own, wb.aux_data))  # scored as the clients are, so that no side is favoured
        load_adapter_state(wb.llm, states["llm"])
        teachers = [moved((uploads[c], wb.held(c).public, wb.held(c).tokenizer), wb.aux_data, wb.tokenizer)
                    for c in sorted(uploads)]
        steps, info = distil_from(wb.llm, wb.aux_data, own, teachers, mkt, mkt.llm_epochs, mkt.llm_lr,
                                  unit_seed(wb.cfg.run.seed, r, -1), f"FedMKT LLM distil r{r}", slm=False,
                                  train=wb.cfg.train)
        states = states | {"llm": adapter_state(wb.llm)}
        t0 = time.perf_counter()
        self._llm_topk(states)  # what the SLMs learn from (this round, or in the next round's tasks)
        budget = Budget(llm_steps=len(steps.losses), llm_examples=mkt.llm_epochs * len(wb.aux_data))
        record = info | {"teachers": len(teachers), "kd_first": steps.losses[0], "kd_last": steps.losses[-1]}
        timing = {"server_kd_s": steps.seconds, "server_topk_s": time.perf_counter() - t0}
        if mkt.slm_when == "after_llm" and (mkt.slm_epochs or mkt.pool_epochs):
            states, taught, seconds = self.teach_slms(states, uploads, r)
            budget += taught
            timing["server_slm_kd_s"] = seconds
        return states, record | {"budget": budget}, timing

    def teach_slms(self, states: States, uploads: dict[str, TopK], r: int) -> tuple[States, Budget, float]:
        """FATE-LLM's second half of a round: each SLM that trained this round (or the shared adapter) distils from
        the LLM just updated, on D^a (fedmkt.target) and then on the unlabelled pool (fedmkt.pool_epochs). The
        server runs it, from the adapter it holds for the client, on public data only; a client's own
        distribution for the selection is its upload (CE as the server scores it, as the LLM's)."""
        wb, mkt, t0 = self.wb, self.mkt, time.perf_counter()
        max_len, eval_bs = wb.cfg.model.max_length, wb.cfg.run.eval_batch_size
        top = self._llm_topk(states)
        top = replace(top, ce=topk_ce(top, wb.aux_data))
        scores = {}
        if mkt.target == "choices" and mkt.slm_epochs:
            scores["aux"] = choice_logprobs(wb.llm, wb.tokenizer, wb.split.aux, max_len, eval_bs, "FedMKT LLM choices")
        if mkt.pool_epochs:
            scores["pool"] = choice_logprobs(wb.llm, wb.tokenizer, wb.split.pool, max_len, eval_bs, "FedMKT LLM pool")
        budget = Budget()
        for name in ["slm"] if mkt.share_adapters else sorted(uploads):
            held = wb.held(name)
            load_adapter_state(held.model, states[name])
            seed = unit_seed(wb.cfg.run.seed, r, int(name.removeprefix("client_")) if name != "slm" else -3)
            if mkt.slm_epochs and "aux" in scores:
                steps = mkt.slm_epochs * held.public.steps_per_epoch(mkt.batch_size)
                choice_distill_steps(held.model, held.tokenizer, wb.split.aux, scores["aux"], steps, mkt.slm_lr,
                                     mkt.batch_size, mkt.slm_weight, mkt.slm_temp, seed, max_len,
                                     f"FedMKT {name} choices r{r}", train=wb.cfg.train)
                budget += Budget.slm_epochs(mkt.slm_epochs, len(wb.split.aux), mkt.batch_size)
            elif mkt.slm_epochs:
                own = uploads.get(name)
                if own is None:  # the shared adapter, as averaged: its own top-k
                    own = public_topk(held.model, held.public, mkt.top_k, len(held.tokenizer), mkt.batch_size)
                    own = replace(own, ce=topk_ce(own, held.public))
                teacher = replace(moved((top, wb.aux_data, wb.tokenizer), held.public, held.tokenizer), ce=top.ce)
                distil_from(held.model, held.public, own, [teacher], mkt, mkt.slm_epochs, mkt.slm_lr, seed,
                            f"FedMKT {name} distil r{r}", slm=True, train=wb.cfg.train)
                budget += Budget.slm_epochs(mkt.slm_epochs, len(wb.split.aux), mkt.batch_size)
            if mkt.pool_epochs:
                steps = epoch_steps(mkt.pool_epochs, len(wb.split.pool), mkt.batch_size)
                choice_distill_steps(held.model, held.tokenizer, wb.split.pool, scores["pool"], steps, mkt.slm_lr,
                                     mkt.batch_size, mkt.slm_weight, mkt.slm_temp, seed + 1, max_len,
                                     f"FedMKT {name} pool r{r}", train=wb.cfg.train)
                budget += Budget(slm_steps=steps, slm_examples=steps * mkt.batch_size)
            states = states | {name: adapter_state(held.model)}
        return states, budget, time.perf_counter() - t0

    def evaluate(self, states: States, limit: int | None, r: int) -> dict:
        if self.mkt.share_adapters:
            return super().evaluate(states, limit, r)
        clients = {c: s for c, s in states.items() if c != "llm"}
        return ({"llm": evaluate_state(self.wb, "llm", states["llm"], limit, f"{self.name} r{r} LLM")}
                | evaluate_clients(self.wb, clients, limit, r, self.name))
