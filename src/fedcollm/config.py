"""Every knob of a run, as typed dataclasses validated on construction.

A `Config` loads from TOML (`Config.from_toml`), takes `section.key=value` overrides from the CLI
(`Config.override`) and round-trips through `to_dict` so a run directory records exactly what ran.
The docstring of each field is the one place it is documented (`fedcollm config-doc` prints them).
Tasks are configuration too: `[tasks.NAME]` tables (see `TaskConfig`); the paper's four tasks are presets
written in that same form in `configs/tasks.toml`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import string
import tomllib
import types
import typing
from dataclasses import dataclass, field, fields
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar, get_type_hints

from fedcollm.errors import ConfigError
from fedcollm.methods import REGISTRY

AGGREGATORS = ("fedavg", "median", "trimmed_mean", "krum")

__all__ = ["Config", "ConfigError", "TaskConfig", "preset_tasks", "parse_derived_spec"]


def _check(cond: bool, where: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{where}: {msg}")


def default_data_dir() -> str | None:
    return os.environ.get("FEDCOLLM_DATA") or None


def parse_derived_spec(spec: str, where: str = "model") -> tuple[str, int] | None:
    """`derived:BASE:N` -> (BASE, N); any other model spec -> None."""
    if not spec.startswith("derived:"):
        return None
    parts = spec.split(":")
    if len(parts) != 3 or not parts[1] or not parts[2].isdigit() or int(parts[2]) < 1:
        raise ConfigError(f"{where}: {spec!r} is not derived:BASE:N with N >= 1 layers, e.g. "
                          f"derived:smollm2-135m:10")
    return parts[1], int(parts[2])


def template_fields(template: str, where: str) -> list[str]:
    """The `{name}` placeholders of a prompt template; anything but plain names is refused."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as err:
        raise ConfigError(f"{where}: not a valid template ({err}); write literal braces as {{{{ and }}}}") from err
    names = []
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        _check(name.isidentifier() and not spec and not conversion, where,
               f"placeholder {{{name}}} must be a plain row field name like {{question}}")
        names.append(name)
    return names


@dataclass
class TaskConfig:
    """One task: where its rows are, which splits train and evaluate, how prompts are built. A choice task scores
    each choice's log-likelihood; a generation task trains on a response and scores what a model writes."""

    path: str = ""
    """Rows: a folder of <split>.jsonl files (absolute, or relative to data.data_dir, falling back to the bundled data), or `hf:ID` for a Hugging Face `datasets` id or a local `save_to_disk` folder."""
    kind: str = "choice"
    """choice (multiple choice: a list of choices and the gold one's index) or generation (prompt/response rows: trained on the response tokens, scored by `metrics` on what the model generates)."""
    train_split: str | None = None
    """Split whose rows are federated (client shards + D^a); unset = evaluation-only task."""
    eval_split: str = "test"
    """Split scored for every reported figure."""
    validation_split: str | None = None
    """Split scored instead when data.scored = "validation" (choosing hyperparameters without the test items)."""
    validation_holdout: int = 0
    """For a task without a separate validation split: its last N train rows are the validation set and are never trained on, in any run."""
    context: str = "Question: {question}\nAnswer:"
    """Prompt; {name} is replaced by the row's field `name` (any string field)."""
    continuation: str | None = None
    """What follows the prompt: for choice tasks the scored choice, with {choice} once (default " {choice}"); for generation tasks the trained response, with {response} once (default " {response}"). Other row fields allowed too."""
    optional_fields: list[str] = field(default_factory=list)
    """Template fields a row may leave out or leave empty (Alpaca's input); they render as empty text."""
    context_without_optional: str | None = None
    """Prompt used instead of `context` when a row leaves an optional field empty (Alpaca's prompt without input); unset = `context` with the field empty."""
    chat_template: bool = False
    """Generation tasks: wrap the prompt as a user turn (and the response as the assistant's) with each model's own tokenizer chat template; a tokenizer without one is refused."""
    response_field: str = "response"
    """Generation tasks: row field holding the reference response (trained on, and scored against)."""
    references_field: str | None = None
    """Generation tasks: row field listing further acceptable references (e.g. SQuAD's answers), which a row may leave out; each metric takes its best over the response and these."""
    metrics: list[str] = field(default_factory=lambda: ["rouge_l", "token_f1", "exact_match", "perplexity"])
    """Generation tasks: what is scored, the first being the headline score: rouge_l (ROUGE-L F, rouge-score with stemming), token_f1 and exact_match (SQuAD's normalisation: lower case, no punctuation or articles), perplexity (of the reference response, no generation needed)."""
    max_new_tokens: int = 64
    """Generation tasks: most tokens generated per prompt (an end-of-text token or a stop sequence ends earlier)."""
    stop: list[str] = field(default_factory=list)
    """Generation tasks: texts that end a generation (cut before the first one), besides the tokenizer's end-of-text."""
    choices_field: str = "choices"
    """Choice tasks: row field holding the list of choice texts (dotted path for nested rows, e.g. choices.text)."""
    answer_field: str = "answer"
    """Choice tasks: row field holding the gold answer: a 0-based index, or a label found in labels_field."""
    labels_field: str = "labels"
    """Choice tasks: row field holding the choice labels (e.g. A-D), used only when the answer is a label string."""
    id_field: str = "id"
    """Row field holding a unique example id (duplicates within a split are refused)."""
    subset: str | None = None
    """Dataset configuration name for `hf:` sources (e.g. ARC-Easy); unset otherwise."""
    duplicate_choices: str = "error"
    """Choice tasks: a row with two identical choice texts: error (refuse the file) or warn (keep it, log the count)."""
    empty_responses: str = "error"
    """Generation tasks: a row whose response is empty or only whitespace: error (refuse the file, naming the row) or skip (drop it, log the count and the first)."""

    GENERATION_METRICS: ClassVar[tuple[str, ...]] = ("rouge_l", "token_f1", "exact_match", "perplexity")
    blanks: ClassVar[frozenset[str]] = frozenset({"stop"})  # string fields that may be whitespace alone ("\n")

    def __post_init__(self) -> None:
        if self.continuation is None:
            self.continuation = " {response}" if self.kind == "generation" else " {choice}"

    @property
    def generative(self) -> bool:
        return self.kind == "generation"

    @property
    def slot(self) -> str:
        """The continuation's own placeholder: the choice or the response."""
        return "response" if self.generative else "choice"

    def validate(self, where: str) -> None:
        _check(bool(self.path.strip()), f"{where}.path", "must name a folder or hf:ID")
        _check(self.kind in ("choice", "generation"), f"{where}.kind", "choice or generation")
        _check(self.train_split is None or self.train_split != self.eval_split, f"{where}.train_split",
               f"is the evaluation split {self.eval_split!r}: training on the items you score is refused")
        ctx = template_fields(self.context, f"{where}.context")
        cont = template_fields(self.continuation, f"{where}.continuation")
        _check(self.slot not in ctx, f"{where}.context",
               f"must not use {{{self.slot}}}: it goes in the continuation")
        _check(cont.count(self.slot) == 1, f"{where}.continuation", f"must contain {{{self.slot}}} exactly once")
        if self.context_without_optional is not None:
            short = template_fields(self.context_without_optional, f"{where}.context_without_optional")
            _check(bool(self.optional_fields), f"{where}.context_without_optional", "needs optional_fields")
            _check(not set(short) & set(self.optional_fields) and self.slot not in short,
                   f"{where}.context_without_optional", "must not use the optional fields or the continuation's")
        unused = sorted(set(self.optional_fields) - set(ctx + cont))
        _check(not unused, f"{where}.optional_fields", f"{', '.join(unused)} appear in no template")
        _check(self.duplicate_choices in ("error", "warn"), f"{where}.duplicate_choices", "error or warn")
        _check(self.empty_responses in ("error", "skip"), f"{where}.empty_responses", "error or skip")
        _check(self.validation_holdout >= 0, f"{where}.validation_holdout", "must be >= 0")
        _check(not (self.validation_split and self.validation_holdout), f"{where}.validation_holdout",
               "set either validation_split or validation_holdout, not both")
        _check(self.validation_holdout == 0 or self.train_split is not None, f"{where}.validation_holdout",
               "needs a train_split to hold rows out of")
        _check(self.validation_split is None or self.validation_split not in (self.eval_split, self.train_split),
               f"{where}.validation_split",
               "must differ from train_split and eval_split: validation items are neither trained on nor reported")
        _check(self.subset is None or self.path.startswith("hf:"), f"{where}.subset", "applies only to hf: sources")
        _check(bool(self.metrics) and set(self.metrics) <= set(self.GENERATION_METRICS)
               and len(set(self.metrics)) == len(self.metrics), f"{where}.metrics",
               f"one or more of {', '.join(self.GENERATION_METRICS)}, each once")
        _check(self.max_new_tokens >= 1, f"{where}.max_new_tokens", "must be >= 1")
        _check(all(isinstance(s, str) and s for s in self.stop), f"{where}.stop", "must list non-empty texts")
        _check(self.generative or not self.chat_template, f"{where}.chat_template", "applies to generation tasks")

    @property
    def template_fields(self) -> list[str]:
        """Row fields the templates read (besides the choice or the response)."""
        names = template_fields(self.context, "context") + template_fields(self.continuation, "continuation")
        return list(dict.fromkeys(n for n in names if n != self.slot))


