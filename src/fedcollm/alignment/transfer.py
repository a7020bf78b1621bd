"""Per-example distillation targets across tokenizers (FedMKT, heterogeneous FedCoLLM): a sender's top-k on the
public set, aligned into the receiver's tokenization and vocabulary, chosen per example by a selection strategy,
and collated onto a batch's answer rows.

Top-k rows exist only for answer tokens (as everywhere in fedcollm, only the answer is trained and scored):
row r of an example predicts its r-th answer token. Pure functions on token ids, strings and tensors.
"""

from __future__ import annotations

from dataclasses import replace
from functools import lru_cache

import torch

from fedcollm.alignment.exchange import TopK
from fedcollm.alignment.selection import (
    select_dual_min_ce,
    select_greater,
    select_weighted_mean,
)
from fedcollm.alignment.sequence import (
    SparseTargets,
    dtw_align,
    keep_exact,
    map_topk_to_student,
    one_to_one,
)
from fedcollm.alignment.vocab import map_vocab, token_strings
from fedcollm.data.batching import SFTData

Encoded = tuple[list[int], int]  # one example as SFTData holds it: token ids, answer length
Target = tuple[torch.Tensor, torch.Tensor] | None  # (ids [n, w], probs [n, w]) per answer row; None: no KD
SELECTIONS = ("dual_min_ce", "greater", "weighted_mean")
Sender = tuple[TopK, SFTData, object]  # a sender's top-k, its encoding of D^a, its tokenizer


def answer_rows(src: Encoded, dst: Encoded, src_strings: list[str], dst_strings: list[str]) -> torch.Tensor:
    """LongTensor[n_dst]: for each answer token of `dst`, the `src` answer row predicting the same token, or -1.

    The two tokenizations of the example are aligned by DTW; a dst token takes a src row only where the two
    tokens are aligned one-to-one with the same text (`keep_exact`) and the src token is one of src's answer
    tokens. For one tokenizer this is the identity.
    """
    (src_ids, n_src), (dst_ids, n_dst) = src, dst
    a, b = [dst_strings[t] for t in dst_ids], [src_strings[t] for t in src_ids]
    token_map = keep_exact(one_to_one(dtw_align(a, b), len(a)), a, b)[len(dst_ids) - n_dst:]
    rows = token_map - (len(src_ids) - n_src)
    return rows.masked_fill((token_map < 0) | (rows < 0) | (rows >= n_src), -1)


def example_targets(top: TopK, e: int, rows: torch.Tensor, id_map: torch.Tensor, gold: torch.Tensor,
                    temperature: float) -> SparseTargets:
    """Example e of `top` as sparse targets on the receiver's answer rows (gold next token where unaligned)."""
    values, ids = top.example(e)
    return map_topk_to_student(values, ids, id_map, rows, gold, temperature)


def realign(top: TopK, src: list[Encoded], dst: list[Encoded], src_strings: list[str], dst_strings: list[str],
            id_map: torch.Tensor) -> TopK:
    """A sender's top-k on its own answer rows, moved onto the receiver's answer rows and into its vocabulary, so
    the receiver needs neither the sender's tokenizer nor the vocabulary map (the server does this for clients).

    Row r of example e is the sender row aligned to the receiver's r-th answer token (`answer_rows`), its ids
    through `id_map` (duplicates are left for `map_topk_to_student` to resolve, as it would have); where there is
    none the row is zeros and `aligned` False. Values stay logits; CEs and example ids are the sender's.
    """
    values, ids, aligned = [], [], []
    for e, (s_enc, d_enc) in enumerate(zip(src, dst)):
        rows = answer_rows(s_enc, d_enc, src_strings, dst_strings)
        hit = (rows >= 0).unsqueeze(-1)
        v, i = top.example(e)
        values.append(v[rows.clamp(min=0)].masked_fill(~hit, 0))
        ids.append(id_map[i[rows.clamp(min=0)].long()].to(torch.int32).masked_fill(~hit, 0))
        aligned.append(hit.squeeze(-1))
    moved = TopK.from_examples(values, ids, top.ce, top.example_ids)
    return replace(moved, aligned=torch.cat(aligned) if aligned else torch.zeros(0, dtype=torch.bool))


