"""Vocabulary mapping on tiny tokenizers built in code: one byte-level BPE (GPT-2 style) and two
SentencePiece-style ones (Gemma's Replace+ByteFallback decoder, Llama's Metaspace), no downloads."""

from __future__ import annotations

import random
import warnings

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from fedcollm.alignment import vocab as V
from fedcollm.alignment.vocab import map_vocab, token_strings
from fedcollm.errors import ModelError

BYTE_LEVEL = ["<|endoftext|>", "Ġthe", "the", "Ċ", "Ã", "Ã©", "Ġcat", "<s>", "Ġdo", "ĠThe"]
SENTENCEPIECE = ["<pad>", "</s>", "<s>", "<unk>", "<0x0A>", "<0xC3>", "▁the", "the", "▁cats", "▁cat", "▁bat",
                 "é", "▁dog", "▁do", "<mask>"]


def byte_level(tokens: list[str], **special: str) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, **special)


def sentencepiece(tokens: list[str], style: str = "replace", **special: str) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=[], unk_token="<unk>",
                               byte_fallback=True))
    if style == "replace":  # Gemma / Llama-3-converted style
        tok.normalizer = normalizers.Replace(" ", "▁")
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    else:
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, **special)


def plain(tokens: list[str]) -> PreTrainedTokenizerFast:
    """No pre-tokenizer or decoder: the surface is the token string itself."""
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)},
                                                                         merges=[])))


@pytest.fixture
def bl():
    return byte_level(BYTE_LEVEL, eos_token="<|endoftext|>")


@pytest.fixture
def sp():
    return sentencepiece(SENTENCEPIECE, pad_token="<pad>", eos_token="</s>", bos_token="<s>", unk_token="<unk>",
                         mask_token="<mask>")


def test_byte_level_surface_text(bl):
    s = token_strings(bl)
    assert s[:7] == ["<|endoftext|>", " the", "the", "\n", "\udcc3", "é", " cat"]
    assert s[7] == "<s>"  # an ordinary token that happens to look like a special one


@pytest.mark.parametrize("style", ["replace", "metaspace"])
def test_sentencepiece_surface_text(style):
    s = token_strings(sentencepiece(SENTENCEPIECE, style=style, eos_token="</s>"))
    assert s[1] == "</s>" and s[4] == "\n" and s[5] == "\udcc3" and s[6] == " the" and s[7] == "the"


def test_the_maps_across_space_markers(bl, sp):
    forward, backward = map_vocab(bl, sp), map_vocab(sp, bl)
    assert forward.ids[BYTE_LEVEL.index("Ġthe")] == SENTENCEPIECE.index("▁the")
    assert backward.ids[SENTENCEPIECE.index("▁the")] == BYTE_LEVEL.index("Ġthe")
    assert forward.exact[BYTE_LEVEL.index("Ġthe")] and backward.exact[SENTENCEPIECE.index("▁the")]


def test_byte_tokens_map_to_the_same_byte(bl, sp):
    vmap = map_vocab(sp, bl)
    assert vmap.ids[SENTENCEPIECE.index("<0x0A>")] == BYTE_LEVEL.index("Ċ")
    assert vmap.ids[SENTENCEPIECE.index("<0xC3>")] == BYTE_LEVEL.index("Ã")  # a lone lead byte, not 'é'
    assert vmap.ids[SENTENCEPIECE.index("é")] == BYTE_LEVEL.index("Ã©")
    assert map_vocab(bl, sp).ids[BYTE_LEVEL.index("Ã")] == SENTENCEPIECE.index("<0xC3>")


def test_specials_map_only_to_specials_and_by_role(bl, sp):
    sp_specials = {SENTENCEPIECE.index(t) for t in ("<pad>", "</s>", "<s>", "<unk>", "<mask>")}
    forward = map_vocab(bl, sp)
    assert forward.ids[0] == SENTENCEPIECE.index("</s>")  # eos -> eos, though the strings differ
    assert not forward.exact[0]
    assert int(forward.ids[BYTE_LEVEL.index("<s>")]) not in sp_specials  # ordinary text stays ordinary
    assert set(forward.ids[1:].tolist()).isdisjoint(sp_specials)
    backward = map_vocab(sp, bl)
    for i in sp_specials:  # the byte-level side has one special, so every special lands on it
        assert backward.ids[i] == 0