@cache
def _presets() -> dict[str, dict]:
    text = (resources.files("fedcollm") / "configs" / "tasks.toml").read_text(encoding="utf-8")
    return tomllib.loads(text)["tasks"]


def preset_tasks() -> dict[str, TaskConfig]:
    """The built-in tasks, defined in configs/tasks.toml exactly as a user defines one in a config."""
    return {name: _build(TaskConfig, spec, f"preset tasks.{name}") for name, spec in _presets().items()}


@dataclass
class LoraConfig:
    r: int = 8
    """LoRA rank."""
    alpha: int = 16
    """LoRA scaling numerator (scale = alpha / r)."""
    dropout: float = 0.05
    """Dropout on the LoRA input."""
    target_modules: list[str] = field(default_factory=list)
    """Modules to adapt; empty = the per-architecture default (q_proj, v_proj for Llama/Qwen/Gemma)."""

    def __post_init__(self) -> None:
        _check(self.r >= 1, "model.lora.r", "must be >= 1")
        _check(self.alpha > 0, "model.lora.alpha", "must be > 0")
        _check(0.0 <= self.dropout < 1.0, "model.lora.dropout", "must be in [0, 1)")


@dataclass
class ModelConfig:
    llm: str = "smollm2-135m"
    """Server LLM f: registry name, local HF dir, .gguf file, or hub id."""
    slm: str = "derived:smollm2-135m:10"
    """Client SLM g: as `llm`, or `derived:BASE:N` for an N-layer SLM derived from registry model BASE."""
    client_slms: list[str] = field(default_factory=list)
    """One SLM per client (entry k is client k's, each named as `slm`), so clients may differ in model family and tokenizer (FedMKT, Standalone); empty = every client runs `slm`."""
    dtype: str = "auto"
    """Compute dtype of the frozen base weights: bf16, fp16, fp32, or auto: bf16 on CUDA that has it; on a CPU with native bf16, whichever of fp32/bf16 measures faster per model (timed once, kept in $FEDCOLLM_CACHE); else fp32."""
    device: str = "auto"
    """auto (cuda if present), cpu, cuda, cuda:N."""
    max_length: int = 128
    """Longest tokenized training sequence (and of the choice scores FedCoLLM and FedMKT distil towards); longer prompts are cut from the left. Evaluation has its own: run.eval_max_length."""
    quantize: str = "none"
    """Frozen base weights of every loaded model in 4bit (NF4, computing in `dtype`) or 8bit (LLM.int8) through bitsandbytes, as QLoRA trains (adapters stay in float); none = plain `dtype`. Needs `pip install 'fedcollm[quant]'` and a device bitsandbytes supports (CUDA)."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    repeats: ClassVar[frozenset[str]] = frozenset({"client_slms"})  # list fields that may name an item twice

    def __post_init__(self) -> None:
        parse_derived_spec(self.llm, "model.llm")
        parse_derived_spec(self.slm, "model.slm")
        for k, spec in enumerate(self.client_slms):
            parse_derived_spec(spec, f"model.client_slms[{k}]")
        _check(self.dtype in ("auto", "bf16", "fp16", "fp32"), "model.dtype", "auto, bf16, fp16 or fp32")
        _check(re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device) is not None, "model.device",
               f"auto, cpu, cuda or cuda:N, got {self.device!r}")
        _check(self.max_length >= 16, "model.max_length", "must be >= 16")
        _check(self.quantize in ("none", "8bit", "4bit"), "model.quantize", "none, 8bit or 4bit")


@dataclass
class DataConfig:
    data_dir: str | None = field(default_factory=default_data_dir)
    """Folder that task paths are relative to (env FEDCOLLM_DATA sets the default); unset = only the data bundled with fedcollm (ARC-Easy, Alpaca subset)."""
    tasks: list[str] = field(default_factory=lambda: ["commonsenseqa", "openbookqa", "arc_challenge", "arc_easy"])
    """Tasks whose train splits are federated and whose eval splits are scored: preset names or [tasks.NAME] tables."""
    eval_tasks: list[str] = field(default_factory=list)
    """Further tasks that are only evaluated (they need no train split)."""
    train_per_task: int | None = None
    """Use at most this many (seeded random) train examples per task; None = all."""
    partition: str = "iid"
    """How client shards are cut: iid, dirichlet (label-skew over tasks), or task (one task per client)."""
    dirichlet_alpha: float = 0.5
    """Concentration of the Dirichlet task mix per client (smaller = more skewed)."""
    aux_fraction: float = 0.2
    """Share of the train pool held by the server as auxiliary data D^a (0.2 = equal 5-way split with 4 clients); unused when aux_tasks is set."""
    aux_tasks: list[str] = field(default_factory=list)
    """Tasks whose train splits (each cut to train_per_task) are D^a, apart from the clients' data, which is then the whole of the tasks' pools; empty = D^a is cut from that pool by aux_fraction. A Flower server needs it set: it then holds D^a without any client's rows."""
    public_pool: int = 0
    """Unlabelled public pool held by the server: per task of data.tasks, up to this many train rows past train_per_task (rows no client, D^a or validation holdout holds), answers removed; distilled by soft targets only (distill.pool_epochs). 0 = none. In-process only: the server reads the tasks' train files."""
    eval_limit: int | None = None
    """Evaluate on the first N items of each task's eval split; None = all. Printed beside every figure."""
    scored: str = "eval"
    """Which split every accuracy is read on: eval (each task's eval_split) or validation (its validation split or holdout, for tuning)."""

    def __post_init__(self) -> None:
        _check(len(self.tasks) > 0, "data.tasks", "must name at least one task")
        both = sorted(set(self.tasks) & set(self.eval_tasks))
        _check(not both, "data.eval_tasks", f"{', '.join(both)} already in data.tasks (which are evaluated too)")
        both = sorted(set(self.tasks) & set(self.aux_tasks))
        _check(not both, "data.aux_tasks", f"{', '.join(both)} also in data.tasks: D^a may not hold the clients' rows")
        _check(self.partition in ("iid", "dirichlet", "task"), "data.partition", "iid, dirichlet or task")
        _check(self.dirichlet_alpha > 0, "data.dirichlet_alpha", "must be > 0")
        _check(0.0 < self.aux_fraction < 1.0, "data.aux_fraction", "must be in (0, 1)")
        _check(self.train_per_task is None or self.train_per_task > 0, "data.train_per_task", "must be > 0 (or none)")
        _check(self.public_pool >= 0, "data.public_pool", "must be >= 0")
        _check(not self.public_pool or self.train_per_task, "data.public_pool",
               "needs data.train_per_task: the pool is the train rows past it")
        _check(self.eval_limit is None or self.eval_limit > 0, "data.eval_limit", "must be > 0 (or none for all)")
        _check(self.scored in ("eval", "validation"), "data.scored", "eval or validation")


