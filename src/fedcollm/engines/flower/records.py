"""Payloads as Flower records: the adapter as an ArrayRecord (same names, dtype and shape as the in-process
safetensors payload) and the example count in a ConfigRecord. Decoding checks shape of the message, not values:
values are checked by the engine exactly as for in-process payloads."""

from __future__ import annotations

from flwr.app import ArrayRecord, ConfigRecord, RecordDict
from flwr.common.serde import recorddict_to_proto

from fedcollm.comm import Payload
from fedcollm.errors import InvalidUpdate

ADAPTER, META = "adapter", "meta"


def to_record(payload: Payload, **config) -> RecordDict:
    """RecordDict holding the adapter and its example count, plus any plain config values (round, seed, ...)."""
    return RecordDict({ADAPTER: ArrayRecord(torch_state_dict=payload.tensors),
                       META: ConfigRecord({"num_examples": payload.num_examples, **config})})


def from_record(content: RecordDict, sender: str) -> Payload:
    """The Payload in `content`; anything malformed is an InvalidUpdate naming `sender`."""
    try:
        arrays, meta = content.array_records[ADAPTER], content.config_records[META]
    except KeyError as err:
        raise InvalidUpdate(f"client {sender}: reply lacks the {err} record") from err
    count = meta.get("num_examples")
    if type(count) is not int:
        raise InvalidUpdate(f"client {sender}: num_examples must be an int, got {count!r}")
    try:
        tensors = arrays.to_torch_state_dict()
    except Exception as err:  # noqa: BLE001 - a peer's bytes: any decoding failure is that peer's fault
        raise InvalidUpdate(f"client {sender}: adapter record does not decode ({type(err).__name__}: {err})") from err
    return Payload(tensors, count)


def wire_bytes(content: RecordDict) -> int:
    """Size of a message's content as Flower serializes it (protobuf), for the communication table."""
    return recorddict_to_proto(content).ByteSize()
