"""What a model writes, and how well: batched generation through transformers' `generate` (left padding, KV
cache, stop sequences, greedy or seeded sampling), the reference response's perplexity, and a generation task's
scores with every item kept (its prompt, reference, generation and scores), so that methods compare item by item.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import GenerationConfig

from fedcollm.config import TaskConfig
from fedcollm.data.batching import (
    answer_logits,
    apply_chat,
    collate,
    encode_response,
    prompt_text,
)
from fedcollm.data.tasks import GenExample
from fedcollm.metrics import score_text


@dataclass(frozen=True)
class Decoding:
    """greedy, or sampling at `temperature` and nucleus `top_p`, seeded per batch from `seed`."""

    sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0


@dataclass
class Generated:
    text: str  # cut before the first stop sequence, stripped
    ids: list[int]  # the generated token ids up to and including the one that ended it

    @property
    def tokens(self) -> int:
        return len(self.ids)


def prompt_ids(tokenizer, ex: GenExample, max_length: int, max_new_tokens: int) -> list[int]:
    """The prompt's tokens, cut from the left so prompt and generation fit max_length (the prompt keeps at least
    half of it)."""
    ids = tokenizer(prompt_text(tokenizer, ex), add_special_tokens=False)["input_ids"]
    return ids[-max(max_length - max_new_tokens, max_length // 2):]


def stop_texts(tokenizer, ex: GenExample, stop: list[str]) -> list[str]:
    """The task's stop sequences, and for chat tasks what the template writes after a response (its end of turn)."""
    if not ex.chat:
        return list(stop)
    marker = "\x00response\x00"
    end = apply_chat(tokenizer, ex, marker).split(marker, 1)[-1].strip()
    return list(stop) + ([end] if end else [])


def _cut(text: str, stop: list[str]) -> str:
    ends = [text.index(s) for s in stop if s in text]
    return (text[:min(ends)] if ends else text).strip()


def _ending(ids: list[int], tokenizer, stop: list[str], ends: set[int]) -> int:
    """How many of `ids` were generated: up to the token that completes a stop text or is an end token. A row of a
    batch that stopped early is padded after that token; the padding is not counted."""
    for n, token in enumerate(ids):
        if token in ends or (stop and any(s in tokenizer.decode(ids[:n + 1], skip_special_tokens=True)
                                          for s in stop)):
            return n + 1
    return len(ids)


@torch.no_grad()
def generate(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, stop: list[str], batch_size: int,
             decoding: Decoding = Decoding(), desc: str = "generate") -> list[Generated]:
    """Each prompt's continuation, `batch_size` prompts per `generate` call (longest first, left-padded)."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ends = {t for t in (tokenizer.eos_token_id, pad) if t is not None}
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=decoding.sample, pad_token_id=pad,
                              eos_token_id=tokenizer.eos_token_id, stop_strings=stop or None,
                              **({"temperature": decoding.temperature, "top_p": decoding.top_p, "top_k": 0}
                                 if decoding.sample else {}))
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    out: list[Generated | None] = [None] * len(prompts)
    was_training = model.training
    model.eval()
    for start in tqdm(range(0, len(order), batch_size), desc=desc, leave=False):
        chunk = order[start:start + batch_size]
        width = max(len(prompts[i]) for i in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, i in enumerate(chunk):
            ids[row, width - len(prompts[i]):] = torch.tensor(prompts[i])
            mask[row, width - len(prompts[i]):] = 1
        if decoding.sample:
            torch.manual_seed(decoding.seed * 1_000_003 + start)
        new = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config,
                             tokenizer=tokenizer)[:, width:].tolist()
        for row, i in enumerate(chunk):
            ids = new[row][:_ending(new[row], tokenizer, stop, ends)]
            out[i] = Generated(_cut(tokenizer.decode(ids, skip_special_tokens=True), stop), ids)
    model.train(was_training)
    return out


@torch.no_grad()
def response_nll(model, tokenizer, examples: list[GenExample], max_length: int,
                 batch_size: int) -> list[tuple[float, int]]:
    """(summed negative log-likelihood, token count) of each example's reference response as it is trained on (its
    end token included), given its prompt."""
    encoded = [encode_response(tokenizer, ex, max_length) for ex in examples]
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i][0]))
    device = next(model.parameters()).device
    out: list[tuple[float, int]] = [(0.0, 0)] * len(encoded)
    was_training = model.training
    model.eval()
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        batch = collate([encoded[i] for i in chunk], tokenizer.pad_token_id).to(device)
        nll = F.cross_entropy(answer_logits(model, batch).transpose(1, 2), batch.targets, reduction="none")
        nll = (nll * batch.target_mask).sum(1).tolist()
        for row, i in enumerate(chunk):
            out[i] = (nll[row], encoded[i][1])
    model.train(was_training)
    return out


def summarize(items: list[dict], metrics: list[str]) -> dict:
    """A task's means over `items`; perplexity is the exponent of the mean token NLL over every response token.
    "score" is the first metric's value (the headline), "metric" its name."""
    out: dict = {"n": len(items)}
    for m in metrics:
        if m == "perplexity":
            tokens = sum(it["tokens"] for it in items)
            out["nll_per_token"] = sum(it["nll"] for it in items) / max(tokens, 1)
            out["perplexity"] = math.exp(out["nll_per_token"])
        else:
            out[m] = sum(it[m] for it in items) / max(len(items), 1)
    return out | {"metric": metrics[0], "score": out[metrics[0]]}


def evaluate_generation(model, tokenizer, examples: list[GenExample], spec: TaskConfig, max_length: int,
                        batch_size: int, decoding: Decoding = Decoding(), label: str = "",
                        curve_items: int | None = None) -> dict:
    """A generation task's scores (`spec.metrics`), its items under "items", its speed under "generation" and under
    "curve" the scores of its first `curve_items` items (None = all)."""
    items = [{"id": ex.id, "prompt": ex.context, "reference": ex.references[0]} for ex in examples]
    out: dict = {}
    if "perplexity" in spec.metrics:
        for item, (nll, tokens) in zip(items, response_nll(model, tokenizer, examples, max_length, batch_size)):
            item |= {"nll": nll, "tokens": tokens}
    if set(spec.metrics) - {"perplexity"}:
        prompts = [prompt_ids(tokenizer, ex, max_length, spec.max_new_tokens) for ex in examples]
        t0 = time.perf_counter()
        written = generate(model, tokenizer, prompts, spec.max_new_tokens,
                           stop_texts(tokenizer, examples[0], spec.stop), batch_size, decoding, f"generate {label}")
        seconds = time.perf_counter() - t0
        for item, ex, gen in zip(items, examples, written):
            item |= {"generation": gen.text, "generated_tokens": gen.tokens}
            item |= score_text(gen.text, ex.references, spec.metrics)
        tokens = sum(g.tokens for g in written)
        out["generation"] = {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
                             "decoding": "sample" if decoding.sample else "greedy"}
    return summarize(items, spec.metrics) | out | {"items": items,
                                                   "curve": summarize(items[:curve_items], spec.metrics)}