@dataclass
class FederationConfig:
    clients: int = 4
    """Number of clients K."""
    rounds: int = 2
    """Communication rounds T."""
    local_epochs: int = 1
    """Local epochs E of task-loss SFT per round on each client shard."""
    client_lr: float = 3e-4
    """Learning rate eta_theta of the clients' AdamW on the SLM adapter."""
    batch_size: int = 8
    """Examples per optimizer step, clients and centralized baseline."""
    fraction_fit: float = 1.0
    """Share of the clients asked to train each round (a seeded sample, the same on every engine)."""
    min_fit_clients: int = 1
    """Fewest clients sampled a round; a round whose accepted uploads fall below it keeps the global adapter."""
    max_examples: int = 100_000
    """A client's claimed example count above this is cut to it (logged with the client's name): bounds its weight."""
    max_share: float = 0.3
    """Largest share of a round's total weight one client may hold in FedAvg (weights above it are cut and the rest
    renormalised); where fewer than 1 / max_share clients are accepted, their weights become equal."""
    max_update_ratio: float = 3.0
    """Largest L2 norm of a client's change to the adapter it was sent, as a multiple of the lower median change
    norm of the round's accepted updates (a bound no single client can raise, so it cannot compound over rounds)."""
    max_update_norm: float = 0.0
    """A fixed largest L2 norm of a client's change instead of max_update_ratio x median; 0 = use the median rule."""
    norm_action: str = "clip"
    """What happens to an update over the norm bound: clip (scale the change down to the bound) or reject."""
    aggregator: str = "fedavg"
    """How accepted updates combine: fedavg (weighted mean), median (coordinate-wise), trimmed_mean (coordinate-wise,
    trim_fraction cut at each end) or krum (the update closest to its n - byzantine - 2 nearest neighbours)."""
    trim_fraction: float = 0.1
    """trimmed_mean: share of the updates dropped at each end of every coordinate, in [0, 0.5)."""
    byzantine: int = 1
    """krum: number of malicious clients it tolerates (needs more than 2 x byzantine + 2 updates)."""

    def __post_init__(self) -> None:
        _check(self.clients >= 1, "federation.clients", "must be >= 1")
        _check(0.0 < self.fraction_fit <= 1.0, "federation.fraction_fit", "must be in (0, 1]")
        _check(1 <= self.min_fit_clients <= self.clients, "federation.min_fit_clients",
               f"must be in [1, federation.clients = {self.clients}]")
        _check(self.max_examples >= 1, "federation.max_examples", "must be >= 1")
        _check(self.max_update_ratio > 0, "federation.max_update_ratio", "must be > 0")
        _check(self.norm_action in ("clip", "reject"), "federation.norm_action", "clip or reject")
        _check(0.0 < self.max_share <= 1.0, "federation.max_share", "must be in (0, 1]")
        _check(self.max_update_norm >= 0, "federation.max_update_norm", "must be >= 0 (0 = median rule)")
        _check(self.aggregator in AGGREGATORS, "federation.aggregator", " / ".join(AGGREGATORS))
        _check(0.0 <= self.trim_fraction < 0.5, "federation.trim_fraction", "must be in [0, 0.5)")
        _check(self.byzantine >= 0, "federation.byzantine", "must be >= 0")
        _check(self.aggregator != "krum" or self.clients > 2 * self.byzantine + 2, "federation.byzantine",
               f"krum tolerates {self.byzantine} malicious clients only among more than 2 x {self.byzantine} + 2, "
               f"but federation.clients = {self.clients}")
        _check(self.rounds >= 1, "federation.rounds", "must be >= 1")
        _check(self.local_epochs >= 1, "federation.local_epochs", "must be >= 1")
        _check(self.client_lr > 0, "federation.client_lr", "must be > 0")
        _check(self.batch_size >= 1, "federation.batch_size", "must be >= 1")


def epoch_steps(epochs: float, examples: int, batch_size: int) -> int:
    """Optimizer steps of `epochs` passes (fractions allowed) over `examples` in batches of `batch_size`."""
    return math.ceil(epochs * examples / batch_size - 1e-9)


class SlmSide:
    """The SLM side's distillation weight and temperature: its own where set, else the shared kd_weight and
    temperature (both distillation tables have all four fields)."""

    @property
    def slm_weight(self) -> float:
        return self.kd_weight if self.slm_kd_weight is None else self.slm_kd_weight

    @property
    def slm_temp(self) -> float:
        return self.temperature if self.slm_temperature is None else self.slm_temperature


