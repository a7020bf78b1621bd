"""The methods whose clients train: Standalone, FedAvg, FedCoLLM (FedAvg + server mutual distillation)."""

from __future__ import annotations

import logging
import time

from fedcollm.algorithms.training import (
    StepLog,
    choice_distill_steps,
    distill_steps,
    mutual_distill,
    one_way_distill,
    public_topk,
    unit_seed,
)
from fedcollm.alignment.sequence import aligned_fraction
from fedcollm.alignment.transfer import moved, row_targets
from fedcollm.comm import AdapterState
from fedcollm.errors import ModelError
from fedcollm.evaluate import choice_logprobs
from fedcollm.methods.base import (
    Budget,
    Method,
    States,
    Updates,
    evaluate_state,
    mean_over_clients,
)
from fedcollm.models.lora import adapter_state, load_adapter_state
from fedcollm.workbench import Workbench

log = logging.getLogger(__name__)


class Standalone(Method):
    """Each client fine-tunes its own adapter on its own shard; nothing is shared (same steps as FedAvg)."""

    name = "standalone"
    trains = True

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
    """Clients fine-tune the broadcast SLM adapter; the server combines them (`Method.average`: the sample-weighted
    mean by default)."""

    name = "fedavg"
    trains = True
    shared = "slm"

    def client_task(self, states: States, client: str) -> AdapterState | None:
        return states["slm"]

    def aggregate(self, states: States, updates: Updates, r: int) -> States:
        if not updates:
            log.warning("round %d: every client update was rejected; the global adapter is kept", r)
            return states
        return states | {"slm": self.average(states["slm"], updates, r)}


def halves_record(f: StepLog, g: StepLog) -> dict:
    """First and last loss of the LLM's (f) and the SLM's (g) training, where each trains in its own loop."""
    return {"kd_first": {"f": f.losses[0], "g": g.losses[0]}, "kd_last": {"f": f.losses[-1], "g": g.losses[-1]}}


