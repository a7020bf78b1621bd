"""Turn (context, continuation) pairs into left-padded token batches that score only answer tokens (a choice
task's gold continuation, a generation task's response and its end).

Left padding puts every continuation at the end of its row, so the model's `logits_to_keep` computes the
vocabulary projection only for the answer positions: the same batch serves SFT (CE on the answer), the
distillation KL (over answer tokens) and multiple-choice scoring (sum of answer log-probs).
Tokenization follows lm-evaluation-harness: continuation tokens = enc(context + continuation)[len(enc(context)):].
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from fedcollm.data.tasks import Example, GenExample
from fedcollm.errors import DataError

log = logging.getLogger(__name__)


@dataclass
class AnswerBatch:
    input_ids: torch.Tensor  # [B, L], left-padded
    attention_mask: torch.Tensor  # [B, L]
    position_ids: torch.Tensor  # [B, L]
    targets: torch.Tensor  # [B, K]: the last K input tokens
    target_mask: torch.Tensor  # [B, K]: 1 on each row's continuation tokens

    @property
    def keep(self) -> int:
        return self.targets.shape[1]

    @property
    def tokens(self) -> int:
        """Answer tokens: what every token-mean loss on this batch averages over."""
        return int(self.target_mask.sum())

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def rows(self, rows: slice) -> "AnswerBatch":
        """These rows alone, trimmed to their own padding: what `collate` makes of their examples (a micro-batch)."""
        length, keep = int(self.attention_mask[rows].sum(1).max()), int(self.target_mask[rows].sum(1).max())
        return AnswerBatch(self.input_ids[rows, -length:], self.attention_mask[rows, -length:],
                           self.position_ids[rows, -length:], self.targets[rows, -keep:], self.target_mask[rows, -keep:])

    def to(self, device) -> "AnswerBatch":
        return AnswerBatch(*(t.to(device) for t in (self.input_ids, self.attention_mask, self.position_ids,
                                                     self.targets, self.target_mask)))


def encode_pair(tokenizer, context: str, continuation: str, max_length: int) -> tuple[list[int], int]:
    """Token ids of context+continuation (left-truncated to max_length) and the continuation's token count."""
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    n_cont = len(whole) - len(ctx)
    if n_cont <= 0 or whole[:len(ctx)] != ctx:  # tokenizer merged across the boundary: encode apart
        cont = tokenizer(continuation, add_special_tokens=False)["input_ids"]
        whole, n_cont = ctx + cont, len(cont)
    n_cont = min(n_cont, max_length - 1)
    return whole[-max_length:], n_cont


def encode_response(tokenizer, ex: GenExample, max_length: int) -> tuple[list[int], int]:
    """Token ids of a generation example's prompt and response, and the response's token count (`fit_response`)."""
    return fit_response(*response_parts(tokenizer, ex), max_length)


def response_parts(tokenizer, ex: GenExample) -> tuple[list[int], list[int]]:
    """A generation example's prompt tokens and response tokens, whole. The response ends as a model should learn
    to stop: the chat template's end of turn, or else the tokenizer's end-of-text token."""
    context, response = prompt_text(tokenizer, ex), ex.target
    eos = []
    if ex.chat:
        whole = apply_chat(tokenizer, ex, ex.target)
        if whole.startswith(context):
            response = whole[len(context):]
    elif tokenizer.eos_token_id is not None:
        eos = [tokenizer.eos_token_id]
    ids, n = encode_pair(tokenizer, context, response, 1 << 30)
    return ids[:len(ids) - n], ids[len(ids) - n:] + eos