@dataclass
class DistillConfig(SlmSide):
    epochs: float = 1.0
    """Epochs over D^a of server mutual distillation per round, fractions allowed: ceil(epochs * |D^a| /
    batch_size) steps, each one batch with both models updated. A budget in epochs, not steps, so that the server
    can be given as many passes over D^a as Centralized gets over its data."""
    kd_weight: float = 1.0
    """lambda: weight of the KL term beside the CE term in L^f and L^g."""
    temperature: float = 1.0
    """Softmax temperature of both distributions in the KL (loss is scaled by T^2)."""
    kl_direction: str = "forward"
    """forward = KL(P_other || P_self) as the authors' code (mean-seeking); reverse = KL(P_self || P_other)."""
    top_k: int = 0
    """Keep only the teacher's top-k logits per token (FATE uses 128) to bound memory; 0 = full vocabulary."""
    llm_lr: float = 1e-4
    """Learning rate eta_omega of the server LLM adapter."""
    slm_lr: float = 1e-4
    """Learning rate of the SLM adapter during server distillation."""
    batch_size: int = 8
    """Auxiliary examples per distillation step."""
    slm_kd_weight: float | None = None
    """lambda_g, the KL weight in the SLM's loss L^g; none = kd_weight (which then weighs both)."""
    slm_temperature: float | None = None
    """Temperature of the distributions the SLM learns from; none = temperature."""
    teacher_mode: str = "eval"
    """How each model is the other's target: eval (a no-gradient forward in eval mode, without LoRA dropout) or train (its training forward's logits, detached: one forward fewer, but the target carries dropout noise)."""
    schedule: str = "joint"
    """joint: each step updates both models against each other (Eq. 5-6); sequential (FATE-LLM's code): the SLM distils from the fixed LLM for the round's steps, then the LLM from the updated SLM."""
    target: str = "tokens"
    """What is distilled: tokens (next-token distributions on the gold answer's tokens) or choices (multiple-choice tasks: each model's distribution over an item's choices, the softmax of its per-choice log-likelihoods at the temperature, computed once a round; CE on the gold choice stays). Choices need no shared tokenizer."""
    pool_epochs: float = 0.0
    """Epochs a round over the unlabelled public pool (data.public_pool), after D^a: the SLM learns the LLM's distribution over each question's choices (soft targets only: the pool has no labels)."""

    def __post_init__(self) -> None:
        _check(self.epochs >= 0, "distill.epochs", "must be >= 0")
        _check(self.slm_kd_weight is None or self.slm_kd_weight >= 0, "distill.slm_kd_weight", "must be >= 0")
        _check(self.slm_temperature is None or self.slm_temperature > 0, "distill.slm_temperature", "must be > 0")
        _check(self.teacher_mode in ("eval", "train"), "distill.teacher_mode", "eval or train")
        _check(self.schedule in ("joint", "sequential"), "distill.schedule", "joint or sequential")
        _check(self.target in ("tokens", "choices"), "distill.target", "tokens or choices")
        _check(self.pool_epochs >= 0, "distill.pool_epochs", "must be >= 0")
        _check(self.kd_weight >= 0, "distill.kd_weight", "must be >= 0")
        _check(self.temperature > 0, "distill.temperature", "must be > 0")
        _check(self.kl_direction in ("forward", "reverse"), "distill.kl_direction", "forward or reverse")
        _check(self.top_k >= 0, "distill.top_k", "must be >= 0")
        _check(self.llm_lr > 0, "distill.llm_lr", "must be > 0")
        _check(self.slm_lr > 0, "distill.slm_lr", "must be > 0")
        _check(self.batch_size >= 1, "distill.batch_size", "must be >= 1")

    def steps(self, aux_examples: int, epochs: float | None = None) -> int:
        """Optimizer steps of one round's distillation over `aux_examples` examples (for `epochs`, default
        distill.epochs)."""
        return epoch_steps(self.epochs if epochs is None else epochs, aux_examples, self.batch_size)


@dataclass
class FedMKTConfig(SlmSide):
    """FedMKT (arXiv 2406.02224): clients and server exchange top-k logits on the public set D^a and distil from
    each other's (aligned, selected) distributions; LoRA adapters stay with their owners unless shared."""

    top_k: int = 16
    """Logits per answer token each side sends (6 bytes each: fp16 value, int32 id); the paper's communication example uses 16, FATE-LLM's code 128."""
    selection: str = "dual_min_ce"
    """Which distribution each public example is distilled towards: dual_min_ce (the paper: the best teacher, only where its CE beats the learner's own), greater (the lowest-CE candidate, the learner's own included) or weighted_mean (all candidates, softmax over exp(-CE))."""
    kd_weight: float = 0.1
    """w in (1 - w) * answer CE + w * soft-target CE, on both sides (the paper: 0.1)."""
    temperature: float = 1.0
    """Softmax temperature of the received top-k logits (the learner's logits stay at T = 1; no T^2 factor)."""
    llm_epochs: int = 1
    """Epochs over D^a the server distils the LLM from the clients' logits each round."""
    slm_epochs: int = 1
    """Epochs over D^a each SLM distils from the LLM's logits a round (when: fedmkt.slm_when)."""
    slm_when: str = "after_llm"
    """When the SLMs distil from the LLM: after_llm (FATE-LLM's round order: in the same round, after the LLM's update, so the last round's LLM reaches the scored SLMs; the server runs it for each client on D^a, which is public, from the adapter it holds for the client) or next_round (the client, at the start of the next round, before its fine-tuning; the last round's LLM never reaches the SLMs)."""
    target: str = "tokens"
    """What the SLMs learn from the LLM: tokens (its top-k next-token logits on the gold answers, selected per example) or choices (its distribution over each D^a item's choices, CE on the gold choice beside; needs slm_when = after_llm). The LLM always learns from the clients' top-k."""
    pool_epochs: float = 0.0
    """Epochs a round each SLM learns the LLM's distribution over the choices of the unlabelled pool (data.public_pool), soft targets only, after D^a; needs slm_when = after_llm."""
    slm_kd_weight: float | None = None
    """w on the SLM side; none = kd_weight (which then applies to both sides)."""
    slm_temperature: float | None = None
    """Temperature of the LLM's logits as the SLMs receive them; none = temperature."""
    llm_lr: float = 3e-5
    """Learning rate of the LLM adapter during distillation (the paper: 3e-5)."""
    slm_lr: float = 3e-4
    """Learning rate of a client's SLM adapter during distillation."""
    batch_size: int = 8
    """Public examples per distillation step, on both sides (and per forward pass when computing top-k)."""
    share_adapters: bool = False
    """FedAvg the clients' SLM adapters each round (only where every client runs the same SLM); off = each client keeps its own."""

    def __post_init__(self) -> None:
        _check(self.top_k >= 1, "fedmkt.top_k", "must be >= 1")
        _check(self.selection in ("dual_min_ce", "greater", "weighted_mean"), "fedmkt.selection",
               f"dual_min_ce, greater or weighted_mean, got {self.selection!r}")
        _check(0.0 <= self.kd_weight <= 1.0, "fedmkt.kd_weight", "must be in [0, 1]")
        _check(self.temperature > 0, "fedmkt.temperature", "must be > 0")
        _check(self.llm_epochs >= 1, "fedmkt.llm_epochs", "must be >= 1")
        _check(self.slm_epochs >= 0, "fedmkt.slm_epochs", "must be >= 0")
        _check(self.slm_when in ("after_llm", "next_round"), "fedmkt.slm_when", "after_llm or next_round")
        _check(self.target in ("tokens", "choices"), "fedmkt.target", "tokens or choices")
        _check(self.pool_epochs >= 0, "fedmkt.pool_epochs", "must be >= 0")
        for name, value in (("target", self.target != "tokens"), ("pool_epochs", self.pool_epochs > 0)):
            _check(not value or self.slm_when == "after_llm", f"fedmkt.{name}",
                   "needs fedmkt.slm_when = after_llm (the server teaches the SLMs)")
        _check(self.slm_kd_weight is None or 0.0 <= self.slm_kd_weight <= 1.0, "fedmkt.slm_kd_weight",
               "must be in [0, 1]")
        _check(self.slm_temperature is None or self.slm_temperature > 0, "fedmkt.slm_temperature", "must be > 0")
        _check(self.llm_lr > 0, "fedmkt.llm_lr", "must be > 0")
        _check(self.slm_lr > 0, "fedmkt.slm_lr", "must be > 0")
        _check(self.batch_size >= 1, "fedmkt.batch_size", "must be >= 1")


