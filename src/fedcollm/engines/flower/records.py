"""Payloads as Flower records under Flower's standard keys, so Flower's own Message strategies can read them: the
adapter as the ArrayRecord "arrays" (same names, dtype and shape as the in-process safetensors payload), the example
count as "num-examples" in the MetricRecord "metrics" (the key FedAvg weights by), and plain settings (round,
method) in the ConfigRecord "config". Decoding checks the shape of the message, not values: values are checked by
the engine exactly as for in-process payloads."""

from __future__ import annotations

from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.common.serde import recorddict_to_proto

from fedcollm.comm import Payload
from fedcollm.errors import InvalidUpdate

ARRAYS, METRICS, CONFIG, COUNT = "arrays", "metrics", "config", "num-examples"


def to_record(payload: Payload, **config) -> RecordDict:
    """RecordDict holding the adapter and its example count, plus any plain config values (round, method, ...)."""
    return RecordDict({ARRAYS: ArrayRecord(torch_state_dict=payload.tensors),
                       METRICS: MetricRecord({COUNT: payload.num_examples}), CONFIG: ConfigRecord(config)})


def from_record(content: RecordDict, sender: str) -> Payload:
    """The Payload in `content`; anything malformed is an InvalidUpdate naming `sender`."""
    try:
        arrays, metrics = content.array_records[ARRAYS], content.metric_records[METRICS]
    except KeyError as err:
        raise InvalidUpdate(f"client {sender}: reply lacks the {err} record") from err
    count = metrics.get(COUNT)
    if type(count) is not int:
        raise InvalidUpdate(f"client {sender}: {COUNT} must be an int, got {count!r}")
    try:
        tensors = arrays.to_torch_state_dict()
    except Exception as err:  # noqa: BLE001 - a peer's bytes: any decoding failure is that peer's fault
        raise InvalidUpdate(f"client {sender}: adapter record does not decode ({type(err).__name__}: {err})") from err
    return Payload(tensors, count)


def wire_bytes(content: RecordDict) -> int:
    """Size of a message's content as Flower serializes it (protobuf), for the communication table."""
    return recorddict_to_proto(content).ByteSize()
