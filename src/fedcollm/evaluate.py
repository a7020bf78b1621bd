"""Scoring of every task: multiple-choice accuracy as lm-evaluation-harness computes it (here), generation tasks by
what the model writes (`fedcollm.generation`).

Each choice is scored by the summed log-probability of its continuation tokens given the context.
acc picks the highest sum; acc_norm divides each sum by the length in characters of the choice text first:
lm-evaluation-harness normalizes by `len(doc_to_choice)`, which excludes the target delimiter (the one leading
space of the continuation template " {choice}") that the scored continuation includes.
Like lm-evaluation-harness, evaluation reads items whole up to the model's own context length (run.eval_max_length
sets another); each task counts the items it had to cut under "truncated", and warns of them.
"""

from __future__ import annotations

import logging

import torch
from tqdm.auto import tqdm
from transformers.tokenization_utils_base import VERY_LARGE_INTEGER

from fedcollm.config import Config
from fedcollm.data.batching import encode_pair, token_groups
from fedcollm.data.tasks import Example, MCExample
from fedcollm.errors import ConfigError
from fedcollm.generation import Decoding, evaluate_generation
from fedcollm.models.modes import evaluating

log = logging.getLogger(__name__)


def _request(tokenizer, ex: MCExample, max_length: int) -> tuple[list[int], list[list[int]], bool]:
    """Context tokens (shared by every choice), each choice's continuation tokens, lm-eval style, and whether
    max_length cut any (context, choice) sequence: a choice keeps its last max_length - 1 tokens, the context
    its last tokens that leave room for the longest choice."""
    conts = []
    for cont in ex.continuations:
        ids, n = encode_pair(tokenizer, ex.context, cont, 1 << 30)
        conts.append(ids[-n:])
    ctx = tokenizer(ex.context, add_special_tokens=False)["input_ids"]
    cut = len(ctx) + max(map(len, conts)) > max_length
    conts = [x[-(max_length - 1):] for x in conts]
    return ctx[-(max_length - max(map(len, conts))):], conts, cut


def _packed_group(group: list[tuple[int, list[int], list[list[int]]]], pad: int, dtype: torch.dtype):
    """One forward's inputs for items packed one per row, left-padded: context, then every choice.

    Segment ids: 0 context, c + 1 choice c, -1 padding. A token sees earlier tokens of the context and of its own
    segment; a padding token sees only itself (a fully masked row would give NaN, which 0-weights still spread).
    Each choice's positions restart after the context, so a choice is scored as if it alone followed it.
    Returns input ids, position ids, the additive 4D mask, the positions whose logits are needed (each choice's
    predecessors: the context's last token, then its own tokens but the last) and, per choice, its (flat logit
    index, token) pairs."""
    width = max(len(ctx) + sum(map(len, conts)) for _, ctx, conts in group)
    rows = len(group)
    ids = torch.full((rows, width), pad, dtype=torch.long)
    pos = torch.zeros((rows, width), dtype=torch.long)
    seg = torch.full((rows, width), -1, dtype=torch.long)
    needed = torch.zeros((rows, width), dtype=torch.bool)
    predictions = []  # per row, per choice: [(row, position) predicting token, token]
    for r, (_, ctx, conts) in enumerate(group):
        at = width - len(ctx) - sum(map(len, conts))
        ids[r, at:at + len(ctx)] = torch.tensor(ctx)
        pos[r, at:at + len(ctx)] = torch.arange(len(ctx))
        seg[r, at:at + len(ctx)] = 0
        last_ctx = at + len(ctx) - 1
        needed[r, last_ctx] = True
        at += len(ctx)
        choices = []
        for c, cont in enumerate(conts):
            ids[r, at:at + len(cont)] = torch.tensor(cont)
            pos[r, at:at + len(cont)] = torch.arange(len(ctx), len(ctx) + len(cont))
            seg[r, at:at + len(cont)] = c + 1
            sources = [last_ctx] + list(range(at, at + len(cont) - 1))
            needed[r, sources[1:]] = True
            choices.append([((r, p), t) for p, t in zip(sources, cont)])
            at += len(cont)
        predictions.append(choices)
    q, k = seg[:, :, None], seg[:, None, :]
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    allowed = causal & (((k == 0) & (q >= 0)) | ((k == q) & (q > 0))) | torch.eye(width, dtype=torch.bool)
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)[:, None]
    flat = needed.flatten().cumsum(0).view(rows, width) - 1  # index of a needed position among the logits
    predictions = [[[(int(flat[rp]), t) for rp, t in choice] for choice in choices] for choices in predictions]
    return ids, pos, mask, needed, predictions


def choice_requests(tokenizer, examples: list[MCExample], max_length: int) -> list[tuple[list[int], list[list[int]]]]:
    """Each item's context tokens and per-choice continuation tokens, as `packed_choice_logprobs` takes them."""
    return [_request(tokenizer, ex, max_length)[:2] for ex in examples]


def packed_choice_logprobs(model, requests: list[tuple[list[int], list[list[int]]]], pad_id: int) -> list[torch.Tensor]:
    """Summed continuation log-probs of each item's choices (one tensor per item), in one forward of the packed
    rows (see `_packed_group`). Differentiable: choice-level distillation trains through it."""
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    ids, pos, mask, needed, predictions = _packed_group([(i, *r) for i, r in enumerate(requests)], pad_id, dtype)
    logits = model(input_ids=ids.to(device), position_ids=pos.to(device), attention_mask=mask.to(device),
                   logits_to_keep=needed.to(device)).logits.float()
    norm = logits.logsumexp(-1)  # log-softmax of just the predicted tokens, not of the whole vocabulary
    out = []
    for choices in predictions:
        sums = []
        for choice in choices:
            rows, tokens = (torch.tensor(x, device=device) for x in zip(*choice))
            sums.append((logits[rows, tokens] - norm[rows]).sum())
        out.append(torch.stack(sums))
    return out


