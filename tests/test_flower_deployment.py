"""FedCoLLM across real processes: a SuperLink and 3 SuperNodes on 127.0.0.1 with TLS and SuperNode
authentication, tiny models; the result must equal the in-process engine's for the same seed."""

from __future__ import annotations

import json
import shutil
import threading

import pytest
import torch

pytest.importorskip("flwr")
if not shutil.which("flower-superlink") or not shutil.which("openssl"):
    pytest.skip("flower-superlink or openssl not on PATH", allow_module_level=True)

from conftest import tiny_toml  # noqa: E402

from fedcollm import cli  # noqa: E402
from fedcollm.comm import states_equal  # noqa: E402
from fedcollm.engines.flower.loopback import LoopbackFederation  # noqa: E402
from fedcollm.runs import RunDir  # noqa: E402

SERVER_DATA = {"aux_tasks": ["openbookqa"]}  # D^a apart from the clients' task: a Flower server holds no client row


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory, data_dir, tokenizer):
    """Tiny LLM/SLM saved as model folders (every process loads them by path) and a config naming them."""
    from fedcollm.models.tiny import tiny_pair

    root = tmp_path_factory.mktemp("flower")
    llm, slm = tiny_pair(seed=0)
    for name, model in (("llm", llm), ("slm", slm)):
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    config = root / "tiny.toml"
    config.write_text(tiny_toml(data_dir, data=SERVER_DATA, model={"llm": str(root / "llm"), "slm": str(root / "slm")}))
    reference = root / "inprocess"
    cli.dispatch(["run", "--config", str(config), "--out", str(reference)])
    return root, config, reference


def _final_adapters(run_dir, refs):
    return RunDir(run_dir).load_round("fedcollm", 2, refs)


def test_waiting_on_the_runs_done_file_asks_flower_only_at_the_start_and_when_it_appears(tmp_path, monkeypatch):
    """A benchmark's wait must not spend CPU on `flwr ls` polls while the run it times computes."""
    fed = LoopbackFederation(tmp_path, nodes=1)  # not entered: no process starts
    done = tmp_path / "results.json"
    asked = []

    def status(run_id):
        asked.append(run_id)
        return "finished:completed" if done.exists() else "running"

    monkeypatch.setattr(fed, "status", status)
    timer = threading.Timer(2.5, done.touch)
    timer.start()
    assert fed.wait(7, timeout=60, poll=300, done_file=done) == "finished:completed"
    timer.join()
    assert asked == [7, 7]  # once at once (a run that failed at start shows), once the file is there


def test_flower_deployment_with_tls_and_auth_equals_inprocess(tiny_setup):
    root, config, reference = tiny_setup
    out = root / "flower-run"
    with LoopbackFederation(root / "deploy", nodes=3) as fed:
        run_id = fed.submit({"config": str(config), "out-dir": str(out), "timeout": 120.0})
        status = fed.wait(run_id, timeout=600)
        assert status == "finished:completed", fed.logs(run_id)[-3000:]
    refs = {"llm": None, "slm": None}
    ours, theirs = _final_adapters(out, refs), _final_adapters(reference, refs)
    assert all(states_equal(ours[k], theirs[k]) for k in refs)
    metrics = RunDir(out).read_metrics("fedcollm")
    assert [m["accepted"] for m in metrics] == [3, 3] and all(m["bytes_up"] > 0 for m in metrics)
    assert json.loads((out / "results.json").read_text())["slm"]["fedcollm"] == json.loads(
        (reference / "results.json").read_text())["slm"]["fedcollm"]


def _wait_for(path, timeout=300, poll=0.5):
    import time

    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} did not appear in {timeout} s"
        time.sleep(poll)


