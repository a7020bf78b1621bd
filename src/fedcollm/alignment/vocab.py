"""Vocabulary mapping between two Hugging Face tokenizers (FedMKT, arXiv 2406.02224, section 3.3).

Every source token id gets one destination token id: the destination token with the same surface text,
else the one at the smallest Levenshtein distance. Surface text is what the token stands for in a string,
decoded from each tokenizer's own representation (byte-level BPE's 'Ġ'/'Ċ' alphabet, SentencePiece's '▁',
byte-fallback '<0xNN>'), so 'Ġthe', '▁the' and ' the' all read ' the'.

Special tokens (bos/eos/pad/unk/mask and added tokens flagged special) form their own namespace: they map
only to destination special tokens (same literal string, else same role such as eos -> eos, else nearest
literal), and ordinary tokens map only to ordinary tokens. A destination without special tokens lends all
its tokens to that search instead.

Ties, made deterministic (the reference implementation took the first in vocabulary order):
  1. exact surface match: the lowest destination id with that surface (duplicates arise e.g. from a
     byte-fallback '<0x0A>' next to an added '\\n');
  2. otherwise the smallest edit distance, then the smallest length difference (a substitution before an
     insertion or deletion, so the token covers a span of the same size), then the lexicographically
     smallest surface in code-point order (the paper's rule), then the lowest id.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from collections import defaultdict
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rapidfuzz import process
from rapidfuzz.distance import Levenshtein
from safetensors.torch import load_file, save_file

from fedcollm.errors import ModelError
from fedcollm.fileio import atomic_write

FORMAT_VERSION = 1  # bump when the surface normalisation or the tie-break changes: it keys the disk cache
_ROLES = ("eos", "bos", "unk", "pad", "mask")  # a special token with several roles is matched by the first
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_UNSET = np.iinfo(np.int32).max  # no candidate seen yet
_CDIST_CELLS = 1 << 25  # distance-matrix entries per rapidfuzz call (64 MiB of int16)


@dataclass(frozen=True)
class VocabMap:
    """`ids[i]` is the destination id for source id i; `exact[i]` says the surface texts were equal."""

    ids: torch.Tensor  # int64 [len(src)]
    exact: torch.Tensor  # bool [len(src)]
    dst_size: int

    @property
    def n_exact(self) -> int:
        return int(self.exact.sum())

    @property
    def n_fuzzy(self) -> int:
        return len(self.exact) - self.n_exact

    @property
    def exact_fraction(self) -> float:
        return self.n_exact / max(len(self.exact), 1)

    def summary(self) -> dict[str, Any]:
        return {"src_size": len(self.ids), "dst_size": self.dst_size, "exact": self.n_exact,
                "fuzzy": self.n_fuzzy, "exact_fraction": self.exact_fraction}


@lru_cache(maxsize=1)
def _byte_of_char() -> dict[str, int]:
    """The inverse of GPT-2's byte -> printable-char table that byte-level BPE vocabularies are written in."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return {char: byte for byte, char in bytes_to_unicode().items()}


def _tokenizer_name(tokenizer: Any) -> str:
    return getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__


