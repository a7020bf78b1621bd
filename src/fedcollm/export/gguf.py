"""GGUF files for llama.cpp-family runtimes, written with the gguf package (GGUFWriter, its tensor-name map, its
quantizers, SpecialVocab).

For a model in memory this does what llama.cpp's convert_hf_to_gguf.py does for these architectures; that script
ships with llama.cpp's source, not with the gguf package, so it cannot be called, hence the hand-written parts:
the hyperparameters llama.cpp reads (from the HF config), Llama's Q/K rows permuted into llama.cpp's rotary
layout, Gemma's RMSNorm weights stored as 1 + w, 1-D tensors kept in F32 and the rest in the asked type (F16
where a row does not split into the type's blocks).

The tokenizer metadata is copied from the model's source GGUF where it has one (registry models and the SLMs
derived from them): it is what llama.cpp already reads there, pre-tokenizer name and chat template included.
Without one it is built from the HF tokenizer, for byte-level BPE with GPT-2's pre-tokenizer only: llama.cpp tells
other pre-tokenizers apart by a hash of their output on a test text, from a list kept in its converter.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from tempfile import TemporaryDirectory

import numpy as np
from gguf import (
    GGML_QUANT_VERSION,
    MODEL_ARCH,
    MODEL_ARCH_NAMES,
    GGMLQuantizationType,
    GGUFReader,
    GGUFWriter,
    LlamaFileType,
    SpecialVocab,
    TokenType,
    get_tensor_name_map,
)
from gguf.quants import QuantError, quantize

from fedcollm.errors import ModelError

logging.getLogger("gguf").setLevel(logging.WARNING)  # its writer logs each file's name and size at INFO

ARCHS = {"llama": MODEL_ARCH.LLAMA, "qwen2": MODEL_ARCH.QWEN2, "gemma3_text": MODEL_ARCH.GEMMA3}
"""HF model_type -> the llama.cpp architecture its GGUF declares."""

GGUF_TYPES = {"f16": (GGMLQuantizationType.F16, LlamaFileType.MOSTLY_F16),
              "q8_0": (GGMLQuantizationType.Q8_0, LlamaFileType.MOSTLY_Q8_0),
              "q4_0": (GGMLQuantizationType.Q4_0, LlamaFileType.MOSTLY_Q4_0)}
"""--gguf-types: the tensor type of every 2-D weight, and the file type the header declares."""


def gguf_arch(config) -> MODEL_ARCH:
    if config.model_type not in ARCHS:
        raise ModelError(f"GGUF export: architecture {config.model_type!r} is not supported (only "
                         f"{', '.join(ARCHS)}); export it with --formats adapter,merged")
    return ARCHS[config.model_type]


def write_gguf(model, tokenizer, path: Path, gguf_type: str, source_gguf: Path | None = None, name: str = "") -> None:
    """`model` (a plain transformers model, e.g. a merged one) as one GGUF file of type `gguf_type`; tokenizer
    metadata from `source_gguf` when given, else built from `tokenizer`."""
    qtype, file_type = GGUF_TYPES[gguf_type]
    config = model.config
    arch = gguf_arch(config)
    writer = GGUFWriter(path, MODEL_ARCH_NAMES[arch])
    if name:
        writer.add_name(name)
    add_hparams(writer, config, arch)
    writer.add_file_type(file_type)
    writer.add_quantization_version(GGML_QUANT_VERSION)
    if source_gguf is not None:
        copy_tokenizer(writer, GGUFReader(source_gguf), config.vocab_size)
    else:
        build_tokenizer(writer, tokenizer, config)
    for tensor_name, data, data_type in gguf_tensors(model, arch, qtype):
        writer.add_tensor(tensor_name, data, raw_dtype=data_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def add_hparams(writer: GGUFWriter, config, arch: MODEL_ARCH) -> None:
    """The hyperparameters llama.cpp reads for `arch`, as convert_hf_to_gguf.py writes them."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    full_theta, sliding_theta = rope_thetas(config)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(full_theta)
    writer.add_vocab_size(config.vocab_size)
    if arch == MODEL_ARCH.LLAMA:
        writer.add_rope_dimension_count(head_dim)
    if arch == MODEL_ARCH.GEMMA3:
        if config.query_pre_attn_scalar != head_dim:  # llama.cpp scales a small Gemma 3's attention by head_dim
            raise ModelError(f"GGUF export: this Gemma 3 scales attention by query_pre_attn_scalar = "
                             f"{config.query_pre_attn_scalar}, llama.cpp by head_dim = {head_dim}")
        writer.add_sliding_window(config.sliding_window)
        writer.add_sliding_window_pattern([kind == "sliding_attention" for kind in config.layer_types])
        writer.add_rope_freq_base_swa(sliding_theta)