def test_a_supernode_that_dies_mid_run_is_a_dropout_and_the_run_finishes(tiny_setup):
    root, config, _ = tiny_setup
    out = root / "dropout-run"
    # Flower's default isolation here (a ClientApp process per message), the worker elsewhere: both are covered
    with LoopbackFederation(root / "deploy-dropout", nodes=3, auth=False, worker=False) as fed:
        # the round timeout must outlast a live client's round (process start, model load, training) on a busy
        # 2-core machine, or live clients count as dropped too; the dead one then costs this much each round
        run_id = fed.submit({"config": str(config), "out-dir": str(out), "timeout": 60.0,
                             "set": "federation.min_fit_clients=2"})
        _wait_for(out / "config.json")  # the clients answered the setup: round 1 starts now
        fed.kill("node2")
        status = fed.wait(run_id, timeout=600)
        logs = fed.logs(run_id)
    assert status == "finished:completed", logs[-3000:]
    metrics = RunDir(out).read_metrics("fedcollm")
    # the dead client shows up as no reply (dropped) or as an error reply the SuperLink sends for it (rejected)
    assert all(m["dropped"] == ["client_2"] or (m["dropped"] == [] and m["rejected"] == 1) for m in metrics)
    assert [m["accepted"] for m in metrics] == [2, 2]
    assert "client_2" in logs
    assert (out / "fedcollm" / "final.json").exists()


def test_a_server_killed_after_round_1_resumes_to_the_same_adapters(tiny_setup):
    root, config, reference = tiny_setup
    out = root / "resumed-run"
    with LoopbackFederation(root / "deploy-resume", nodes=3, auth=False) as fed:
        first = fed.submit({"config": str(config), "out-dir": str(out), "timeout": 120.0})
        _wait_for(out / "fedcollm" / "round_001" / "done.json", poll=0.05)
        workers = [f"worker{k}" for k in range(3)]
        for name in workers:  # hold round 2 (a client takes >= 1 s to see it) while the server is stopped
            fed.pause(name)
        fed.flwr("stop", str(first), "fedcollm")
        assert fed.wait(first, timeout=120).startswith("finished")
        assert not (out / "fedcollm" / "final.json").exists()
        for name in workers:
            fed.pause(name, resume=True)
        # a client that never answers the setup fails the run within the wait, its processes' logs in the report
        second = fed.submit({"out-dir": str(out), "resume": True, "timeout": 120.0, "setup-timeout": 300.0})
        status = fed.wait(second, timeout=600)
        assert status == "finished:completed", fed.process_logs() + fed.logs(second)[-3000:]
    refs = {"llm": None, "slm": None}
    ours, theirs = _final_adapters(out, refs), _final_adapters(reference, refs)
    assert all(states_equal(ours[k], theirs[k]) for k in refs)
    assert [m["round"] for m in RunDir(out).read_metrics("fedcollm")] == [1, 2]


def _relative_l2(a, b) -> float:
    num = sum(float(((a[k].double() - b[k].double()) ** 2).sum()) for k in a)
    den = sum(float((b[k].double() ** 2).sum()) for k in b)
    return (num / den) ** 0.5


