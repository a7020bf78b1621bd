"""User tasks from TOML alone, runs that lose nothing when damaged or interrupted, and curves on the same items."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from fedcollm import cli
from fedcollm.comm import states_equal
from fedcollm.errors import DataError, RunDirError
from fedcollm.runs import RunDir


def _digest(run: Path, parts: list[str]) -> dict[str, str]:
    """sha256 of every file under the given parts of a run (what must never change once completed)."""
    out = {}
    for part in parts:
        root = run / part
        for p in sorted([root] if root.is_file() else root.rglob("*")):
            if p.is_file():
                out[str(p.relative_to(run))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _args(out: Path, data_dir: str, *extra: str) -> list[str]:
    return ["run", "--out", str(out), "--set", f"data.data_dir='{data_dir}'", "--set", "data.tasks=['arc_easy']",
            "--set", "data.train_per_task=24", "--limit", "6", "--set", "run.round_eval_limit=3",
            "--set", "run.eval_every=1",
            "--set", "federation.clients=2", "--set", "distill.epochs=1", "--set", "model.max_length=64",
            "--set", "model.lora.dropout=0.0", "--set", "run.methods=['zero_shot','fedcollm']", *extra]


@pytest.fixture(scope="module")
def finished(tmp_path_factory, data_dir, tokenizer) -> Path:
    """A completed tiny run; tests copy it before touching anything."""
    from conftest import patch_tiny_build

    out = tmp_path_factory.mktemp("safety") / "finished"
    with pytest.MonkeyPatch.context() as mp:
        patch_tiny_build(mp, tokenizer)
        cli.dispatch(_args(out, data_dir))
    return out


def test_a_task_declared_only_in_toml_trains_and_evaluates(tmp_path, tiny_build):
    rows = tmp_path / "rows" / "colors"
    rows.mkdir(parents=True)
    colors = ["red", "green", "blue", "yellow"]
    for split, n in (("fit", 24), ("holdout", 5)):
        lines = [json.dumps({"key": f"{split}-{i}", "prompt": f"What colour is thing {i}?",
                             "options": colors, "letters": ["A", "B", "C", "D"], "gold": "ABCD"[i % 4]})
                 for i in range(n)]
        (rows / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    config = tmp_path / "mine.toml"
    config.write_text(f"""
[data]
data_dir = "{tmp_path / 'rows'}"
tasks = ["colors"]
train_per_task = 24

[tasks.colors]
path = "colors"
train_split = "fit"
eval_split = "holdout"
context = "Q: {{prompt}}\\nA:"
continuation = " {{choice}}"
choices_field = "options"
labels_field = "letters"
answer_field = "gold"
id_field = "key"

[federation]
clients = 2
rounds = 1

[distill]
epochs = 1

[model]
max_length = 64

