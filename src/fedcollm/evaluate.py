"""Zero-shot multiple-choice accuracy scored as lm-evaluation-harness does.

Each choice is scored by the summed log-probability of its continuation tokens given the context.
acc picks the highest sum; acc_norm divides each sum by the continuation's length in characters first.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from fedcollm.data.batching import answer_logits, collate, encode_pair
from fedcollm.data.tasks import MCExample


@torch.no_grad()
def choice_logprobs(model, tokenizer, examples: list[MCExample], max_length: int, batch_size: int = 32,
                    desc: str = "eval") -> list[list[float]]:
    requests = [(i, c, encode_pair(tokenizer, ex.context, ex.continuation(c), max_length))
                for i, ex in enumerate(examples) for c in range(len(ex.choices))]
    requests.sort(key=lambda r: -len(r[2][0]))  # similar lengths together: little padding
    scores = [[0.0] * len(ex.choices) for ex in examples]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    for s in tqdm(range(0, len(requests), batch_size), desc=desc, leave=False):
        chunk = requests[s:s + batch_size]
        batch = collate([r[2] for r in chunk], tokenizer.pad_token_id).to(device)
        logp = torch.log_softmax(answer_logits(model, batch), -1)
        token_lp = logp.gather(-1, batch.targets.unsqueeze(-1)).squeeze(-1) * batch.target_mask
        for (i, c, _), total in zip(chunk, token_lp.sum(-1).tolist()):
            scores[i][c] = total
    model.train(was_training)
    return scores


def accuracy(examples: list[MCExample], scores: list[list[float]]) -> dict[str, float]:
    correct = correct_norm = 0
    for ex, sc in zip(examples, scores):
        norm = [s / len(ex.continuation(c)) for c, s in enumerate(sc)]
        correct += max(range(len(sc)), key=sc.__getitem__) == ex.answer
        correct_norm += max(range(len(norm)), key=norm.__getitem__) == ex.answer
    n = len(examples)
    return {"acc": correct / n, "acc_norm": correct_norm / n, "n": n}


def evaluate_tasks(model, tokenizer, tasks: dict[str, list[MCExample]], max_length: int, batch_size: int,
                   label: str = "") -> dict[str, dict[str, float]]:
    return {task: accuracy(exs, choice_logprobs(model, tokenizer, exs, max_length, batch_size, f"eval {label} {task}"))
            for task, exs in tasks.items()}
