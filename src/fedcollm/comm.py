"""The one serialization seam: what crosses the network is named tensors plus a count, as safetensors bytes.

Engines call `pack`/`decode_upload` and count bytes; they never look inside a payload. Each upload is decoded on
its own, so one garbage or truncated payload is one rejected client, never a lost round.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from fedcollm.errors import InvalidUpdate

AdapterState = dict[str, torch.Tensor]  # LoRA weights by peft's state-dict names: what clients and server exchange
MAX_COUNT_DIGITS = 18  # an int64 always holds it; int() refuses strings past 4,300 digits with a ValueError


@dataclass
class Payload:
    tensors: AdapterState
    num_examples: int = 0


def pack(payload: Payload) -> bytes:
    tensors = {k: v.contiguous() for k, v in payload.tensors.items()}
    return save(tensors, metadata={"num_examples": str(payload.num_examples)})


def unpack(blob: bytes, sender: str = "peer") -> Payload:
    """Decode a payload; anything malformed is an InvalidUpdate naming `sender`."""
    if not isinstance(blob, (bytes, bytearray)) or len(blob) < 8:
        raise InvalidUpdate(f"client {sender}: payload is not a safetensors blob ({len(blob or b'')} bytes)")
    header_len = struct.unpack("<Q", blob[:8])[0]
    if header_len > len(blob) - 8:
        raise InvalidUpdate(f"client {sender}: payload is truncated (header says {header_len} bytes, "
                            f"{len(blob) - 8} follow)")
    try:
        header = json.loads(bytes(blob[8:8 + header_len]))
        tensors = load(bytes(blob))
    except (UnicodeDecodeError, json.JSONDecodeError, SafetensorError, ValueError, RuntimeError) as err:
        raise InvalidUpdate(f"client {sender}: payload is not a valid safetensors blob ({err})") from err
    metadata = header.get("__metadata__") or {} if isinstance(header, dict) else {}
    count = metadata.get("num_examples", "")
    if not (isinstance(count, str) and count.isascii() and count.isdigit() and len(count) <= MAX_COUNT_DIGITS):
        shown = count[:40] if isinstance(count, str) else count
        raise InvalidUpdate(f"client {sender}: payload metadata num_examples must be a decimal count, got {shown!r} "
                            f"(at most {MAX_COUNT_DIGITS} digits)")
    return Payload(tensors=tensors, num_examples=int(count))


def num_params(tensors: AdapterState) -> int:
    return sum(t.numel() for t in tensors.values())


def states_equal(a: AdapterState, b: AdapterState) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
