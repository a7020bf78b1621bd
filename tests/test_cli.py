import json

import pytest

from fedcollm import cli


def _args(tmp_path, data_dir, *extra):
    return ["run", "--out", str(tmp_path / "run"), "--set", f"data.data_dir='{data_dir}'",
            "--set", "data.train_per_task=24", "--limit", "4", "--set", "federation.clients=2",
            "--set", "distill.epochs=1", "--set", "model.max_length=64", "--set", "model.lora.dropout=0.0",
            "--set", "run.methods=['zero_shot','fedavg','fedcollm']", *extra]


def test_run_writes_results_in_the_documented_schema(tiny_build, tmp_path, data_dir, capsys):
    cli.main(_args(tmp_path, data_dir))
    out = tmp_path / "run"
    res = json.loads((out / "results.json").read_text())
    assert set(res["setting"]) >= {"llm", "slm", "clients", "rounds", "limit", "seed"}
    assert res["tasks"] == ["arc_easy"] and res["n_eval"] == {"arc_easy": 4}
    assert set(res["llm"]) == {"zero_shot", "fedcollm"} and set(res["slm"]) == {"zero_shot", "fedavg", "fedcollm"}
    comm = res["communication"]
    assert 0 < comm["adapter_percent"] < 100 and comm["bytes_up_per_round"] > 4 * comm["adapter_params"]
    assert set(res["timing"]) >= {"round_s", "client_train_s", "aggregate_s", "server_kd_s", "eval_s",
                                  "overhead_fraction", "kd_step_s", "fwd_bwd_f_s", "fwd_bwd_g_s"}
    assert (out / "results.md").exists() and (out / "accuracy.png").exists()
    assert (out / "fedcollm" / "round_002" / "slm" / "adapter_config.json").exists()
    assert "Table 1" in capsys.readouterr().out


def test_rerun_into_an_existing_run_refuses_and_resume_finishes(tiny_build, tmp_path, data_dir, capsys):
    cli.main(_args(tmp_path, data_dir))
    with pytest.raises(SystemExit) as exit_info:
        cli.main(_args(tmp_path, data_dir))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.splitlines()[-1].startswith("fedcollm: error: ") and "--resume" in err.splitlines()[-1]
    first = (tmp_path / "run" / "results.json").read_text()
    cli.main(["run", "--resume", str(tmp_path / "run")])  # everything done: reuses final evaluations
    assert json.loads((tmp_path / "run" / "results.json").read_text())["llm"] == json.loads(first)["llm"]


def test_bad_override_is_one_line_naming_the_field(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["run", "--set", "federation.clients=0"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "fedcollm: error: --set: federation.clients: must be >= 1\n"
