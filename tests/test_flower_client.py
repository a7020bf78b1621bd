"""The Flower ClientApp's handlers called directly (no deployment): setup, training on its shard, own data."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("flwr")

from flwr.app import ConfigRecord, Context, Message, Metadata, RecordDict  # noqa: E402

from fedcollm.comm import Payload  # noqa: E402
from fedcollm.engines.flower import client_app  # noqa: E402
from fedcollm.engines.flower.records import from_record, to_record  # noqa: E402


@pytest.fixture
def model_dirs(tmp_path, tokenizer):
    from fedcollm.models.tiny import tiny_pair

    llm, slm = tiny_pair(seed=0)
    for name, model in (("llm", llm), ("slm", slm)):
        model.save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
    return tmp_path


def _config(root, data_dir) -> dict:
    from conftest import tiny_config

    cfg = tiny_config(data_dir, str(root / "run"), model={"llm": str(root / "llm"), "slm": str(root / "slm")})
    return cfg.to_dict()


def _context(node_config: dict) -> Context:
    return Context(run_id=7, node_id=1, node_config=node_config, state=RecordDict(), run_config={})


def _ask(handler, content: RecordDict, context: Context, kind: str) -> Message:
    """Call a ClientApp handler as the SuperNode would, with the metadata a delivered message carries."""
    meta = Metadata(run_id=7, message_id="m1", src_node_id=1, dst_node_id=2, reply_to_message_id="", group_id="1",
                    created_at=0.0, ttl=3600.0, message_type=kind)
    return handler(Message(content, metadata=meta), context)


def test_client_trains_its_partition_like_the_inprocess_engine(model_dirs, data_dir, make_workbench):
    from fedcollm.comm import pack, unpack
    from fedcollm.engines.inprocess import SimulatedClient

    config = _config(model_dirs, data_dir)
    context = _context({"partition-id": 1, "num-partitions": 3})
    hello = _ask(client_app.setup, RecordDict({"setup": ConfigRecord({"config": json.dumps(config)})}), context,
                 "query").content.config_records["hello"]
    wb = make_workbench(str(model_dirs / "run"))
    assert hello["client"] == "client_1" and hello["examples"] == len(wb.client_data[1])

    reply = _ask(client_app.train, to_record(Payload(wb.slm_init), round=1), context, "train")
    ours = from_record(reply.content, "client_1")
    theirs = unpack(SimulatedClient(wb, 1).fit(pack(Payload(wb.slm_init)), 1, "fedavg"))
    assert ours.num_examples == theirs.num_examples
    assert all((ours.tensors[k] - theirs.tensors[k]).abs().max() < 1e-6 for k in theirs.tensors)


def test_client_with_its_own_data_and_task(model_dirs, data_dir, tmp_path):
    rows = tmp_path / "mine" / "notes"
    rows.mkdir(parents=True)
    rows.joinpath("train.jsonl").write_text("\n".join(json.dumps(
        {"id": f"n{i}", "note": f"Note {i}: which colour?", "choices": ["red", "blue"], "answer": i % 2})
        for i in range(7)) + "\n")
    own = tmp_path / "mine.toml"
    own.write_text(f'[data]\ndata_dir = "{tmp_path / "mine"}"\ntasks = ["notes"]\n\n'
                   '[tasks.notes]\npath = "notes"\ntrain_split = "train"\neval_split = "test"\n'
                   'context = "{note}"\n')
    context = _context({"partition-id": 0, "data-config": str(own)})
    hello = _ask(client_app.setup, RecordDict({"setup": ConfigRecord({"config": json.dumps(
        _config(model_dirs, data_dir))})}), context, "query").content.config_records["hello"]
    assert hello["examples"] == 7  # all of its own rows; nothing from the shared data



def test_a_long_lived_client_process_loads_its_slm_once_per_run(model_dirs, data_dir):
    """Under `fedcollm clientapp-worker` one process serves every message: later messages of a run reuse the
    loaded SLM, and a new run replaces (not adds to) what is cached."""
    setup = RecordDict({"setup": ConfigRecord({"config": json.dumps(_config(model_dirs, data_dir))})})
    context = _context({"partition-id": 0, "num-partitions": 3})
    _ask(client_app.setup, setup, context, "query")
    first = client_app._client_side(context)
    assert client_app._client_side(context) is first
    other_run = Context(run_id=8, node_id=1, node_config=context.node_config, state=context.state, run_config={})
    assert client_app._client_side(other_run) is not first
    assert len(client_app._cache) == 1


def test_clientapp_worker_names_a_missing_certificate(tmp_path):
    from fedcollm.cli import dispatch
    from fedcollm.errors import ConfigError

    with pytest.raises(ConfigError, match="nope.crt"):
        dispatch(["clientapp-worker", "--root-certificates", str(tmp_path / "nope.crt")])


def test_a_run_that_ends_mid_task_does_not_end_the_worker(monkeypatch):
    """Flower signals SIGINT to a task whose run was stopped (heartbeat refused, token revoked); the worker drops
    that task and serves the next one, as a resumed run needs (a dead worker left the resume waiting forever)."""
    import signal
    from types import SimpleNamespace

    from fedcollm.engines.flower import worker

    handler = signal.getsignal(signal.SIGINT)
    acquired = iter([True, True])

    def acquire(request):
        if next(acquired, False):
            return SimpleNamespace(HasField=lambda field: True, token="t")
        raise SystemExit  # ends serve() for the test

    ran = []

    def run_task(address, token, root_certificates):
        ran.append(token)
        if len(ran) == 1:
            signal.raise_signal(signal.SIGINT)  # what flwr's heartbeat does when the SuperNode says the run ended
            raise AssertionError("the SIGINT should have aborted the task")

    monkeypatch.setattr(worker, "_runtime_client", lambda *a: SimpleNamespace(AcquireTask=acquire))
    monkeypatch.setattr(worker, "run_task", run_task)
    with pytest.raises(SystemExit):
        worker.serve("127.0.0.1:1", poll_interval=0.0)
    assert ran == ["t", "t"]
    assert signal.getsignal(signal.SIGINT) is handler  # Ctrl-C between tasks still ends the worker


@pytest.mark.parametrize("push_fails", [False, True])
def test_a_task_whose_run_ends_still_answers_the_supernode(monkeypatch, push_fails):
    """A SuperNode waits for a reply to the message it handed out before it pulls another: a task aborted because
    its run ended pushes an error reply, and is finished only once that reply is in (else its token is left to
    expire, on which the SuperNode writes the reply itself); finishing it unanswered stalled every later run."""
    from types import SimpleNamespace

    from flwr.common.constant import ErrorCode, SubStatus
    from flwr.supercore.run import RunNotRunningException

    from fedcollm.engines.flower import worker

    calls = []
    message = Message(RecordDict(), metadata=Metadata(run_id=7, message_id="m1", src_node_id=1, dst_node_id=2,
                                                      reply_to_message_id="", group_id="2", created_at=0.0,
                                                      ttl=3600.0, message_type="train"))

    def app(message, context):
        raise RunNotRunningException

    def push_message(client, reply, context):
        calls.append(("reply", reply.error.code if reply.has_error() else None))
        if push_fails:
            raise RunNotRunningException

    monkeypatch.setattr(worker, "_runtime_client", lambda *a: SimpleNamespace(close=lambda: None))
    monkeypatch.setattr(worker, "HeartbeatSender", lambda fn: SimpleNamespace(start=lambda: None, stop=lambda: None))
    monkeypatch.setattr(worker, "pull_task_input", lambda client: (message, _context({})))
    monkeypatch.setattr(worker, "push_message", push_message)
    monkeypatch.setattr(worker, "push_task_output", lambda **kw: calls.append(("finished", kw["sub_status"])))
    monkeypatch.setattr(client_app, "app", app)
    with pytest.raises(RunNotRunningException):  # serve() then waits for the next task
        worker.run_task("127.0.0.1:1", "t")
    answered = [("reply", ErrorCode.CLIENT_APP_RAISED_EXCEPTION)]
    assert calls == (answered if push_fails else answered + [("finished", SubStatus.FAILED)])


def test_a_task_whose_message_never_arrives_is_given_up_and_finished(monkeypatch):
    """A SuperNode keeps a task whose run ended before it pulled the message's objects; the worker waits a bounded
    time for them (not flwr's two hours), then finishes the task unanswered (the SuperNode awaits no reply for a
    message it never received) and is free for the next run's tasks."""
    import time
    from types import SimpleNamespace

    from flwr.common.constant import SubStatus

    from fedcollm.engines.flower import worker

    res = SimpleNamespace(task_id=1, run=SimpleNamespace(run_id=7), context=_context({}))
    tree = SimpleNamespace(object_id="m1", children=[])
    client = SimpleNamespace(
        PullTaskInput=lambda req: res,
        PullMessages=lambda req: SimpleNamespace(messages_list=[object()], message_object_trees=[tree]),
        PullObject=lambda req: SimpleNamespace(object_found=True, object_available=False),
        ConfirmMessageReceived=lambda req: None, close=lambda: None)
    monkeypatch.setattr(worker, "context_from_proto", lambda proto: proto)
    started = time.monotonic()
    with pytest.raises(Exception):
        worker.pull_task_input(client, timeout=0.5)
    assert time.monotonic() - started < 30

    calls = []
    monkeypatch.setattr(worker, "_runtime_client", lambda *a: client)
    monkeypatch.setattr(worker, "HeartbeatSender", lambda fn: SimpleNamespace(start=lambda: None, stop=lambda: None))

    def objects_never_come(client):
        raise TimeoutError("objects never came")

    monkeypatch.setattr(worker, "pull_task_input", objects_never_come)
    monkeypatch.setattr(worker, "push_message", lambda *a: calls.append("reply"))
    monkeypatch.setattr(worker, "push_task_output", lambda **kw: calls.append(("finished", kw["sub_status"])))
    worker.run_task("127.0.0.1:1", "t")
    assert calls == [("finished", SubStatus.FAILED)]


