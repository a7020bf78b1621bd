"""The Hugging Face side of an export: a peft adapter folder, plain model folders (the base, the merged model).

Every folder written here loads with transformers and peft alone: plain safetensors, config and tokenizer files,
no custom code, so the person who receives it needs nothing of fedcollm.
"""

from __future__ import annotations

from pathlib import Path

from peft import PeftConfig

BASE_REF = "./base"
"""The adapter's base_model_name_or_path: the base folder written beside it. The registry models are dequantized
GGUFs, not the hub's weights, so no hub id would give the base the adapter was trained on."""


def merge(peft_model):
    """The plain transformers model with the LoRA update folded into its weights (W + B A * alpha / r).
    `peft_model` is consumed: its base weights are changed in place, so write the base folder first."""
    return peft_model.merge_and_unload()


def write_model_folder(model, tokenizer, folder: Path) -> None:
    """A folder that `AutoModelForCausalLM.from_pretrained` and `AutoTokenizer.from_pretrained` load as is."""
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def write_adapter(peft_model, folder: Path, card: str, base_ref: str = BASE_REF) -> None:
    """The adapter in peft's format, naming `base_ref` as its base, with `card` (provenance) as its README.md."""
    peft_model.save_pretrained(folder)
    config = PeftConfig.from_pretrained(folder)
    config.base_model_name_or_path = base_ref
    config.save_pretrained(folder)
    (folder / "README.md").write_text(card, encoding="utf-8")  # replaces peft's generic model card
