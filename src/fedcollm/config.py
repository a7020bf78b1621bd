"""Every knob of a run, as typed dataclasses validated on construction.

A `Config` loads from TOML (`Config.from_toml`), takes `section.key=value` overrides from the CLI
(`Config.override`) and round-trips through `to_dict` so a run directory records exactly what ran.
The docstring of each field is the one place it is documented (`fedcollm config-doc` prints them).
"""

from __future__ import annotations

import dataclasses
import json
import os
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_type_hints

TASKS = ("commonsenseqa", "openbookqa", "arc_challenge", "arc_easy")
METHODS = ("zero_shot", "standalone", "fedavg", "centralized", "fedcollm")


class ConfigError(ValueError):
    """A config value is out of range or of the wrong type; the message names the field."""


def _check(cond: bool, where: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{where}: {msg}")


def default_data_dir() -> str:
    return os.environ.get("FEDCOLLM_DATA", "../shared/data")


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
        _check(self.r >= 1, "lora.r", "must be >= 1")
        _check(self.alpha > 0, "lora.alpha", "must be > 0")
        _check(0.0 <= self.dropout < 1.0, "lora.dropout", "must be in [0, 1)")


@dataclass
class ModelConfig:
    llm: str = "smollm2-135m"
    """Server LLM f: registry name, local HF dir, .gguf file, or hub id."""
    slm: str = "derived:smollm2-135m:10"
    """Client SLM g: as `llm`, or `derived:BASE:N` for an N-layer SLM derived from registry model BASE."""
    dtype: str = "auto"
    """Compute dtype of the frozen base weights: auto (bf16 where the hardware has it), bf16, fp16, fp32."""
    device: str = "auto"
    """auto (cuda if present), cpu, cuda, cuda:N."""
    max_length: int = 128
    """Longest tokenized training/eval sequence; longer prompts are cut from the left."""
    lora: LoraConfig = field(default_factory=LoraConfig)

    def __post_init__(self) -> None:
        _check(self.dtype in ("auto", "bf16", "fp16", "fp32"), "model.dtype", "auto, bf16, fp16 or fp32")
        _check(self.max_length >= 16, "model.max_length", "must be >= 16")


@dataclass
class DataConfig:
    data_dir: str = field(default_factory=default_data_dir)
    """Folder with <task>/<split>.jsonl (env FEDCOLLM_DATA overrides the default ../shared/data)."""
    tasks: list[str] = field(default_factory=lambda: list(TASKS))
    """Multiple-choice tasks whose train splits are federated and whose test splits are evaluated."""
    train_per_task: int | None = None
    """Use at most this many (seeded random) train examples per task; None = all."""
    partition: str = "iid"
    """How client shards are cut: iid, dirichlet (label-skew over tasks), or task (one task per client)."""
    dirichlet_alpha: float = 0.5
    """Concentration of the Dirichlet task mix per client (smaller = more skewed)."""
    aux_fraction: float = 0.2
    """Share of the train pool held by the server as auxiliary data D^a (0.2 = equal 5-way split with 4 clients)."""
    eval_limit: int | None = None
    """Evaluate on the first N items of each task's test split (CSQA: dev); None = all. Printed beside every figure."""

    def __post_init__(self) -> None:
        for t in self.tasks:
            _check(t in TASKS, "data.tasks", f"unknown task {t!r}; known: {', '.join(TASKS)}")
        _check(len(self.tasks) > 0, "data.tasks", "must name at least one task")
        _check(self.partition in ("iid", "dirichlet", "task"), "data.partition", "iid, dirichlet or task")
        _check(self.dirichlet_alpha > 0, "data.dirichlet_alpha", "must be > 0")
        _check(0.0 < self.aux_fraction < 1.0, "data.aux_fraction", "must be in (0, 1)")
        _check(self.train_per_task is None or self.train_per_task > 0, "data.train_per_task", "must be > 0")
        _check(self.eval_limit is None or self.eval_limit > 0, "data.eval_limit", "must be > 0")


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

    def __post_init__(self) -> None:
        _check(self.clients >= 1, "federation.clients", "must be >= 1")
        _check(self.rounds >= 1, "federation.rounds", "must be >= 1")
        _check(self.local_epochs >= 1, "federation.local_epochs", "must be >= 1")
        _check(self.client_lr > 0, "federation.client_lr", "must be > 0")
        _check(self.batch_size >= 1, "federation.batch_size", "must be >= 1")


@dataclass
class DistillConfig:
    steps: int = 8
    """R: mutual-distillation steps on D^a per round (each step: one batch, both models updated)."""
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

    def __post_init__(self) -> None:
        _check(self.steps >= 0, "distill.steps", "must be >= 0")
        _check(self.kd_weight >= 0, "distill.kd_weight", "must be >= 0")
        _check(self.temperature > 0, "distill.temperature", "must be > 0")
        _check(self.kl_direction in ("forward", "reverse"), "distill.kl_direction", "forward or reverse")
        _check(self.top_k >= 0, "distill.top_k", "must be >= 0")
        _check(self.llm_lr > 0 and self.slm_lr > 0, "distill.llm_lr/slm_lr", "must be > 0")
        _check(self.batch_size >= 1, "distill.batch_size", "must be >= 1")


@dataclass
class DeriveConfig:
    layers: int = 10
    """Decoder layers kept in the derived SLM (overridden by the N of `derived:BASE:N`)."""
    calib_texts: int = 8
    """Alpaca texts used to score candidate layers during greedy selection."""
    calib_len: int = 48
    """Token length of each calibration text (selection cost grows with texts x length x 255 evaluations)."""
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
        _check(self.layers >= 1, "derive.layers", "must be >= 1")
        _check(self.heal_steps >= 0, "derive.heal_steps", "must be >= 0")
        _check(self.calib_texts >= 1 and self.heal_batch >= 1, "derive", "calib_texts and heal_batch >= 1")


@dataclass
class RunConfig:
    methods: list[str] = field(default_factory=lambda: ["zero_shot", "fedcollm"])
    """Methods to run, any of zero_shot, standalone, fedavg, centralized, fedcollm (one sub-directory each)."""
    seed: int = 0
    """Seeds data split, LoRA init, batch order and dropout."""
    out_dir: str = "runs/demo"
    """Run directory (config, metrics, adapters, results)."""
    eval_every: int = 1
    """Evaluate every N rounds (the last round is always evaluated); 0 = only at the end."""
    round_eval_limit: int | None = None
    """Items per task for the intermediate (per-round) evaluations; None = data.eval_limit."""
    eval_batch_size: int = 32
    """Sequences per forward pass during evaluation."""
    threads: int = 0
    """torch CPU threads; 0 = torch's default."""

    def __post_init__(self) -> None:
        for m in self.methods:
            _check(m in METHODS, "run.methods", f"unknown method {m!r}; known: {', '.join(METHODS)}")
        _check(len(self.methods) > 0, "run.methods", "name at least one method")
        _check(self.eval_every >= 0, "run.eval_every", "must be >= 0")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    derive: DeriveConfig = field(default_factory=DeriveConfig)
    run: RunConfig = field(default_factory=RunConfig)

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "config") -> "Config":
        return _build(cls, data, where)

    @classmethod
    def from_toml(cls, path: str | Path) -> "Config":
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"{path}: not valid TOML: {err}") from err
        return cls.from_dict(data, where=str(path))

    def override(self, assignments: list[str]) -> "Config":
        """Apply `section.key=value` strings (values parsed as TOML, bare words as strings)."""
        data = self.to_dict()
        for item in assignments:
            key, sep, raw = item.partition("=")
            _check(bool(sep), item, "override must look like section.key=value")
            try:
                value = tomllib.loads(f"v = {raw}")["v"]
            except tomllib.TOMLDecodeError:
                value = raw
            node = data
            parts = key.strip().split(".")
            for p in parts[:-1]:
                _check(isinstance(node.get(p), dict), key, f"no config section {p!r}")
                node = node[p]
            _check(parts[-1] in node, key, "no such config field")
            node[parts[-1]] = None if value == "none" else value
        return Config.from_dict(data, where="override")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def _build(cls, data: dict[str, Any], where: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a table, got {type(data).__name__}")
    hints = get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    unknown = set(data) - known
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(known))}")
    kwargs = {}
    for f in fields(cls):
        if f.name not in data:
            continue
        value, hint = data[f.name], hints[f.name]
        if dataclasses.is_dataclass(hint):
            kwargs[f.name] = _build(hint, value, f"{where}.{f.name}")
        else:
            kwargs[f.name] = _coerce(value, hint, f"{where}.{f.name}")
    return cls(**kwargs)


