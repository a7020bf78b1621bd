import json

import torch

from fedcollm.comm import Payload, pack, states_equal, unpack
from fedcollm.engines.inprocess import InProcessTransport, SimulatedClient, run_method
from fedcollm.runs import RunDir


class NaNClient(SimulatedClient):
    """A faulty client whose upload holds NaN."""

    def fit(self, blob, round_idx, method):
        payload = unpack(super().fit(blob, round_idx, method))
        key = next(iter(payload.tensors))
        payload.tensors[key][0, 0] = float("nan")
        return pack(payload)


def test_client_payload_holds_only_adapter_tensors_and_a_count(make_workbench):
    wb = make_workbench()
    payload = unpack(SimulatedClient(wb, 0).fit(pack(Payload(wb.slm_init)), 1, "fedavg"))
    assert payload.num_examples == len(wb.client_data[0])
    assert set(payload.tensors) == set(wb.slm_init)
    assert all("lora_" in k for k in payload.tensors)
    assert all(t.is_floating_point() for t in payload.tensors.values())  # no token ids, no examples
    base_params = sum(p.numel() for n, p in wb.slm.named_parameters() if "lora_" not in n)
    assert sum(t.numel() for t in payload.tensors.values()) < base_params / 5


def test_rejected_update_leaves_round_running(make_workbench, tmp_path, caplog):
    wb = make_workbench(str(tmp_path))
    clients = [SimulatedClient(wb, 0), NaNClient(wb, 1), SimulatedClient(wb, 2)]
    with caplog.at_level("WARNING"):
        final = run_method(wb, "fedavg", RunDir(tmp_path), InProcessTransport(clients))
    records = RunDir(tmp_path).read_metrics("fedavg")
    assert [r["rejected"] for r in records] == [1, 1]
    assert [r["accepted"] for r in records] == [2, 2]
    assert "client_1" in caplog.text
    assert final["slm"]["arc_easy"]["n"] == 6
    state = RunDir(tmp_path).load_round("fedavg", 2, {"slm": wb.slm_init})["slm"]
    assert all(torch.isfinite(t).all() for t in state.values())


def test_resume_equals_uninterrupted(make_workbench, tmp_path):
    full = make_workbench(str(tmp_path / "full"))
    run_method(full, "fedcollm", RunDir(tmp_path / "full"))

    # interrupted: only round 1 completes ...
    part = make_workbench(str(tmp_path / "part"), federation={"rounds": 1})
    run_method(part, "fedcollm", RunDir(tmp_path / "part"))
    (tmp_path / "part" / "fedcollm" / "final.json").unlink()
    # ... then a fresh process resumes with the full config
    resumed = make_workbench(str(tmp_path / "part"))
    run_method(resumed, "fedcollm", RunDir(tmp_path / "part"))

    refs = {"llm": full.llm_init, "slm": full.slm_init}
    a = RunDir(tmp_path / "full").load_round("fedcollm", 2, refs)
    b = RunDir(tmp_path / "part").load_round("fedcollm", 2, refs)
    assert a.keys() == b.keys() == {"llm", "slm"}
    assert all(states_equal(a[k], b[k]) for k in a)
    rounds = [r["round"] for r in RunDir(tmp_path / "part").read_metrics("fedcollm")]
    assert rounds == [1, 2]


def test_adapters_load_with_peft(make_workbench, tmp_path):
    from peft import PeftModel

    from fedcollm.models.lora import peft_wrapping
    from fedcollm.models.tiny import tiny_pair

    wb = make_workbench(str(tmp_path))
    run_method(wb, "fedcollm", RunDir(tmp_path))
    _, slm = tiny_pair(seed=0)
    with peft_wrapping():
        loaded = PeftModel.from_pretrained(slm, tmp_path / "fedcollm" / "round_002" / "slm")
    saved = RunDir(tmp_path).load_round("fedcollm", 2, {"slm": wb.slm_init})["slm"]
    from peft import get_peft_model_state_dict
    got = get_peft_model_state_dict(loaded)
    assert all(torch.equal(got[k], saved[k]) for k in saved)


def test_every_method_runs_and_reports(make_workbench, tmp_path):
    from fedcollm.report import build_results, write_report

    methods = ["zero_shot", "standalone", "fedavg", "centralized", "fedcollm"]
    wb = make_workbench(str(tmp_path), run={"methods": methods}, federation={"rounds": 1})
    run = RunDir(tmp_path)
    run.write_config(wb.cfg.to_json())
    for m in methods:
        run_method(wb, m, run)
    comm = {"slm_params": 10, "adapter_params": 1, "adapter_percent": 10.0, "bytes_up_per_round": 1,
            "bytes_down_per_round": 1}
    results = build_results(run, {"llm": "tiny", "slm": "tiny", "clients": 3, "rounds": 1, "limit": 6, "seed": 0},
                            comm)
    assert set(results["llm"]) == {"zero_shot", "centralized", "fedcollm"}
    assert set(results["slm"]) == {"zero_shot", "standalone", "fedavg", "fedcollm"}
    assert len(results["slm_standalone_clients"]) == 3
    md = write_report(run, results)
    assert "Table 1" in md and "FedCoLLM vs FedAvg" in md
    assert (tmp_path / "accuracy.png").stat().st_size > 1000
    assert json.loads((tmp_path / "results.json").read_text())["n_eval"] == {"arc_easy": 6}


