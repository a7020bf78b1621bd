"""Zero-shot multiple-choice accuracy scored as lm-evaluation-harness does.

Each choice is scored by the summed log-probability of its continuation tokens given the context.
acc picks the highest sum; acc_norm divides each sum by the length in characters of the choice text first:
lm-evaluation-harness normalizes by `len(doc_to_choice)`, which excludes the target delimiter (the one leading
space of the continuation template " {choice}") that the scored continuation includes.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from fedcollm.data.batching import collate, encode_pair, last_positions
from fedcollm.data.tasks import MCExample


def _requests(tokenizer, ex: MCExample, max_length: int) -> tuple[list[int], list[list[int]]]:
    """Context tokens (shared by every choice) and each choice's continuation tokens, lm-eval style."""
    conts = []
    for c in range(len(ex.choices)):
        ids, n = encode_pair(tokenizer, ex.context, ex.continuations[c], max_length)
        conts.append(ids[-n:])
    ctx = tokenizer(ex.context, add_special_tokens=False)["input_ids"]
    return ctx[-(max_length - max(len(x) for x in conts)):], conts


@torch.no_grad()
def choice_logprobs(model, tokenizer, examples: list[MCExample], max_length: int, batch_size: int = 32,
                    desc: str = "eval") -> list[list[float]]:
    """Summed continuation log-probs per choice; each context is run once and its KV cache shared by its choices.

    Scores equal a separate forward pass per (context, choice) as lm-evaluation-harness does, at about a third
    of the compute for 4-5 choices (tests pin the equality). Where a request exceeds max_length, the shared
    context is cut from the left to fit the longest choice, so every choice sees the same context.
    """
    items = sorted(((i, *_requests(tokenizer, ex, max_length)) for i, ex in enumerate(examples)),
                   key=lambda it: -len(it[1]))
    groups, group, rows = [], [], 0
    for it in items:  # batch_size bounds the number of choice rows per forward
        if group and rows + len(it[2]) > batch_size:
            groups.append(group)
            group, rows = [], 0
        group.append(it)
        rows += len(it[2])
    groups += [group] if group else []

    scores = [[0.0] * len(ex.choices) for ex in examples]
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id
    was_training = model.training
    model.eval()
    for group in tqdm(groups, desc=desc, leave=False):
        ctx = collate([(c, 1) for _, c, _ in group], pad).to(device)  # left-padded contexts
        out = model(input_ids=ctx.input_ids, attention_mask=ctx.attention_mask, position_ids=ctx.position_ids,
                    use_cache=True, logits_to_keep=last_positions(ctx.input_ids.shape[1], 1, device))
        first = torch.log_softmax(out.logits[:, -1].float(), -1)  # predicts each choice's first token
        owner = torch.tensor([g for g, (_, _, conts) in enumerate(group) for _ in conts], device=device)
        conts = [c for _, _, cs in group for c in cs]
        cache = out.past_key_values
        cache.reorder_cache(owner)
        width = max(len(c) for c in conts)
        cont_ids = torch.full((len(conts), width), pad, dtype=torch.long, device=device)
        cont_mask = torch.zeros_like(cont_ids)
        for r, c in enumerate(conts):
            cont_ids[r, :len(c)] = torch.tensor(c)
            cont_mask[r, :len(c)] = 1
        attn = torch.cat([ctx.attention_mask[owner], cont_mask], 1)
        pos = ctx.attention_mask.sum(1)[owner, None] + torch.arange(width, device=device)
        logp = torch.log_softmax(model(input_ids=cont_ids, attention_mask=attn, position_ids=pos,
                                       past_key_values=cache, use_cache=True).logits.float(), -1)
        token_lp = torch.cat([first[owner].gather(1, cont_ids[:, :1]),
                              logp[:, :-1].gather(-1, cont_ids[:, 1:, None]).squeeze(-1)], 1)
        totals = (token_lp * cont_mask).sum(1).tolist()
        r = 0
        for i, _, cs in group:
            for c in range(len(cs)):
                scores[i][c] = totals[r]
                r += 1
    model.train(was_training)
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
    out = {"acc": sum(correct) / n, "acc_norm": sum(correct_norm) / n, "n": n}
    if items:
        out |= {"correct": "".join("01"[c] for c in correct), "correct_norm": "".join("01"[c] for c in correct_norm)}
    return out


def evaluate_tasks(model, tokenizer, tasks: dict[str, list[MCExample]], max_length: int, batch_size: int,
                   label: str = "", curve_items: int | None = None) -> dict[str, dict]:
    """Accuracy per task with the items it got right, and under "curve" the accuracy on its first `curve_items`
    items (None = all), so every point of a per-round curve is read on the same items (evaluation sets are
    prefixes of a split)."""
    out = {}
    for task, exs in tasks.items():
        scores = choice_logprobs(model, tokenizer, exs, max_length, batch_size, f"eval {label} {task}")
        out[task] = accuracy(exs, scores, items=True)
        out[task]["curve"] = accuracy(exs[:curve_items], scores[:curve_items])
    return out
