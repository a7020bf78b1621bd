"""Attacks by one malicious client on the average (issue 26, item 5), each run through the in-process engine.

Every test here won against commit d614e59 (the numbers are in each docstring) and fails against this code.
Clients that train nothing (`Scripted`) keep the runs to seconds; FedMKT's need real top-k, so they train.
"""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_FEDMKT
from safetensors.torch import save

from fedcollm.comm import Payload, pack, unpack
from fedcollm.engines.inprocess import InProcessTransport, SimulatedClient, run_method
from fedcollm.runs import RunDir


def _norm(state) -> float:
    return float(torch.sqrt(sum((t.double() ** 2).sum() for t in state.values())))


def _noise(sent, scale: float, seed: int):
    """A change of L2 norm `scale` in a direction seeded by `seed`."""
    gen = torch.Generator().manual_seed(seed)
    step = {k: torch.randn(sent[k].shape, generator=gen) for k in sorted(sent)}  # sorted: one direction per seed
    return {k: v * (scale / _norm(step)) for k, v in step.items()}


class Scripted:
    """A client that trains nothing: it returns the adapter it was sent plus `change(sent, round)`, claiming
    `claim` examples (default: the `examples` it declares), and keeps every adapter it was sent."""

    def __init__(self, k: int, change, examples: int = 10, claim: int | None = None):
        self.name, self.examples, self.claim, self.change = f"client_{k}", examples, claim or examples, change
        self.seen: list[dict] = []

    def fit(self, blob, round_idx, method):
        sent = unpack(blob).tensors
        self.seen.append(sent)
        change = self.change(sent, round_idx)
        return pack(Payload({k: sent[k] + change[k] for k in sent}, self.claim))


ATTACK_SEED = 7  # the seed of the attacker's direction (`_direction`)


def _honest_change(sent, k: int, r: int):
    """A change of norm 0.05, orthogonal to the attacker's direction, so that the share of the average the attacker
    took reads exactly from the global adapter's projection on that direction (no honest noise in it)."""
    change, direction = _noise(sent, 1.0, 100 * r + k), _noise(sent, 1.0, ATTACK_SEED)
    along = sum((change[key] * direction[key]).sum() for key in change)
    change = {key: change[key] - along * direction[key] for key in change}
    return {key: v * (0.05 / _norm(change)) for key, v in change.items()}


def honest(k: int) -> Scripted:
    return Scripted(k, lambda sent, r: _honest_change(sent, k, r))


def _run(make_workbench, tmp_path, clients, rounds: int = 1, **federation):
    """Run FedAvg over `clients`; the global adapter after the last round."""
    wb = make_workbench(str(tmp_path), federation={"clients": len(clients), "rounds": rounds} | federation,
                        run={"methods": ["fedavg"], "eval_every": 0})
    run_method(wb, "fedavg", RunDir(tmp_path), InProcessTransport(clients))
    return wb, RunDir(tmp_path).load_round("fedavg", rounds, {"slm": wb.slm_init})["slm"]


def _direction(make_workbench, tmp_path):
    """The attacker's change: as large as an honest one, in a fixed direction (so no norm bound touches it)."""
    return _noise(make_workbench(str(tmp_path / "shapes")).slm_init, 0.05, ATTACK_SEED)


def _attacker_share(wb, final, direction) -> float:
    """How much of the attacker's change `direction` the global adapter took: its share of the average."""
    moved = {k: final[k].double() - wb.slm_init[k].double() for k in final}
    return float(sum((moved[k] * direction[k].double()).sum() for k in moved) / _norm(direction) ** 2)


def test_a_client_claiming_more_examples_than_it_declared_is_rejected(make_workbench, tmp_path, caplog):
    """Against d614e59 a client that declares 10 examples and claims 10^12 was counted at federation.max_examples
    and held 0.9997 of the average; now its update is rejected (share 0: the honest changes are orthogonal to the attacker's)."""
    direction = _direction(make_workbench, tmp_path)
    clients = [honest(0), honest(1), honest(2), Scripted(3, lambda sent, r: direction, claim=10**12)]
    with caplog.at_level("WARNING"):
        wb, final = _run(make_workbench, tmp_path, clients)
    share = _attacker_share(wb, final, direction)
    assert abs(share) < 1e-4, share
    assert "client client_3: claims 1000000000000 examples but declared 10 before training" in caplog.text


