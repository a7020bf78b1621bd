"""Sequence alignment and distribution mapping between two tokenizations of the same text (FedMKT, FuseLLM).

Position convention (used throughout): a token map `M` of length n_student holds, for each student *token*
index, the teacher token index it is aligned to one-to-one, or -1. Distributions live at *positions*: the
logits at position i predict token i+1. Student position i takes teacher position j when student token i+1 and
teacher token j+1 are aligned one-to-one (`next_token_positions`). On a monotone DTW path a 1:1 pair
(i+1, j+1) is always preceded by (i, j), so the two prefixes read up to then are aligned as wholes: both models
predict the same next piece of text from the same context.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from rapidfuzz.distance import Levenshtein
from rapidfuzz.process import cdist

Path = list[tuple[int, int]]


def dtw_align(a_tokens: list[str], b_tokens: list[str], markers: str = " \u2581\u0120") -> Path:
    """Dynamic-time-warping path between two token sequences; cost = edit distance of marker-stripped strings.

    Every character of `markers` (space, SentencePiece's '▁', byte-level BPE's 'Ġ') is removed before the
    distance, as in FuseLLM. The path runs from (0, 0) to (n-1, m-1) in steps (1,1), (1,0), (0,1); it is
    empty when either sequence is. Ties in the traceback prefer the diagonal, then a step in A, then in B
    (FuseLLM's order).

    The programme is written here because the DTW libraries (dtaidistance, tslearn, fastdtw) take numeric
    series and their own distance, not a precomputed string-cost matrix with this traceback rule. Costs come
    from rapidfuzz in C; each row of the recurrence is one vectorised min-plus scan.
    """
    if not a_tokens or not b_tokens:
        return []
    table = str.maketrans("", "", markers)
    cost = cdist([t.translate(table) for t in a_tokens], [t.translate(table) for t in b_tokens],
                 scorer=Levenshtein.distance, dtype=np.int64).astype(np.float64)
    n, m = cost.shape
    acc = np.full((n + 1, m + 1), np.inf)
    acc[0, 0] = 0.0
    for i in range(1, n + 1):
        c = cost[i - 1]
        # D[i,j] = c[j] + min(D[i-1,j], D[i-1,j-1], D[i,j-1]): with e[j] = c[j] + min(up, diagonal) the row is
        # D[i,j] = min_{k<=j} e[k] + c[k+1] + ... + c[j] = C[j] + min_{k<=j}(e[k] - C[k]), C the prefix sums.
        e = c + np.minimum(acc[i - 1, 1:], acc[i - 1, :-1])
        run = np.cumsum(c)
        acc[i, 1:] = run + np.minimum.accumulate(e - run)
    d = acc[1:, 1:]
    i, j = n - 1, m - 1
    path = [(i, j)]
    while i > 0 or j > 0:
        diag = d[i - 1, j - 1] if i > 0 and j > 0 else np.inf
        up = d[i - 1, j] if i > 0 else np.inf
        left = d[i, j - 1] if j > 0 else np.inf
        move = int(np.argmin([diag, up, left]))
        i, j = (i - 1, j - 1) if move == 0 else (i - 1, j) if move == 1 else (i, j - 1)
        path.append((i, j))
    return path[::-1]


def one_to_one(path: Path, n_a: int) -> torch.Tensor:
    """LongTensor[n_a]: the j aligned to A's token i where i meets only j on the path and j only i, else -1.

    Stricter than FuseLLM, which only asks that i meets one j: a B token spread over several A tokens covers
    text none of them alone predicts, so it is dropped from both sides.
    """
    out = torch.full((n_a,), -1, dtype=torch.long)
    if not path:
        return out
    ij = torch.tensor(path, dtype=torch.long)
    count_a = torch.bincount(ij[:, 0], minlength=n_a)
    count_b = torch.bincount(ij[:, 1])
    single = (count_a[ij[:, 0]] == 1) & (count_b[ij[:, 1]] == 1)
    out[ij[single, 0]] = ij[single, 1]
    return out


def keep_exact(token_map: torch.Tensor, a_tokens: list[str], b_tokens: list[str]) -> torch.Tensor:
    """`token_map` with -1 wherever the paired tokens' (normalised) texts differ: FuseLLM's 'hard' alignment.

    DTW pairs 'happy' with 'unhappy' 1:1 when the other side split the word; their next-token distributions
    predict different text, so only identical pairs are kept.
    """
    out = token_map.clone()
    for i, j in enumerate(token_map.tolist()):
        if j >= 0 and a_tokens[i] != b_tokens[j]:
            out[i] = -1
    return out


def next_token_positions(token_map: torch.Tensor) -> torch.Tensor:
    """LongTensor[n-1]: teacher position for each student position 0..n-2, or -1 (see the module docstring).

    Student position i takes teacher position M[i+1] - 1; a student token aligned to teacher token 0 has no
    teacher position predicting it.
    """
    return (token_map[1:] - 1).clamp(min=-1)


class SparseTargets(NamedTuple):
    """Target distributions as the k (id, probability) pairs per position; padding slots have probability 0."""

    ids: torch.Tensor  # long [S, k], student vocabulary
    probs: torch.Tensor  # float32 [S, k], rows sum to 1
    aligned: torch.Tensor  # bool [S], True where the row came from the teacher


def map_topk_to_student(teacher_values: torch.Tensor, teacher_ids: torch.Tensor, id_map: torch.Tensor,
                        positions: torch.Tensor, gold_next_ids: torch.Tensor,
                        temperature: float = 1.0) -> SparseTargets:
    """Teacher top-k logits [T, k] (teacher vocabulary) as sparse student targets at S student positions.

    positions[i] is the teacher position for student position i or -1 (`next_token_positions`). At an aligned
    position the teacher's ids go through `id_map` (teacher id -> student id, -1 = no counterpart, dropped);
    ids that land on the same student id keep only the highest logit (FuseLLM keeps the first of the sorted
    top-k) and the rest is renormalised by softmax(values / temperature) over the survivors. The temperature
    shapes the teacher only; no T^2 factor, the loss is a cross-entropy.
    Elsewhere, and where no teacher id survives the map, the target is one-hot on the gold next token
    gold_next_ids[i]. FuseLLM puts it on the input token at i instead, one step behind (FuseAI issue #27).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if positions.numel() and int(positions.max()) >= teacher_values.shape[0]:
        raise ValueError(f"position {int(positions.max())} is past the teacher's {teacher_values.shape[0]} rows")
    s, k = positions.shape[0], teacher_values.shape[1]
    src = positions.clamp(min=0)
    vals = teacher_values[src].float() / temperature
    ids = id_map[teacher_ids[src].long()]
    order = vals.argsort(dim=-1, descending=True, stable=True)
    vals, ids = vals.gather(-1, order), ids.gather(-1, order)
    earlier = torch.ones(k, k, dtype=torch.bool).tril(-1)  # earlier[a, b]: slot b comes before slot a
    dup = ((ids.unsqueeze(-1) == ids.unsqueeze(-2)) & earlier).any(-1)
    live = (ids >= 0) & ~dup & (positions >= 0).unsqueeze(-1)
    aligned = live.any(-1)
    probs = torch.softmax(vals.masked_fill(~live, float("-inf")), -1).nan_to_num(0.0)
    ids = ids.masked_fill(~live, 0)
    one_hot_ids = torch.zeros(s, k, dtype=torch.long)
    one_hot_ids[:, 0] = gold_next_ids
    one_hot = torch.zeros(s, k)
    one_hot[:, 0] = 1.0
    row = aligned.unsqueeze(-1)
    return SparseTargets(torch.where(row, ids, one_hot_ids), torch.where(row, probs, one_hot), aligned)


def aligned_fraction(aligned: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """Share of (masked-in) positions whose target came from the teacher; 0.0 when no position is in."""
    keep = aligned.bool() if mask is None else aligned.bool() & mask.bool()
    total = aligned.numel() if mask is None else int(mask.bool().sum())
    return int(keep.sum()) / total if total else 0.0


def soft_target_ce(student_logits: torch.Tensor, target_ids: torch.Tensor, target_probs: torch.Tensor,
                   mask: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of student logits [B, S, V] against sparse targets [B, S, k], mean over masked-in tokens.

    Equals KL(target || student) + H(target) per token, computed with a gather so no [B, S, V] target exists.
    """
    logp = F.log_softmax(student_logits, -1).gather(-1, target_ids)
    ce = -(target_probs * logp).sum(-1)
    return (ce * mask).sum() / mask.sum().clamp(min=1)


def fedmkt_loss(lm_ce: torch.Tensor, kd_ce: torch.Tensor, kd_weight: float = 0.1) -> torch.Tensor:
    """(1 - w) * LM loss + w * distillation loss; the FedMKT paper uses 0.9 / 0.1."""
    if not 0.0 <= kd_weight <= 1.0:
        raise ValueError(f"kd_weight must be in [0, 1], got {kd_weight}")
    return (1.0 - kd_weight) * lm_ce + kd_weight * kd_ce