@dataclass
class DPConfig:
    noise_multiplier: float = 0.0
    """z: client-level DP on the shared adapter; the Gaussian noise on the clipped sum has std z x its sensitivity
    (dp-accounting's meaning of a noise multiplier), see `sampling`; 0 = off."""
    clip_norm: float = 1.0
    """C: with DP on, each client's change to the adapter is clipped to this L2 norm and changes are averaged unweighted."""
    delta: float = 1e-5
    """delta at which the accountant reports epsilon after every round."""
    sampling: str = "fixed"
    """fixed: federation.fraction_fit of the K clients, a fixed number m, drawn without replacement (replace-one
    neighbours, sensitivity 2C on the sum; with m = K no amplification, add-or-remove-one, sensitivity C); poisson:
    each client independently with probability fraction_fit (add-or-remove-one, sensitivity C). Either way the sum
    is divided by the expected number of clients, and a rejected or missing client counts as a zero change."""
    mode: str = "central"
    """central: the server adds the noise to the clipped sum; distributed (needs secagg.enabled): each sampled client
    adds its share of the noise before masking, so the server never sees a noiseless sum."""
    min_noising_clients: int = 0
    """distributed: the fewest sampled clients assumed to add their share honestly (each adds variance 1 / this of
    the total); 0 = every client sampled."""

    def __post_init__(self) -> None:
        _check(self.noise_multiplier >= 0, "dp.noise_multiplier", "must be >= 0 (0 = off)")
        _check(self.clip_norm > 0, "dp.clip_norm", "must be > 0")
        _check(0 < self.delta < 1, "dp.delta", "must be in (0, 1)")
        _check(self.sampling in ("fixed", "poisson"), "dp.sampling", "fixed or poisson")
        _check(self.mode in ("central", "distributed"), "dp.mode", "central or distributed")
        _check(self.min_noising_clients >= 0, "dp.min_noising_clients", "must be >= 0 (0 = every client sampled)")


SECAGG_MAX_MODULUS = 2**62  # Flower sends the modulus as a sint64 and draws masks as int64 below it


@dataclass
class SecAggConfig:
    enabled: bool = False
    """Flower engine only: SecAgg+, so the server learns only the weighted average of the sampled clients' adapters."""
    num_shares: int = 3
    """Shares each client's secret is split into (each goes to a neighbour); > 2 and at most the clients sampled."""
    reconstruction_threshold: int = 2
    """Shares needed to rebuild a dropped client's mask; < num_shares (more tolerates fewer dropouts, hides more)."""
    clipping_range: float = 0.5
    """Each masked value (an entry of the client's change to the adapter x its weight, the round's largest weight
    being 1; 1 for all under DP) is clipped to +-this before quantization; clipped entries are counted in the round's
    metrics. Under dp.mode = distributed it must cover the change plus the client's noise: >= dp.clip_norm + 6 noise
    stds."""
    quantization_range: int = 16777216
    """Integer levels over twice the clipping range (2^24): each entry of the mean is within n x 2 x clipping_range /
    this / (total weight) of the exact weighted mean, reported per round; the modulus is chosen above n x this."""

    def __post_init__(self) -> None:
        _check(self.num_shares > 2, "secagg.num_shares", "must be > 2")
        _check(2 <= self.reconstruction_threshold < self.num_shares, "secagg.reconstruction_threshold",
               f"must be in [2, secagg.num_shares = {self.num_shares})")
        _check(self.clipping_range > 0, "secagg.clipping_range", "must be > 0")
        _check(2 <= self.quantization_range <= 2**30, "secagg.quantization_range", "must be in [2, 2^30]")


@dataclass
class DeriveConfig:
    """How `derived:BASE:N` SLMs are made (N, the layer count, comes from the model spec)."""

    calib_texts: int = 8
    """Alpaca texts used to score candidate layers during greedy selection."""
    calib_len: int = 48
    """Token length of each calibration text (selection cost grows with texts x length x 255 evaluations)."""
    selection: str = "greedy"
    """How layers are chosen: "greedy" (add the layer that lowers calibration loss most, ~N x layers forward passes)
    or "block_influence" (keep the N layers that change the hidden state most, ShortGPT; one forward pass)."""
    heal_steps: int = 60
    """Distillation steps that heal the pruned model."""
    heal_lr: float = 3e-4
    """Peak AdamW learning rate while healing (cosine decay, short warm-up)."""
    heal_batch: int = 8
    """Sequences per healing step."""
    sampled_texts: int = 32
    """Teacher-sampled continuations mixed into the healing text."""
    seq_len: int = 64
    """Token length of healing and held-out perplexity sequences (teacher samples add seq_len/2 new tokens)."""
    seed: int = 0
    """Seeds layer ties, sampling and batch order: same seed, same SLM."""

    def __post_init__(self) -> None:
        _check(self.calib_texts >= 1, "derive.calib_texts", "must be >= 1")
        _check(self.calib_len >= 8, "derive.calib_len", "must be >= 8")
        _check(self.selection in ("greedy", "block_influence"), "derive.selection",
               f"must be 'greedy' or 'block_influence', got {self.selection!r}")
        _check(self.heal_steps >= 0, "derive.heal_steps", "must be >= 0")
        _check(self.heal_lr > 0, "derive.heal_lr", "must be > 0")
        _check(self.heal_batch >= 1, "derive.heal_batch", "must be >= 1")
        _check(self.sampled_texts >= 0, "derive.sampled_texts", "must be >= 0")
        _check(self.seq_len >= 8, "derive.seq_len", "must be >= 8")
        _check(self.seed >= 0, "derive.seed", "must be >= 0")


@dataclass
class TrainConfig:
    """How every training path steps (client SFT, both methods' server distillation, FedMKT's distillation on
    either side, Centralized): memory and optimisation knobs for models of user size. The defaults train exactly
    as before these knobs existed."""

    micro_batch_size: int = 0
    """Gradient accumulation: each batch runs as micro-batches of at most this many examples, each loss weighted by its share of the batch's denominators (answer tokens, items), so the step equals the whole batch's; 0 = the path's batch_size (off)."""
    gradient_checkpointing: bool = False
    """Activation checkpointing of the trained models' decoder layers (transformers', non-reentrant): their activations are recomputed in the backward pass instead of held, for about one more forward."""
    lr_schedule: str = "constant"
    """Learning rate over the optimizer steps of one training call (a client's local epochs, a round's server distillation of one model): constant, linear or cosine (decay to 0), each after warmup_ratio's linear warm-up."""
    warmup_ratio: float = 0.0
    """Share of a training call's optimizer steps over which the learning rate rises linearly from 0 (rounded up to whole steps)."""
    max_grad_norm: float = 0.0
    """Clip each trained model's gradient to this L2 norm before its step (over its trainable parameters); 0 = off. Not DP's clipping (dp.clip_norm)."""
    autocast: str = "off"
    """Mixed precision on CUDA: off, bf16, or fp16 (with loss scaling); the weights stay in model.dtype, which must be fp32 or this same half precision. Refused on a CPU."""

    def __post_init__(self) -> None:
        _check(self.micro_batch_size >= 0, "train.micro_batch_size", "must be >= 0 (0 = off)")
        _check(self.lr_schedule in ("constant", "linear", "cosine"), "train.lr_schedule", "constant, linear or cosine")
        _check(0.0 <= self.warmup_ratio < 1.0, "train.warmup_ratio", "must be in [0, 1)")
        _check(self.max_grad_norm >= 0, "train.max_grad_norm", "must be >= 0 (0 = off)")
        _check(self.autocast in ("off", "bf16", "fp16"), "train.autocast", "off, bf16 or fp16")


