"""The pure training steps: client SFT, FedCoLLM's server mutual distillation, FedMKT's public-set top-k and
distillation towards per-example targets (no transport inside).

Every unit of work re-seeds torch from (seed, round, role), so the same unit gives the same result whether
it runs in one go, after a resume, or on another engine. Every path takes its optimizer steps through one
`Stepper`, so each [train] knob (TrainConfig: accumulation, checkpointing, schedule, clipping, autocast) applies to
all of them alike; with the knobs off a path trains exactly as before they existed.
"""

from __future__ import annotations

import itertools
import math
import time
from collections import Counter
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from fedcollm.alignment.exchange import TopK, topk_of
from fedcollm.alignment.sequence import fedmkt_loss, soft_target_ce
from fedcollm.alignment.transfer import Target, collate_targets
from fedcollm.comm import AdapterState
from fedcollm.config import TrainConfig
from fedcollm.data.batching import AnswerBatch, SFTData, answer_logits, collate
from fedcollm.data.tasks import MCExample
from fedcollm.distill.losses import (
    answer_ce,
    choice_distill_loss,
    mutual_losses,
    one_way_loss,
    pad_choices,
)
from fedcollm.errors import ConfigError
from fedcollm.evaluate import choice_requests, packed_choice_logprobs
from fedcollm.models.modes import evaluating

PLAIN = TrainConfig()  # every [train] knob off: each path steps as it did before they existed
SCHEDULES = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}  # transformers' names
HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}


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


Part = tuple[Any, tuple[int, ...]]  # a micro-batch and the counts its loss terms average over (tokens, items)


class Stepper:
    """The optimizer step of every training path. A batch comes as micro-batches (train.micro_batch_size), each
    with the counts its loss terms average over; each is weighted by its share of the batch's counts, run under
    autocast and backpropagated before the next is computed, so the gradients add up to the whole batch's. Then
    each optimizer's gradient (each model's) is clipped, its step taken (loss-scaled under fp16) and its learning-rate schedule,
    which spans the `steps` optimizer steps of one training call, advanced."""

    def __init__(self, optimizers: list[torch.optim.Optimizer], train: TrainConfig = PLAIN, steps: int = 1):
        from transformers import get_scheduler

        self.optimizers, self.train = optimizers, train
        self.device = optimizers[0].param_groups[0]["params"][0].device
        warmup = math.ceil(train.warmup_ratio * steps)
        self.schedules = [get_scheduler(SCHEDULES[train.lr_schedule], opt, num_warmup_steps=warmup,
                                        num_training_steps=steps) for opt in optimizers]
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=train.autocast == "fp16")

    def slices(self, rows: int) -> list[slice]:
        """The micro-batches of a batch of `rows` examples, as row slices (one when accumulation is off)."""
        size = self.train.micro_batch_size or rows
        return [slice(s, s + size) for s in range(0, rows, size)]

    def token_parts(self, batch: AnswerBatch) -> list[Part]:
        """`batch`'s micro-batches on the device, each trimmed to its own padding, with its answer-token count
        (what every token-mean loss averages over)."""
        parts = [batch.rows(s).to(self.device) for s in self.slices(len(batch))]
        return [(part, (part.tokens,)) for part in parts]

    def step(self, parts: list[Part], loss_of: Callable[[Any, tuple[float, ...]], tuple[torch.Tensor, dict]]
             ) -> tuple[float, dict[str, float]]:
        """One optimizer step on the batch `parts` make up. `loss_of(part, shares)` gives a part's loss and stats
        with each term scaled by its share (the part's count over the batch's), so the parts add up to the whole
        batch's loss and stats, which are returned."""
        wholes = [max(sum(counts), 1) for counts in zip(*(c for _, c in parts))]
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        loss, stats = 0.0, Counter()
        for part, counts in parts:
            with self._autocast():
                part_loss, part_stats = loss_of(part, tuple(c / w for c, w in zip(counts, wholes)))
            self.scaler.scale(part_loss).backward()
            loss += part_loss.item()
            stats.update(part_stats)
        for opt in self.optimizers:
            if self.train.max_grad_norm:
                self.scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]],
                                               self.train.max_grad_norm)
            self.scaler.step(opt)
        self.scaler.update()
        for schedule in self.schedules:
            schedule.step()
        return loss, dict(stats)

    def _autocast(self):
        """The forward and the loss in the weights' own precision, or under CUDA autocast to train.autocast's."""
        mode = self.train.autocast
        return nullcontext() if mode == "off" else torch.autocast(self.device.type, HALF[mode])