def choice_logprobs(model, tokenizer, examples: list[MCExample], max_length: int, batch_size: int = 32,
                    desc: str = "eval", batch_tokens: int | None = None) -> list[list[float]]:
    """Summed continuation log-probs per choice, all of an item's choices in one packed sequence.

    Each score equals a separate forward pass of (context, choice) as lm-evaluation-harness runs it (tests pin
    the equality), but the context is computed once per item, no choice is padded to the longest, and logits are
    taken only where a choice token is predicted. Where a request exceeds max_length, the context is cut from the
    left to fit the longest choice, so every choice sees the same context.
    """
    requests = choice_requests(tokenizer, examples, max_length)
    return score_requests(model, requests, tokenizer.pad_token_id, batch_size, batch_tokens, desc)


def score_requests(model, requests: list[tuple[list[int], list[list[int]]]], pad_id: int, batch_size: int,
                   batch_tokens: int | None = None, desc: str = "eval") -> list[list[float]]:
    """`packed_choice_logprobs` of every request, in eval mode, at most batch_size items and batch_tokens packed
    tokens (rows x longest row; None = no bound) per forward: the attention mask grows with rows x width^2, so
    a token bound keeps long items from exploding memory."""
    lengths = [len(ctx) + sum(map(len, conts)) for ctx, conts in requests]
    scores: list[list[float]] = [[] for _ in requests]
    with evaluating(model):
        for group in tqdm(token_groups(lengths, batch_size, batch_tokens), desc=desc, leave=False):
            for i, sums in zip(group, packed_choice_logprobs(model, [requests[i] for i in group], pad_id)):
                scores[i] = sums.tolist()
    return scores


def choice_length(continuation: str) -> int:
    """acc_norm's divisor: the continuation less lm-eval's target delimiter (one leading space)."""
    return max(1, len(continuation.removeprefix(" ")))


def accuracy(examples: list[MCExample], scores: list[list[float]], items: bool = False) -> dict:
    """acc and acc_norm; with `items`, also which items each got right, as strings of 0/1 in evaluation order
    ("correct", "correct_norm"), what a paired bootstrap over items needs."""
    correct, correct_norm = [], []
    for ex, sc in zip(examples, scores):
        norm = [s / choice_length(ex.continuations[c]) for c, s in enumerate(sc)]
        correct.append(max(range(len(sc)), key=sc.__getitem__) == ex.answer)
        correct_norm.append(max(range(len(norm)), key=norm.__getitem__) == ex.answer)
    n = len(examples)
    out = {"acc": sum(correct) / n, "acc_norm": sum(correct_norm) / n, "n": n, "metric": "acc",
           "score": sum(correct) / n}
    if items:
        out |= {"correct": "".join("01"[c] for c in correct), "correct_norm": "".join("01"[c] for c in correct_norm)}
    return out


def decoding(cfg: Config) -> Decoding:
    """How generation tasks are decoded in this run (run.decoding), seeded by run.seed."""
    run = cfg.run
    return Decoding(run.decoding == "sample", run.sample_temperature, run.sample_top_p, run.seed)


def evaluate_tasks(model, tokenizer, tasks: dict[str, list[Example]], cfg: Config, label: str = "",
                   curve_items: int | None = None) -> dict[str, dict]:
    """Each task's scores with its items (a choice task's acc and acc_norm with the items it got right, a generation
    task's metrics with every item's generation; "score" names the headline under "metric"), and under "curve" the
    same on its first `curve_items` items (None = all), so every point of a per-round curve is read on the same
    items (evaluation sets are prefixes of a split)."""
    out = {}
    specs = cfg.task_specs(list(tasks))
    max_length, batch = eval_length(cfg, model, tokenizer), (cfg.run.eval_batch_size, cfg.run.eval_batch_tokens)
    for task, exs in tasks.items():
        if specs[task].generative:
            out[task] = evaluate_generation(model, tokenizer, exs, specs[task], max_length, *batch, decoding(cfg),
                                            f"{label} {task}", curve_items)
        else:
            requests = [_request(tokenizer, ex, max_length) for ex in exs]
            scores = score_requests(model, [r[:2] for r in requests], tokenizer.pad_token_id, *batch,
                                    f"eval {label} {task}")
            out[task] = accuracy(exs, scores, items=True) | {"truncated": sum(r[2] for r in requests)}
            out[task]["curve"] = accuracy(exs[:curve_items], scores[:curve_items])
        if out[task]["truncated"]:
            log.warning("%s %s: %d of %d items exceed the evaluation length of %d tokens (run.eval_max_length) and "
                        "are scored on cut text", label, task, out[task]["truncated"], len(exs), max_length)
    return out


def eval_length(cfg: Config, model, tokenizer) -> int:
    """The longest sequence evaluation scores: run.eval_max_length, or else the model's own context length as
    lm-evaluation-harness reads it (its config's position limit), or the tokenizer's model_max_length where
    that is lower (transformers' huge sentinel = unset)."""
    if cfg.run.eval_max_length is not None:
        return cfg.run.eval_max_length
    stated = [getattr(model.config, a, None) for a in ("n_positions", "max_position_embeddings", "n_ctx")]
    limits = [n for n in stated + [tokenizer.model_max_length] if isinstance(n, int) and n < VERY_LARGE_INTEGER]
    if not limits:
        raise ConfigError(f"run.eval_max_length: model {tokenizer.name_or_path!r} states no context length (no "
                          f"max_position_embeddings in its config, no model_max_length in its tokenizer): set it")
    return min(limits)
