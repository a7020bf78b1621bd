"""benchmarks/study.py on tiny models: tuning on validation items, finals per seed, pieces that resume, and a
results.json in the schema issue 8 asks for."""

from __future__ import annotations

import importlib
import json
import shutil
import sys
from pathlib import Path

import pytest
from conftest import tiny_toml

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def study(tiny_build, tmp_path, data_dir, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    module = importlib.import_module("study")
    (tmp_path / "base.toml").write_text(tiny_toml(data_dir, data={"eval_limit": 8},
                                                  federation={"clients": 2}, run={"round_eval_limit": 4}))
    (tmp_path / "plan.toml").write_text("""
config = "base.toml"
results = "results"
runs = "runs"
methods = ["zero_shot", "standalone", "fedavg", "fedcollm", "centralized"]
seeds = [0, 1]
tune_eval_limit = 6
resamples = 200
[select_by]
standalone = ["slm"]
fedavg = ["slm"]
fedcollm = ["llm", "slm"]
centralized = ["llm"]
[search]
standalone = [{ "federation.client_lr" = 1e-3 }, { "federation.client_lr" = 3e-2 }]
fedavg = [{ "federation.client_lr" = 1e-3 }, { "federation.client_lr" = 3e-2 }]
fedcollm = [{ "distill.kd_weight" = 1.0 }, { "distill.kd_weight" = 0.1 }]
centralized = [{ "federation.client_lr" = 1e-3 }, { "federation.client_lr" = 3e-2 }]
[inherit]
fedcollm = { "federation.client_lr" = "fedavg" }
[claims]
pairs = [["slm", "fedcollm", "fedavg"], ["llm", "fedcollm", "centralized"], ["slm", "standalone", "zero_shot"]]
""")
    yield module, tmp_path
    sys.modules.pop("study", None)


def test_a_piece_stops_at_its_budget_and_the_next_one_goes_on_without_redoing_units(study, capsys):
    module, root = study
    module.main(["run", "--plan", str(root / "plan.toml"), "--hours", "1e-9"])
    done = sorted((root / "results" / "units").glob("*.json"))
    assert [p.name for p in done] == ["tune-zero_shot-s0.json"]  # one unit, then the budget is spent
    first = done[0].stat().st_mtime_ns
    module.main(["run", "--plan", str(root / "plan.toml"), "--hours", "10"])
    assert done[0].stat().st_mtime_ns == first
    assert len(list((root / "results" / "units").glob("*.json"))) == 1 + 8 + 1 + 8
    pieces = json.loads((root / "results" / "pieces.json").read_text())
    assert [len(p["units"]) for p in pieces] == [1, 17] and all("cpu" in p for p in pieces)

    res = json.loads((root / "results" / "results.json").read_text())
    assert set(res) >= {"setting", "tasks", "llm", "slm", "claims", "budget", "hparams"}
    assert set(res["setting"]) >= {"seeds", "train_per_task", "rounds", "piece_hours", "cpu", "dtype"}
    assert res["setting"]["seeds"] == [0, 1] and len(res["setting"]["piece_hours"]) == 2
    assert set(res["slm"]) == {"zero_shot", "standalone", "fedavg", "fedcollm"}
    assert set(res["llm"]) == {"zero_shot", "fedcollm", "centralized"}
    cell = res["slm"]["fedavg"]["arc_easy"]
    assert set(cell) >= {"mean", "std", "ci95", "n"} and cell["n"] == 8 and cell["seeds"] == 2
    assert cell["ci95"][0] <= cell["mean"] <= cell["ci95"][1]
    assert {(c["a"], c["b"]) for c in res["claims"]} == {("fedcollm", "fedavg"), ("fedcollm", "centralized"),
                                                        ("standalone", "zero_shot")}
    assert all(set(c) >= {"claim", "a", "b", "task", "diff", "ci95_items", "holm_interval", "holm_alpha", "p",
                          "significant"} for c in res["claims"])
    chosen = res["hparams"]["chosen"]
    # FedCoLLM's clients train as FedAvg's: it takes FedAvg's chosen learning rate and tunes only its own knob
    assert chosen["fedcollm"]["overrides"]["federation.client_lr"] == chosen["fedavg"]["overrides"][
        "federation.client_lr"]
    assert res["budget"]["fedcollm"]["llm_steps"] > 0 and res["budget"]["fedavg"]["llm_steps"] == 0
    # every tuning candidate shows each model's validation mean beside the score it was chosen by, and its cost
    for cand in res["hparams"]["search"]["fedcollm"]:
        assert cand["score"] == pytest.approx(sum(cand["means"].values()) / 2) and cand["seconds"] > 0
    md = (root / "results" / "results.md").read_text()
    assert "Table 2" in md and "| unit hours |" in md


def test_only_keeps_a_piece_to_the_units_it_matches(study):
    module, root = study
    module.main(["run", "--plan", str(root / "plan.toml"), "--hours", "10", "--only", "tune-fedavg-*"])
    assert sorted(p.stem for p in (root / "results" / "units").glob("*.json")) == ["tune-fedavg-c0-s0",
                                                                                   "tune-fedavg-c1-s0"]
    with pytest.raises(SystemExit, match="matches no unit"):  # a typo says so rather than running nothing
        module.main(["run", "--plan", str(root / "plan.toml"), "--only", "tune-fedavgg-*"])


def test_two_pieces_started_in_the_same_second_are_both_recorded(study):
    module, root = study
    plan = module.Plan.load(root / "plan.toml")
    plan.results.mkdir(parents=True)
    module._record_piece(plan, 0, "2026-11-26T00:00:00+00:00", 1.0, ["a"])
    module._record_piece(plan, 1, "2026-11-26T00:00:00+00:00", 2.0, ["b"])
    module._record_piece(plan, 1, "2026-11-26T00:00:00+00:00", 3.0, ["b", "c"])  # the same piece, one unit later
    pieces = json.loads((root / "results" / "pieces.json").read_text())
    assert [p["units"] for p in pieces] == [["a"], ["b", "c"]]


def test_a_unit_is_estimated_from_its_method_and_phase_or_else_as_twice_the_longest_finished_unit(study):
    """A method that has not run yet must not be rated cheaper than the dearest unit seen, or a piece overruns."""
    module, root = study
    plan = module.Plan.load(root / "plan.toml")
    (plan.results / "units").mkdir(parents=True)
    for unit, seconds in [(module.Unit("tune", "zero_shot", 0), 100.0), (module.Unit("tune", "fedavg", 0, 0), 300.0),
                          (module.Unit("tune", "fedavg", 0, 1), 500.0)]:
        module.unit_path(plan, unit).write_text(json.dumps({"seconds": seconds}))
    assert module._estimate(plan, module.Unit("tune", "fedavg", 0, 1)) == 400.0
    assert module._estimate(plan, module.Unit("tune", "fedcollm", 0, 0)) == 1000.0
    assert module._estimate(plan, module.Unit("final", "fedavg", 0)) == 1000.0  # finals score more items


def test_a_unit_resumed_after_round_1_counts_the_seconds_of_that_round_too(study):
    """Unit seconds are the cost record later pieces plan by: a unit a dead piece left after round 1 cost round 1
    and the rest, not only what the resuming process spent."""
    module, root = study
    plan = module.Plan.load(root / "plan.toml")
    unit, overrides = module.Unit("tune", "fedavg", 0, 0), {"federation.client_lr": 1e-3}
    module.run_unit(plan, unit, overrides)
    run = module.RunDir(module.unit_config(plan, unit, overrides).run.out_dir)
    (run.method_dir("fedavg") / "final.json").unlink()  # as the piece left it when it died in round 2
    shutil.rmtree(run.round_dir("fedavg", 2))
    run.rebuild_metrics("fedavg")
    round_1 = run.read_metrics("fedavg")[0]["timing"]["round_s"]

    resumed = module.run_unit(plan, unit, overrides)
    assert resumed["resumed_after_rounds"] == 1
    assert resumed["seconds"] > round_1 + run.read_metrics("fedavg")[1]["timing"]["round_s"]


def test_tuning_units_are_scored_on_validation_items_and_finals_on_the_test_items(study):
    module, root = study
    plan = module.Plan.load(root / "plan.toml")
    tune = module.unit_config(plan, module.Unit("tune", "fedavg", 0, 1), {"federation.client_lr": 0.03})
    final = module.unit_config(plan, module.Unit("final", "fedavg", 1), {"federation.client_lr": 0.03})
    assert (tune.data.scored, tune.data.eval_limit, tune.federation.client_lr) == ("validation", 6, 0.03)
    assert (final.data.scored, final.data.eval_limit, final.run.seed) == ("eval", 8, 1)
    assert module.overrides_of(plan, module.Unit("final", "fedavg", 0)) is None  # its tuning has not run


def test_the_committed_plan_loads_and_every_unit_of_it_makes_a_valid_config(study):
    """A typo in study_plan.toml or study.toml would otherwise surface hours into a piece."""
    module, _ = study
    plan = module.Plan.load(BENCHMARKS / "study_plan.toml")
    for unit in module.units(plan):
        overrides = (plan.search.get(unit.method) or [{}])[unit.candidate] if unit.candidate is not None else {}
        inherited = {key: plan.search[source][0][key] for key, source in plan.inherit.get(unit.method, {}).items()}
        cfg = module.unit_config(plan, unit, inherited | overrides)
        assert cfg.run.methods == [unit.method]
        assert cfg.data.scored == ("validation" if unit.phase == "tune" else "eval")