def test_client_runs_the_method_the_server_names(model_dirs, data_dir, make_workbench):
    """A train message whose meta names fedmkt runs FedMKT's client hook: the reply holds the adapter and a top-k
    on the public set, equal to the in-process client's."""
    from conftest import tiny_config

    from fedcollm.alignment.exchange import from_tensors
    from fedcollm.comm import pack, unpack
    from fedcollm.engines.inprocess import SimulatedClient

    mkt = {"top_k": 4, "batch_size": 4, "slm_when": "next_round"}  # the order in which tasks carry the LLM's top-k
    cfg = tiny_config(data_dir, str(model_dirs / "run"), model={"llm": str(model_dirs / "llm"),
                                                                 "slm": str(model_dirs / "slm")},
                      run={"methods": ["fedmkt"]}, fedmkt=mkt).to_dict()
    context = _context({"partition-id": 2, "num-partitions": 3})
    _ask(client_app.setup, RecordDict({"setup": ConfigRecord({"config": json.dumps(cfg)})}), context, "query")
    wb = make_workbench(str(model_dirs / "run"), run={"methods": ["fedmkt"]}, fedmkt=mkt)
    reply = _ask(client_app.train, to_record(Payload(wb.slm_init), round=1, method="fedmkt"), context, "train")
    ours = from_record(reply.content, "client_2")
    theirs = unpack(SimulatedClient(wb, 2).fit(pack(Payload(wb.slm_init)), 1, "fedmkt"))
    assert ours.tensors.keys() == theirs.tensors.keys()
    top = from_tensors(ours.tensors, "client_2", len(wb.tokenizer), 4)
    assert top.example_ids.tolist() == list(range(len(wb.aux_data)))
    assert torch.equal(top.ids, from_tensors(theirs.tensors, "in-process", len(wb.tokenizer), 4).ids)


