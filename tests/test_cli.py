import json

import pytest

from fedcollm import cli
from fedcollm.config import Config


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


def _main(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    return exit_info.value.code


def test_bad_input_is_one_line_with_its_traceback_in_the_cache_log(capsys, tmp_path, monkeypatch):
    """No run directory yet: the traceback goes to the cache's errors.log, named in the one line (d614e59 wrote
    the line but kept no traceback anywhere)."""
    monkeypatch.setenv("FEDCOLLM_CACHE", str(tmp_path / "cache"))
    assert _main(["run", "--set", "federation.clients=0"]) == 2
    log = tmp_path / "cache" / "errors.log"
    assert capsys.readouterr().err == f"fedcollm: error: --set: federation.clients: must be >= 1 (traceback in {log})\n"
    assert "Traceback" in log.read_text() and "ConfigError: --set: federation.clients" in log.read_text()


def test_an_error_in_a_started_run_is_logged_in_its_directory(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("FEDCOLLM_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(Config().to_json())
    assert _main(["report", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.endswith(f"results file not found (traceback in {run / 'errors.log'})\n")
    assert "RunDirError" in (run / "errors.log").read_text() and not (tmp_path / "cache").exists()


def test_an_unexpected_exception_is_one_line_too(capsys, tmp_path, monkeypatch):
    """A bug (or bad input no check caught) is no traceback on the terminal either: against d614e59 anything but
    a FedcollmError, e.g. the RecursionError of a deeply nested data row, printed a raw traceback."""
    def bug(cfg):
        raise KeyError("timing")

    monkeypatch.setenv("FEDCOLLM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(cli, "run_experiment", bug)
    assert _main(["run", "--out", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err
    assert err == (f"fedcollm: internal error (KeyError; please report it): 'timing' "
                   f"(traceback in {tmp_path / 'cache' / 'errors.log'})\n")
    assert "in bug" in (tmp_path / "cache" / "errors.log").read_text()
    assert not (tmp_path / "run").exists()


def test_bare_fedcollm_lists_the_commands_and_runs_nothing(capsys, monkeypatch):
    """Bare `fedcollm` used to start the demo (minutes of work and a runs/demo directory); now it prints the usage
    with every command and exits 2, as argparse does for a missing argument."""
    def started(cfg):
        raise AssertionError("bare fedcollm started a run")

    monkeypatch.setattr(cli, "run_experiment", started)
    for argv in ([], ["-v"]):
        assert _main(argv) == 2
        out, err = capsys.readouterr()
        assert out == "" and err.startswith("usage: fedcollm")
        assert all(command in err for command in ("run", "derive-slm", "eval", "report", "config-doc"))
        assert err.endswith("fedcollm: error: name a command; `fedcollm run` runs the embedded demo\n")


def test_fedcollm_run_alone_runs_the_embedded_demo(monkeypatch):
    from fedcollm.experiment import default_config_path

    started = []
    monkeypatch.setattr(cli, "run_experiment", started.append)
    cli.main(["run"])
    assert started == [Config.from_toml(default_config_path())] and started[0].run.out_dir == "runs/demo"