def test_secagg_server_holds_only_the_average_and_matches_inprocess_within_quantization(tiny_setup):
    """FedAvg's round-1 adapter is sent + the securely aggregated mean change, so it must equal the in-process one
    within the round's reported quantization bound, entry by entry (plus float32 rounding). FedCoLLM's final adapters
    are no such function of the aggregate: at this seed the LLM's q_proj lora_A[0, 18] has a gradient of 2e-6
    (median entry 4e-3) at its first non-zero KD step, and Adam turns its sign into a +-lr step, so SecAgg+'s
    random stochastic rounding (1.8e-7 relative on the aggregate) flips it in about 5 runs of 12 and the final SLM
    is then 6.2e-4 off the in-process one (else 5e-6); only a gross error is refused there (summing with the
    uncapped count weights gave 6.4e-2)."""
    root, config, reference = tiny_setup
    out = root / "secagg-run"
    fedavg_reference = root / "inprocess-fedavg"
    cli.dispatch(["run", "--config", str(config), "--out", str(fedavg_reference), "--set", "run.methods=['fedavg']"])
    with LoopbackFederation(root / "deploy-secagg", nodes=3, auth=False) as fed:
        run_id = fed.submit({"config": str(config), "out-dir": str(out), "timeout": 120.0,
                             "set": "secagg.enabled=true;run.methods=['fedcollm','fedavg']"})
        status = fed.wait(run_id, timeout=900)
        assert status == "finished:completed", fed.logs(run_id)[-3000:]
    [first, _] = RunDir(out).read_metrics("fedavg")
    ours, theirs = (RunDir(run).load_round("fedavg", 1, {"slm": None})["slm"] for run in (out, fedavg_reference))
    tolerance = {k: first["secagg_quantization_bound"] + 2 * torch.finfo(torch.float32).eps * t.double().abs()
                 for k, t in theirs.items()}
    assert all(((ours[k].double() - t.double()).abs() <= tolerance[k]).all() for k, t in theirs.items())
    assert any(not torch.equal(ours[k], t) for k, t in theirs.items())  # quantized: not the exact mean
    metrics = RunDir(out).read_metrics("fedcollm")
    # what the server's strategy was handed each round: one result per client, every one the same average
    assert [m["secagg_results"] for m in metrics] == [3, 3]
    assert all(m["secagg_all_results_identical"] for m in metrics)
    assert [m["contributors"] for m in metrics] == [["client_0", "client_1", "client_2"]] * 2
    refs = {"llm": None, "slm": None}
    ours, theirs = _final_adapters(out, refs), _final_adapters(reference, refs)
    # bytes of all four stages on the wire: each client uploads its masked adapter, >= 32 bits per value
    masked = 4 * sum(t.numel() for t in theirs["slm"].values())
    assert all(m["bytes_up"] > 3 * masked and m["bytes_down"] > 0 for m in metrics)
    error = _relative_l2(ours["slm"], theirs["slm"])
    (root / "secagg_rel_error.json").write_text(json.dumps({"slm_rel_l2_after_2_rounds": error}))
    assert 0 < error < 1e-2, error


def test_fedmkt_with_clients_of_other_vocabularies_on_flower_equals_inprocess(tmp_path_factory, data_dir, tokenizer,
                                                                              client_tokenizers):
    """2 rounds of FedMKT: the LLM (512 ids) and clients on a Llama with 300 ids, a Qwen2 with 400 ids and the
    Llama again, each process loading its own model folder; the same adapters as in one process, the SLMs taught
    by the server after the LLM's update in each round."""
    from conftest import hetero_models

    from fedcollm.models.tiny import tiny_pair

    root = tmp_path_factory.mktemp("flower-fedmkt")
    llm, _ = tiny_pair(seed=0)
    folders = {"llm": (llm, tokenizer)} | hetero_models(client_tokenizers)
    for name, (model, tok) in folders.items():
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    a, b = root / "tiny-llama", root / "tiny-qwen2"
    config = root / "fedmkt.toml"
    config.write_text(tiny_toml(
        data_dir, model={"llm": str(root / "llm"), "slm": str(a), "client_slms": [str(a), str(b), str(a)]},
        fedmkt={"top_k": 4, "batch_size": 4, "llm_lr": 0.01, "slm_lr": 0.01}, run={"methods": ["fedmkt"]},
        data=SERVER_DATA))
    reference, out = root / "inprocess", root / "flower-run"
    cli.dispatch(["run", "--config", str(config), "--out", str(reference)])
    with LoopbackFederation(root / "deploy", nodes=3, auth=False) as fed:
        run_id = fed.submit({"config": str(config), "out-dir": str(out), "timeout": 120.0})
        status = fed.wait(run_id, timeout=600)
        assert status == "finished:completed", fed.logs(run_id)[-3000:]
    refs = {"llm": None} | {f"client_{k}": None for k in range(3)}
    ours = RunDir(out).load_round("fedmkt", 2, refs)
    theirs = RunDir(reference).load_round("fedmkt", 2, refs)
    assert all(states_equal(ours[k], theirs[k]) for k in refs)
    metrics = RunDir(out).read_metrics("fedmkt")
    assert [m["accepted"] for m in metrics] == [3, 3]
    # FATE-LLM's order (fedmkt.slm_when = after_llm): the server taught each adapter after the LLM's update, on
    # both engines alike, so the tasks carry only adapters
    assert metrics[1]["bytes_down"] == metrics[0]["bytes_down"] and metrics[1]["timing"]["server_slm_kd_s"] > 0
    assert json.loads((out / "results.json").read_text())["slm"] == json.loads(
        (reference / "results.json").read_text())["slm"]