def test_a_client_with_its_own_model_and_tokenizer_answers_in_its_own_vocabulary(model_dirs, data_dir,
                                                                                    client_tokenizers, tokenizer):
    """model.client_slms[1] is a Qwen2 on a 400-id tokenizer: partition 1 builds that SLM with its own tokenizer and,
    sent the LLM's top-k that the server moved into its vocabulary, replies with a top-k in its own vocabulary,
    as the in-process client does. It is never given the LLM's tokenizer."""
    from conftest import hetero_models, tiny_config

    from fedcollm.alignment.exchange import from_tensors
    from fedcollm.comm import pack, unpack
    from fedcollm.engines.inprocess import SimulatedClient
    from fedcollm.methods.fedmkt import FedMKT
    from fedcollm.workbench import Workbench

    models = hetero_models(client_tokenizers)
    for name, (model, tok) in models.items():
        model.save_pretrained(model_dirs / name)
        tok.save_pretrained(model_dirs / name)
    slms = [str(model_dirs / n) for n in ("tiny-llama", "tiny-qwen2", "tiny-llama")]
    mkt = {"top_k": 4, "batch_size": 4, "slm_when": "next_round"}  # the order in which tasks carry the LLM's top-k
    cfg = tiny_config(data_dir, str(model_dirs / "run"), model={"llm": str(model_dirs / "llm"),
                                                                 "slm": str(model_dirs / "slm"), "client_slms": slms},
                      run={"methods": ["fedmkt"]}, fedmkt=mkt)
    context = _context({"partition-id": 1, "num-partitions": 3})
    _ask(client_app.setup, RecordDict({"setup": ConfigRecord({"config": json.dumps(cfg.to_dict())})}), context,
         "query")
    side = client_app._client_side(context)
    ids = list(range(400))  # its own 400-id vocabulary (reloading as Qwen2 may append a special token after it)
    assert side.slm.config.model_type == "qwen2" and side.slm.config.vocab_size == 400
    assert side.tokenizer.convert_ids_to_tokens(ids) == client_tokenizers[1].convert_ids_to_tokens(ids)

    from fedcollm.models.tiny import tiny_pair

    llm, slm = tiny_pair(seed=0)
    wb = Workbench.from_models(cfg, llm, slm, tokenizer,
                               client_slms={str(model_dirs / n): m for n, m in models.items()})
    method = FedMKT(wb)
    states = method.initial_states(["client_0", "client_1", "client_2"]) | {"llm": dict(wb.llm_init)}
    task = Payload(method.client_task(states, "client_1"))
    assert "topk.aligned" in task.tensors  # the LLM's top-k, already in client_1's rows and vocabulary
    reply = _ask(client_app.train, to_record(task, round=2, method="fedmkt"), context, "train")
    ours = from_record(reply.content, "client_1")
    theirs = unpack(SimulatedClient(wb, 1).fit(pack(task), 2, "fedmkt"))
    top = from_tensors(ours.tensors, "client_1", 400, 4)
    assert top.example_ids.tolist() == list(range(len(wb.aux_data)))
    assert torch.equal(top.ids, from_tensors(theirs.tensors, "in-process", 400, 4).ids)
    assert all((ours.tensors[k] - theirs.tensors[k]).abs().max() < 1e-5 for k in theirs.tensors if "lora" in k)