def rope_thetas(config) -> tuple[float, float | None]:
    """(rope base of full attention, of sliding attention or None); scaled rope is refused, as unwritten here."""
    params = config.rope_parameters
    full, sliding = params.get("full_attention", params), params.get("sliding_attention")
    for p in filter(None, (full, sliding)):
        if p.get("rope_type", "default") != "default":
            raise ModelError(f"GGUF export: rope scaling {p['rope_type']!r} is not supported")
    return full["rope_theta"], sliding["rope_theta"] if sliding else None


def copy_tokenizer(writer: GGUFWriter, source: GGUFReader, vocab_size: int) -> None:
    """Every tokenizer.* key of `source`, as is (the model keeps its source's vocabulary)."""
    count = len(source.fields["tokenizer.ggml.tokens"].data)
    if count != vocab_size:
        raise ModelError(f"GGUF export: the source GGUF has {count} tokens, the model {vocab_size} embedding rows")
    for key, field in source.fields.items():
        if key.startswith("tokenizer."):
            writer.add_key_value(key, field.contents(), field.types[0], field.types[-1] if len(field.types) > 1 else None)


def build_tokenizer(writer: GGUFWriter, tokenizer, config) -> None:
    """Tokens and their types as convert_hf_to_gguf.py lists them (ids without a token are UNUSED padding rows);
    merges, special ids and chat template through gguf's SpecialVocab, which reads the saved tokenizer files."""
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(bpe_pre_tokenizer(tokenizer))
    by_id = {i: token for token, i in tokenizer.get_vocab().items()}
    if max(by_id) >= config.vocab_size:
        raise ModelError(f"GGUF export: the tokenizer has id {max(by_id)}, the model {config.vocab_size} embedding rows")
    added, special = tokenizer.get_added_vocab(), set(tokenizer.all_special_ids)
    tokens, types = [], []
    for i in range(config.vocab_size):
        token = by_id.get(i, f"[PAD{i}]")
        tokens.append(token)
        types.append(TokenType.UNUSED if i not in by_id else TokenType.CONTROL if i in special
                     else TokenType.USER_DEFINED if token in added else TokenType.NORMAL)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    with TemporaryDirectory() as folder:
        tokenizer.save_pretrained(folder)
        config.save_pretrained(folder)
        SpecialVocab(folder, load_merges=True, n_vocab=config.vocab_size).add_to_gguf(writer, quiet=True)


def bpe_pre_tokenizer(tokenizer) -> str:
    """llama.cpp's name of the tokenizer's pre-tokenizer: "gpt-2" for a byte-level BPE split by GPT-2's regex."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    pre = spec.get("pre_tokenizer") or {}
    if spec["model"]["type"] == "BPE" and pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    raise ModelError(f"GGUF export: cannot name this tokenizer's pre-tokenizer for llama.cpp ({spec['model']['type']} "
                     f"model, pre-tokenizer {pre.get('type')}); export it from a registry model or a .gguf file, or "
                     f"with --formats adapter,merged")


def gguf_tensors(model, arch: MODEL_ARCH, qtype: GGMLQuantizationType):
    """(GGUF name, data, GGML type) of every weight of `model`, in llama.cpp's layout."""
    config = model.config
    names = get_tensor_name_map(arch, config.num_hidden_layers)
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue  # without an output tensor llama.cpp uses token_embd, as the tied HF model does
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ModelError(f"GGUF export: {config.model_type} tensor {hf_name} has no GGUF name")
        data = to_llama_cpp_layout(tensor.detach().float().cpu().numpy(), name, config, arch)
        yield name, *encoded(data, qtype)


def to_llama_cpp_layout(data: np.ndarray, name: str, config, arch: MODEL_ARCH) -> np.ndarray:
    if arch == MODEL_ARCH.LLAMA and name.endswith((".attn_q.weight", ".attn_q.bias")):
        return llama_rope_permute(data, config.num_attention_heads)
    if arch == MODEL_ARCH.LLAMA and name.endswith((".attn_k.weight", ".attn_k.bias")):
        return llama_rope_permute(data, config.num_key_value_heads)
    if arch == MODEL_ARCH.GEMMA3 and name.endswith("norm.weight"):
        return data + 1  # HF's Gemma RMSNorm multiplies by 1 + w, llama.cpp's by the stored weight
    return data


def llama_rope_permute(weights: np.ndarray, heads: int) -> np.ndarray:
    """Each head's rows from HF's rotate-half order (all first halves, then all second halves) to llama.cpp's
    interleaved pairs: convert_hf_to_gguf.py's LlamaModel.permute, which transformers' GGUF loader reverses."""
    return (weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def encoded(data: np.ndarray, qtype: GGMLQuantizationType) -> tuple[np.ndarray, GGMLQuantizationType]:
    """1-D tensors (norms, biases) stay F32, as llama.cpp's converter keeps them; a matrix whose rows do not split
    into `qtype`'s blocks falls back to F16, as there too."""
    if data.ndim == 1:
        return data.astype(np.float32), GGMLQuantizationType.F32
    try:
        return quantize(data, qtype), qtype
    except QuantError:
        return quantize(data, GGMLQuantizationType.F16), GGMLQuantizationType.F16
