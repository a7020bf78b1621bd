"""The pure training steps: client SFT, FedCoLLM's server mutual distillation, FedMKT's public-set top-k and
distillation towards per-example targets (no transport inside).

Every unit of work re-seeds torch from (seed, round, role), so the same unit gives the same result whether
it runs in one go, after a resume, or on another engine.
"""

from __future__ import annotations

import itertools
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from fedcollm.alignment.exchange import TopK, topk_of
from fedcollm.alignment.sequence import fedmkt_loss, soft_target_ce
from fedcollm.alignment.transfer import Target, collate_targets
from fedcollm.data.batching import AnswerBatch, SFTData, answer_logits, collate
from fedcollm.data.tasks import MCExample
from fedcollm.distill.losses import (
    answer_ce,
    choice_distill_loss,
    mutual_losses,
    one_way_loss,
    pad_choices,
)
from fedcollm.evaluate import choice_requests, packed_choice_logprobs
from fedcollm.models.lora import AdapterState, adapter_state, load_adapter_state


def unit_seed(seed: int, round_idx: int, role: int) -> int:
    """Distinct reproducible seed per (run seed, round, role); role -1 is the server."""
    return (seed * 1_000_003 + round_idx * 1_009 + role + 7) % (2**31)


def cycle_batches(data: SFTData, batch_size: int, seed: int):
    """Endless seeded shuffled batches: epoch after epoch with a fresh permutation each."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        yield from data.batches(batch_size, gen)


def _trainable(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _adamw(model, lr: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(_trainable(model), lr=lr, weight_decay=0.0)


@dataclass
class StepLog:
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def mean_loss(self) -> float:
        return sum(self.losses) / max(len(self.losses), 1)


def _step(opt: torch.optim.Optimizer, loss: torch.Tensor, log: StepLog) -> None:
    """One optimizer step on `loss`, logged: the step SFT and FedMKT's distillation share."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    log.losses.append(loss.item())


@contextmanager
def _training(model, lr: float, seed: int):
    """Seeded training of `model`'s trainable parameters with a fresh AdamW: yields (optimizer, device, log);
    the model is back in eval mode and the log timed when the block ends."""
    torch.manual_seed(seed)
    log, t0 = StepLog(), time.perf_counter()
    model.train()
    try:
        yield _adamw(model, lr), next(model.parameters()).device, log
    finally:
        model.eval()
        log.seconds = time.perf_counter() - t0


def sft_steps(model, data: SFTData, steps: int, lr: float, batch_size: int, seed: int, desc: str = "sft") -> StepLog:
    """`steps` AdamW steps of answer-token cross-entropy on the model's trainable (LoRA) parameters."""
    with _training(model, lr, seed) as (opt, device, log):
        batches = cycle_batches(data, batch_size, seed)
        for _ in tqdm(range(steps), desc=desc, leave=False):
            batch = next(batches).to(device)
            _step(opt, answer_ce(answer_logits(model, batch), batch.targets, batch.target_mask), log)
    return log


def client_update(model, global_state: AdapterState, data: SFTData, epochs: int, lr: float, batch_size: int,
                  seed: int) -> tuple[AdapterState, int, StepLog]:
    """Client k: start from the broadcast theta, E epochs of task-loss SFT, return (theta_k, n_k, log)."""
    load_adapter_state(model, global_state)
    log = sft_steps(model, data, epochs * data.steps_per_epoch(batch_size), lr, batch_size, seed, "client SFT")
    return adapter_state(model), len(data), log


@dataclass
class DistillLog(StepLog):
    stats: list[dict[str, float]] = field(default_factory=list)
    step_seconds: list[float] = field(default_factory=list)


@contextmanager
def _evaluating(*models):
    """Models in eval mode (LoRA dropout off) without gradients, each back to its mode after: teacher outputs."""
    modes = [m.training for m in models]
    try:
        for m in models:
            m.eval()
        with torch.no_grad():
            yield
    finally:
        for m, mode in zip(models, modes):
            m.train(mode)


