"""Attacks on the SecAgg+ round, each run through Flower's real protocol: SecAggPlusWorkflow (driven by
`secure_round`) talks over an in-memory grid to secaggplus_mod on every simulated client, with real key agreement,
masks, quantization and modular sums; no processes, so 300 clients take seconds."""

from __future__ import annotations

import copy
import json
import time
import types

import numpy as np
import pytest
import torch

pytest.importorskip("flwr")

from flwr.app import ConfigRecord, Context, Message, Metadata, RecordDict  # noqa: E402
from flwr.client.mod import secaggplus_mod  # noqa: E402
from flwr.common import (  # noqa: E402
    Code,
    FitRes,
    Status,
    bytes_to_ndarray,
    ndarray_to_bytes,
    ndarrays_to_parameters,
)
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS  # noqa: E402
from flwr.common.secure_aggregation.secaggplus_constants import Key as SecAggKey  # noqa: E402
from flwr.compat.common import recorddict_compat as compat  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402
from test_flower_client import model_dirs  # noqa: E402, F401  (fixture)

from fedcollm.comm import Payload  # noqa: E402
from fedcollm.config import Config, FederationConfig, SecAggConfig  # noqa: E402
from fedcollm.engines.flower import client_app  # noqa: E402
from fedcollm.engines.flower.secagg import secure_round  # noqa: E402
from fedcollm.errors import ConfigError  # noqa: E402
from fedcollm.methods.base import Method  # noqa: E402
from fedcollm.privacy import clip_change  # noqa: E402


class MemoryGrid:
    """A Grid that hands each message (a copy, as the wire would) to secaggplus_mod wrapping the node's handler."""

    def __init__(self, handlers: dict, mods: dict | None = None):
        self.handlers, self.mods = handlers, mods or {}
        self.contexts = {nid: Context(run_id=1, node_id=nid, node_config={}, state=RecordDict(), run_config={})
                         for nid in handlers}
        self.run = types.SimpleNamespace(run_id=1)
        self.sent = 0

    def get_node_ids(self):
        return list(self.handlers)

    def send_and_receive(self, messages, timeout=None):
        replies = []
        for msg in messages:
            self.sent += 1
            nid = msg.metadata.dst_node_id
            meta = Metadata(run_id=1, message_id=str(self.sent), src_node_id=0, dst_node_id=nid,
                            reply_to_message_id="", group_id=msg.metadata.group_id, created_at=time.time(),
                            ttl=3600.0, message_type=msg.metadata.message_type)
            mod = self.mods.get(nid, secaggplus_mod)
            replies.append(mod(Message(copy.deepcopy(msg.content), metadata=meta), self.contexts[nid],
                               self.handlers[nid]))
        return replies


@pytest.fixture
def server_identity(monkeypatch):
    """The identity Flower stamps on the messages a ServerApp creates (set by the SuperExec in a real run)."""
    for attr, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 0)):
        monkeypatch.setattr(TaskIdentity, attr, value)


def _uploader(arrays: list[np.ndarray], num_examples: int):
    """A client that uploads exactly `arrays` with the count `num_examples` (its weight element)."""
    def handler(msg: Message, context: Context) -> Message:
        res = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(arrays), num_examples, {})
        return Message(compat.fitres_to_recorddict(res, keep_input=True), reply_to=msg)
    return handler


@pytest.mark.parametrize("clients,quantization_range", [(300, 2**24), (4, 2**30)])
def test_many_clients_or_a_wide_range_cannot_wrap_the_modular_sum(server_identity, clients, quantization_range):
    """300 clients at the default 2^24 levels, and 4 at the largest admitted 2^30: n x levels reaches the fixed
    modulus 2^32 of d614e59, so the summed values and weight elements wrap. Against d614e59 the 300-client round
    came out finite but wrong (largest entry error 0.31, bound 6.3e-8) and the 4-client round decoded a total
    weight of 0 (every entry inf). Now the modulus is chosen above n x levels and every entry of the mean is within
    the reported quantization bound."""
    cfg = SecAggConfig(enabled=True, quantization_range=quantization_range)
    rng = np.random.default_rng(0)
    # near-equal weights (300 clients) or equal ones as under DP (4): the summed weight elements near n x levels
    counts = rng.integers(900, 1001, clients) if clients > 4 else np.ones(clients, dtype=int)
    changes = [rng.uniform(-0.4, 0.4, 64) for _ in range(clients)]  # within clipping_range 0.5: nothing clipped
    q = np.round(counts / counts.max() * quantization_range).astype(int)  # Flower's weight elements
    grid = MemoryGrid({100 + i: _uploader([changes[i]], int(q[i])) for i in range(clients)})
    sent = {"a": torch.zeros(64, dtype=torch.float64)}  # the old code's result (the mean upload) reads the same

    average, seen = secure_round(grid, Context(1, 0, {}, RecordDict(), {}), sent,
                                 {100 + i: float(c) for i, c in enumerate(counts)}, 1, cfg)

    exact = sum(qi * c for qi, c in zip(q, changes)) / q.sum()
    bound = clients * 2 * cfg.clipping_range / quantization_range / (q.sum() / quantization_range)
    error = np.abs(average["a"].numpy() - exact)
    assert np.isfinite(error).all() and error.max() <= bound * (1 + 1e-9), (error.max(), bound)
    assert seen["secagg_quantization_bound"] == pytest.approx(bound)
    assert seen["secagg_results"] == clients


