"""benchmarks/channel.py's report on synthetic unit files: the pre-registered rule read on exact differences (a
channel exactly 1 point above both the start and the control moves the SLM), the Holm family as claims, and the
ceiling flag."""

from __future__ import annotations

import importlib
import json
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_toml

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def channel(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    return importlib.import_module("channel")


def _unit(folder: Path, name: str, correct: int, items: int = 100) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    outcome = "1" * correct + "0" * (items - correct)
    (folder / f"{name}-s0.json").write_text(json.dumps(
        {"unit": name, "final": {"arc_easy": {"acc": correct / items, "n": items, "correct": outcome}},
         "seconds": 1.0, "train_seconds": 0.0, "machine": {}, "dtype": "fp32"}))


def _plan(tmp_path: Path, data_dir: str, channel_names: list[str]) -> dict:
    (tmp_path / "base.toml").write_text(tiny_toml(data_dir))
    channels = [{"name": "control", "kind": "sft", "data": "aux"}] + [
        {"name": n, "kind": "choices", "data": "aux", "weight": 1.0} for n in channel_names]
    return {"config": str(tmp_path / "base.toml"), "results": tmp_path / "results", "runs": tmp_path / "runs",
            "setting": {}, "probe": {"channels": channels, "control": "control", "ceiling_points": 1.0,
                                     "seeds": [0], "resamples": 200, "steps": 2, "lr": 1e-3, "batch_size": 8,
                                     "eval_limit": 100, "rule": "test rule"}}


def test_exact_difference_and_the_rule_have_no_float_edge(channel):
    a, b = np.array([[1] * 31 + [0] * 69]), np.array([[1] * 30 + [0] * 70])
    assert channel.exact_difference(a, b) == Fraction(1, 100)
    exact = {("x", "start"): Fraction(1, 100), ("x", "control"): Fraction(1, 100),
             ("y", "start"): Fraction(2, 100), ("y", "control"): Fraction(99, 10_000)}
    assert channel.moved_channels(["x", "y"], exact, "control", 1.0) == ["x"]
    # 57 % against 56 % is exactly one point, but as a difference of float accuracies it falls short of 0.01
    a, b = np.array([[1] * 57 + [0] * 43]), np.array([[1] * 56 + [0] * 44])
    assert 0.57 - 0.56 < 0.01 and channel.exact_difference(a, b) == Fraction(1, 100)


def test_report_flags_the_ceiling_only_when_no_channel_clears_both_bars(channel, tmp_path, data_dir):
    plan = _plan(tmp_path, data_dir, ["exactly-one-point", "only-over-start"])
    probe_dir = plan["results"] / "probe"
    for name, correct in (("teacher", 50), ("start", 30), ("control", 31), ("exactly-one-point", 32),
                          ("only-over-start", 31)):
        _unit(probe_dir, name, correct)
    probe = channel.cmd_report(plan)
    assert probe["moved_by_1pt"] == ["exactly-one-point"] and probe["ceiling"] is False
    results = json.loads((plan["results"] / "results.json").read_text())
    assert results["setting"]["seeds"] == [0] and results["probe"]["ceiling"] is False
    claims = results["claims"]
    assert len(claims) == 5  # each channel against the start and the control, the control against the start
    assert all(set(c) >= {"model", "a", "b", "task", "diff", "holm_interval", "significant"} for c in claims)
    assert (plan["results"] / "probe.md").exists()

    _unit(probe_dir, "exactly-one-point", 31)  # now 1 point over the start, none over the control
    assert channel.cmd_report(plan)["ceiling"] is True
