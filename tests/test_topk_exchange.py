"""Top-k logits on the wire: bit-identical through safetensors payloads and Flower records, and every malformed
field rejected with the sender and the field named."""

import pytest
import torch

from fedcollm.alignment.exchange import FIELDS, TopK, from_tensors, to_tensors, topk_of
from fedcollm.comm import Payload, pack, unpack
from fedcollm.errors import InvalidUpdate

VOCAB, K = 50, 4


def _topk() -> TopK:
    g = torch.Generator().manual_seed(0)
    rows = [topk_of(torch.randn(n, VOCAB, generator=g) * 10, K) for n in (3, 0, 5)]
    return TopK.from_examples([v for v, _ in rows], [i for _, i in rows], torch.tensor([1.25, 2.0, 0.5]),
                              torch.tensor([7, 3, 9]))


def _bits_equal(a: TopK, b: TopK) -> bool:
    return all(getattr(a, f).dtype == getattr(b, f).dtype and getattr(a, f).shape == getattr(b, f).shape
               and getattr(a, f).view(torch.uint8).tolist() == getattr(b, f).view(torch.uint8).tolist()
               for f in FIELDS)


def test_topk_of_matches_torch_topk_in_wire_dtypes():
    logits = torch.tensor([[0.5, 3.0, -1.0, 2.0], [1.0, 1.0, 0.0, 4.0]])
    values, ids = topk_of(logits, 2)
    assert values.dtype == torch.float16 and ids.dtype == torch.int32
    assert values.tolist() == [[3.0, 2.0], [4.0, 1.0]] and ids.tolist()[0] == [1, 3] and ids[1, 0].item() == 3
    with pytest.raises(ValueError, match="float16"):
        topk_of(torch.tensor([[7e4, 0.0]]), 1)
    with pytest.raises(ValueError, match="k must be in"):
        topk_of(logits, 5)


def test_from_examples_offsets_and_slices():
    top = _topk()
    assert top.offsets.tolist() == [0, 3, 3, 8] and top.values.shape == (8, K)
    assert top.example(1)[0].shape == (0, K)
    assert torch.equal(top.example(2)[1], top.ids[3:8])


def test_round_trip_through_safetensors_payload_is_bit_identical():
    top = _topk()
    adapter = {"a.lora_A.weight": torch.randn(2, 3)}
    blob = pack(Payload({**adapter, **to_tensors(top)}, 3))
    back = unpack(blob, "c1")
    assert _bits_equal(from_tensors(back.tensors, "c1", VOCAB, K), top)
    assert torch.equal(back.tensors["a.lora_A.weight"], adapter["a.lora_A.weight"])  # other keys untouched
    raw = 8 * K * 6 + 4 * 8 + 3 * 4 + 3 * 8 + 6 * 4  # 6 bytes a logit; offsets, ce, example ids; adapter
    print(f"safetensors payload: {len(blob)} bytes for {raw} bytes of tensors")
    assert raw < len(blob) < raw + 1024


def test_round_trip_through_flower_records_is_bit_identical():
    pytest.importorskip("flwr")
    from fedcollm.engines.flower.records import from_record, to_record, wire_bytes

    top = _topk()
    content = to_record(Payload(to_tensors(top), 3))
    back = from_record(content, "c1")
    assert _bits_equal(from_tensors(back.tensors, "c1", VOCAB, K), top)
    size = wire_bytes(content)
    print(f"Flower record: {size} bytes")
    assert 8 * K * 6 < size < 8 * K * 6 + 2048


def _bad(field: str, value) -> dict:
    d = to_tensors(_topk())
    if value is None:
        del d["topk." + field]
    else:
        d["topk." + field] = value
    return d


@pytest.mark.parametrize("d, field, why", [
    (_bad("values", None), "values", "is missing"),
    (_bad("example_ids", None), "example_ids", "is missing"),
    (_bad("ce", [1.0, 2.0, 0.5]), "ce", "is not a tensor"),
    (_bad("values", _topk().values.float()), "values", "must be torch.float16 of rank 2"),
    (_bad("ids", _topk().ids.long()), "ids", "must be torch.int32"),
    (_bad("offsets", torch.tensor([0, 3, 3, 8], dtype=torch.int32)), "offsets", "must be torch.int64"),
    (_bad("values", _topk().values[0]), "values", "of rank 2, got torch.float16 of rank 1"),
    (_bad("ids", _topk().ids[:, :2]), "ids", "shape (8, 2) differs"),
    (_bad("ids", _topk().ids.clone().index_fill_(0, torch.tensor([4]), VOCAB)), "ids", "outside [0, 50)"),
    (_bad("ids", _topk().ids.clone().index_fill_(0, torch.tensor([0]), -1)), "ids", "outside [0, 50)"),
    (_bad("values", _topk().values.clone().index_fill_(0, torch.tensor([2]), float("nan"))), "values",
     "non-finite"),
    (_bad("values", _topk().values.clone().index_fill_(0, torch.tensor([2]), float("inf"))), "values",
     "non-finite"),
    (_bad("offsets", torch.tensor([1, 3, 3, 8])), "offsets", "must start at 0"),
    (_bad("offsets", torch.zeros(0, dtype=torch.int64)), "offsets", "must start at 0"),
    (_bad("offsets", torch.tensor([0, 5, 3, 8])), "offsets", "must not decrease"),
    (_bad("offsets", torch.tensor([0, 3, 3, 7])), "offsets", "end at 7, but there are 8 token rows"),
    (_bad("ce", torch.tensor([1.0, 2.0])), "ce", "has 2 entries for 3 examples"),
    (_bad("ce", torch.tensor([1.0, -2.0, 0.5])), "ce", "finite and >= 0"),
    (_bad("ce", torch.tensor([1.0, float("nan"), 0.5])), "ce", "finite and >= 0"),
    (_bad("example_ids", torch.tensor([7, 7, 9])), "example_ids", "distinct"),
    (_bad("example_ids", torch.tensor([7, 3])), "example_ids", "has 2 entries for 3 examples"),
])
def test_malformed_fields_are_rejected_naming_sender_and_field(d, field, why):
    with pytest.raises(InvalidUpdate) as err:
        from_tensors(d, "client 2", VOCAB, K)
    assert f"top-k from client 2: field topk.{field}" in str(err.value) and why in str(err.value)


def test_wrong_k_is_rejected():
    with pytest.raises(InvalidUpdate, match="field topk.values holds k=4 logits per token, expected 8"):
        from_tensors(to_tensors(_topk()), "c1", VOCAB, k=8)


def test_out_of_range_ids_are_caught_after_a_real_wire_round_trip():
    d = to_tensors(_topk())
    back = unpack(pack(Payload(d, 3)), "c9").tensors
    with pytest.raises(InvalidUpdate, match="top-k from c9: field topk.ids has ids outside \\[0, 10\\)"):
        from_tensors(back, "c9", vocab_size=10)