class FedCoLLM(FedAvg):
    """FedAvg, then mutual knowledge distillation between the LLM and the SLM on D^a (Eq. 3-6), for
    distill.epochs epochs a round. Where the two vocabularies differ (heterogeneous FedCoLLM), each model's
    distribution reaches the other through FedMKT's alignment (see `aligned_server_update`)."""

    name = "fedcollm"

    def __init__(self, wb: Workbench):
        super().__init__(wb)
        slm = wb.held("slm")
        self.aligned = slm.tokenizer is not wb.tokenizer
        if not self.aligned and wb.llm.config.vocab_size != slm.model.config.vocab_size:
            raise ModelError(f"LLM {wb.llm_name or wb.cfg.model.llm} ({wb.llm.config.vocab_size} ids) and SLM "
                             f"{wb.slm_name or wb.cfg.model.slm} ({slm.model.config.vocab_size} ids) share a "
                             f"tokenizer but not an output size")

    def server_update(self, states: States, r: int) -> tuple[States, dict, dict]:
        """Distillation on D^a (distill.target, distill.schedule), then on the unlabelled pool if there is one."""
        wb, d = self.wb, self.wb.cfg.distill
        steps = d.steps(len(wb.aux_data))
        pool_steps = d.steps(len(wb.split.pool), d.pool_epochs) if wb.split.pool else 0
        if not steps and not pool_steps:
            return states, {}, {}
        load_adapter_state(wb.llm, states["llm"])
        load_adapter_state(wb.slm, states["slm"])
        record, timing = {"budget": Budget()}, {"server_kd_s": 0.0}
        if steps:
            update = (self.choice_server_update if d.target == "choices" else self.aligned_server_update
                      if self.aligned else self.token_server_update)
            record, timing = update(r, steps)
        if pool_steps:
            record, timing = self.pool_update(r, pool_steps, record, timing)
        return states | {"llm": adapter_state(wb.llm), "slm": adapter_state(wb.slm)}, record, timing

    def token_server_update(self, r: int, steps: int) -> tuple[dict, dict]:
        """Eq. 5-6 on the answer tokens of D^a, one vocabulary: joint steps, or FATE-LLM's sequential halves."""
        wb, d = self.wb, self.wb.cfg.distill
        seed = unit_seed(wb.cfg.run.seed, r, -1)
        budget = Budget(llm_steps=steps, slm_steps=steps, llm_examples=steps * d.batch_size,
                        slm_examples=steps * d.batch_size)
        if d.schedule == "sequential":
            g = one_way_distill(wb.slm, wb.llm, wb.aux_data, steps, d.slm_weight, d.slm_temp, d.kl_direction,
                                d.top_k, d.slm_lr, d.batch_size, seed, f"FedCoLLM SLM from LLM r{r}", train=wb.cfg.train)
            f = one_way_distill(wb.llm, wb.slm, wb.aux_data, steps, d.kd_weight, d.temperature, d.kl_direction,
                                d.top_k, d.llm_lr, d.batch_size, seed, f"FedCoLLM LLM from SLM r{r}", train=wb.cfg.train)
            return halves_record(f, g) | {"budget": budget}, {"server_kd_s": f.seconds + g.seconds}
        kd = mutual_distill(wb.llm, wb.slm, wb.aux_data, steps, d.kd_weight, d.temperature, d.kl_direction,
                            d.top_k, d.llm_lr, d.slm_lr, d.batch_size, seed, teacher_eval=d.teacher_mode == "eval",
                            slm_kd_weight=d.slm_kd_weight, slm_temperature=d.slm_temperature, train=wb.cfg.train)
        warm = kd.step_seconds[1:] or kd.step_seconds  # the first step pays one-off allocation costs
        return ({"kd_first": kd.stats[0], "kd_last": kd.stats[-1], "budget": budget},
                {"server_kd_s": kd.seconds, "kd_step_s": sum(warm) / len(warm)})

    def choice_server_update(self, r: int, steps: int) -> tuple[dict, dict]:
        """Choice-level mutual distillation on D^a: each model learns CE on the gold choice plus lambda * KL towards
        the other's distribution over the item's choices. Each model's per-choice log-likelihoods are computed
        once (eval mode) at the start of the server phase, the sequential schedule recomputing the SLM's after its
        update; scores need no shared tokenizer, so heterogeneous pairs distil the same way."""
        wb, d = self.wb, self.wb.cfg.distill
        slm, seed, aux, t0 = wb.held("slm"), unit_seed(wb.cfg.run.seed, r, -1), wb.split.aux, time.perf_counter()
        llm_scores = self._choice_scores(wb.held("llm"), aux, f"r{r} LLM")
        slm_scores = self._choice_scores(slm, aux, f"r{r} SLM")
        score_s = time.perf_counter() - t0
        g = choice_distill_steps(slm.model, slm.tokenizer, aux, llm_scores, steps, d.slm_lr, d.batch_size,
                                 d.slm_weight, d.slm_temp, seed, wb.cfg.model.max_length, f"FedCoLLM SLM choices r{r}",
                                 train=wb.cfg.train)
        if d.schedule == "sequential":
            t1 = time.perf_counter()
            slm_scores = self._choice_scores(slm, aux, f"r{r} SLM after")
            score_s += time.perf_counter() - t1
        f = choice_distill_steps(wb.llm, wb.tokenizer, aux, slm_scores, steps, d.llm_lr, d.batch_size, d.kd_weight,
                                 d.temperature, seed, wb.cfg.model.max_length, f"FedCoLLM LLM choices r{r}",
                                 train=wb.cfg.train)
        budget = Budget(llm_steps=steps, slm_steps=steps, llm_examples=steps * d.batch_size,
                        slm_examples=steps * d.batch_size)
        return (halves_record(f, g) | {"budget": budget},
                {"server_kd_s": f.seconds + g.seconds, "server_scores_s": score_s})

    def pool_update(self, r: int, steps: int, record: dict, timing: dict) -> tuple[dict, dict]:
        """The SLM learns the LLM's (after this round's update) distribution over the choices of the unlabelled
        pool's questions, soft targets only, for distill.pool_epochs."""
        wb, d = self.wb, self.wb.cfg.distill
        slm, pool, t0 = wb.held("slm"), wb.split.pool, time.perf_counter()
        scores = self._choice_scores(wb.held("llm"), pool, f"r{r} LLM pool")
        score_s = time.perf_counter() - t0
        g = choice_distill_steps(slm.model, slm.tokenizer, pool, scores, steps, d.slm_lr, d.batch_size, d.slm_weight,
                                 d.slm_temp, unit_seed(wb.cfg.run.seed, r, -2), wb.cfg.model.max_length,
                                 f"FedCoLLM SLM pool r{r}", train=wb.cfg.train)
        budget = record["budget"] + Budget(slm_steps=steps, slm_examples=steps * d.batch_size)
        return (record | {"pool_kd_first": g.losses[0], "pool_kd_last": g.losses[-1], "budget": budget},
                timing | {"server_kd_s": timing["server_kd_s"] + g.seconds,
                          "server_scores_s": timing.get("server_scores_s", 0.0) + score_s})

    def _choice_scores(self, held, examples, label: str) -> list[list[float]]:
        cfg = self.wb.cfg
        return choice_logprobs(held.model, held.tokenizer, examples, cfg.model.max_length, cfg.run.eval_batch_size,
                               f"FedCoLLM choices {label}")

    def aligned_server_update(self, r: int, steps: int) -> tuple[dict, dict]:
        """Mutual distillation across two vocabularies. Each model's top-k on D^a, taken once at the start of the
        server phase (detached, as in Eq. 5-6), is moved onto the other's tokenization and vocabulary by FedMKT's
        alignment; then each model trains distill.epochs on D^a towards it. Loss CE + lambda * soft-target CE,
        written as (1 - w) CE + w soft CE with w = lambda / (1 + lambda): the same direction, and AdamW steps do
        not depend on the loss scale. Top-k width: distill.top_k, or 16 when that is 0 (a full distribution
        cannot be moved across vocabularies). Unlike the one-vocabulary path, the targets do not follow the other
        model step by step: alignment works on whole examples, computed once a round (sequential schedule: the
        SLM's again after its update, before the LLM learns from it)."""
        wb, d = self.wb, self.wb.cfg.distill
        slm, k = wb.held("slm"), d.top_k or 16
        w_f, w_g = d.kd_weight / (1.0 + d.kd_weight), d.slm_weight / (1.0 + d.slm_weight)
        seed = unit_seed(wb.cfg.run.seed, r, -1)

        def slm_to_llm():
            slm_top = public_topk(slm.model, slm.public, k, len(slm.tokenizer), d.batch_size)
            return moved((slm_top, slm.public, slm.tokenizer), wb.aux_data, wb.tokenizer)

        llm_top = public_topk(wb.llm, wb.aux_data, k, len(wb.tokenizer), d.batch_size)
        to_slm = moved((llm_top, wb.aux_data, wb.tokenizer), slm.public, slm.tokenizer)
        to_llm = slm_to_llm() if d.schedule == "joint" else None
        g_log = distill_steps(slm.model, slm.public, row_targets(to_slm, slm.public.encoded, d.slm_temp),
                              d.epochs, d.slm_lr, d.batch_size, w_g, seed, f"FedCoLLM aligned KD SLM r{r}",
                              train=wb.cfg.train)
        to_llm = to_llm or slm_to_llm()  # sequential: the LLM learns from the SLM after its update
        f_log = distill_steps(wb.llm, wb.aux_data, row_targets(to_llm, wb.aux_data.encoded, d.temperature),
                              d.epochs, d.llm_lr, d.batch_size, w_f, seed, f"FedCoLLM aligned KD LLM r{r}",
                              train=wb.cfg.train)
        budget = Budget(llm_steps=len(f_log.losses), slm_steps=len(g_log.losses),
                        llm_examples=round(d.epochs * len(wb.aux_data)), slm_examples=round(d.epochs * len(slm.public)))
        aligned = {"llm": aligned_fraction(to_llm.aligned), "slm": aligned_fraction(to_slm.aligned)}
        return (halves_record(f_log, g_log) | {"aligned_fraction": aligned, "budget": budget},
                {"server_kd_s": f_log.seconds + g_log.seconds})
