"""What an operator of a Flower deployment relies on: clients cannot steer the SuperLink, one bad or lost client
is reported once and costs only itself, and clients that start together do not derive the same model twice.

Each test is an attack or failure that worked against commit d614e59 (numbers in its docstring)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import threading
import time
import uuid

import pytest

pytest.importorskip("flwr")

from flwr.app import ConfigRecord, Message, RecordDict  # noqa: E402
from flwr.app.error import Error  # noqa: E402
from flwr.common.constant import ErrorCode  # noqa: E402

from fedcollm.comm import pack, unpack  # noqa: E402
from fedcollm.engines.flower.records import from_record, to_record  # noqa: E402
from fedcollm.engines.flower.transport import FlowerTransport  # noqa: E402
from fedcollm.engines.inprocess import SimulatedClient, run_method  # noqa: E402
from fedcollm.runs import RunDir  # noqa: E402

NODES = {101: 0, 102: 1, 103: 2}  # SuperNode id -> partition (client_K)


@pytest.fixture(autouse=True)
def in_a_task(monkeypatch):
    """Flower stamps every Message with the identity of the task that creates it, as inside a ServerApp."""
    from flwr.supercore.task_identity import TaskIdentity

    for field in ("_task_id", "_run_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, field, 1)


class FakeGrid:
    """The Grid calls FlowerTransport makes, answered in this process: SuperNode 101+K is client_K, which trains
    with the in-process client code; `answer` may replace a client's reply (a malformed one, an error)."""

    def __init__(self, wb, answer=None):
        self.clients = {nid: SimulatedClient(wb, k) for nid, k in NODES.items()}
        self.answer, self.outbox = answer or (lambda name, msg, reply: reply), {}

    def get_node_ids(self):
        return list(NODES)

    def create_message(self, content, message_type, dst_node_id, group_id):
        return Message(content, dst_node_id, message_type, group_id=group_id)

    def push_messages(self, messages):
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = str(uuid.uuid4())
            self.outbox[msg.metadata.message_id] = msg
        return list(self.outbox)

    def pull_messages(self, ids):
        return [self._reply(self.outbox.pop(i)) for i in list(ids) if i in self.outbox]

    def _reply(self, msg: Message) -> Message:
        client = self.clients[msg.metadata.dst_node_id]
        if msg.metadata.message_type == "query":
            hello = ConfigRecord({"client": client.name, "examples": len(client.resources.data)})
            return Message(RecordDict({"hello": hello}), reply_to=msg)
        meta = msg.content.config_records["config"]
        blob = client.fit(pack(from_record(msg.content, "server")), int(meta["round"]), str(meta["method"]))
        return self.answer(client.name, msg, Message(to_record(unpack(blob)), reply_to=msg))


def _run(wb, tmp_path, answer):
    transport = FlowerTransport(FakeGrid(wb, answer), {"config": "{}"}, 3, 2, 600.0, 60.0)
    run_method(wb, "fedavg", RunDir(tmp_path), transport)
    return RunDir(tmp_path).read_metrics("fedavg")


def test_a_reply_with_a_float_example_count_rejects_that_client_and_the_round_goes_on(make_workbench, tmp_path,
                                                                                      caplog):
    """Attack: client_1 replies with num_examples = 10.0. Against d614e59 `FlowerTransport.fit` decoded replies
    outside the per-client check, so this one reply raised InvalidUpdate out of the round and ended the whole run
    (no round completed, for either of the honest clients)."""

    def float_count(name, msg, reply):
        if name == "client_1":
            reply.content.metric_records["metrics"]["num-examples"] = 10.0
        return reply

    with caplog.at_level(logging.WARNING):
        metrics = _run(make_workbench(str(tmp_path)), tmp_path, float_count)
    assert [(m["accepted"], m["rejected"], m["dropped"]) for m in metrics] == [(2, 1, [])] * 2
    assert "client client_1 (SuperNode 102): num-examples must be an int, got 10.0" in caplog.text


def test_a_client_whose_supernode_is_lost_is_one_dropout_reported_once_with_its_node(make_workbench, tmp_path,
                                                                                     caplog):
    """Failure: client_2's SuperNode dies; the SuperLink answers for it with NODE_UNAVAILABLE when its heartbeat
    lapses. Against d614e59 each round logged client_2 twice, "did not answer within 600 s" (the configured
    timeout, not when it was noticed) and "rejected update: client client_2: no reply", and the metrics counted
    it as both dropped (["client_2"]) and rejected (1)."""

    def lost(name, msg, reply):
        if name != "client_2":
            return reply
        time.sleep(0.3)
        return Message(Error(code=ErrorCode.NODE_UNAVAILABLE, reason="node unavailable"), reply_to=msg)

    with caplog.at_level(logging.WARNING):
        metrics = _run(make_workbench(str(tmp_path)), tmp_path, lost)
    assert [(m["accepted"], m["rejected"], m["dropped"]) for m in metrics] == [(2, 0, ["client_2"])] * 2
    lines = [r.getMessage() for r in caplog.records if "client_2" in r.getMessage()]
    assert len(lines) == 2 and all("client_2 (SuperNode 103) dropped out" in line for line in lines), lines
    assert not any("600" in line for line in lines), lines  # it was noticed within a second, not at the timeout


