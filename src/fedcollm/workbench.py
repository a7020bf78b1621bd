"""Everything a run needs in memory once: the LoRA-wrapped LLM and SLM(s) with their own tokenizers, data shards
and eval sets.

Methods share one workbench and each starts from the same seeded LoRA initialisation, so every row of the
results table runs the same code on the same models and data.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import torch

from fedcollm.algorithms.training import check_autocast
from fedcollm.comm import AdapterState
from fedcollm.config import Config
from fedcollm.data.batching import SFTData
from fedcollm.data.partition import (
    FederatedSplit,
    load_train_pool,
    partition,
    public_set,
    unlabelled_pool,
)
from fedcollm.data.tasks import Example, load_scored_split
from fedcollm.errors import ConfigError, ModelError
from fedcollm.methods import method_class
from fedcollm.models.lora import adapter_state, add_lora

log = logging.getLogger(__name__)


def load_data(cfg: Config, clients: bool = True) -> tuple[FederatedSplit, dict[str, list[Example]]]:
    """The federated split of the trained tasks and the evaluation items of every task, all validated.

    Without `clients` (a Flower server, whose clients hold their own rows): D^a and the evaluation items only,
    and no client task's train split is opened."""
    specs = cfg.task_specs()
    seed = cfg.run.seed
    if clients:
        split = partition(load_train_pool(specs, cfg.data, seed), cfg.federation.clients, cfg.data, seed)
    else:
        _check_server_only(cfg)
        split = FederatedSplit(aux=[], clients=[])
    if cfg.data.aux_tasks:
        split = replace(split, aux=public_set(cfg.task_specs(cfg.data.aux_tasks), cfg.data, seed))
    if cfg.data.public_pool:
        split = replace(split, pool=unlabelled_pool(cfg.task_specs(cfg.data.tasks), cfg.data, seed))
    log.info("%s", split.describe())
    eval_sets = {t: load_scored_split(t, spec, cfg.data) for t, spec in specs.items()}
    return split, eval_sets


def _check_server_only(cfg: Config) -> None:
    """Refuse what a server without the clients' rows cannot do, before any model loads."""
    if not cfg.data.aux_tasks:
        raise ConfigError("data.aux_tasks: empty, so D^a would be cut from the train splits of data.tasks and the "
                          "server would need every client's rows; name the task(s) whose train split is D^a")
    pooled = [m for m in cfg.run.methods if method_class(m).needs_client_data]
    if pooled:
        raise ConfigError(f"run.methods: {', '.join(pooled)} trains on every client's shard on the server, which "
                          f"a Flower server does not hold; run it with the in-process engine")
    if cfg.data.public_pool:
        raise ConfigError("data.public_pool: the pool is cut from the train files of data.tasks, the clients' data; "
                          "run it with the in-process engine")
    if cfg.data.scored == "validation":
        for name, spec in cfg.task_specs(cfg.data.tasks).items():
            if not spec.validation_split:
                raise ConfigError(f"data.scored: validation would read task {name!r}'s holdout from its train "
                                  f"split, the clients' data; give tasks.{name} a validation_split on the server")


@dataclass
class LoadedModel:
    """One model as a run holds it: LoRA-wrapped, with its own tokenizer, initial adapter and D^a in its tokens."""

    name: str
    model: torch.nn.Module
    tokenizer: object
    init: AdapterState
    public: SFTData