@dataclass
class StepLog:
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def mean_loss(self) -> float:
        return sum(self.losses) / max(len(self.losses), 1)


def check_autocast(train: TrainConfig, model) -> None:
    """Autocast only where it is right: on CUDA, over weights in fp32 or in its own half precision (casting the
    other half precision's weights would lose range or bits)."""
    if train.autocast == "off":
        return
    device = next(model.parameters()).device
    if device.type != "cuda":
        raise ConfigError(f"train.autocast = {train.autocast} runs on CUDA only, but the model is on {device}: set "
                          f"train.autocast = off")
    other = {p.dtype for p in model.parameters()} & (set(HALF.values()) - {HALF[train.autocast]})
    if other:
        raise ConfigError(f"train.autocast = {train.autocast} would recast the model's {other.pop()} weights into "
                          f"the other half precision: set model.dtype = fp32 (or {train.autocast})")


@contextmanager
def _checkpointing(models: list, on: bool):
    """Activation checkpointing of `models`' layers for the block, each as it was after. It is transformers'
    non-reentrant kind, which needs no input that requires grad: the embedding hook transformers adds for the
    reentrant kind is removed (it would only add a backward pass through the first layer)."""
    turned = [m for m in models if on and not m.is_activation_checkpointing]
    for m in turned:
        m.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        m.disable_input_require_grads()
    try:
        yield
    finally:
        for m in turned:
            m.activation_checkpointing_disable()


@contextmanager
def _training(trained: list[tuple[Any, float]], seed: int, steps: int, train: TrainConfig, log: StepLog):
    """Seeded training of each (model, learning rate)'s trainable parameters with a fresh AdamW, for `steps` steps
    of one Stepper, which it yields; the models are back in eval mode (and checkpointing as before) and the log
    timed when the block ends."""
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    models = [m for m, _ in trained]
    for m in models:
        check_autocast(train, m)
    try:
        with _checkpointing(models, train.gradient_checkpointing):
            for m in models:
                m.train()
            yield Stepper([_adamw(m, lr) for m, lr in trained], train, steps)
    finally:
        for m in models:
            m.eval()
        log.seconds = time.perf_counter() - t0


def sft_steps(model, data: SFTData, steps: int, lr: float, batch_size: int, seed: int, desc: str = "sft", *,
              train: TrainConfig = PLAIN) -> StepLog:
    """`steps` AdamW steps of answer-token cross-entropy on the model's trainable (LoRA) parameters."""
    def loss_of(part: AnswerBatch, shares: tuple[float, ...]) -> tuple[torch.Tensor, dict]:
        return answer_ce(answer_logits(model, part), part.targets, part.target_mask) * shares[0], {}

    log = StepLog()
    with _training([(model, lr)], seed, steps, train, log) as stepper:
        batches = cycle_batches(data, batch_size, seed)
        for _ in tqdm(range(steps), desc=desc, leave=False):
            log.losses.append(stepper.step(stepper.token_parts(next(batches)), loss_of)[0])
    return log


def client_update(model, global_state: AdapterState, data: SFTData, epochs: int, lr: float, batch_size: int,
                  seed: int, *, train: TrainConfig = PLAIN) -> tuple[AdapterState, int, StepLog]:
    """Client k: start from the broadcast theta, E epochs of task-loss SFT, return (theta_k, n_k, log)."""
    # peft, imported where a client trains rather than with these otherwise peft-free steps
    from fedcollm.models.lora import adapter_state, load_adapter_state

    load_adapter_state(model, global_state)
    log = sft_steps(model, data, epochs * data.steps_per_epoch(batch_size), lr, batch_size, seed, "client SFT",
                    train=train)
    return adapter_state(model), len(data), log