def mutual_distill_step(llm, slm, batch: AnswerBatch, opt_f, opt_g, kd_weight: float, temperature: float,
                        direction: str, top_k: int, *, teacher_eval: bool = False, slm_kd_weight: float | None = None,
                        slm_temperature: float | None = None) -> dict[str, float]:
    """One step of Eq. 5-6. Each model's training logits serve its CE; with `teacher_eval` each is the other's
    target through a separate eval-mode forward (no LoRA dropout), else through its training logits, detached."""
    teachers = {}
    if teacher_eval:
        with _evaluating(llm, slm):
            teachers = {"llm_teacher": answer_logits(llm, batch), "slm_teacher": answer_logits(slm, batch)}
    llm_logits, slm_logits = answer_logits(llm, batch), answer_logits(slm, batch)
    loss_f, loss_g, stats = mutual_losses(llm_logits, slm_logits, batch.targets, batch.target_mask, kd_weight,
                                          temperature, direction, top_k, slm_kd_weight=slm_kd_weight,
                                          slm_temperature=slm_temperature, **teachers)
    opt_f.zero_grad(set_to_none=True)
    opt_g.zero_grad(set_to_none=True)
    (loss_f + loss_g).backward()  # targets are detached: L^f reaches only omega, L^g only theta
    opt_f.step()
    opt_g.step()
    return stats


def mutual_distill(llm, slm, aux: SFTData, steps: int, kd_weight: float, temperature: float, direction: str,
                   top_k: int, llm_lr: float, slm_lr: float, batch_size: int, seed: int, *, teacher_eval: bool = False,
                   slm_kd_weight: float | None = None, slm_temperature: float | None = None) -> DistillLog:
    """Server side of a round: `steps` steps of mutual knowledge distillation on D^a, updating omega and theta."""
    torch.manual_seed(seed)
    device = next(llm.parameters()).device
    opt_f, opt_g = _adamw(llm, llm_lr), _adamw(slm, slm_lr)
    llm.train()
    slm.train()
    log = DistillLog()
    t0 = time.perf_counter()
    batches = cycle_batches(aux, batch_size, seed)
    weight_g = kd_weight if slm_kd_weight is None else slm_kd_weight
    for _ in tqdm(range(steps), desc="server mutual KD", leave=False):
        batch = next(batches).to(device)
        ts = time.perf_counter()
        stats = mutual_distill_step(llm, slm, batch, opt_f, opt_g, kd_weight, temperature, direction, top_k,
                                    teacher_eval=teacher_eval, slm_kd_weight=slm_kd_weight,
                                    slm_temperature=slm_temperature)
        log.step_seconds.append(time.perf_counter() - ts)
        log.stats.append(stats)
        log.losses.append(stats["ce_f"] + stats["ce_g"] + kd_weight * stats["kl_f"] + weight_g * stats["kl_g"])
    llm.eval()
    slm.eval()
    log.seconds = time.perf_counter() - t0
    return log


def one_way_distill(student, teacher, aux: SFTData, steps: int, kd_weight: float, temperature: float,
                    direction: str, top_k: int, lr: float, batch_size: int, seed: int, desc: str) -> StepLog:
    """`steps` steps of CE + lambda * KL of `student` towards the fixed `teacher` (scored in eval mode, no
    gradient) on D^a: one half of FATE-LLM's sequential FedCoLLM schedule."""
    with _training(student, lr, seed) as (opt, device, log):
        batches = cycle_batches(aux, batch_size, seed)
        for _ in tqdm(range(steps), desc=desc, leave=False):
            batch = next(batches).to(device)
            with _evaluating(teacher):
                target = answer_logits(teacher, batch)
            loss, _ = one_way_loss(answer_logits(student, batch), target, batch.targets, batch.target_mask,
                                   kd_weight, temperature, direction, top_k)
            _step(opt, loss, log)
    return log


def public_topk(model, data: SFTData, k: int, vocab: int, batch_size: int) -> TopK:
    """The model's k largest logits among ids [0, vocab) (its tokenizer's; padded embedding rows are no token)
    on every answer token of `data`, examples in order, with its CE on each example's answer (full vocabulary)."""
    device = next(model.parameters()).device
    model.eval()
    values, ids, ce = [], [], []
    with torch.no_grad():
        for s in range(0, len(data.encoded), batch_size):
            chunk = data.encoded[s:s + batch_size]
            batch = collate(chunk, data.pad_id).to(device)
            logits = answer_logits(model, batch)
            nll = F.cross_entropy(logits.transpose(1, 2), batch.targets, reduction="none")
            for i, (_, n) in enumerate(chunk):
                v, t = topk_of(logits[i, batch.keep - n:, :vocab], k)
                values.append(v.cpu())
                ids.append(t.cpu())
                ce.append(nll[i, batch.keep - n:].mean().cpu())
    return TopK.from_examples(values, ids, torch.stack(ce), torch.arange(len(data.encoded)))


