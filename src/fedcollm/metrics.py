"""Scores of a generated text against its references: exact match, token F1 and ROUGE-L, each the best over an
item's references (SQuAD's rule for several gold answers).

ROUGE-L is rouge-score's (Google's reference implementation, with its Porter stemming); its tokenizer keeps only
the ASCII letters and digits, so text in other scripts scores 0 there. Exact match and token F1 follow the
official SQuAD v1.1 evaluation script; they are written out here because no maintained package exposes them per
item (evaluate's `squad` is a script fetched from the Hub, torchmetrics' `squad` returns only corpus means, and
the tests pin this code against it).
"""

from __future__ import annotations

import re
import string
from collections import Counter
from functools import cache

_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lower case, punctuation and the articles a/an/the removed, whitespace collapsed."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


def token_f1(prediction: str, reference: str) -> float:
    """F1 of the normalised tokens' overlap (as multisets)."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


@cache
def _rouge_scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure (longest common subsequence of stemmed tokens)."""
    return _rouge_scorer().score(reference, prediction)["rougeL"].fmeasure


TEXT_METRICS = {"exact_match": exact_match, "token_f1": token_f1, "rouge_l": rouge_l}


def score_text(prediction: str, references: tuple[str, ...] | list[str], metrics: list[str]) -> dict[str, float]:
    """Each text metric named in `metrics` (others are skipped), the best over `references`."""
    return {m: max(TEXT_METRICS[m](prediction, r) for r in references) for m in metrics if m in TEXT_METRICS}