@dataclass
class Workbench:
    cfg: Config
    tokenizer: object  # the LLM's
    llm: torch.nn.Module  # peft-wrapped f
    split: FederatedSplit
    client_data: list[SFTData]  # each shard in its client's tokenizer; none on a Flower server
    aux_data: SFTData  # D^a in the LLM's tokenizer
    eval_sets: dict[str, list[Example]]
    llm_init: AdapterState
    slms: dict[str, LoadedModel]  # by model spec: model.slm and every model.client_slms entry, each loaded once
    llm_name: str = ""
    slm_name: str = ""

    @property
    def slm(self) -> torch.nn.Module:
        """model.slm (peft-wrapped g): the SLM that shared-adapter methods train and the SLM row scores."""
        return self.slms[self.cfg.model.slm].model

    @property
    def slm_init(self) -> AdapterState:
        return self.slms[self.cfg.model.slm].init

    def held(self, which: str) -> LoadedModel:
        """The model behind a state name: "llm", "slm" (model.slm) or "client_K" (client K's SLM)."""
        if which == "llm":
            return LoadedModel(self.llm_name, self.llm, self.tokenizer, self.llm_init, self.aux_data)
        if which == "slm":
            return self.slms[self.cfg.model.slm]
        return self.slms[self.cfg.client_models()[int(which.removeprefix("client_"))]]

    @classmethod
    def from_models(cls, cfg: Config, llm, slm, tokenizer, llm_name: str = "", slm_name: str = "",
                    data: tuple[FederatedSplit, dict[str, list[Example]]] | None = None, slm_tokenizer=None,
                    client_slms: dict[str, tuple[torch.nn.Module, object]] | None = None) -> "Workbench":
        """`slm` is model.slm (with `slm_tokenizer`, default the LLM's `tokenizer`); `client_slms` holds the model
        and tokenizer of every other name in model.client_slms. A model that uses the LLM's tokenizer object
        shares its encoding of D^a."""
        seed = cfg.run.seed
        for model in [llm, slm, *(m for m, _ in (client_slms or {}).values())]:
            check_autocast(cfg.train, model)  # on the resolved device and dtype, before anything runs
        split, eval_sets = data or load_data(cfg)
        llm = add_lora(llm, cfg.model.lora, seed)
        max_len = cfg.model.max_length
        aux_data = SFTData(split.aux, tokenizer, max_len)

        def held(name: str, model, tok) -> LoadedModel:
            model = add_lora(model, cfg.model.lora, seed + 1)
            public = aux_data if tok is tokenizer else SFTData(split.aux, tok, max_len)
            return LoadedModel(name, model, tok, adapter_state(model), public)

        loaded = dict(client_slms or {})
        loaded[cfg.model.slm] = (slm, slm_tokenizer or tokenizer)
        missing = sorted(set(cfg.client_models()) - set(loaded))
        if missing:
            raise ModelError(f"model.client_slms names {', '.join(missing)}, but no such model was loaded")
        slms = {name: held(name, model, tok) for name, (model, tok) in loaded.items()}
        tokenizers = [slms[name].tokenizer for name in cfg.client_models()]
        return cls(cfg=cfg, tokenizer=tokenizer, llm=llm, split=split,
                   client_data=[SFTData(shard, tok, max_len) for shard, tok in zip(split.clients, tokenizers)],
                   aux_data=aux_data, eval_sets=eval_sets, llm_init=adapter_state(llm), slms=slms,
                   llm_name=llm_name, slm_name=slm_name)

    @classmethod
    def build(cls, cfg: Config, clients: bool = True) -> "Workbench":
        """Load the configured real models (converting / deriving them on first use), each distinct one once.
        Without `clients`, the data of a server whose clients hold their own rows (see load_data)."""
        from fedcollm.models.derive import resolve_model_dir
        from fedcollm.models.loading import (
            load_model,
            load_tokenizer,
            resolve_device,
            resolve_dtype,
        )

        data = load_data(cfg, clients)  # bad data fails here, before minutes of model conversion or derivation
        device = resolve_device(cfg.model.device)
        llm_dir = resolve_model_dir(cfg.model.llm, cfg.derive, cfg.data.data_dir)
        tokenizer = load_tokenizer(llm_dir)

        def load(name: str) -> tuple[torch.nn.Module, object]:
            path = resolve_model_dir(name, cfg.derive, cfg.data.data_dir)
            tok = load_tokenizer(path)
            dtype = resolve_dtype(cfg.model.dtype, device, path)
            log.info("loading SLM %s as %s on %s", name, dtype, device)
            # one vocabulary as the LLM's: one tokenizer, so D^a is encoded once and FedCoLLM distils step by step
            model = load_model(path, dtype, device, cfg.model.quantize)
            return model, tokenizer if tok.get_vocab() == tokenizer.get_vocab() else tok

        slm, slm_tokenizer = load(cfg.model.slm)
        others = {name: load(name) for name in dict.fromkeys(cfg.client_models()) if name != cfg.model.slm}
        dtype = resolve_dtype(cfg.model.dtype, device, llm_dir)
        log.info("loading LLM %s as %s on %s", cfg.model.llm, dtype, device)
        llm = load_model(llm_dir, dtype, device, cfg.model.quantize)
        return cls.from_models(cfg, llm, slm, tokenizer, llm_name=cfg.model.llm, slm_name=cfg.model.slm, data=data,
                               slm_tokenizer=slm_tokenizer, client_slms=others)