def test_engine_never_branches_on_method_names():
    import inspect

    from fedcollm.engines import inprocess
    from fedcollm.methods import REGISTRY

    source = inspect.getsource(inprocess)
    assert not [name for name in REGISTRY if f'"{name}"' in source or f"'{name}'" in source]


class GreedyClient(SimulatedClient):
    """A poisoning client: claims 10^12 examples and scales its update by 10^6."""

    def fit(self, blob, round_idx, method):
        sent = unpack(blob).tensors
        payload = unpack(super().fit(blob, round_idx, method))
        scaled = {k: sent[k] + (v - sent[k]) * 1e6 for k, v in payload.tensors.items()}
        return pack(Payload(scaled, 10**12))


def test_a_poisoning_client_cannot_take_over_the_average(make_workbench, tmp_path, caplog):
    wb = make_workbench(str(tmp_path), federation={"rounds": 1})
    honest = make_workbench(str(tmp_path / "h"), federation={"rounds": 1})
    with caplog.at_level("WARNING"):
        run_method(wb, "fedavg", RunDir(tmp_path), InProcessTransport(
            [SimulatedClient(wb, 0), GreedyClient(wb, 1), SimulatedClient(wb, 2)]))
    assert "client client_1: claims 1000000000000 examples but declared" in caplog.text  # rejected, so not averaged
    run_method(honest, "fedavg", RunDir(tmp_path / "h"))
    refs = {"slm": wb.slm_init}
    poisoned = RunDir(tmp_path).load_round("fedavg", 1, refs)["slm"]
    clean = RunDir(tmp_path / "h").load_round("fedavg", 1, refs)["slm"]

    def dist(a, b):
        return float(torch.sqrt(sum(((a[k] - b[k]).double() ** 2).sum() for k in a)))
    init_norm = float(torch.sqrt(sum((t.double() ** 2).sum() for t in wb.slm_init.values())))
    # the average is the honest clients', not moved by 10^6
    assert dist(poisoned, wb.slm_init) <= 2.0 * init_norm and dist(poisoned, clean) < 2.0 * init_norm


def test_client_sampling_is_seeded_and_shared_by_engines(make_workbench, tmp_path):
    from fedcollm.engines.inprocess import sample_clients

    names = [f"client_{k}" for k in range(4)]
    picks = [sample_clients(names, 0.5, 1, 0, r) for r in (1, 2, 3)]
    assert all(len(p) == 2 for p in picks) and picks == [sample_clients(names, 0.5, 1, 0, r) for r in (1, 2, 3)]
    assert len({tuple(p) for p in picks}) > 1
    assert sample_clients(names, 0.1, 3, 0, 1).__len__() == 3
    wb = make_workbench(str(tmp_path), federation={"fraction_fit": 0.5, "min_fit_clients": 1})
    run_method(wb, "fedavg", RunDir(tmp_path))
    records = RunDir(tmp_path).read_metrics("fedavg")
    assert [len(r["sampled"]) for r in records] == [2, 2] and [r["accepted"] for r in records] == [2, 2]


def test_every_method_records_the_steps_and_examples_each_model_trained_on(make_workbench, tmp_path):
    """The budgets the study compares at: client SFT counted from each reply's example count, the server's
    distillation as ceil(epochs * |D^a| / batch) steps a round, Centralized's epochs over the union."""
    from fedcollm.report import training_budget

    wb = make_workbench(str(tmp_path))  # 3 clients, batch 4, 1 local epoch, D^a of 8 at 1.5 epochs, 2 rounds
    run = RunDir(tmp_path)
    sizes = [len(d) for d in wb.client_data]
    client_steps = sum(-(-n // 4) for n in sizes)
    kd_steps = wb.cfg.distill.steps(len(wb.aux_data))
    assert kd_steps == 3  # ceil(1.5 * 8 / 4)
    for name in ("fedavg", "fedcollm", "centralized"):
        run_method(wb, name, run)
    assert training_budget(run, "fedavg") == {"llm_steps": 0, "slm_steps": 2 * client_steps, "llm_examples": 0,
                                              "slm_examples": 2 * sum(sizes), "examples_seen": 2 * sum(sizes)}
    fedcollm = training_budget(run, "fedcollm")
    assert fedcollm["llm_steps"] == 2 * kd_steps and fedcollm["slm_steps"] == 2 * (client_steps + kd_steps)
    assert fedcollm["llm_examples"] == 2 * kd_steps * 4
    union = sum(sizes) + len(wb.aux_data)
    assert training_budget(run, "centralized")["llm_steps"] == 2 * -(-union // 4)
