"""LoRA adapters through peft: per-architecture defaults, frozen base weights, adapter state dicts.

The adapter state dict (peft's `get_peft_model_state_dict` naming) is the only thing that crosses the
network between clients and server, so these helpers are the serialization seam's model side.
"""

from __future__ import annotations

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

from fedcollm.config import LoraConfig
from fedcollm.errors import ConfigError

DEFAULT_TARGETS = {
    "llama": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "gemma3_text": ["q_proj", "v_proj"],
    "gemma3": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
}

AdapterState = dict[str, torch.Tensor]


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