@dataclass
class DistillLog(StepLog):
    stats: list[dict[str, float]] = field(default_factory=list)
    step_seconds: list[float] = field(default_factory=list)


def mutual_distill_step(llm, slm, batch: AnswerBatch, stepper: Stepper, kd_weight: float, temperature: float,
                        direction: str, top_k: int, *, teacher_eval: bool = False, slm_kd_weight: float | None = None,
                        slm_temperature: float | None = None) -> dict[str, float]:
    """One step of Eq. 5-6 (`stepper` holds the LLM's and the SLM's optimizers). Each model's training logits
    serve its CE; with `teacher_eval` each is the other's target through a separate eval-mode forward (no LoRA
    dropout), else through its training logits, detached."""
    def loss_of(part: AnswerBatch, shares: tuple[float, ...]) -> tuple[torch.Tensor, dict]:
        teachers = {}
        if teacher_eval:
            with evaluating(llm, slm):
                teachers = {"llm_teacher": answer_logits(llm, part), "slm_teacher": answer_logits(slm, part)}
        loss_f, loss_g, stats = mutual_losses(answer_logits(llm, part), answer_logits(slm, part), part.targets,
                                              part.target_mask, kd_weight, temperature, direction, top_k,
                                              slm_kd_weight=slm_kd_weight, slm_temperature=slm_temperature,
                                              **teachers)
        # targets are detached: L^f reaches only omega, L^g only theta
        return (loss_f + loss_g) * shares[0], {k: v * shares[0] for k, v in stats.items()}

    return stepper.step(stepper.token_parts(batch), loss_of)[1]


def mutual_distill(llm, slm, aux: SFTData, steps: int, kd_weight: float, temperature: float, direction: str,
                   top_k: int, llm_lr: float, slm_lr: float, batch_size: int, seed: int, *, teacher_eval: bool = False,
                   slm_kd_weight: float | None = None, slm_temperature: float | None = None,
                   train: TrainConfig = PLAIN) -> DistillLog:
    """Server side of a round: `steps` steps of mutual knowledge distillation on D^a, updating omega and theta."""
    log = DistillLog()
    weight_g = kd_weight if slm_kd_weight is None else slm_kd_weight
    with _training([(llm, llm_lr), (slm, slm_lr)], seed, steps, train, log) as stepper:
        batches = cycle_batches(aux, batch_size, seed)
        for _ in tqdm(range(steps), desc="server mutual KD", leave=False):
            batch = next(batches)
            ts = time.perf_counter()
            stats = mutual_distill_step(llm, slm, batch, stepper, kd_weight, temperature, direction, top_k,
                                        teacher_eval=teacher_eval, slm_kd_weight=slm_kd_weight,
                                        slm_temperature=slm_temperature)
            log.step_seconds.append(time.perf_counter() - ts)
            log.stats.append(stats)
            log.losses.append(stats["ce_f"] + stats["ce_g"] + kd_weight * stats["kl_f"] + weight_g * stats["kl_g"])
    return log


