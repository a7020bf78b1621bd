"""Everything a run needs in memory once: tokenizer, LoRA-wrapped LLM and SLM, data shards and eval sets.

Methods share one workbench and each starts from the same seeded LoRA initialisation, so every row of the
results table runs the same code on the same models and data.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from fedcollm.config import Config
from fedcollm.data.batching import SFTData
from fedcollm.data.partition import FederatedSplit, load_train_pool, partition
from fedcollm.data.tasks import MCExample, load_eval_split
from fedcollm.errors import ModelError
from fedcollm.models.lora import AdapterState, adapter_state, add_lora

log = logging.getLogger(__name__)


def load_data(cfg: Config) -> tuple[FederatedSplit, dict[str, list[MCExample]]]:
    """The federated split of the trained tasks and the evaluation items of every task, all validated."""
    specs = cfg.task_specs()
    seed = cfg.run.seed
    split = partition(load_train_pool(specs, cfg.data, seed), cfg.federation.clients, cfg.data, seed)
    log.info("%s", split.describe())
    eval_sets = {t: load_eval_split(t, spec, cfg.data.data_dir, cfg.data.eval_limit) for t, spec in specs.items()}
    return split, eval_sets


@dataclass
class Workbench:
    cfg: Config
    tokenizer: object
    llm: torch.nn.Module  # peft-wrapped f
    slm: torch.nn.Module  # peft-wrapped g
    split: FederatedSplit
    client_data: list[SFTData]
    aux_data: SFTData
    eval_sets: dict[str, list[MCExample]]
    llm_init: AdapterState
    slm_init: AdapterState
    llm_name: str = ""
    slm_name: str = ""

    @classmethod
    def from_models(cls, cfg: Config, llm, slm, tokenizer, llm_name: str = "", slm_name: str = "",
                    data: tuple[FederatedSplit, dict[str, list[MCExample]]] | None = None) -> "Workbench":
        if llm.config.vocab_size != slm.config.vocab_size:
            raise ModelError(f"FedCoLLM needs one vocabulary: LLM has {llm.config.vocab_size} tokens, "
                             f"SLM {slm.config.vocab_size}")
        seed = cfg.run.seed
        split, eval_sets = data or load_data(cfg)
        llm = add_lora(llm, cfg.model.lora, seed)
        slm = add_lora(slm, cfg.model.lora, seed + 1)
        max_len = cfg.model.max_length
        return cls(cfg=cfg, tokenizer=tokenizer, llm=llm, slm=slm, split=split,
                   client_data=[SFTData(shard, tokenizer, max_len) for shard in split.clients],
                   aux_data=SFTData(split.aux, tokenizer, max_len), eval_sets=eval_sets,
                   llm_init=adapter_state(llm), slm_init=adapter_state(slm), llm_name=llm_name, slm_name=slm_name)

    @classmethod
    def build(cls, cfg: Config) -> "Workbench":
        """Load the configured real models (converting / deriving them on first use)."""
        from fedcollm.models.derive import resolve_model_dir
        from fedcollm.models.loading import (
            load_model,
            load_tokenizer,
            resolve_device,
            resolve_dtype,
        )

        data = load_data(cfg)  # bad data fails here, before minutes of model conversion or derivation
        device = resolve_device(cfg.model.device)
        dtype = resolve_dtype(cfg.model.dtype, device)
        llm_dir = resolve_model_dir(cfg.model.llm, cfg.derive, cfg.data.data_dir)
        slm_dir = resolve_model_dir(cfg.model.slm, cfg.derive, cfg.data.data_dir)
        tokenizer = load_tokenizer(llm_dir)
        slm_tokenizer = load_tokenizer(slm_dir)
        if tokenizer.get_vocab() != slm_tokenizer.get_vocab():
            raise ModelError(f"LLM {cfg.model.llm} and SLM {cfg.model.slm} use different tokenizers; FedCoLLM needs "
                             f"one vocabulary (cross-tokenizer transfer is FedMKT's job)")
        log.info("loading LLM %s and SLM %s as %s on %s", cfg.model.llm, cfg.model.slm, dtype, device)
        return cls.from_models(cfg, load_model(llm_dir, dtype, device), load_model(slm_dir, dtype, device), tokenizer,
                               llm_name=cfg.model.llm, slm_name=cfg.model.slm, data=data)