@dataclass
class RunConfig:
    methods: list[str] = field(default_factory=lambda: ["zero_shot", "fedcollm"])
    """Methods to run, any of {methods} (one sub-directory each)."""
    seed: int = 0
    """Seeds data split, LoRA init, batch order and dropout."""
    out_dir: str = "runs/demo"
    """Run directory (config, metrics, adapters, results); a new run refuses a directory that holds files."""
    eval_every: int = 1
    """Evaluate every N rounds (the last round is always evaluated); 0 = only at the end."""
    round_eval_limit: int | None = None
    """Items per task behind every point of the per-round curves (the same first N items each round, at most data.eval_limit); None = data.eval_limit."""
    eval_batch_size: int = 32
    """Most items per forward pass during evaluation (one sequence each: the context, then every choice), and prompts per `generate` call."""
    eval_batch_tokens: int = 8192
    """Most tokens per evaluation forward pass or `generate` call (rows x the longest row, with padding and max_new_tokens): long items go fewer to a batch, one longer than this alone, so memory stays bounded at any evaluation length."""
    eval_max_length: int | None = None
    """Longest tokenized evaluation sequence (a context and a choice; a prompt and max_new_tokens); longer items are cut from the left as in training and counted under "truncated"; None = the model's own context length (its config's max_position_embeddings, or the tokenizer's model_max_length where lower), as lm-evaluation-harness."""
    decoding: str = "greedy"
    """How generation tasks are decoded: greedy, or sample (at sample_temperature and sample_top_p, seeded by run.seed)."""
    sample_temperature: float = 0.7
    """Softmax temperature when run.decoding = sample."""
    sample_top_p: float = 0.95
    """Nucleus (top-p) share when run.decoding = sample."""
    threads: int = 0
    """torch CPU threads; 0 = torch's default."""

    def __post_init__(self) -> None:
        _check(len(self.methods) > 0, "run.methods", "name at least one method")
        for m in self.methods:
            _check(m in REGISTRY, "run.methods", f"unknown method {m!r}; known: {', '.join(REGISTRY)}")
        _check(self.seed >= 0, "run.seed", "must be >= 0")
        _check(self.eval_every >= 0, "run.eval_every", "must be >= 0")
        _check(self.round_eval_limit is None or self.round_eval_limit > 0, "run.round_eval_limit",
               "must be > 0 (or none)")
        _check(self.eval_batch_size >= 1, "run.eval_batch_size", "must be >= 1")
        _check(self.eval_batch_tokens >= 1, "run.eval_batch_tokens", "must be >= 1")
        _check(self.eval_max_length is None or self.eval_max_length >= 16, "run.eval_max_length",
               "must be >= 16 (or none)")
        _check(self.decoding in ("greedy", "sample"), "run.decoding", "greedy or sample")
        _check(self.sample_temperature > 0, "run.sample_temperature", "must be > 0")
        _check(0 < self.sample_top_p <= 1, "run.sample_top_p", "must be in (0, 1]")
        _check(self.threads >= 0, "run.threads", "must be >= 0")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    fedmkt: FedMKTConfig = field(default_factory=FedMKTConfig)
    dp: DPConfig = field(default_factory=DPConfig)
    secagg: SecAggConfig = field(default_factory=SecAggConfig)
    derive: DeriveConfig = field(default_factory=DeriveConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunConfig = field(default_factory=RunConfig)
    tasks: dict[str, TaskConfig] = field(default_factory=dict)
    """User-declared tasks, [tasks.NAME] tables; a name equal to a preset replaces that preset."""

    def __post_init__(self) -> None:
        for name, task in self.tasks.items():
            _check(re.fullmatch(r"[A-Za-z0-9_.-]+", name) is not None, f"tasks.{name}",
                   "task names may use letters, digits, _ . - only")
            task.validate(f"tasks.{name}")
        known = preset_tasks() | self.tasks
        for listed in ("tasks", "eval_tasks", "aux_tasks"):
            for name in getattr(self.data, listed):
                _check(name in known, f"data.{listed}", f"unknown task {name!r}: declare it in a [tasks.{name}] "
                       f"table or use a preset ({', '.join(preset_tasks())})")
        self._check_autocast()
        robust = self.federation.aggregator != "fedavg"
        _check(not (robust and self.secagg.enabled), "federation.aggregator",
               f"{self.federation.aggregator} needs each client's update, but under SecAgg+ (secagg.enabled) the "
               f"server sees only their sum: use fedavg or turn SecAgg+ off")
        _check(not (robust and self.dp.noise_multiplier > 0), "federation.aggregator",
               f"{self.federation.aggregator} would be ignored: under DP the server releases the noised mean of the "
               f"clipped changes (what its noise is calibrated to): use fedavg or set dp.noise_multiplier to 0")
        for m in self.run.methods:  # both protect adapters: a method whose clients upload anything else is refused
            spec = REGISTRY[m]
            _check(spec.supports_secagg or not self.secagg.enabled, "secagg.enabled", f"SecAgg+ sums adapters, but "
                   f"{spec.title} uploads {spec.uploads}, which cannot be summed: drop {m} from run.methods or turn "
                   f"SecAgg+ off")
            _check(spec.supports_dp or self.dp.noise_multiplier == 0, "dp.noise_multiplier", f"DP here noises the "
                   f"shared adapter, but {spec.title} uploads {spec.uploads} that it would not cover: drop {m} from "
                   f"run.methods or set it to 0")
        slms = self.model.client_slms
        _check(not slms or len(slms) == self.federation.clients, "model.client_slms",
               f"lists {len(slms)} SLMs for federation.clients = {self.federation.clients}: give one per client, "
               f"or none (every client runs model.slm)")
        averaged = [m if REGISTRY[m].shares_adapter is True else f"{m} with {REGISTRY[m].shares_adapter}"
                    for m in self.run.methods if self.shares_adapter(m)]
        others = sorted(set(slms) - {self.model.slm})
        _check(not (averaged and others), "model.client_slms",
               f"{', '.join(averaged)} average one SLM adapter, so every client must run model.slm = "
               f"{self.model.slm!r}, but it also names {', '.join(map(repr, others))}: leave model.client_slms empty "
               f"or drop those methods")
        _check(self.dp.noise_multiplier == 0 or averaged, "dp.noise_multiplier",
               f"noises the shared SLM adapter, but none of run.methods = {self.run.methods} shares one, so nothing "
               f"would be noised: add {' or '.join(m for m, s in REGISTRY.items() if s.shares_adapter is True)}, or "
               f"set it to 0")
        if self.dp.noise_multiplier > 0:
            _check(self.dp.mode != "distributed" or self.secagg.enabled, "dp.mode", "distributed needs "
                   "secagg.enabled: without SecAgg+ the server sees each client's update, so it adds the noise itself "
                   "(dp.mode = central)")
            _check(self.dp.sampling != "poisson" or self.federation.fraction_fit < 1, "dp.sampling",
                   "poisson samples each client with probability federation.fraction_fit, which is 1 (every client, "
                   "every round, no amplification): lower fraction_fit or use dp.sampling = fixed")
            _check(self.federation.aggregator == "fedavg", "federation.aggregator",
                   f"{self.federation.aggregator} under DP: the DP release is the clipped sum over a fixed "
                   f"denominator, whose sensitivity the accountant prices; use fedavg or set dp.noise_multiplier = 0")
        if self.secagg.enabled:
            from fedcollm.privacy import (
                expected_clients,  # imports torch: only for SecAgg+, which trains anyway
            )

            fed = self.federation
            sampled = expected_clients(self.dp, fed.clients, fed.fraction_fit, fed.min_fit_clients)
            _check(self.secagg.num_shares <= sampled, "secagg.num_shares",
                   f"{self.secagg.num_shares} shares, but {sampled:g} client(s) are sampled a round (federation."
                   f"clients = {fed.clients}, fraction_fit = {fed.fraction_fit}): each sampled client holds one share, "
                   f"so at most {math.floor(sampled)} (SecAgg+ needs at least 3 clients a round)")
            self._check_secagg_ranges(sampled)
        for section in ("distill", "fedmkt"):
            _check(not getattr(self, section).pool_epochs or self.data.public_pool, f"{section}.pool_epochs",
                   "needs an unlabelled pool: set data.public_pool")
        for name in self.data.aux_tasks:
            _check(known[name].train_split is not None, "data.aux_tasks", f"task {name!r} has no train split to be D^a")
        self._check_generation_tasks(known)
        for name in self.data.tasks:
            _check(known[name].train_split is not None, "data.tasks",
                   f"task {name!r} has no train split (evaluation-only): set tasks.{name}.train_split or move it "
                   f"to data.eval_tasks")

    def shares_adapter(self, method: str) -> bool:
        """Whether registered `method` averages one SLM adapter across the clients under this config (its
        MethodSpec.shares_adapter: always, never, or as the config option it names says)."""
        switch = REGISTRY[method].shares_adapter
        if isinstance(switch, str):
            section, key = switch.split(".")
            return bool(getattr(getattr(self, section), key))
        return switch

    def _check_autocast(self) -> None:
        """Autocast where the config already rules it out (with model.device or dtype = auto, training checks the
        resolved ones)."""
        mode, model = self.train.autocast, self.model
        if mode == "off":
            return
        _check(model.device != "cpu", "train.autocast", f"{mode} runs on CUDA only, but model.device = cpu: set "
               f"train.autocast = off")
        _check(model.dtype in ("auto", "fp32", mode), "train.autocast", f"{mode} would recast model.dtype = "
               f"{model.dtype} weights into the other half precision: set model.dtype = fp32 (or {mode})")

    def _check_generation_tasks(self, known: dict[str, TaskConfig]) -> None:
        """What needs choices refuses generation tasks: the choice-level channels and the unlabelled pool."""
        d = self.data
        generative = sorted({n for n in d.tasks + d.eval_tasks + d.aux_tasks if known[n].generative})
        if not generative:
            return
        named = f"generation task(s) {', '.join(generative)}"
        for section in ("distill", "fedmkt"):
            _check(getattr(self, section).target == "tokens", f"{section}.target",
                   f"choices needs every task to have choices, but {named} have none: use tokens")
        _check(not d.public_pool, "data.public_pool", f"the pool is distilled over choices, which {named} lack")

    def _check_secagg_ranges(self, sampled: float) -> None:
        """No sum can wrap: the modulus must exceed clients x quantization_range (every client may contribute, and
        each value and weight element is at most quantization_range); and under distributed DP the clipping range
        must cover a client's change plus its noise, or clipping would bias the sum and undo the noise's shape."""
        sec, fed, dp = self.secagg, self.federation, self.dp
        _check(fed.clients * sec.quantization_range < SECAGG_MAX_MODULUS, "secagg.quantization_range",
               f"{sec.quantization_range} levels x federation.clients = {fed.clients} could sum past SecAgg+'s largest "
               f"modulus 2^62 and wrap: lower secagg.quantization_range or federation.clients")
        if dp.noise_multiplier > 0 and dp.mode == "distributed":
            from fedcollm.privacy import client_noise_std

            need = dp.clip_norm + 6 * client_noise_std(dp, fed.clients, sampled)
            _check(sec.clipping_range >= need, "secagg.clipping_range",
                   f"{sec.clipping_range} would clip the noised changes (each entry up to dp.clip_norm = "
                   f"{dp.clip_norm} plus noise of std {client_noise_std(dp, fed.clients, sampled):.4g}): set it to at "
                   f"least {need:.4g} (dp.clip_norm + 6 noise stds)")

    def client_models(self) -> list[str]:
        """The SLM each client runs, by client index: model.client_slms, or model.slm for every client."""
        return self.model.client_slms or [self.model.slm] * self.federation.clients

    def task_specs(self, names: list[str] | None = None) -> dict[str, TaskConfig]:
        """The spec of each named task (default: trained + evaluation-only tasks); user tables win over presets."""
        known = preset_tasks() | self.tasks
        return {n: known[n] for n in (names if names is not None else self.data.tasks + self.data.eval_tasks)}

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Any, where: str = "config") -> "Config":
        """Build and validate; `where` (a file path, or "config"/"override") prefixes every message."""
        try:
            return _build(cls, data, where)
        except ConfigError as err:
            if str(err).startswith(where):
                raise
            raise ConfigError(f"{where}: {err}") from err

    @classmethod
    def from_toml(cls, path: str | Path) -> "Config":
        return cls.from_dict(read_toml(path), where=str(path))

    def override(self, assignments: list[str]) -> "Config":
        """Apply `section.key=value` strings (values parsed as TOML, bare words as strings, none = None)."""
        data = self.to_dict()
        for item in assignments:
            key, sep, raw = item.partition("=")
            _check(bool(sep) and bool(key.strip()), repr(item), "override must look like section.key=value")
            try:
                value = tomllib.loads(f"v = {raw}")["v"]
            except tomllib.TOMLDecodeError:
                value = raw.strip()
            _assign(data, key.strip(), None if value == "none" else value)
        return Config.from_dict(data, where="--set")

    def with_field(self, key: str, value: Any, where: str = "override") -> "Config":
        """This config with one dotted field replaced by a plain Python value (validated like an override)."""
        data = self.to_dict()
        _assign(data, key, value)
        return Config.from_dict(data, where=where)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def _assign(data: dict, key: str, value: Any) -> None:
    node, parts = data, key.split(".")
    for i, p in enumerate(parts[:-1]):
        _check(isinstance(node.get(p), dict), key, f"no config section {'.'.join(parts[:i + 1])!r}")
        node = node[p]
    _check(parts[-1] in node, key, "no such config field (see `fedcollm config-doc`)")
    _check(not isinstance(node[parts[-1]], dict) or parts[:-1] == ["tasks"], key,
           "is a section: set one of its fields, e.g. section.key=value")
    node[parts[-1]] = value


