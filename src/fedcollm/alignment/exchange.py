"""Top-k logits as they cross the network (FedMKT): five named tensors, never Python lists.

Examples have different lengths, so their per-token rows are concatenated on one token axis and `offsets`
marks where each example starts (CSR style): example e owns rows offsets[e]:offsets[e+1]. Values travel as
fp16 (2 bytes) and ids as int32 (4 bytes), 6 bytes per kept logit. A top-k that the server has already moved
onto a client's answer rows and into its vocabulary carries a sixth tensor, `aligned` (one byte per row), saying
which rows have a counterpart in the sender's. A received set is checked field by field; anything off is an
InvalidUpdate naming the sender and the field, so one bad peer is one rejected upload.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedcollm.errors import InvalidUpdate

PREFIX = "topk."
FIELDS = {"values": (torch.float16, 2), "ids": (torch.int32, 2), "offsets": (torch.int64, 1),
          "ce": (torch.float32, 1), "example_ids": (torch.int64, 1)}
ALIGNED = (torch.bool, 1)  # the optional field


@dataclass
class TopK:
    """The top-k logits of a set of examples, flattened on the token axis."""

    values: torch.Tensor  # float16 [N_tokens, k], logits
    ids: torch.Tensor  # int32 [N_tokens, k], sender's vocabulary
    offsets: torch.Tensor  # int64 [N_examples + 1], offsets[0] == 0, offsets[-1] == N_tokens
    ce: torch.Tensor  # float32 [N_examples], the sender's CE on each example (selection's reward)
    example_ids: torch.Tensor  # int64 [N_examples], distinct ids of the examples in the shared data
    aligned: torch.Tensor | None = None  # bool [N_tokens] on a realigned top-k (False rows: zeros); None: all rows

    @classmethod
    def from_examples(cls, values: list[torch.Tensor], ids: list[torch.Tensor], ce: torch.Tensor,
                      example_ids: torch.Tensor) -> TopK:
        """Concatenate per-example [T_e, k] rows (e.g. from `topk_of`) and record where each one starts."""
        lengths = torch.tensor([v.shape[0] for v in values], dtype=torch.int64)
        offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
        k = values[0].shape[1] if values else 0
        return cls(torch.cat(values) if values else torch.zeros(0, k, dtype=torch.float16),
                   torch.cat(ids) if ids else torch.zeros(0, k, dtype=torch.int32),
                   offsets, ce.to(torch.float32), example_ids.to(torch.int64))

    def example(self, e: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(values, ids) rows of the e-th example."""
        lo, hi = int(self.offsets[e]), int(self.offsets[e + 1])
        return self.values[lo:hi], self.ids[lo:hi]


def topk_of(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values fp16 [S, k], ids int32 [S, k]) of the k largest logits per row, largest first.

    Raises ValueError rather than send a logit that fp16 cannot hold (|x| > 65504 becomes inf).
    """
    if not 1 <= k <= logits.shape[-1]:
        raise ValueError(f"k must be in [1, {logits.shape[-1]}], got {k}")
    values, ids = logits.detach().float().topk(k, dim=-1)
    half = values.to(torch.float16)
    if not torch.isfinite(half).all():
        raise ValueError("logits are not finite in float16 (NaN, or beyond +-65504)")
    return half, ids.to(torch.int32)


def to_tensors(topk: TopK) -> dict[str, torch.Tensor]:
    """The named tensors of a payload (keys 'topk.<field>'); they can share a payload with other tensors."""
    names = list(FIELDS) + (["aligned"] if topk.aligned is not None else [])
    return {PREFIX + name: getattr(topk, name).contiguous() for name in names}


def from_tensors(d: dict[str, torch.Tensor], sender: str, vocab_size: int, k: int | None = None) -> TopK:
    """The TopK in `d` (other keys are ignored), checked against the sender's `vocab_size` and, if given, `k`.

    Checked: every field present with its dtype and rank; values and ids of one shape [N_tokens, k >= 1];
    offsets start at 0, never decrease and end at N_tokens; one CE and one example id per example; ids in
    [0, vocab_size) and, in a sender's own vocabulary (no `aligned`), distinct within a row (a repeated id would
    stand for k tokens while naming fewer; realigning may map two ids to one, so there repeats are allowed);
    values and CEs finite, CEs >= 0; example ids >= 0 and distinct; `aligned`, where present, bool with one entry
    per token row.
    """
    def bad(field: str, why: str) -> InvalidUpdate:
        return InvalidUpdate(f"top-k from {sender}: field {PREFIX + field} {why}")

    for name, (dtype, ndim) in FIELDS.items():
        t = d.get(PREFIX + name)
        if not isinstance(t, torch.Tensor):
            raise bad(name, "is missing" if t is None else f"is not a tensor ({type(t).__name__})")
        if t.dtype != dtype or t.dim() != ndim:
            raise bad(name, f"must be {dtype} of rank {ndim}, got {t.dtype} of rank {t.dim()}")
    aligned = d.get(PREFIX + "aligned")
    if aligned is not None and (not isinstance(aligned, torch.Tensor) or aligned.dtype != ALIGNED[0]
                                or aligned.dim() != ALIGNED[1] or aligned.shape[0] != d[PREFIX + "values"].shape[0]):
        raise bad("aligned", "must be torch.bool of rank 1 with one entry per token row")
    top = TopK(*(d[PREFIX + name] for name in FIELDS), aligned=aligned)
    n_tok, got_k = top.values.shape
    if top.ids.shape != top.values.shape:
        raise bad("ids", f"shape {tuple(top.ids.shape)} differs from values' {tuple(top.values.shape)}")
    if got_k < 1 or (k is not None and got_k != k):
        raise bad("values", f"holds k={got_k} logits per token, expected {k if k is not None else '>= 1'}")
    n_ex = top.offsets.shape[0] - 1
    if n_ex < 0 or int(top.offsets[0]) != 0:
        raise bad("offsets", "must start at 0")
    if (top.offsets.diff() < 0).any():
        raise bad("offsets", "must not decrease")
    if int(top.offsets[-1]) != n_tok:
        raise bad("offsets", f"end at {int(top.offsets[-1])}, but there are {n_tok} token rows")
    for name in ("ce", "example_ids"):
        if getattr(top, name).shape[0] != n_ex:
            raise bad(name, f"has {getattr(top, name).shape[0]} entries for {n_ex} examples")
    if top.ids.numel() and (int(top.ids.min()) < 0 or int(top.ids.max()) >= vocab_size):
        raise bad("ids", f"has ids outside [0, {vocab_size}) (min {int(top.ids.min())}, max {int(top.ids.max())})")
    if aligned is None and got_k > 1:
        ordered = top.ids.sort(dim=1).values
        repeats = ordered[:, 1:] == ordered[:, :-1]
        if repeats.any():
            row = int(repeats.any(1).nonzero()[0])
            raise bad("ids", f"repeats id {int(ordered[row, 1:][repeats[row]][0])} within row {row}; a top-k names "
                      f"k distinct tokens")
    if not torch.isfinite(top.values).all():
        raise bad("values", "has non-finite logits")
    if not (torch.isfinite(top.ce) & (top.ce >= 0)).all():
        raise bad("ce", "must be finite and >= 0")
    if (top.example_ids < 0).any() or top.example_ids.unique().numel() != n_ex:
        raise bad("example_ids", "must be distinct and >= 0")
    return top
