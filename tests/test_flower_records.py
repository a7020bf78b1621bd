"""Payloads as Flower records: same tensors and count back, and a malformed reply names its client."""

import pytest
import torch

pytest.importorskip("flwr")

from flwr.app import ArrayRecord, ConfigRecord, RecordDict  # noqa: E402

from fedcollm.comm import Payload  # noqa: E402
from fedcollm.engines.flower.records import from_record, to_record, wire_bytes  # noqa: E402
from fedcollm.errors import InvalidUpdate  # noqa: E402

STATE = {"a.lora_A.weight": torch.randn(4, 8), "a.lora_B.weight": torch.zeros(8, 4)}


def test_round_trip_keeps_names_dtypes_values_and_count():
    content = to_record(Payload(STATE, 17), round=3)
    back = from_record(content, "c1")
    assert back.num_examples == 17 and content.config_records["meta"]["round"] == 3
    assert all(torch.equal(back.tensors[k], STATE[k]) and back.tensors[k].dtype == torch.float32 for k in STATE)
    assert wire_bytes(content) > sum(t.numel() * 4 for t in STATE.values())


@pytest.mark.parametrize("content, expected", [
    (RecordDict({}), "reply lacks the 'adapter' record"),
    (RecordDict({"adapter": ArrayRecord(torch_state_dict=STATE)}), "reply lacks the 'meta' record"),
    (RecordDict({"adapter": ArrayRecord(torch_state_dict=STATE), "meta": ConfigRecord({"num_examples": True})}),
     "num_examples must be an int, got True"),
    (RecordDict({"adapter": ArrayRecord(torch_state_dict=STATE), "meta": ConfigRecord({"num_examples": 2.5})}),
     "num_examples must be an int"),
])
def test_malformed_reply_names_the_client(content, expected):
    with pytest.raises(InvalidUpdate, match=f"client c7: {expected}"):
        from_record(content, "c7")