def distill_steps(model, data: SFTData, targets: list[Target], epochs: float, lr: float, batch_size: int,
                  kd_weight: float, seed: int, desc: str = "distill") -> StepLog:
    """`epochs` epochs over `data` (a fraction ends part-way through an epoch) of FedMKT's loss, (1 - w) answer
    CE + w soft-target CE towards each example's target (`targets[i]` for example i; an example whose target is
    None learns from its CE alone)."""
    gen = torch.Generator().manual_seed(seed)
    whole = int(epochs)
    total = whole * data.steps_per_epoch(batch_size) + math.ceil((epochs - whole) * len(data) / batch_size - 1e-9)
    with _training(model, lr, seed) as (opt, device, log), tqdm(total=total, desc=desc, leave=False) as bar:
        while bar.n < total:
            for idx, batch in itertools.islice(data.indexed_batches(batch_size, gen), total - bar.n):
                batch = batch.to(device)
                t_ids, t_probs, t_mask = (x.to(device) for x in collate_targets([targets[i] for i in idx],
                                                                                 batch.keep))
                logits = answer_logits(model, batch)
                _step(opt, fedmkt_loss(answer_ce(logits, batch.targets, batch.target_mask),
                                       soft_target_ce(logits, t_ids, t_probs, t_mask), kd_weight), log)
                bar.update()
    return log


def choice_distill_steps(model, tokenizer, examples: list[MCExample], teacher_scores: list[list[float]], steps: int,
                         lr: float, batch_size: int, kd_weight: float, temperature: float, seed: int, max_length: int,
                         desc: str = "choice distill") -> StepLog:
    """`steps` AdamW steps of choice-level distillation (`choice_distill_loss`) towards `teacher_scores` (the
    teacher's per-choice log-likelihoods of each example, computed once by `choice_logprobs`); examples with
    answer < 0 are unlabelled. Each step scores every choice of a batch of items in one packed forward."""
    requests = choice_requests(tokenizer, examples, max_length)
    gold = [len(conts[ex.answer]) if ex.answer >= 0 else 0 for ex, (_, conts) in zip(examples, requests)]
    teacher = [torch.tensor(t) for t in teacher_scores]
    gen = torch.Generator().manual_seed(seed)
    order: list[int] = []
    with _training(model, lr, seed) as (opt, device, log):
        for _ in tqdm(range(steps), desc=desc, leave=False):
            while len(order) < batch_size:
                order += torch.randperm(len(examples), generator=gen).tolist()
            idx, order = order[:batch_size], order[batch_size:]
            scores = packed_choice_logprobs(model, [requests[i] for i in idx], tokenizer.pad_token_id)
            loss, _ = choice_distill_loss(scores, pad_choices([teacher[i] for i in idx]).to(device),
                                          [examples[i].answer for i in idx], [gold[i] for i in idx], kd_weight,
                                          temperature)
            _step(opt, loss, log)
    return log


def fwd_bwd(model, batch: AnswerBatch) -> None:
    """One plain forward+backward of answer CE (no optimizer step): the yardstick a KD step is timed against."""
    answer_ce(answer_logits(model, batch), batch.targets, batch.target_mask).backward()
    model.zero_grad(set_to_none=True)


def time_fwd_bwd(model, data: SFTData, batch_size: int, steps: int, seed: int) -> float:
    """Mean seconds of `fwd_bwd` on the batches a distillation step would see."""
    device = next(model.parameters()).device
    batches = cycle_batches(data, batch_size, seed)
    model.train()
    times = []
    for i in range(steps + 1):  # the first pass warms up allocations and is not counted
        batch = next(batches).to(device)
        t0 = time.perf_counter()
        fwd_bwd(model, batch)
        if i:
            times.append(time.perf_counter() - t0)
    model.eval()
    return sum(times) / len(times)
