"""LoRA adapters through peft: per-architecture defaults, frozen base weights, adapter state dicts.

The adapter state dict (peft's `get_peft_model_state_dict` naming) is the only thing that crosses the
network between clients and server, so these helpers are the serialization seam's model side.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import (
    PeftModel,
    get_peft_model,
    get_peft_model_state_dict,
    set_peft_model_state_dict,
)

from fedcollm.comm import AdapterState
from fedcollm.config import LoraConfig
from fedcollm.errors import ConfigError, RunDirError

DEFAULT_TARGETS = {
    "llama": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "gemma3_text": ["q_proj", "v_proj"],
    "gemma3": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
}


@contextmanager
def peft_wrapping() -> Iterator[None]:
    """Wrap a model with peft (`get_peft_model`, `PeftModel.from_pretrained`) without transformers' deprecation
    FutureWarning on every wrap.

    peft's `PeftModel.__init__` (peft 0.21.2, and its main branch as of 2026-08) asks
    `getattr(model, "is_gradient_checkpointing", True)`, a property transformers 5 deprecated in favour of
    `is_activation_checkpointing`; nothing a caller passes avoids that read. peft tracks the transformers
    deprecations it trips in https://github.com/huggingface/peft/pull/2817. Only that one message is ignored, only
    while peft wraps; remove this once peft reads `is_activation_checkpointing`."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def load_peft_adapter(model, folder: Path):
    """`model` with the peft adapter saved in `folder`; a missing, damaged, non-finite or ill-fitting one is refused."""
    from fedcollm.runs import load_adapter_file  # runs imports this module

    if not (folder / "adapter_config.json").is_file():
        raise RunDirError(f"{folder}: no adapter_config.json, so this is not a peft adapter folder "
                          f"(e.g. RUN/fedcollm/round_002/slm)")
    load_adapter_file(folder / "adapter_model.safetensors")  # readable and finite before peft touches it
    try:
        with peft_wrapping():
            return PeftModel.from_pretrained(model, folder)
    except (RuntimeError, ValueError, KeyError, OSError) as err:  # peft/torch: shape mismatch, bad config
        raise RunDirError(f"{folder}: adapter does not fit this model ({str(err).splitlines()[0][:300]})") from err


def target_modules(model, cfg: LoraConfig) -> list[str]:
    if cfg.target_modules:
        return list(cfg.target_modules)
    arch = model.config.model_type
    if arch not in DEFAULT_TARGETS:
        raise ConfigError(f"model.lora.target_modules: no default for architecture {arch!r}; name the modules to "
                          f"adapt, e.g. {_linear_names(model)[:6]}")
    return DEFAULT_TARGETS[arch]


def _linear_names(model) -> list[str]:
    """Last name component of every module peft can adapt (Linear / GPT-2 Conv1D), in model order."""
    names = [n.rsplit(".", 1)[-1] for n, m in model.named_modules()
             if isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D"]
    return list(dict.fromkeys(names))


def add_lora(model, cfg: LoraConfig, seed: int):
    """Wrap `model` with a fresh, seeded LoRA adapter; every base weight is frozen."""
    targets = target_modules(model, cfg)
    available = _linear_names(model)
    missing = [t for t in targets if t not in available]
    if missing:  # peft would adapt the rest silently (or fail with its own message when none match)
        raise ConfigError(f"model.lora.target_modules: {missing} match no linear module of this "
                          f"{model.config.model_type} model; available: {available}")
    torch.manual_seed(seed)
    peft_cfg = PeftLoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                              target_modules=targets, task_type="CAUSAL_LM")
    with peft_wrapping():
        peft_model = get_peft_model(model, peft_cfg)
    for name, p in peft_model.named_parameters():
        p.requires_grad = "lora_" in name
    return peft_model


def adapter_state(model) -> AdapterState:
    """A detached CPU copy of the adapter weights (what a client uploads or the server broadcasts)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in get_peft_model_state_dict(model).items()}


def load_adapter_state(model, state: AdapterState) -> None:
    result = set_peft_model_state_dict(model, state)  # shapes are checked by callers (check_adapter_state)
    unexpected = getattr(result, "unexpected_keys", []) or []
    if unexpected:
        raise KeyError(f"adapter state has keys the model does not: {unexpected[:3]}")


def count_parameters(model) -> tuple[int, int]:
    """(adapter params, base params): the ratio is what the paper's Table 3 reports."""
    adapter = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    base = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)
    return adapter, base