[run]
methods = ["fedavg", "fedcollm"]
""")
    cli.dispatch(["run", "--config", str(config), "--out", str(tmp_path / "run")])
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["tasks"] == ["colors"] and results["n_eval"] == {"colors": 5}
    assert set(results["slm"]) == {"fedavg", "fedcollm"} and "colors" in results["llm"]["fedcollm"]
    recorded = json.loads((tmp_path / "run" / "config.json").read_text())["tasks"]["colors"]
    assert recorded["answer_field"] == "gold"  # the run directory records the task it ran


def test_a_failed_start_leaves_nothing_and_a_retry_works(tmp_path, data_dir, tiny_build):
    bad = tmp_path / "bad"
    (bad / "arc_easy").mkdir(parents=True)
    (bad / "arc_easy" / "train.jsonl").write_text('{"id": "x"}\n')
    with pytest.raises(DataError, match="train.jsonl, line 1: missing field"):
        cli.dispatch(_args(tmp_path / "run", str(bad)))
    assert not (tmp_path / "run").exists()
    cli.dispatch(_args(tmp_path / "run", data_dir))
    assert (tmp_path / "run" / "results.json").exists()


def test_an_interrupted_run_resumes_past_crash_debris_and_keeps_what_was_done(finished, tmp_path, tiny_build, caplog):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    # a crash during round 2: its checkpoint half written, its metrics line cut, temp files left behind
    shutil.rmtree(run / "fedcollm" / "round_002")
    (run / "fedcollm" / "final.json").unlink()
    shutil.copytree(run / "fedcollm" / "round_001", run / "fedcollm" / "round_002.tmp")
    (run / "fedcollm" / "round_002.tmp" / "done.json").unlink()
    metrics = run / "fedcollm" / "metrics.jsonl"
    metrics.write_text(metrics.read_text().splitlines()[0] + '\n{"round": 2, "method": "fedc')
    (run / ".config.json.tmp").write_text("{")
    kept = _digest(run, ["config.json", "zero_shot", "fedcollm/round_001"])

    with caplog.at_level("WARNING"):
        cli.dispatch(["run", "--resume", str(run)])
    assert "metrics.jsonl, line 2: unreadable metrics line dropped" in caplog.text
    assert _digest(run, ["config.json", "zero_shot", "fedcollm/round_001"]) == kept
    assert [r["round"] for r in RunDir(run).read_metrics("fedcollm")] == [1, 2]
    refs = RunDir(finished).load_round("fedcollm", 1, {"llm": None, "slm": None})
    again, original = (RunDir(d).load_round("fedcollm", 2, refs) for d in (run, finished))
    assert all(states_equal(again[k], original[k]) for k in refs)  # same result as the uninterrupted run
    assert json.loads((run / "fedcollm" / "final.json").read_text()) == json.loads(
        (finished / "fedcollm" / "final.json").read_text())


@pytest.mark.parametrize("damage, expected", [
    (lambda r: (r / "config.json").unlink(), "already holds"),  # a new run into it: refused
    (lambda r: (r / "fedcollm" / "round_002" / "slm" / "adapter_model.safetensors").write_bytes(b"\0" * 9),
     "round_002/slm/adapter_model.safetensors: not a readable safetensors adapter"),
    (lambda r: (r / "fedcollm" / "round_002" / "llm" / "adapter_model.safetensors").write_bytes(b""),
     "round_002/llm/adapter_model.safetensors: not a readable safetensors adapter"),
])
def test_damage_never_changes_completed_work(finished, tmp_path, data_dir, tiny_build, damage, expected):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    damage(run)
    (run / "fedcollm" / "final.json").unlink()
    before = _digest(run, ["."])
    argv = _args(run, data_dir) if not (run / "config.json").exists() else ["run", "--resume", str(run)]
    with pytest.raises(RunDirError, match=expected):
        cli.dispatch(argv)
    assert _digest(run, ["."]) == before


def test_nan_checkpoint_is_refused_not_evaluated(finished, tmp_path, tiny_build):
    from safetensors.torch import load_file, save_file

    run = tmp_path / "run"
    shutil.copytree(finished, run)
    (run / "fedcollm" / "final.json").unlink()
    path = run / "fedcollm" / "round_002" / "slm" / "adapter_model.safetensors"
    state = load_file(path)
    next(iter(state.values())).fill_(float("nan"))
    save_file(state, path)
    with pytest.raises(RunDirError, match=f"{path}: .* holds NaN or Inf; refusing to use this checkpoint"):
        cli.dispatch(["run", "--resume", str(run)])
    assert not (run / "fedcollm" / "final.json").exists()


def test_every_curve_point_is_on_the_same_items(finished, make_workbench):
    records = RunDir(finished).read_metrics("fedcollm")
    assert [r["eval"]["slm"]["arc_easy"]["n"] for r in records] == [3, 6]  # round 1 cheap, last round all items
    assert [r["eval"][w]["arc_easy"]["curve"]["n"] for r in records for w in ("llm", "slm")] == [3, 3, 3, 3]
    zero = json.loads((finished / "zero_shot" / "final.json").read_text())
    assert zero["slm"]["arc_easy"]["curve"]["n"] == 3

    # the last round's curve point is exactly the accuracy of that round's adapter on the first 3 items
    from fedcollm.methods.base import evaluate_state

    wb = make_workbench(str(finished), data={"eval_limit": 6}, model={"lora": {"r": 8, "alpha": 16, "dropout": 0.0}})
    state = RunDir(finished).load_round("fedcollm", 2, {"slm": wb.slm_init})["slm"]
    on_three = evaluate_state(wb, "slm", state, 3, "check")["arc_easy"]
    assert records[-1]["eval"]["slm"]["arc_easy"]["curve"]["acc"] == on_three["acc"]
