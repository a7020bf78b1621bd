"""Vocabulary mapping and alignment on the real tokenizers of the registry's weight packages: SmolLM2 (byte-level
BPE, 49,152 ids), Gemma-3 (SentencePiece with byte fallback, 262,144) and Qwen2.5 (Qwen2 BPE, 151,936). Each
test skips, naming the package to install, where a model's package is absent. The test extra installs Gemma's
and Qwen's; the README's test command installs SmolLM2's."""

from __future__ import annotations

import pytest
import torch

from fedcollm.alignment.exchange import TopK, from_tensors, to_tensors, topk_of
from fedcollm.alignment.transfer import answer_rows
from fedcollm.alignment.vocab import map_vocab, token_strings
from fedcollm.comm import Payload, pack, unpack
from fedcollm.data.batching import encode_pair
from fedcollm.models.loading import registry_tokenizer
from fedcollm.models.registry import MissingModelPackage

SMOL, GEMMA, QWEN = "smollm2-135m", "gemma3-270m", "qwen2.5-coder-0.5b"


@pytest.fixture(scope="module")
def tokenizers():
    loaded = {}

    def get(name: str):
        if name not in loaded:
            try:
                loaded[name] = registry_tokenizer(name)
            except MissingModelPackage as err:
                loaded[name] = err
        if isinstance(loaded[name], MissingModelPackage):
            pytest.skip(str(loaded[name]))
        return loaded[name]

    return get


def _surface(tok, token: str) -> str:
    return token_strings(tok)[tok.convert_tokens_to_ids(token)]


def test_each_tokenizers_markers_and_byte_tokens_read_as_the_same_text(tokenizers):
    """The surfaces exact matching compares: Ġ (byte-level) and ▁ (SentencePiece) both read as a space, and
    Gemma's byte-fallback token <0x0A> reads as the newline that byte-level BPE writes Ċ."""
    smol, gemma, qwen = tokenizers(SMOL), tokenizers(GEMMA), tokenizers(QWEN)
    assert _surface(smol, "Ġthe") == _surface(qwen, "Ġthe") == _surface(gemma, "▁the") == " the"
    assert _surface(smol, "Ċ") == _surface(qwen, "Ċ") == _surface(gemma, "<0x0A>") == "\n"


def test_identical_token_strings_map_to_each_other_and_special_tokens_to_special_tokens(tokenizers, tmp_path):
    smol, qwen = tokenizers(SMOL), tokenizers(QWEN)
    vmap = map_vocab(smol, qwen, cache_dir=tmp_path)
    for token in ("Ġthe", "the", "Ġcarbon", "Ċ", ":", "ĠAnswer"):
        src = smol.convert_tokens_to_ids(token)
        assert vmap.exact[src] and vmap.ids[src] == qwen.convert_tokens_to_ids(token), token
    special = set(qwen.all_special_ids) | set(qwen.added_tokens_decoder)
    assert int(vmap.ids[smol.eos_token_id]) in special


def test_a_mapping_is_built_once_and_then_read_from_the_cache(tokenizers, tmp_path, monkeypatch):
    from fedcollm.alignment import vocab

    smol, qwen = tokenizers(SMOL), tokenizers(QWEN)
    first = map_vocab(qwen, smol, cache_dir=tmp_path)
    monkeypatch.setattr(vocab, "_build", lambda *a: pytest.fail("the cached map was built again"))
    again = map_vocab(qwen, smol, cache_dir=tmp_path)
    assert torch.equal(first.ids, again.ids) and torch.equal(first.exact, again.exact)


@pytest.mark.parametrize("src_name,dst_name", [(SMOL, QWEN), (SMOL, GEMMA), (GEMMA, QWEN)])
def test_a_known_answer_aligns_token_for_token_across_tokenizations(tokenizers, src_name, dst_name):
    """'Question: ...\\nAnswer:' + ' carbon dioxide': every answer token of the receiver that has a same-text
    token in the sender's answer takes that sender row, in order."""
    src_tok, dst_tok = tokenizers(src_name), tokenizers(dst_name)
    context, answer = "Question: Which gas do plants take in from the air?\nAnswer:", " carbon dioxide"
    src, dst = encode_pair(src_tok, context, answer, 64), encode_pair(dst_tok, context, answer, 64)
    src_strings, dst_strings = token_strings(src_tok), token_strings(dst_tok)
    rows = answer_rows(src, dst, src_strings, dst_strings)
    src_answer = [src_strings[t] for t in src[0][-src[1]:]]
    dst_answer = [dst_strings[t] for t in dst[0][-dst[1]:]]
    assert "".join(src_answer) == "".join(dst_answer) == answer
    expected = [src_answer.index(text) if text in src_answer else -1 for text in dst_answer]
    assert rows.tolist() == expected
    assert (rows >= 0).any()


def test_topk_over_the_largest_real_vocabulary_round_trips_through_the_payload(tokenizers):
    size = len(tokenizers(GEMMA))  # 262,144 ids: they need int32, not int16
    logits = torch.randn(6, size, generator=torch.Generator().manual_seed(0))
    logits[0, size - 1] = 100.0  # the last id is in the top-k
    values, ids = topk_of(logits, 16)
    top = TopK.from_examples([values[:4], values[4:]], [ids[:4], ids[4:]], torch.tensor([1.0, 2.0]),
                             torch.tensor([0, 1]))
    back = from_tensors(unpack(pack(Payload(to_tensors(top), 2))).tensors, "client_0", size, 16)
    assert torch.equal(back.ids, top.ids) and torch.equal(back.values, top.values)
    assert int(back.ids[0, 0]) == size - 1
