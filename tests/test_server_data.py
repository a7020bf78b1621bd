"""The Flower server holds only what it owns: the LLM (and SLM), D^a and the evaluation sets, never a client's
training rows; D^a comes from data.aux_tasks, apart from the clients' tasks."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
from conftest import tiny_config, tiny_toml

from fedcollm.data.partition import load_train_pool
from fedcollm.errors import ConfigError
from fedcollm.workbench import Workbench, load_data

AUX = {"aux_tasks": ["openbookqa"]}


def server_folder(root: Path, data_dir: str) -> Path:
    """What a server machine holds: D^a's task (openbookqa's train split) and the clients' task's eval split
    (arc_easy test); arc_easy's train split, the clients' rows, is not there at all."""
    folder = root / "server-data"
    for task, split in (("openbookqa", "train"), ("arc_easy", "test")):
        (folder / task).mkdir(parents=True, exist_ok=True)
        shutil.copy(Path(data_dir, task, f"{split}.jsonl"), folder / task / f"{split}.jsonl")
    return folder


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, tokenizer) -> Path:
    """Tiny LLM/SLM saved as model folders, loaded by path as a server machine loads them."""
    from fedcollm.models.tiny import tiny_pair

    root = tmp_path_factory.mktemp("server-models")
    for name, model in zip(("llm", "slm"), tiny_pair(seed=0)):
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    return root


@pytest.fixture
def own_logging():
    """Undo what the ServerApp does to fedcollm's logger in this process, so later tests' caplog still sees it."""
    ours = logging.getLogger("fedcollm")
    handlers, propagate, level = list(ours.handlers), ours.propagate, ours.level
    yield
    ours.handlers[:], ours.propagate = handlers, propagate
    ours.setLevel(level)


def test_aux_tasks_are_d_a_and_the_clients_share_out_every_row_of_their_tasks(data_dir):
    cfg = tiny_config(data_dir, data=AUX)
    split, _ = load_data(cfg)
    pool = load_train_pool(cfg.task_specs(), cfg.data, cfg.run.seed)["arc_easy"]
    assert sorted(ex.context for shard in split.clients for ex in shard) == sorted(ex.context for ex in pool)
    assert len(split.aux) == 40 and all(ex.task == "openbookqa" for ex in split.aux)
    # the clients' shards do not depend on D^a, which a client (or the server) may load without the other
    other, _ = load_data(tiny_config(data_dir, data={"aux_tasks": ["arc_challenge"]}))
    assert other.clients == split.clients


@pytest.mark.parametrize("aux, field", [(["arc_easy"], "data.aux_tasks"), (["nope"], "data.aux_tasks")])
def test_an_aux_task_that_is_a_client_task_or_unknown_is_refused(data_dir, aux, field):
    with pytest.raises(ConfigError, match=field):
        tiny_config(data_dir, data={"aux_tasks": aux})


def test_a_server_only_workbench_never_opens_a_client_tasks_train_split(tmp_path, data_dir, tokenizer):
    from fedcollm.models.tiny import tiny_pair

    folder = server_folder(tmp_path, data_dir)
    cfg = tiny_config(str(folder), data=AUX)
    with pytest.raises(Exception, match="arc_easy"):  # the in-process engine needs the clients' rows
        load_data(cfg)
    wb = Workbench.from_models(cfg, *tiny_pair(seed=0), tokenizer, data=load_data(cfg, clients=False))
    assert wb.split.clients == [] and wb.client_data == []
    assert len(wb.aux_data) == 40 and set(wb.eval_sets) == {"arc_easy"} and len(wb.eval_sets["arc_easy"]) == 6


@pytest.mark.parametrize("sections, message", [
    ({}, "data.aux_tasks: empty"),
    ({"data": AUX, "run": {"methods": ["centralized"]}}, "run.methods: centralized"),
    ({"data": AUX | {"scored": "validation", "tasks": ["held"]},
      "tasks": {"held": {"path": "arc_easy", "train_split": "train", "validation_holdout": 5,
                         "context": "Question: {question}\nAnswer:", "continuation": " {choice}"}}}, "data.scored"),
])
def test_a_server_without_client_rows_refuses_what_needs_them(data_dir, sections, message):
    with pytest.raises(ConfigError, match=message):
        load_data(tiny_config(data_dir, **sections), clients=False)


def test_a_serverapp_with_no_client_shard_on_its_disk_starts(tmp_path, data_dir, model_dirs, monkeypatch,
                                                              own_logging):
    """Attack: start the ServerApp on a machine whose data folder holds D^a's task and the eval split only.

    Against d614e59 (whose config has no data.aux_tasks, so the same folder and config less that key) it failed
    before reaching any client, `DataError: .../server-data/arc_easy/train.jsonl: JSONL file not found`: a
    server needed every client's training rows to start. Now it builds its workbench (no client rows) and waits
    for the SuperNodes, failing only because none is connected here."""
    from flwr.app import Context, RecordDict

    from fedcollm.engines.flower import server_app
    from fedcollm.errors import FederationError

    config = tmp_path / "server.toml"
    config.write_text(tiny_toml(str(server_folder(tmp_path, data_dir)), data=AUX,
                                model={"llm": str(model_dirs / "llm"), "slm": str(model_dirs / "slm")}))
    seen = {}
    real = server_app.run_experiment

    def run_experiment(cfg, connect):
        def spy(wb):
            seen["wb"] = wb
            return connect(wb)
        return real(cfg, spy)

    monkeypatch.setattr(server_app, "run_experiment", run_experiment)

    class NoNodes:  # a Grid no SuperNode has connected to
        def get_node_ids(self):
            return []

        def push_messages(self, messages):
            return []

    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                      run_config={"config": str(config), "out-dir": str(tmp_path / "run"), "setup-timeout": 0.0})
    with pytest.raises(FederationError, match="only 0 of federation.clients = 3"):
        server_app.main(NoNodes(), context)
    wb = seen["wb"]
    assert wb.client_data == [] and wb.split.clients == [] and len(wb.aux_data) == 40


def test_a_client_cuts_its_shard_and_d_a_as_the_in_process_engine_does_without_the_server(data_dir):
    """With data.aux_tasks a client without a data-config cuts shard K from the data.tasks pool, and (for a method
    that needs it) D^a from the aux tasks, exactly as the in-process engine does."""
    pytest.importorskip("flwr")
    from fedcollm.engines.flower.client_app import _client_rows

    cfg = tiny_config(data_dir, data=AUX)
    split, _ = load_data(cfg)
    for k in range(cfg.federation.clients):
        assert _client_rows(cfg, k, "", needs_public=False)[1:] == (split.clients[k], None)
    assert _client_rows(cfg, 1, "", needs_public=True)[2] == split.aux