def test_a_client_declaring_a_huge_shard_holds_at_most_max_share(make_workbench, tmp_path):
    """Against d614e59 a client that declares and claims 10^12 examples held 0.9997 of the average (counted at
    federation.max_examples = 100,000 beside 3 x 10); now its weight is cut to federation.max_share = 0.3, exactly
    (the honest changes are orthogonal to its direction)."""
    direction = _direction(make_workbench, tmp_path)
    clients = [honest(0), honest(1), honest(2), Scripted(3, lambda sent, r: direction, examples=10**12)]
    wb, final = _run(make_workbench, tmp_path, clients)
    share = _attacker_share(wb, final, direction)
    assert share == pytest.approx(0.3, abs=1e-4), share  # the cap, exactly (float32 adapters)


def test_one_client_cannot_grow_the_global_adapter_round_after_round(make_workbench, tmp_path):
    """One attacker among 4 scales the adapter it is sent by 1001 (its change is 1000 x the adapter) for 10
    rounds. Against d614e59 each round clipped it to 2 x ||adapter|| and so grew the global adapter by 1.5x:
    after 10 rounds its norm was 57.7 x the initial one. Now the bound is 3 x the round's median change norm,
    which the attacker cannot raise: the norm ends at 1.23 x the initial one."""
    clients = [honest(0), honest(1), honest(2), Scripted(3, lambda sent, r: {k: 1000 * v for k, v in sent.items()})]
    wb, final = _run(make_workbench, tmp_path, clients, rounds=10)
    growth = _norm(final) / _norm(wb.slm_init)
    assert growth < 1.5, growth


def _raw_blob(tensors, count: str) -> bytes:
    return save({k: v.contiguous() for k, v in tensors.items()}, metadata={"num_examples": count})


class RawCount(Scripted):
    """Sends its own bytes: a count of 5,000 digits in the payload's metadata."""

    def fit(self, blob, round_idx, method):
        return _raw_blob(unpack(blob).tensors, "9" * 5000)


@pytest.mark.parametrize("attacker", [
    lambda: RawCount(3, None),  # the bytes a malicious client can send
    lambda: Scripted(3, lambda sent, r: {k: torch.zeros_like(v) for k, v in sent.items()}, claim=10**5000),
])
def test_a_count_of_5000_digits_is_one_rejected_client(make_workbench, tmp_path, caplog, attacker):
    """Against d614e59 int() of the 5,000-digit count (or str() of it, packing) raised ValueError and the run
    aborted; now that client is rejected and the round goes on with the others."""
    with caplog.at_level("WARNING"):
        _run(make_workbench, tmp_path, [honest(0), honest(1), honest(2), attacker()])
    [record] = RunDir(tmp_path).read_metrics("fedavg")
    assert record["accepted"] == 3 and record["rejected"] == 1
    assert "rejected update: client client_3:" in caplog.text


# ---- FedMKT ---------------------------------------------------------------------------------------------------

def _fedmkt_wb(make_workbench, tmp_path):
    return make_workbench(str(tmp_path), fedmkt=TINY_FEDMKT, run={"methods": ["fedmkt"], "eval_every": 0},
                          federation={"rounds": 1})


class ZeroCE(SimulatedClient):
    """Reports a CE of 0 on every public example, whatever its logits say."""

    def fit(self, blob, round_idx, method):
        payload = unpack(super().fit(blob, round_idx, method))
        payload.tensors["topk.ce"] = torch.zeros_like(payload.tensors["topk.ce"])
        return pack(payload)