def test_a_secure_client_masks_its_change_with_a_capped_count_and_counts_its_clipped_entries(model_dirs, data_dir):
    """train_secure (secaggplus_mod's inner handler) uploads theta_k - sent, not theta_k, in float64; reports the
    weight element the server assigned, at most the quantization range (so summed elements cannot wrap); and how
    many entries Flower's clip to +-secagg.clipping_range will change (scaled by that weight), as a count only."""
    from flwr.common import FitIns, ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.compat.common import recorddict_compat as compat

    from fedcollm.engines.flower.secagg import CLIPPED, to_arrays

    context = _context({"partition-id": 0, "num-partitions": 3})
    cfg = _config(model_dirs, data_dir) | {"secagg": {"enabled": True, "clipping_range": 1e-3, "quantization_range": 8}}
    _ask(client_app.setup, RecordDict({"setup": ConfigRecord({"config": json.dumps(cfg)})}), context, "query")
    sent = {k: v.clone() for k, v in client_app.adapter_state(client_app._client_side(context).slm).items()}
    plain = from_record(_ask(client_app.train, to_record(Payload(sent), round=1), context, "train").content, "c")
    fitins = FitIns(ndarrays_to_parameters(to_arrays(sent)), {"round": 1, "weight": 99})
    reply = _ask(client_app.train_secure, compat.fitins_to_recorddict(fitins, True), context, "train")
    res = compat.recorddict_to_fitres(reply.content, keep_input=True)
    change = parameters_to_ndarrays(res.parameters)
    expected = [(a.astype("float64") - b.astype("float64")) for a, b in zip(to_arrays(plain.tensors), to_arrays(sent))]
    assert all(c.dtype == "float64" and abs(c - e).max() < 1e-6 for c, e in zip(change, expected))
    assert res.num_examples == 8
    assert res.metrics[CLIPPED] == sum(int((abs(e) > 1e-3).sum()) for e in expected) > 0