def fit_response(prompt: list[int], answer: list[int], max_length: int) -> tuple[list[int], int]:
    """prompt + answer within max_length, and the answer's kept token count. Over max_length, the answer keeps its
    start (cut at its end, then without the end token) but leaves the prompt at least half of max_length (or all
    of a shorter prompt); the prompt, cut from the left as prompts are everywhere, fills the rest."""
    if len(prompt) + len(answer) > max_length:
        answer = answer[:max_length - min(len(prompt), max_length // 2)]
        prompt = prompt[len(prompt) - (max_length - len(answer)):]
    return prompt + answer, len(answer)


def apply_chat(tokenizer, ex: GenExample, response: str | None = None) -> str:
    """The example's prompt as a user turn in the tokenizer's chat template, ready for the assistant's answer, or
    with `response` the whole exchange."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"task {ex.task!r}: chat_template = true, but tokenizer {tokenizer.name_or_path!r} has no "
                        f"chat template")
    turns = [{"role": "user", "content": ex.context}]
    if response is None:
        return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
    return tokenizer.apply_chat_template(turns + [{"role": "assistant", "content": response}], tokenize=False)


def prompt_text(tokenizer, ex: Example) -> str:
    """The text a model is given before its answer: the context, or for chat tasks the templated user turn."""
    return apply_chat(tokenizer, ex) if isinstance(ex, GenExample) and ex.chat else ex.context


def encode_example(tokenizer, ex: Example, max_length: int) -> tuple[list[int], int]:
    """(token ids, count of trained tokens at the end) of what an example trains on."""
    if isinstance(ex, GenExample):
        return encode_response(tokenizer, ex, max_length)
    return encode_pair(tokenizer, ex.context, ex.target, max_length)


def collate(encoded: list[tuple[list[int], int]], pad_id: int) -> AnswerBatch:
    length = max(len(ids) for ids, _ in encoded)
    keep = max(n for _, n in encoded)
    B = len(encoded)
    input_ids = torch.full((B, length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((B, length), dtype=torch.long)
    target_mask = torch.zeros((B, keep), dtype=torch.long)
    for i, (ids, n_cont) in enumerate(encoded):
        input_ids[i, length - len(ids):] = torch.tensor(ids)
        attention_mask[i, length - len(ids):] = 1
        target_mask[i, keep - n_cont:] = 1
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return AnswerBatch(input_ids, attention_mask, position_ids, input_ids[:, -keep:].clone(), target_mask)


def token_groups(lengths: list[int], max_items: int, max_tokens: int | None = None) -> list[list[int]]:
    """Indices, longest first, in groups of at most `max_items` whose rows x longest row stays within
    `max_tokens` (None = no bound; an item longer than it goes alone), so that a left-padded batch's memory
    stays bounded however long its items are."""
    groups: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        fits = groups and len(groups[-1]) < max_items and (
            max_tokens is None or (len(groups[-1]) + 1) * lengths[groups[-1][0]] <= max_tokens)
        if fits:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def last_positions(length: int, count: int, device, end: int = 0) -> torch.Tensor:
    """Positions [length - count - end, length - end) as an index tensor for `logits_to_keep`: transformers slices
    a count as a strided view, on which the lm_head runs as a batched matmul at about 2.4x the time of one
    contiguous matmul (forward+backward over SmolLM2's 49,152-token head, measured); an index tensor gathers the
    positions into a contiguous block first."""
    return torch.arange(length - count - end, length - end, device=device)


# cuDNN's attention, which PyTorch picks by default for bf16/fp16 on Hopper GPUs, gives NaN gradients when a query
# row attends to nothing, as the pad rows of a left-padded batch do (its forward is fine); the memory-efficient and
# math kernels handle such rows. Measured on an H200, torch 2.11 (tests/test_cuda.py; docs/benchmarks.md "On a GPU").
TRAINABLE_ATTENTION = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]


def answer_logits(model, batch: AnswerBatch) -> torch.Tensor:
    """Float logits [B, K, V] predicting the last K tokens (the continuation positions); on CUDA through attention
    kernels whose backward survives the pad rows. No KV cache: nothing is generated, and under activation
    checkpointing a cache would keep every layer's keys and values."""
    ids = batch.input_ids
    with sdpa_kernel(TRAINABLE_ATTENTION) if ids.is_cuda else nullcontext():
        out = model(input_ids=ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
                    logits_to_keep=last_positions(ids.shape[1], batch.keep, ids.device, end=1), use_cache=False)
    return out.logits.float()


class SFTData:
    """Pre-tokenized (question, gold answer) pairs of one shard; yields seeded shuffled AnswerBatches."""

    def __init__(self, examples: list[Example], tokenizer, max_length: int):
        self.examples = examples
        self.encoded = [encode_example(tokenizer, ex, max_length) for ex in examples]
        cut = [ex for ex, (ids, _) in zip(examples, self.encoded) if isinstance(ex, GenExample) and len(ids) >= max_length]
        if cut:
            log.warning("%d of %d prompt/response examples fill model.max_length = %d (first: task %r, id %r): cut "
                        "to fit, the prompt from the left, the response (where it needs more than half) at its end",
                        len(cut), len(examples), max_length, cut[0].task, cut[0].id)
        self.pad_id = tokenizer.pad_token_id

    def __len__(self) -> int:
        return len(self.examples)

    def batches(self, batch_size: int, generator: torch.Generator):
        for _, batch in self.indexed_batches(batch_size, generator):
            yield batch

    def indexed_batches(self, batch_size: int, generator: torch.Generator):
        """(example indices, batch) in a seeded shuffled order: for per-example targets (FedMKT)."""
        order = torch.randperm(len(self.encoded), generator=generator).tolist()
        for s in range(0, len(order), batch_size):
            chunk = order[s:s + batch_size]
            yield chunk, collate([self.encoded[i] for i in chunk], self.pad_id)

    def steps_per_epoch(self, batch_size: int) -> int:
        return -(-len(self.encoded) // batch_size)