def one_way_distill(student, teacher, aux: SFTData, steps: int, kd_weight: float, temperature: float,
                    direction: str, top_k: int, lr: float, batch_size: int, seed: int, desc: str, *,
                    train: TrainConfig = PLAIN) -> StepLog:
    """`steps` steps of CE + lambda * KL of `student` towards the fixed `teacher` (scored in eval mode, no
    gradient) on D^a: one half of FATE-LLM's sequential FedCoLLM schedule."""
    def loss_of(part: AnswerBatch, shares: tuple[float, ...]) -> tuple[torch.Tensor, dict]:
        with evaluating(teacher):
            target = answer_logits(teacher, part)
        loss, _ = one_way_loss(answer_logits(student, part), target, part.targets, part.target_mask, kd_weight,
                               temperature, direction, top_k)
        return loss * shares[0], {}

    log = StepLog()
    with _training([(student, lr)], seed, steps, train, log) as stepper:
        batches = cycle_batches(aux, batch_size, seed)
        for _ in tqdm(range(steps), desc=desc, leave=False):
            log.losses.append(stepper.step(stepper.token_parts(next(batches)), loss_of)[0])
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
                  kd_weight: float, seed: int, desc: str = "distill", *, train: TrainConfig = PLAIN) -> StepLog:
    """`epochs` epochs over `data` (a fraction ends part-way through an epoch) of FedMKT's loss, (1 - w) answer
    CE + w soft-target CE towards each example's target (`targets[i]` for example i; an example whose target is
    None learns from its CE alone)."""
    def loss_of(part: tuple, shares: tuple[float, ...]) -> tuple[torch.Tensor, dict]:
        batch, t_ids, t_probs, t_mask = part
        logits = answer_logits(model, batch)
        return fedmkt_loss(answer_ce(logits, batch.targets, batch.target_mask) * shares[0],
                           soft_target_ce(logits, t_ids, t_probs, t_mask) * shares[1], kd_weight), {}

    gen = torch.Generator().manual_seed(seed)
    whole = int(epochs)
    total = whole * data.steps_per_epoch(batch_size) + math.ceil((epochs - whole) * len(data) / batch_size - 1e-9)
    log = StepLog()
    with (_training([(model, lr)], seed, total, train, log) as stepper,
          tqdm(total=total, desc=desc, leave=False) as bar):
        while bar.n < total:
            for idx, batch in itertools.islice(data.indexed_batches(batch_size, gen), total - bar.n):
                parts = []
                for rows, (part, counts) in zip(stepper.slices(len(idx)), stepper.token_parts(batch)):
                    t_ids, t_probs, t_mask = (x.to(stepper.device) for x in
                                              collate_targets([targets[i] for i in idx[rows]], part.keep))
                    parts.append(((part, t_ids, t_probs, t_mask), counts + (int(t_mask.sum()),)))
                log.losses.append(stepper.step(parts, loss_of)[0])
                bar.update()
    return log


def choice_distill_steps(model, tokenizer, examples: list[MCExample], teacher_scores: list[list[float]], steps: int,
                         lr: float, batch_size: int, kd_weight: float, temperature: float, seed: int, max_length: int,
                         desc: str = "choice distill", *, train: TrainConfig = PLAIN) -> StepLog:
    """`steps` AdamW steps of choice-level distillation (`choice_distill_loss`) towards `teacher_scores` (the
    teacher's per-choice log-likelihoods of each example, computed once by `choice_logprobs`); examples with
    answer < 0 are unlabelled. Each step scores every choice of a batch of items in one packed forward (one per
    micro-batch)."""
    requests = choice_requests(tokenizer, examples, max_length)
    gold = [len(conts[ex.answer]) if ex.answer >= 0 else 0 for ex, (_, conts) in zip(examples, requests)]
    teacher = [torch.tensor(t) for t in teacher_scores]

    def loss_of(rows: list[int], shares: tuple[float, ...]) -> tuple[torch.Tensor, dict]:
        scores = packed_choice_logprobs(model, [requests[i] for i in rows], tokenizer.pad_token_id)
        return choice_distill_loss(scores, pad_choices([teacher[i] for i in rows]).to(stepper.device),
                                   [examples[i].answer for i in rows], [gold[i] for i in rows], kd_weight,
                                   temperature, shares=shares)

    gen = torch.Generator().manual_seed(seed)
    order: list[int] = []
    log = StepLog()
    with _training([(model, lr)], seed, steps, train, log) as stepper:
        for _ in tqdm(range(steps), desc=desc, leave=False):
            while len(order) < batch_size:
                order += torch.randperm(len(examples), generator=gen).tolist()
            idx, order = order[:batch_size], order[batch_size:]
            # counts: the labelled items' gold tokens (gold is 0 for an unlabelled one) for CE, the items for KL
            parts = [(idx[s], (sum(gold[i] for i in idx[s]), len(idx[s]))) for s in stepper.slices(len(idx))]
            log.losses.append(stepper.step(parts, loss_of)[0])
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
