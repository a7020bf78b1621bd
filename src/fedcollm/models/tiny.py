"""Tiny randomly initialised Llama and Qwen2 models and a tiny trained tokenizer, for tests (no download)."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

TINY_VOCAB = 512


def tiny_llama(hidden: int = 64, layers: int = 2, vocab: int = TINY_VOCAB, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                      initializer_range=0.15)  # peaked, distinct distributions: KL between two is not ~0
    return LlamaForCausalLM(cfg).eval()


def tiny_qwen2(hidden: int = 48, layers: int = 2, vocab: int = TINY_VOCAB, seed: int = 0) -> Qwen2ForCausalLM:
    """Another model family than `tiny_llama` (Qwen2: biased q/k/v projections), for heterogeneous clients."""
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                      initializer_range=0.15)
    return Qwen2ForCausalLM(cfg).eval()


def tiny_pair(seed: int = 0) -> tuple[LlamaForCausalLM, LlamaForCausalLM]:
    """(LLM, SLM) sharing one vocabulary: FedCoLLM's step-by-step mutual distillation."""
    return tiny_llama(hidden=64, layers=3, seed=seed), tiny_llama(hidden=32, layers=1, seed=seed + 1)


def tiny_tokenizer(texts: list[str], vocab: int = TINY_VOCAB) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained in milliseconds on `texts`; every byte is covered, so no text is unknown."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