def test_the_server_and_each_client_hold_only_their_own_data(tiny_setup, tmp_path, data_dir):
    """The server's data folder holds D^a's task and the eval split and no client training row; SuperNode k's
    folder holds only its own ARC-Easy train rows (30, 40, 50 of them), named by its data-config; every party runs
    with its own HOME and working directory. Against d614e59 such a ServerApp could not start (DataError on the
    missing arc_easy/train.jsonl, see tests/test_server_data.py); now the run completes, and the clients' example
    counts reach the server only in their setup replies."""
    from pathlib import Path

    from test_server_data import server_folder

    root, _, _ = tiny_setup
    rows = Path(data_dir, "arc_easy", "train.jsonl").read_text().splitlines(keepends=True)
    own = {}
    for k, (start, stop) in enumerate(((0, 30), (30, 70), (70, 120))):
        folder = tmp_path / f"client{k}-data"
        (folder / "arc_easy").mkdir(parents=True)
        (folder / "arc_easy" / "train.jsonl").write_text("".join(rows[start:stop]))
        (folder / "mine.toml").write_text(f'[data]\ndata_dir = "{folder}"\ntasks = ["arc_easy"]\n')
        own[k] = f'data-config="{folder / "mine.toml"}"'
    config = tmp_path / "server.toml"
    config.write_text(tiny_toml(str(server_folder(tmp_path, data_dir)), data=SERVER_DATA,
                                model={"llm": str(root / "llm"), "slm": str(root / "slm")}))
    out = tmp_path / "run"
    with LoopbackFederation(tmp_path / "deploy", nodes=3, auth=False, node_config=own, apart=True) as fed:
        run_id = fed.submit({"config": str(config), "out-dir": str(out), "timeout": 120.0,
                             "set": "federation.rounds=1"})
        status = fed.wait(run_id, timeout=600)
        assert status == "finished:completed", fed.process_logs() + fed.logs(run_id)[-3000:]
    assert [m["accepted"] for m in RunDir(out).read_metrics("fedcollm")] == [3]
    setting = json.loads((out / "results.json").read_text())["setting"]
    assert setting["client_examples"] == [30, 40, 50] and setting["aux_examples"] == 40


def test_the_serverapp_log_maps_clients_to_supernodes_and_reports_a_dead_one_once_per_round(tiny_setup):
    """The operator's view (`flwr log`) of a run in which client_2's machine dies after the setup: fedcollm's own
    lines (clients and their SuperNodes, rounds) are there, and each round reports client_2 once, as a dropout,
    with how it was noticed; the metrics count it as dropped, never as rejected. Against d614e59 (this test) the log
    held no "clients:" line and no round line; round 1 said "client client_2 did not answer within 300 s" (the
    timeout, though the SuperLink had reported the node gone) and "rejected update: client client_2: no reply",
    round 2 those two and "client_2 no longer connected", and each round counted client_2 as rejected too."""
    root, config, _ = tiny_setup
    out = root / "dropout-log-run"
    with LoopbackFederation(root / "deploy-dropout-log", nodes=3, auth=False) as fed:
        run_id = fed.submit({"config": str(config), "out-dir": str(out), "timeout": 300.0,
                             "set": "federation.min_fit_clients=2"})
        _wait_for(out / "config.json")
        fed.kill("node2")
        status = fed.wait(run_id, timeout=900)
        logs = fed.logs(run_id)
    assert status == "finished:completed", logs[-3000:]
    assert "clients: client_0 (SuperNode " in logs and "fedcollm round 2/2 done" in logs
    lines = [line for line in logs.splitlines() if "client_2" in line and "clients:" not in line]
    assert len(lines) == 2 and all("client_2 (SuperNode " in line and "dropped out" in line for line in lines), lines
    metrics = RunDir(out).read_metrics("fedcollm")
    assert [(m["accepted"], m["rejected"], m["dropped"]) for m in metrics] == [(2, 0, ["client_2"])] * 2