def test_two_processes_asking_for_one_derived_model_derive_it_once(tmp_path, monkeypatch):
    """Failure: two clients on one machine start together and both need `derived:BASE:N`. Against d614e59 both
    began deriving the same model into the same cache folder (2 derivations for 1 model: 9 minutes each on
    2 cores, against a 900 s setup timeout); now the second waits for the first and reuses its result."""
    from fedcollm.config import DeriveConfig
    from fedcollm.models import derive

    started = []

    class Derived(Exception):
        """Ends the fake derivation once its result is written."""

    def fake_derivation(base):  # the first step of a derivation: load the base model's tokenizer
        started.append(base)
        time.sleep(0.5)
        (target / "config.json").parent.mkdir(parents=True, exist_ok=True)
        (target / "config.json").write_text("{}")
        raise Derived

    target = tmp_path / "models" / "derived-tiny-1l"
    monkeypatch.setattr(derive, "load_tokenizer", fake_derivation)

    def ask():
        try:
            derive.derive_slm("tiny", 1, DeriveConfig(), None, out_dir=target)
        except Derived:
            pass

    threads = [threading.Thread(target=ask) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert started == ["tiny"]


def _flwr_as(home, *args) -> subprocess.CompletedProcess:
    env = os.environ | {"FLWR_HOME": str(home), "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}
    return subprocess.run(["flwr", *args], env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(not shutil.which("flower-supernode") or not shutil.which("openssl"),
                    reason="flower-supernode or openssl not on PATH")
def test_a_client_holding_ca_crt_cannot_register_nodes_or_start_stop_or_list_runs(tmp_path):
    """Attack: a client holds what the README gives it (`ca.crt`, its node key) and points the `flwr` CLI at the
    address its SuperNode uses. Against d614e59 (the README's layout, one public port for everything, run with its
    LoopbackFederation) every attempt succeeded, exit 0 each: `flwr supernode register sybil.pub` ("SuperNode ...
    registered successfully"; the SuperLink then listed 2 nodes for 1 client), `flwr ls` (the operator's run, with
    its id), `flwr run flower_app` ("Successfully started run") and `flwr stop RUN` on the operator's running run
    ("successfully stopped"). Now that address serves only the Fleet API; the operator's full API is on 127.0.0.1,
    and the SuperLink keeps its registered nodes across a restart (its --database)."""
    from fedcollm.engines.flower.loopback import (
        APP,
        CONNECTION,
        SCRIPTS,
        LoopbackFederation,
    )

    with LoopbackFederation(tmp_path / "fed", nodes=1) as fed:
        run_id = fed.submit({"config": str(tmp_path / "absent.toml"), "out-dir": str(tmp_path / "run")})
        subprocess.run(["bash", str(SCRIPTS / "gen_node_keys.sh"), str(tmp_path / "sybil"), "sybil"], check=True,
                       capture_output=True)
        attacker = tmp_path / "attacker"
        attacker.mkdir()
        (attacker / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\naddress = "127.0.0.1:{fed.fleet_port}"'
            f'\nroot-certificates = "{tmp_path / "fed" / "certs" / "ca.crt"}"\n')
        attempts = {"register": ["supernode", "register", str(tmp_path / "sybil" / "sybil.pub"), CONNECTION],
                    "list": ["ls", CONNECTION], "run": ["run", str(APP), CONNECTION],
                    "stop": ["stop", str(run_id), CONNECTION]}
        outcome = {what: _flwr_as(attacker, *args) for what, args in attempts.items()}
        assert all(done.returncode != 0 for done in outcome.values()), {
            what: (done.returncode, done.stdout[-300:]) for what, done in outcome.items()}
        runs = json.loads(fed.flwr("ls", CONNECTION, "--format", "json"))["runs"]
        assert [int(r["run-id"]) for r in runs] == [run_id]  # the attacker's `flwr run` started nothing

        fed.kill("superlink")
        fed.start_superlink()
        nodes = json.loads(fed.flwr("supernode", "list", CONNECTION, "--format", "json"))["nodes"]
    assert len(nodes) == 1  # node0, registered before the restart; the Sybil never was
