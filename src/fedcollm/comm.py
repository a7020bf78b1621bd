"""The one serialization seam: what crosses the network is named tensors plus a count, as safetensors bytes.

Engines call `pack`/`unpack` and count bytes; they never look inside a payload.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from safetensors.torch import load, save

from fedcollm.models.lora import AdapterState


@dataclass
class Payload:
    tensors: AdapterState
    num_examples: int = 0


def pack(payload: Payload) -> bytes:
    tensors = {k: v.contiguous() for k, v in payload.tensors.items()}
    return save(tensors, metadata={"num_examples": str(payload.num_examples)})


def unpack(blob: bytes) -> Payload:
    import json
    import struct

    header_len = struct.unpack("<Q", blob[:8])[0]
    metadata = json.loads(blob[8:8 + header_len]).get("__metadata__", {})
    return Payload(tensors=load(blob), num_examples=int(metadata.get("num_examples", 0)))


def num_params(tensors: AdapterState) -> int:
    return sum(t.numel() for t in tensors.values())


def states_equal(a: AdapterState, b: AdapterState) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