def test_exact_match_wins_and_duplicates_go_to_the_lowest_id(bl):
    vmap = map_vocab(bl, sentencepiece(["<unk>", "▁cats", "▁bat", "▁cat"]))
    assert vmap.ids[BYTE_LEVEL.index("Ġcat")] == 3 and vmap.exact[BYTE_LEVEL.index("Ġcat")]
    dup = sentencepiece(["<unk>", "<0x61>", "b", "a"])  # '<0x61>' and 'a' are both 'a'
    vmap = map_vocab(plain(["a"]), dup)
    assert vmap.ids.tolist() == [1] and vmap.exact.tolist() == [True]


def test_tie_break_distance_then_length_difference_then_lexicographic():
    def nearest(dst: list[str]) -> str:
        return dst[int(map_vocab(plain(["abcd"]), plain(dst)).ids[0])]

    assert nearest(["abcdxy", "abce", "abc"]) == "abce"  # all distance <= 2; same length wins at distance 1
    assert nearest(["zbcd", "abcx"]) == "abcx"  # equal distance and length: lexicographic
    assert nearest(["bcd", "abcdz"]) == "abcdz"  # both one off, one shorter and one longer: lexicographic
    assert nearest(["xyzw", "abcdxy"]) == "abcdxy"  # distance beats length difference


def test_a_tokenizer_maps_to_itself_as_identity(bl, sp):
    for tok in (bl, sp):
        vmap = map_vocab(tok, tok)
        assert torch.equal(vmap.ids, torch.arange(len(tok))) and bool(vmap.exact.all())


def test_cache_hit_and_corrupt_cache_is_rebuilt(bl, sp, tmp_path, monkeypatch):
    first = map_vocab(bl, sp, cache_dir=tmp_path)
    [path] = tmp_path.glob("*.safetensors")
    built = []
    real_build = V._build
    monkeypatch.setattr(V, "_build", lambda *a: built.append(1) or real_build(*a))
    again = map_vocab(bl, sp, cache_dir=tmp_path)
    assert not built and torch.equal(again.ids, first.ids) and torch.equal(again.exact, first.exact)
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not safetensors")
    with pytest.warns(UserWarning, match="unusable"):
        rebuilt = map_vocab(bl, sp, cache_dir=tmp_path)
    assert built == [1] and torch.equal(rebuilt.ids, first.ids)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        map_vocab(bl, sp, cache_dir=tmp_path)  # the rebuilt file is good again
    assert built == [1]
    assert len(list(map_vocab(sp, bl, cache_dir=tmp_path).ids)) == len(sp)  # the reverse pair has its own file
    assert len(list(tmp_path.glob("*.safetensors"))) == 2


def test_cache_defaults_to_fedcollm_cache(bl, sp, tmp_path, monkeypatch):
    monkeypatch.setenv("FEDCOLLM_CACHE", str(tmp_path))
    map_vocab(bl, sp)
    assert len(list((tmp_path / "vocab-maps").glob("*.safetensors"))) == 1


def _levenshtein(a: str, b: str) -> int:
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]


def test_fast_search_equals_brute_force(monkeypatch):
    monkeypatch.setattr(V, "_CDIST_CELLS", 37)  # many small rapidfuzz calls, so chunking is exercised too
    rng = random.Random(0)

    def vocab(n: int) -> list[str]:
        words: set[str] = set()
        while len(words) < n:
            words.add("".join(rng.choice("abcé中 ") for _ in range(rng.randint(1, 7))))
        return sorted(words, key=lambda _: rng.random())

    src, dst = vocab(300), vocab(400)
    vmap = map_vocab(plain(src), plain(dst))
    for i, s in enumerate(src):
        want = min(range(len(dst)), key=lambda j: (_levenshtein(s, dst[j]), abs(len(dst[j]) - len(s)), dst[j], j))
        assert int(vmap.ids[i]) == want, (s, dst[int(vmap.ids[i])], dst[want])
        assert bool(vmap.exact[i]) == (s in dst)
    assert 0 < vmap.n_exact < len(src)


def test_slow_tokenizer_is_a_model_error():
    class Slow:
        name_or_path = "some/slow-tokenizer"

        def __len__(self) -> int:
            return 3

    with pytest.raises(ModelError, match="some/slow-tokenizer"):
        token_strings(Slow())