def test_secagg_with_distributed_dp_finishes_and_the_server_never_holds_the_noiseless_mean(tiny_setup):
    """SecAgg+ with dp.mode = distributed over real processes: the clients noise their clipped changes before
    masking, so the adapter the server releases (and saves) is off the noiseless clipped mean (an in-process run
    with negligible noise, z = 1e-9) by noise of std z C / 3 per entry; nothing else of the clients' reaches the
    run directory, and no client reports its clipped-entry count under DP."""
    root, config, _ = tiny_setup
    common = ["run.methods=['fedavg']", "federation.rounds=1", "dp.clip_norm=0.1"]
    noiseless = root / "dp-noiseless"
    cli.dispatch(["run", "--config", str(config), "--out", str(noiseless)]
                 + [a for s in common + ["dp.noise_multiplier=1e-9"] for a in ("--set", s)])
    out = root / "secagg-dp-run"
    with LoopbackFederation(root / "deploy-secagg-dp", nodes=3, auth=False) as fed:
        settings = common + ["secagg.enabled=true", "dp.noise_multiplier=0.5", "dp.mode=distributed"]
        run_id = fed.submit({"config": str(config), "out-dir": str(out), "timeout": 120.0, "set": ";".join(settings)})
        status = fed.wait(run_id, timeout=900)
        assert status == "finished:completed", fed.logs(run_id)[-3000:]
    [metrics] = RunDir(out).read_metrics("fedavg")
    assert metrics["secagg_results"] == 3 and metrics["secagg_clipped_entries"] is None
    assert metrics["dp"]["noised_by"] == "clients"
    refs = {"slm": None}
    ours = RunDir(out).load_round("fedavg", 1, refs)["slm"]
    clean = RunDir(noiseless).load_round("fedavg", 1, refs)["slm"]
    residual = torch.cat([(ours[k].double() - clean[k].double()).flatten() for k in clean])
    assert residual.std().item() == pytest.approx(0.5 * 0.1 / 3, rel=0.15)
    saved = sorted(p.name for p in out.rglob("*.safetensors"))
    assert saved == sorted(p.name for p in noiseless.rglob("*.safetensors"))  # the released adapters only


def test_a_generation_task_on_flower_equals_inprocess(tiny_setup, data_dir):
    """Clients hold a prompt/response task declared in TOML, the server Alpaca as D^a: FedCoLLM on Flower ends
    with the in-process adapters and the same generations."""
    from conftest import write_notes_task

    root, _, _ = tiny_setup
    task = write_notes_task(root / "notes", data_dir)
    config = root / "notes.toml"
    config.write_text(tiny_toml(data_dir, data={"tasks": ["notes"], "aux_tasks": ["alpaca"], "train_per_task": 24,
                                                "eval_limit": 4},
                                model={"llm": str(root / "llm"), "slm": str(root / "slm")}) + task)
    reference, out = root / "notes-inprocess", root / "notes-flower"
    cli.dispatch(["run", "--config", str(config), "--out", str(reference)])
    with LoopbackFederation(root / "deploy-notes", nodes=3) as fed:
        run_id = fed.submit({"config": str(config), "out-dir": str(out), "timeout": 120.0})
        assert fed.wait(run_id, timeout=600) == "finished:completed", fed.logs(run_id)[-3000:]
    refs = {"llm": None, "slm": None}
    ours, theirs = _final_adapters(out, refs), _final_adapters(reference, refs)
    assert all(states_equal(ours[k], theirs[k]) for k in refs)
    ours, theirs = ({w: {k: v for k, v in rows["fedcollm"]["notes"].items() if k != "tokens_per_s"}  # a timing
                     for w, rows in json.loads((d / "results.json").read_text())["generation"].items()}
                    for d in (out, reference))
    assert ours == theirs and ours["slm"]["n"] == 4
    written = [RunDir(d).read_final("fedcollm")["slm"]["notes"]["items"] for d in (out, reference)]
    assert [i["generation"] for i in written[0]] == [i["generation"] for i in written[1]]