def _coerce(value: Any, hint: Any, where: str) -> Any:
    import types
    import typing

    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        return _coerce(value, next(a for a in args if a is not type(None)), where)
    if origin is list:
        _check(isinstance(value, list), where, f"expected a list, got {value!r}")
        return [_coerce(v, args[0], where) for v in value]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    _check(isinstance(value, hint) and not (hint is int and isinstance(value, bool)), where,
           f"expected {hint.__name__}, got {value!r}")
    return value


def describe() -> str:
    """Markdown reference of every knob, from the field docstrings (the single source of truth)."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(inspect.getmodule(Config)))
    docs: dict[str, list[tuple[str, str, str]]] = {}
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            rows, body = [], node.body
            for i, stmt in enumerate(body):
                if isinstance(stmt, ast.AnnAssign) and i + 1 < len(body):
                    nxt = body[i + 1]
                    if isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
                        default = ast.unparse(stmt.value) if stmt.value is not None else ""
                        rows.append((stmt.target.id, default, nxt.value.value))
            docs[node.name] = rows
    sections = {"model": "ModelConfig", "model.lora": "LoraConfig", "data": "DataConfig",
                "federation": "FederationConfig", "distill": "DistillConfig", "derive": "DeriveConfig",
                "run": "RunConfig"}
    out = []
    for section, cls_name in sections.items():
        out.append(f"\n### [{section}]\n\n| key | default | meaning |\n|---|---|---|")
        for name, default, doc in docs[cls_name]:
            out.append(f"| `{name}` | `{default}` | {doc} |")
    return "\n".join(out).strip() + "\n"
