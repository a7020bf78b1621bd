"""The CUDA code path on tiny models: every method, bf16, FedMKT across tokenizers, DP and SecAgg+.

Skipped where torch sees no GPU (CI has none); run on a GPU machine with `pytest tests/test_cuda.py`. What crosses
the wire and what is checkpointed stays on the CPU (adapter_state copies there), so these tests pin down that a run
on the GPU trains there, keeps its states on the CPU and, in fp32, matches the same run on the CPU.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import TINY_FEDMKT, hetero_models, tiny_config

from fedcollm.engines.inprocess import run_method
from fedcollm.models.loading import resolve_device, resolve_dtype
from fedcollm.models.tiny import tiny_pair
from fedcollm.runs import RunDir
from fedcollm.workbench import Workbench

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CUDA = torch.device("cuda")
METHODS = ["zero_shot", "standalone", "fedavg", "centralized", "fedcollm", "fedmkt"]


def _workbench(data_dir, tokenizer, out, device, dtype, client_slms=None, **sections) -> Workbench:
    llm, slm = (m.to(device, dtype) for m in tiny_pair(seed=0))
    if client_slms:
        client_slms = {name: (m.to(device, dtype), tok) for name, (m, tok) in client_slms.items()}
    return Workbench.from_models(tiny_config(data_dir, str(out), **sections), llm, slm, tokenizer,
                                 client_slms=client_slms)


def _accuracies(final: dict) -> list[float]:
    rows = [final.get("llm"), final.get("slm"), *final.get("slm_clients", {}).values()]
    return [task["acc"] for row in rows if row for task in row.values()]


def _states_on_cpu(run: RunDir, method: str, wb: Workbench) -> tuple[dict, dict]:
    """The last round's adapters (each state the method saved) and their initial values."""
    last = run.last_completed_round(method, wb.cfg.federation.rounds)
    refs = {d.name: wb.held(d.name).init for d in run.round_dir(method, last).iterdir() if d.is_dir()}
    states = run.load_round(method, last, refs)
    assert all(t.device.type == "cpu" for state in states.values() for t in state.values())
    return states, refs


def test_auto_picks_cuda_and_bf16():
    assert resolve_device("auto") == CUDA
    expected = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    assert resolve_dtype("auto", CUDA) == expected


def test_every_method_trains_on_the_gpu_in_bf16(data_dir, tokenizer, tmp_path):
    wb = _workbench(data_dir, tokenizer, tmp_path, CUDA, torch.bfloat16, run={"methods": METHODS}, fedmkt=TINY_FEDMKT)
    assert next(wb.llm.parameters()).device.type == CUDA.type
    run = RunDir(tmp_path)
    for method in METHODS:
        final = run_method(wb, method, run)
        accs = _accuracies(final)
        assert accs and all(0 <= a <= 1 for a in accs), (method, final)
        if method == "zero_shot":
            continue
        records = run.read_metrics(method)
        assert [r["round"] for r in records] == [1, 2]
        states, refs = _states_on_cpu(run, method, wb)
        trained = [name for name, state in states.items()
                   if any(not torch.equal(state[k], refs[name][k]) for k in state)]
        assert trained, f"{method}: no adapter changed on the GPU"
        assert all(math.isfinite(v.float().abs().max().item()) for s in states.values() for v in s.values())


def test_fp32_on_the_gpu_matches_the_cpu(data_dir, tokenizer, tmp_path, monkeypatch):
    """Same seed, same data order: one FedCoLLM round's adapters agree to float tolerance across devices."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    sections = {"run": {"methods": ["fedcollm"]}, "federation": {"rounds": 1}}
    finals = {}
    for device in ("cpu", "cuda"):
        wb = _workbench(data_dir, tokenizer, tmp_path / device, torch.device(device), torch.float32, **sections)
        run = RunDir(tmp_path / device)
        run_method(wb, "fedcollm", run)
        finals[device] = run.load_round("fedcollm", 1, {"llm": wb.llm_init, "slm": wb.slm_init})
    for which in ("llm", "slm"):
        for key, cpu in finals["cpu"][which].items():
            torch.testing.assert_close(finals["cuda"][which][key], cpu, rtol=1e-3, atol=1e-4, msg=f"{which} {key}")


def test_fedmkt_across_tokenizers_on_the_gpu(data_dir, tokenizer, client_tokenizers, tmp_path):
    wb = _workbench(data_dir, tokenizer, tmp_path, CUDA, torch.bfloat16, client_slms=hetero_models(client_tokenizers),
                    model={"client_slms": ["tiny-llama", "tiny-qwen2", "tiny-llama"]}, run={"methods": ["fedmkt"]},
                    fedmkt=TINY_FEDMKT)
    run = RunDir(tmp_path)
    final = run_method(wb, "fedmkt", run)
    records = run.read_metrics("fedmkt")
    assert [r["teachers"] for r in records] == [3, 3] and all(0 < r["aligned_fraction"] < 1 for r in records)
    assert set(final["slm_clients"]) == {"client_0", "client_1", "client_2"}


def test_dp_and_secagg_on_the_gpu(data_dir, tokenizer, tmp_path):
    pytest.importorskip("flwr")
    wb = _workbench(data_dir, tokenizer, tmp_path, CUDA, torch.float32, run={"methods": ["fedavg"]},
                    dp={"noise_multiplier": 1.1, "clip_norm": 0.05}, secagg={"enabled": True})
    run = RunDir(tmp_path)
    run_method(wb, "fedavg", run)
    records = run.read_metrics("fedavg")
    assert all(r["dp"]["epsilon"] > 0 and r["accepted"] == 3 and r["dropped"] == 0 for r in records)  # counts under DP
    _states_on_cpu(run, "fedavg", wb)