def test_a_client_that_forges_its_masked_weight_element_cannot_blow_up_the_mean(server_identity):
    """A malicious client runs secaggplus_mod, then adds 1 - n x Q to the masked weight element it uploads: the
    server decodes a total weight of 1 / Q instead of n and multiplies the sum by n x Q. Against d614e59 the round's
    mean came out finite, every entry scaled by 4 x 2^24 (largest 4.9e4 for changes of 1e-3), and nothing refused
    it. Now a decoded mean outside the range honest clients can produce (n x clipping_range / total weight) is
    refused and the round keeps the adapter."""
    cfg = SecAggConfig(enabled=True)
    rng = np.random.default_rng(1)
    changes = [rng.uniform(-1e-3, 1e-3, 64) for _ in range(4)]

    def forge(msg, context, call_next):
        reply = secaggplus_mod(msg, context, call_next)
        record = reply.content.config_records[RECORD_KEY_CONFIGS]
        if SecAggKey.MASKED_PARAMETERS in record:  # stage 2: the masked upload, weight element first
            arrays = [bytes_to_ndarray(b) for b in record[SecAggKey.MASKED_PARAMETERS]]
            arrays[0] = arrays[0] + 1 - 4 * cfg.quantization_range
            record[SecAggKey.MASKED_PARAMETERS] = [ndarray_to_bytes(a) for a in arrays]
        return reply

    grid = MemoryGrid({100 + i: _uploader([changes[i]], cfg.quantization_range) for i in range(4)}, mods={100: forge})
    sent = {"a": torch.zeros(64, dtype=torch.float64)}
    average, seen = secure_round(grid, Context(1, 0, {}, RecordDict(), {}), sent, dict.fromkeys(grid.handlers, 1.0),
                                 1, cfg)
    assert average is None, float(average["a"].abs().max())
    assert seen["secagg_out_of_range"] and seen["secagg_results"] == 4


def test_a_federation_whose_sum_could_pass_the_largest_modulus_is_refused():
    """Against d614e59 any number of clients was accepted at any range up to 2^30 (its sum wraps from 4 clients at
    2^30); now a sum that could pass Flower's largest usable modulus (2^62) is refused, naming both fields."""
    with pytest.raises(ConfigError, match=r"secagg\.quantization_range.*federation\.clients"):
        Config(federation=FederationConfig(clients=2**32 + 1),
               secagg=SecAggConfig(enabled=True, quantization_range=2**30))


def test_with_distributed_dp_the_server_never_sees_the_noiseless_mean(server_identity, model_dirs, data_dir):  # noqa: F811
    """The server's attack: compare what SecAgg+ hands it with the clipped noiseless mean of the clients' changes
    (recomputed here from the same deterministic training). Against d614e59 (central DP only: the server noised the
    sum after unmasking it) the aggregate equalled the noiseless mean to 1.7e-7 (float32 rounding). With
    dp.mode = distributed each client adds N(0, (z C)^2 / 3) before masking: the aggregate is off the noiseless mean
    by noise of std z C / 3 per entry, which the server cannot remove (the clients' seeds come from OS entropy)."""
    from conftest import tiny_config

    z, clip = 0.5, 0.05
    cfg = tiny_config(data_dir, str(model_dirs / "run"), model={"llm": str(model_dirs / "llm"),
                                                                "slm": str(model_dirs / "slm")},
                      run={"methods": ["fedavg"]}, dp={"noise_multiplier": z, "clip_norm": clip,
                                                       "mode": "distributed"},
                      secagg={"enabled": True, "clipping_range": 2.0})
    setup = RecordDict({"setup": ConfigRecord({"config": json.dumps(cfg.to_dict())})})
    grid = MemoryGrid({100 + k: client_app.train_secure for k in range(3)})
    for k, (nid, context) in enumerate(grid.contexts.items()):
        context.node_config["partition-id"] = k
        meta = Metadata(run_id=1, message_id="s", src_node_id=0, dst_node_id=nid, reply_to_message_id="",
                        group_id="", created_at=0.0, ttl=3600.0, message_type="query")
        client_app.setup(Message(setup, metadata=meta), context)
    sides = [client_app._client_side(c) for c in grid.contexts.values()]
    sent = {k: v.clone() for k, v in client_app.adapter_state(sides[0].slm).items()}
    clean = [clip_change(Method.client_fit(side, Payload(sent), 1).tensors, sent, clip) for side in sides]

    average, seen = secure_round(grid, Context(1, 0, {}, RecordDict(), {}), sent, dict.fromkeys(grid.handlers, 1.0),
                                 1, cfg.secagg)

    residual = torch.cat([(average[k].double() - sum(c[k].double() for c in clean) / 3).flatten() for k in sent])
    assert residual.abs().max() > 1e-4, residual.abs().max()  # not the noiseless mean
    assert residual.numel() > 400  # enough entries to estimate the std within a few percent
    assert residual.std().item() == pytest.approx(z * clip / 3, rel=0.15)  # the central noise, from the clients