def test_a_client_reporting_zero_ce_does_not_win_every_selection(make_workbench, tmp_path, monkeypatch):
    """Against d614e59 the server trusted each client's reported CE: a client reporting 0 was the LLM's teacher on
    all 8 of 8 public examples (dual_min_ce). Now the server scores every candidate's top-k itself against D^a's
    gold tokens and the reported 0 is ignored: the same client is chosen on 3 of 8, as its logits earn."""
    import fedcollm.methods.fedmkt as fedmkt

    seen = []
    real = fedmkt.select_targets

    def spy(strategy, own_ce, own, teacher_ce, teachers):
        seen.append((own_ce, teacher_ce))
        return real(strategy, own_ce, own, teacher_ce, teachers)

    monkeypatch.setattr(fedmkt, "select_targets", spy)
    wb = _fedmkt_wb(make_workbench, tmp_path)
    clients = [SimulatedClient(wb, 0), ZeroCE(wb, 1), SimulatedClient(wb, 2)]
    run_method(wb, "fedmkt", RunDir(tmp_path), InProcessTransport(clients))
    own_ce, teacher_ce = seen[0]  # the server's selection for the LLM (then each SLM's, from the updated LLM)
    assert teacher_ce.shape[0] == 3
    best = teacher_ce.argmin(0)
    attacker_wins = ((best == 1) & (teacher_ce.min(0).values < own_ce)).float().mean().item()
    assert (teacher_ce[1] > 0).all() and attacker_wins < 0.9, attacker_wins


class Overflowing(SimulatedClient):
    """A client whose logits grow past float16's range (its output layer scaled up for its turn only)."""

    def fit(self, blob, round_idx, method):
        head = self.resources.slm.get_output_embeddings().weight
        with torch.no_grad():
            head.mul_(1e6)
        try:
            return super().fit(blob, round_idx, method)
        finally:
            with torch.no_grad():
                head.div_(1e6)


def test_a_fedmkt_client_whose_logits_overflow_fp16_is_one_rejected_client(make_workbench, tmp_path, caplog):
    """Against d614e59 the ValueError of the client's fp16 top-k ended the whole run; now that client is rejected
    and the others' top-k are distilled."""
    wb = _fedmkt_wb(make_workbench, tmp_path)
    clients = [SimulatedClient(wb, 0), Overflowing(wb, 1), SimulatedClient(wb, 2)]
    with caplog.at_level("WARNING"):
        run_method(wb, "fedmkt", RunDir(tmp_path), InProcessTransport(clients))
    [record] = RunDir(tmp_path).read_metrics("fedmkt")
    assert record["accepted"] == 2 and record["teachers"] == 2
    assert "client client_1: failed this round" in caplog.text and "float16" in caplog.text


def test_on_flower_a_reply_claiming_more_than_the_setup_declared_is_rejected(make_workbench, tmp_path, caplog,
                                                                            monkeypatch):
    """The same claim on the Flower engine, where each client declares its count in its setup reply. Against
    d614e59 the reply of client_1 claiming 10^12 examples was accepted in both rounds (3 of 3 accepted), counted
    at federation.max_examples = 100,000; now it is rejected each round, naming the declared count."""
    pytest.importorskip("flwr")
    from flwr.supercore.task_identity import TaskIdentity
    from test_deployment_security import FakeGrid

    from fedcollm.engines.flower.transport import FlowerTransport

    for field in ("_task_id", "_run_id", "_node_id"):  # as inside a ServerApp (test_deployment_security's in_a_task)
        monkeypatch.setattr(TaskIdentity, field, 1)

    def greedy(name, msg, reply):
        if name == "client_1":
            reply.content.metric_records["metrics"]["num-examples"] = 10**12
        return reply

    wb = make_workbench(str(tmp_path))
    with caplog.at_level("WARNING"):
        run_method(wb, "fedavg", RunDir(tmp_path), FlowerTransport(FakeGrid(wb, greedy), {"config": "{}"}, 3, 2,
                                                                   600.0, 60.0))
    assert [(m["accepted"], m["rejected"]) for m in RunDir(tmp_path).read_metrics("fedavg")] == [(2, 1)] * 2
    assert "client client_1: claims 1000000000000 examples but declared" in caplog.text
