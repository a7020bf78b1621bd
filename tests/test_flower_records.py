"""Payloads as Flower records: same tensors and count back, and a malformed reply names its client."""

import pytest
import torch

pytest.importorskip("flwr")

from flwr.app import ArrayRecord, MetricRecord, RecordDict  # noqa: E402

from fedcollm.comm import Payload  # noqa: E402
from fedcollm.engines.flower.records import from_record, to_record, wire_bytes  # noqa: E402
from fedcollm.errors import InvalidUpdate  # noqa: E402

STATE = {"a.lora_A.weight": torch.randn(4, 8), "a.lora_B.weight": torch.zeros(8, 4)}


def test_round_trip_keeps_names_dtypes_values_and_count():
    content = to_record(Payload(STATE, 17), round=3)
    back = from_record(content, "c1")
    assert back.num_examples == 17 and content.config_records["config"]["round"] == 3
    assert all(torch.equal(back.tensors[k], STATE[k]) and back.tensors[k].dtype == torch.float32 for k in STATE)
    assert wire_bytes(content) > sum(t.numel() * 4 for t in STATE.values())


@pytest.mark.parametrize("content, expected", [
    (RecordDict({}), "reply lacks the 'arrays' record"),
    (RecordDict({"arrays": ArrayRecord(torch_state_dict=STATE)}), "reply lacks the 'metrics' record"),
    (RecordDict({"arrays": ArrayRecord(torch_state_dict=STATE), "metrics": MetricRecord({"num-examples": 2.5})}),
     "num-examples must be an int, got 2.5"),
    (RecordDict({"arrays": ArrayRecord(torch_state_dict=STATE), "metrics": MetricRecord({"loss": 1})}),
     "num-examples must be an int, got None"),
])
def test_malformed_reply_names_the_client(content, expected):
    with pytest.raises(InvalidUpdate, match=f"client c7: {expected}"):
        from_record(content, "c7")


def test_flowers_own_fedavg_reads_our_replies_under_its_standard_keys():
    """Flower's Message strategies weight by "num-examples" in the one MetricRecord and average the one
    ArrayRecord; our replies pass its consistency check and its average is the sample-weighted mean."""
    from flwr.serverapp.strategy.strategy_utils import (
        aggregate_arrayrecords,
        validate_message_reply_consistency,
    )

    other = {k: v + 1.0 for k, v in STATE.items()}
    replies = [to_record(Payload(STATE, 10)), to_record(Payload(other, 30))]
    validate_message_reply_consistency(replies, "num-examples", check_arrayrecord=True)
    mean = aggregate_arrayrecords(replies, "num-examples").to_torch_state_dict()
    assert all(torch.allclose(mean[k], STATE[k] + 0.75) for k in STATE)