def row_targets(top: TopK, dst: list[Encoded], temperature: float) -> list[SparseTargets]:
    """A top-k on the receiver's own answer rows and vocabulary (its own, or `realign`ed) as sparse targets, one
    per example: softmax over the distinct ids of an aligned row, one-hot on the gold next token elsewhere."""
    identity = torch.arange(int(top.ids.max()) + 1 if top.ids.numel() else 1)
    out = []
    for e, (ids, n) in enumerate(dst):
        rows = torch.arange(n)
        if top.aligned is not None:
            lo = int(top.offsets[e])
            rows = rows.masked_fill(~top.aligned[lo:lo + n], -1)
        out.append(example_targets(top, e, rows, identity, torch.tensor(ids[len(ids) - n:]), temperature))
    return out


def select_targets(strategy: str, own_ce: torch.Tensor, own: list[SparseTargets], teacher_ce: torch.Tensor,
                   teachers: list[list[SparseTargets]]) -> list[Target]:
    """Per example, what the learner distils towards: its own start-of-round distribution (`own`, CE `own_ce` [B])
    and N teachers' (`teachers[t][e]`, CE `teacher_ce` [N, B]) are the candidates.

    greater: the best-fitting candidate (lowest CE; own wins ties), own included as an anchor.
    weighted_mean: every candidate, weighted by softmax over exp(-CE) (their rows side by side, width (N+1)k).
    dual_min_ce (the paper's): the best teacher, only where its CE is below the learner's own; else None.
    """
    if strategy == "dual_min_ce":
        best, keep = select_dual_min_ce(teacher_ce, own_ce)
        return [(teachers[t][e].ids, teachers[t][e].probs) if k else None
                for e, (t, k) in enumerate(zip(best.tolist(), keep.tolist()))]
    candidates = [own] + teachers
    ce = torch.cat([own_ce.unsqueeze(0), teacher_ce])
    if strategy == "greater":
        return [(candidates[c][e].ids, candidates[c][e].probs) for e, c in enumerate(select_greater(ce).tolist())]
    if strategy == "weighted_mean":
        weights = select_weighted_mean(ce)
        return [(torch.cat([c[e].ids for c in candidates], -1),
                 torch.cat([c[e].probs * weights[i, e] for i, c in enumerate(candidates)], -1))
                for e in range(ce.shape[1])]
    raise ValueError(f"selection must be one of {', '.join(SELECTIONS)}, got {strategy!r}")


def collate_targets(targets: list[Target], keep: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids [B, keep, w], probs [B, keep, w], mask [B, keep]) for a batch whose answers are right-aligned in
    `keep` rows (AnswerBatch's layout); mask is 1 on the answer rows of examples that have a target."""
    width = max((t[0].shape[1] for t in targets if t is not None), default=1)
    ids = torch.zeros(len(targets), keep, width, dtype=torch.long)
    probs = torch.zeros(len(targets), keep, width)
    mask = torch.zeros(len(targets), keep)
    for i, t in enumerate(targets):
        if t is None:
            continue
        n, w = t[0].shape
        ids[i, keep - n:, :w], probs[i, keep - n:, :w], mask[i, keep - n:] = t[0], t[1], 1.0
    return ids, probs, mask


def vocab_ids(src_tokenizer, dst_tokenizer) -> torch.Tensor:
    """Source token id -> destination token id: the identity for one vocabulary, else the vocabulary map."""
    if src_tokenizer is dst_tokenizer or src_tokenizer.get_vocab() == dst_tokenizer.get_vocab():
        return torch.arange(len(src_tokenizer))
    return map_vocab(src_tokenizer, dst_tokenizer).ids


@lru_cache(maxsize=32)
def _bridge(src_tokenizer, dst_tokenizer) -> tuple[torch.Tensor, list[str], list[str]]:
    """The vocabulary map and both surface vocabularies of a tokenizer pair: built once a process (every round
    and every client of a model reuses them; `map_vocab` also caches on disk)."""
    return vocab_ids(src_tokenizer, dst_tokenizer), token_strings(src_tokenizer), token_strings(dst_tokenizer)


def moved(sender: Sender, dst: SFTData, dst_tokenizer) -> TopK:
    """A sender's top-k on D^a, on the receiver's answer rows and in its vocabulary (itself for one tokenizer)."""
    top, src, src_tokenizer = sender
    if src_tokenizer is dst_tokenizer:
        return top
    id_map, src_strings, dst_strings = _bridge(src_tokenizer, dst_tokenizer)
    return realign(top, src.encoded, dst.encoded, src_strings, dst_strings, id_map)