def _backend_str(tokenizer: Any) -> str:
    """The `tokenizers` backend as JSON text: the representation of the vocabulary is read from it."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ModelError(f"tokenizer {_tokenizer_name(tokenizer)} ({type(tokenizer).__name__}) has no `tokenizers` "
                         "backend; vocabulary mapping needs a fast tokenizer (load it with use_fast=True)")
    return backend.to_str()


def _components(node: Any) -> list[dict[str, Any]]:
    """A pre-tokenizer or decoder and everything nested in its Sequence, flattened."""
    if not isinstance(node, dict):
        return []
    nested = node.get("pretokenizers") or node.get("decoders") or []
    return [node] + [c for child in nested for c in _components(child)]


def _scheme(backend: dict[str, Any]) -> tuple[bool, str | None, bool]:
    """(byte-level BPE?, the space marker such as '▁' or None, byte-fallback '<0xNN>' tokens?) of a backend.

    Read from the pre-tokenizer and decoder rather than the tokenizer class, so any fast tokenizer works.
    """
    parts = _components(backend.get("pre_tokenizer")) + _components(backend.get("decoder"))
    byte_level = any(p.get("type") == "ByteLevel" for p in parts)
    marker = None
    for p in parts:
        if p.get("type") == "Metaspace":
            marker = p.get("replacement", "▁")
        elif p.get("type") == "Replace" and p.get("content") == " " and "String" in (p.get("pattern") or {}):
            marker = p["pattern"]["String"]
    byte_fallback = bool((backend.get("model") or {}).get("byte_fallback")) or any(
        p.get("type") == "ByteFallback" for p in parts)
    return byte_level, marker, byte_fallback


def _text(raw: bytes) -> str:
    # surrogateescape turns each byte of an incomplete UTF-8 sequence into its own code point U+DC80..U+DCFF,
    # so a partial character never crashes and matches only the same byte from another tokenizer.
    return raw.decode("utf-8", errors="surrogateescape")


def _vocab(tokenizer: Any) -> tuple[list[str], np.ndarray]:
    """Surface strings of ids 0..len(tokenizer)-1 and a mask of the special ones (kept literal)."""
    byte_level, marker, byte_fallback = _scheme(json.loads(_backend_str(tokenizer)))
    size = len(tokenizer)
    if size == 0:
        raise ModelError(f"tokenizer {_tokenizer_name(tokenizer)} has an empty vocabulary")
    tokens = tokenizer.convert_ids_to_tokens(list(range(size)))
    added = tokenizer.added_tokens_decoder
    special = np.zeros(size, dtype=bool)
    for i in set(tokenizer.all_special_ids) | {i for i, tok in added.items() if tok.special}:
        if 0 <= i < size:
            special[i] = True
    byte_of = _byte_of_char()
    strings = []
    for i, token in enumerate(tokens):
        if token is None:
            raise ModelError(f"tokenizer {_tokenizer_name(tokenizer)} has no token for id {i} although its "
                             f"length is {size}")
        if special[i]:
            strings.append(token)
        elif i in added:  # added tokens are stored as plain text, not in the model's byte alphabet
            strings.append(token.replace(marker, " ") if marker else token)
        elif byte_level:  # chars outside the byte alphabet stand for themselves (hand-edited vocabularies)
            strings.append(_text(b"".join(bytes([byte_of[c]]) if c in byte_of else c.encode() for c in token)))
        elif byte_fallback and (m := _BYTE_TOKEN.fullmatch(token)):
            strings.append(_text(bytes([int(m.group(1), 16)])))
        else:
            strings.append(token.replace(marker, " ") if marker else token)
    return strings, special


def token_strings(tokenizer: Any) -> list[str]:
    """The surface text of every token id, normalised so two tokenizers' strings compare equal.

    Bytes that are not a complete UTF-8 character become U+DC80+byte (Python's surrogateescape);
    special tokens are their literal string.
    """
    return _vocab(tokenizer)[0]


def _roles(tokenizer: Any) -> dict[str, int]:
    roles = {}
    for role in _ROLES:
        i = getattr(tokenizer, f"{role}_token_id", None)
        if isinstance(i, int):
            roles.setdefault(role, i)
    return roles


def _nearest(queries: list[str], cands: list[str]) -> np.ndarray:
    """Index into `cands` of each query's nearest candidate under the module's tie-break.

    `cands` must be unique and sorted (code-point order), so the first minimum of a row is the
    lexicographically smallest. Since distance >= |length difference|, candidates are visited in buckets of
    growing length difference k and a query stops once k reaches its best distance: a later bucket can then
    at best tie, and ties go to the smaller length difference already found. rapidfuzz does the distances;
    this bucketing is what it does not do for a many-to-many search.
    """
    cand_len = np.fromiter(map(len, cands), dtype=np.int64, count=len(cands))
    bucket_ids = {int(n): np.flatnonzero(cand_len == n) for n in np.unique(cand_len)}
    buckets = {n: [cands[j] for j in ids] for n, ids in bucket_ids.items()}
    max_len = int(cand_len.max())
    by_len: dict[int, list[int]] = defaultdict(list)
    for qi, q in enumerate(queries):
        by_len[len(q)].append(qi)
    result = np.full(len(queries), -1, dtype=np.int64)
    for qlen, members in by_len.items():
        group = np.array(members, dtype=np.int64)
        best_d = np.full(len(group), _UNSET, dtype=np.int64)
        best_j = np.full(len(group), -1, dtype=np.int64)
        for k in range(max(qlen, max_len) + 1):
            active = np.flatnonzero(best_d > k)
            if len(active) == 0:
                break
            step_d = np.full(len(active), _UNSET, dtype=np.int64)
            step_j = np.full(len(active), -1, dtype=np.int64)
            for n in sorted({qlen - k, qlen + k}):  # same length difference: compare by (distance, rank)
                if n not in buckets:
                    continue
                d, j = _row_min([queries[i] for i in group[active]], buckets[n], _cutoff(best_d[active]))
                j = bucket_ids[n][j]
                better = (d < step_d) | ((d == step_d) & (j < step_j))
                step_d[better], step_j[better] = d[better], j[better]
            improved = step_d < best_d[active]  # strict: an equal distance found earlier has a smaller k
            best_d[active[improved]], best_j[active[improved]] = step_d[improved], step_j[improved]
        result[group] = best_j
    return result


def _cutoff(best: np.ndarray) -> int | None:
    """Distances at or above every query's best cannot win, so rapidfuzz may stop counting there."""
    worst = int(best.max())
    return None if worst == _UNSET else worst - 1


def _row_min(queries: list[str], choices: list[str], cutoff: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Per query, the smallest Levenshtein distance to `choices` and the first choice reaching it.

    Distances above `cutoff` come back as cutoff + 1 (rapidfuzz's convention); they never beat a best.
    The matrix is computed choices x queries: rapidfuzz is faster with the longer list as its rows."""
    cols = max(1, _CDIST_CELLS // len(choices))
    d_out, j_out = [], []
    for start in range(0, len(queries), cols):
        dist = process.cdist(choices, queries[start:start + cols], scorer=Levenshtein.distance,
                             dtype=np.int16, workers=-1, score_cutoff=cutoff)
        j = dist.argmin(axis=0)
        d_out.append(dist[j, np.arange(len(j))].astype(np.int64))
        j_out.append(j)
    return np.concatenate(d_out), np.concatenate(j_out)


def _lowest_id_of(strings: list[str], ids: np.ndarray) -> dict[str, int]:
    lookup: dict[str, int] = {}
    for i in ids.tolist():  # ascending, so the first id seen for a string is the lowest
        lookup.setdefault(strings[i], i)
    return lookup


def _build(src: Any, dst: Any) -> VocabMap:
    src_str, src_special = _vocab(src)
    dst_str, dst_special = _vocab(dst)
    ids = np.full(len(src_str), -1, dtype=np.int64)
    exact = np.zeros(len(src_str), dtype=bool)
    dst_roles = _roles(dst)
    by_role: dict[int, int] = {}  # source special id -> destination id of its first shared role
    for role, i in _roles(src).items():
        if role in dst_roles:
            by_role.setdefault(i, dst_roles[role])
    for is_special in (False, True):
        pool = np.flatnonzero(dst_special == is_special)
        lookup = _lowest_id_of(dst_str, pool if len(pool) else np.arange(len(dst_str)))
        todo = []
        for i in np.flatnonzero(src_special == is_special).tolist():
            if (j := lookup.get(src_str[i])) is not None:
                ids[i], exact[i] = j, True
            elif is_special and i in by_role:
                ids[i] = by_role[i]
            else:
                todo.append(i)
        if todo:
            cands = sorted(lookup)
            nearest = _nearest([src_str[i] for i in todo], cands)
            ids[todo] = [lookup[cands[j]] for j in nearest.tolist()]
    return VocabMap(ids=torch.from_numpy(ids), exact=torch.from_numpy(exact), dst_size=len(dst_str))


def _fingerprint(tokenizer: Any) -> str:
    """sha256 of everything the mapping reads from a tokenizer: the backend JSON, specials and their roles."""
    extra = {"special": sorted(tokenizer.all_special_ids), "roles": _roles(tokenizer), "len": len(tokenizer),
             "added": {i: [t.content, t.special] for i, t in sorted(tokenizer.added_tokens_decoder.items())}}
    blob = _backend_str(tokenizer) + json.dumps(extra, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _cache_path(src: Any, dst: Any, cache_dir: str | Path | None) -> Path | None:
    if cache_dir is None:
        env = os.environ.get("FEDCOLLM_CACHE")
        if not env:
            return None
        cache_dir = Path(env) / "vocab-maps"
    key = hashlib.sha256(f"v{FORMAT_VERSION}:{_fingerprint(src)}:{_fingerprint(dst)}".encode()).hexdigest()
    return Path(cache_dir) / f"{key}.safetensors"


def _load_cached(path: Path, src_size: int, dst_size: int) -> VocabMap | None:
    """The cached map, or None (with a warning) when the file is damaged or does not fit the tokenizers."""
    try:
        tensors = load_file(path)
        ids, exact = tensors["ids"], tensors["exact"]
        if ids.dtype != torch.int64 or exact.dtype != torch.bool or ids.shape != (src_size,) \
                or exact.shape != (src_size,) or (src_size and not (0 <= int(ids.min()) <= int(ids.max()) < dst_size)):
            raise ValueError("tensors do not fit the tokenizers")
    except Exception as err:  # any damage (truncated header, wrong tensors) means: rebuild
        warnings.warn(f"vocab-map cache {path} is unusable ({err}); rebuilding it", stacklevel=3)
        return None
    return VocabMap(ids=ids, exact=exact, dst_size=dst_size)


def map_vocab(src_tokenizer: Any, dst_tokenizer: Any, cache_dir: str | Path | None = None) -> VocabMap:
    """Map every id of `src_tokenizer` to one id of `dst_tokenizer` (exact surface, else nearest; see module doc).

    The map is cached under `cache_dir` (default `$FEDCOLLM_CACHE/vocab-maps` when that is set, else none),
    keyed by both tokenizers' content, because a large pair takes minutes.
    """
    path = _cache_path(src_tokenizer, dst_tokenizer, cache_dir)
    if path is not None and path.exists():
        cached = _load_cached(path, len(src_tokenizer), len(dst_tokenizer))
        if cached is not None:
            return cached
    vmap = _build(src_tokenizer, dst_tokenizer)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {"ids": vmap.ids.contiguous(), "exact": vmap.exact.contiguous()}
        atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata={"format": str(FORMAT_VERSION)}))
    return vmap