def read_toml(path: str | Path) -> dict[str, Any]:
    """The tables of a TOML file, unvalidated; unreadable or not TOML is a ConfigError naming the file."""
    from fedcollm.fileio import read_bytes

    raw = read_bytes(path, "config file", ConfigError)
    try:
        return tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text (byte {err.start})") from err
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: not valid TOML: {err}") from err
    except RecursionError as err:
        raise ConfigError(f"{path}: arrays or tables nested too deeply to read") from err


def _build(cls, data: Any, where: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a table, got {type(data).__name__} {data!r}")
    hints = get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    unknown = set(data) - known
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {', '.join(sorted(map(str, unknown)))}; "
                          f"known: {', '.join(sorted(known))}")
    repeats, blanks = getattr(cls, "repeats", frozenset()), getattr(cls, "blanks", frozenset())
    kwargs = {f.name: _coerce(data[f.name], hints[f.name], f"{where}.{f.name}", f.name not in repeats,
                              f.name in blanks)
              for f in fields(cls) if f.name in data}
    return cls(**kwargs)


def _coerce(value: Any, hint: Any, where: str, unique: bool = True, blank: bool = False) -> Any:
    """Check `value` against the field's type: finite floats, non-empty strings (whitespace alone only where the
    class lists the field in `blanks`), lists without duplicates (unless the class lists the field in `repeats`,
    as one model per client does)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, where)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        return _coerce(value, next(a for a in args if a is not type(None)), where, unique, blank)
    if origin is dict:
        _check(isinstance(value, dict), where, f"expected a table of NAME = {{...}}, got {value!r}")
        return {str(k): _coerce(v, args[1], f"{where}.{k}") for k, v in value.items()}
    if origin is list:
        _check(isinstance(value, list), where, f"expected a list, got {value!r}")
        items = [_coerce(v, args[0], where, blank=blank) for v in value]
        dupes = sorted({repr(v) for v in items if items.count(v) > 1}) if unique else []
        _check(not dupes, where, f"lists {', '.join(dupes)} more than once")
        return items
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    _check(isinstance(value, bool) if hint is bool else isinstance(value, hint) and not isinstance(value, bool), where,
           f"expected {hint.__name__}, got {type(value).__name__} {value!r}")
    if hint is float:
        _check(math.isfinite(value), where, f"must be a finite number, got {value!r}")
    if hint is str:
        _check(bool(value.strip() if not blank else value), where, "must not be empty")
    return value


REFERENCE_COMMAND = "python -m fedcollm.config > docs/configuration.md"
"""How docs/configuration.md is made (`fedcollm config-doc` prints the same text)."""

_REFERENCE_HEAD = f"""# Configuration reference

