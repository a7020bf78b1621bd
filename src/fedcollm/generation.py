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
    fit_response,
    prompt_text,
    response_parts,
    token_groups,
)
from fedcollm.data.tasks import GenExample
from fedcollm.errors import ConfigError
from fedcollm.metrics import score_text
from fedcollm.models.modes import evaluating


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


def prompt_ids(tokenizer, ex: GenExample, max_length: int, max_new_tokens: int) -> tuple[list[int], bool]:
    """The prompt's tokens, cut from the left so that prompt and generation fit max_length, and whether it was cut."""
    room = max_length - max_new_tokens
    if room < 1:
        raise ConfigError(f"task {ex.task!r}: max_new_tokens = {max_new_tokens} leaves no room for a prompt in the "
                          f"evaluation length of {max_length} tokens: raise run.eval_max_length")
    ids = tokenizer(prompt_text(tokenizer, ex), add_special_tokens=False)["input_ids"]
    return ids[-room:], len(ids) > room


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


def generate(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, stop: list[str], batch_size: int,
             decoding: Decoding = Decoding(), desc: str = "generate",
             batch_tokens: int | None = None) -> list[Generated]:
    """Each prompt's continuation, at most `batch_size` prompts and `batch_tokens` tokens (rows x (longest prompt
    + max_new_tokens); None = no bound) per `generate` call, longest first, left-padded."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ends = {t for t in (tokenizer.eos_token_id, pad) if t is not None}
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=decoding.sample, pad_token_id=pad,
                              eos_token_id=tokenizer.eos_token_id, stop_strings=stop or None,
                              **({"temperature": decoding.temperature, "top_p": decoding.top_p, "top_k": 0}
                                 if decoding.sample else {}))
    out: list[Generated | None] = [None] * len(prompts)
    with evaluating(model):
        start = 0  # prompts before this chunk, longest first: seeds the chunk's sampling
        for chunk in tqdm(token_groups([len(p) + max_new_tokens for p in prompts], batch_size, batch_tokens), desc=desc,
                          leave=False):
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
            start += len(chunk)
    return out


def response_nll(model, tokenizer, examples: list[GenExample], max_length: int, batch_size: int,
                 batch_tokens: int | None = None) -> list[tuple[float, int, bool]]:
    """(summed negative log-likelihood, token count, whether max_length cut prompt or response) of each example's
    reference response as it is trained on (its end token included), given its prompt; batched as `generate`."""
    parts = [response_parts(tokenizer, ex) for ex in examples]
    encoded = [fit_response(prompt, answer, max_length) for prompt, answer in parts]
    device = next(model.parameters()).device
    out: list[tuple[float, int, bool]] = [(0.0, 0, False)] * len(encoded)
    with evaluating(model):
        for chunk in token_groups([len(ids) for ids, _ in encoded], batch_size, batch_tokens):
            batch = collate([encoded[i] for i in chunk], tokenizer.pad_token_id).to(device)
            nll = F.cross_entropy(answer_logits(model, batch).transpose(1, 2), batch.targets, reduction="none")
            nll = (nll * batch.target_mask).sum(1).tolist()
            for row, i in enumerate(chunk):
                out[i] = (nll[row], encoded[i][1], sum(map(len, parts[i])) > max_length)
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
                        batch_size: int, batch_tokens: int | None = None, decoding: Decoding = Decoding(),
                        label: str = "", curve_items: int | None = None) -> dict:
    """A generation task's scores (`spec.metrics`), its items under "items", its speed under "generation", how many
    items max_length cut (prompt, or the reference pair perplexity reads) under "truncated", and under "curve"
    the scores of its first `curve_items` items (None = all)."""
    items = [{"id": ex.id, "prompt": ex.context, "reference": ex.references[0]} for ex in examples]
    out: dict = {}
    cut = [False] * len(examples)
    if "perplexity" in spec.metrics:
        scored = response_nll(model, tokenizer, examples, max_length, batch_size, batch_tokens)
        for item, (nll, tokens, _) in zip(items, scored):
            item |= {"nll": nll, "tokens": tokens}
        cut = [c or was_cut for c, (_, _, was_cut) in zip(cut, scored)]
    if set(spec.metrics) - {"perplexity"}:
        prompts, prompt_cut = zip(*(prompt_ids(tokenizer, ex, max_length, spec.max_new_tokens) for ex in examples))
        cut = [c or was_cut for c, was_cut in zip(cut, prompt_cut)]
        t0 = time.perf_counter()
        written = generate(model, tokenizer, list(prompts), spec.max_new_tokens,
                           stop_texts(tokenizer, examples[0], spec.stop), batch_size, decoding, f"generate {label}",
                           batch_tokens)
        seconds = time.perf_counter() - t0
        for item, ex, gen in zip(items, examples, written):
            item |= {"generation": gen.text, "generated_tokens": gen.tokens}
            item |= score_text(gen.text, ex.references, spec.metrics)
        tokens = sum(g.tokens for g in written)
        out["generation"] = {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
                             "decoding": "sample" if decoding.sample else "greedy"}
    return summarize(items, spec.metrics) | out | {"truncated": sum(cut), "items": items,
                                                   "curve": summarize(items[:curve_items], spec.metrics)}