<!-- Generated from the field docstrings in src/fedcollm/config.py by `{REFERENCE_COMMAND}`: edit those, not this file. -->

Every knob of a fedcollm run, with its default value. Set them in a TOML file, one table per section, and pass it
with `fedcollm run --config my.toml`:

```toml
[federation]
rounds = 3

[model.lora]
r = 16
```

or one at a time on the command line: `fedcollm run --set federation.rounds=3 --set model.lora.r=16` (each value is
read as TOML, a bare word as a string, and `none` unsets a field that may be unset). A field left out keeps the default
below. `fedcollm run` without `--config` starts from the embedded demo (`src/fedcollm/configs/demo.toml`), which sets
a few of them. Every run records the config it resolved in `RUN/config.json`. The paper's tasks are presets written as
`[tasks.NAME]` tables in `src/fedcollm/configs/tasks.toml`.

This file is generated from the field docstrings in `src/fedcollm/config.py`; regenerate it with
`{REFERENCE_COMMAND}` (`fedcollm config-doc` prints the same).
"""


def _field_docs(cls) -> dict[str, str]:
    """Each field's docstring (the string literal right below it) in `cls` and its dataclass bases."""
    import ast
    import inspect
    import textwrap

    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body
        for stmt, nxt in zip(body, body[1:]):
            if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and isinstance(nxt, ast.Expr)
                    and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
                docs[stmt.target.id] = " ".join(nxt.value.value.split())
    return docs


def config_sections() -> list[tuple[str, type]]:
    """(section name, its dataclass) for every table of a config, nested ones after their parent: `model`,
    `model.lora`, ..., `tasks.NAME`."""
    def walk(name: str, cls) -> list[tuple[str, type]]:
        hints = get_type_hints(cls)
        return [(name, cls)] + [s for f in fields(cls) if dataclasses.is_dataclass(hints[f.name])
                                for s in walk(f"{name}.{f.name}", hints[f.name])]

    out: list[tuple[str, type]] = []
    for f in fields(Config):
        hint = get_type_hints(Config)[f.name]
        if dataclasses.is_dataclass(hint):
            out += walk(f.name, hint)
        elif typing.get_origin(hint) is dict and dataclasses.is_dataclass(typing.get_args(hint)[1]):
            out += walk(f"{f.name}.NAME", typing.get_args(hint)[1])
    return out


def _toml_value(value: Any) -> str:
    """A default as it would be written in a config file (`none` where a field is unset)."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + "}"
    return repr(value)


def _default_cell(f: dataclasses.Field) -> str:
    """The default value of field `f` as a table cell: what a default_factory produces, not its source text."""
    if f.default_factory is default_data_dir:  # read from the environment: say so rather than print this machine's
        return "`$FEDCOLLM_DATA` if set, else `none`"
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return "(required)"
    text = _toml_value(value).replace("|", "\\|")
    return f"``{text}``" if "`" in text else f"`{text}`"


def _anchor(heading: str) -> str:
    """GitHub's anchor of a markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")


def describe() -> str:
    """The configuration reference (docs/configuration.md): every knob with its default value and its docstring,
    section by section; the docstrings in this module are its single source ("{methods}" in one: the registered
    methods' names)."""
    sections = config_sections()
    out = [_REFERENCE_HEAD, "Sections: " + " · ".join(f"[`[{name}]`](#{_anchor(name)})" for name, _ in sections)]
    for name, cls in sections:
        docs, hints = _field_docs(cls), get_type_hints(cls)
        docs = {k: v.replace("{methods}", ", ".join(REGISTRY)) for k, v in docs.items()}  # the registered names
        out.append(f"\n## [{name}]\n\n| key | default | meaning |\n|---|---|---|")
        for f in fields(cls):
            if dataclasses.is_dataclass(hints[f.name]):
                continue  # its own section, below
            out.append(f"| `{f.name}` | {_default_cell(f)} | {docs.get(f.name, '').replace('|', chr(92) + '|')} |")
    return "\n".join(out).rstrip() + "\n"


if __name__ == "__main__":  # python -m fedcollm.config > docs/configuration.md
    import sys

    # the package's module, not this __main__ copy of it (whose classes the rest of fedcollm does not use)
    from fedcollm.config import describe as _describe

    sys.stdout.write(_describe())
