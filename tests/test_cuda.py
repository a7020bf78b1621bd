"""The CUDA code path on tiny models: every method, bf16, FedMKT across tokenizers, DP and SecAgg+, and the
[train] knobs that need a GPU (autocast, fp16 loss scaling) or bitsandbytes (quantized base weights).

Skipped where torch sees no GPU (CI has none); run on a GPU machine with `pytest tests/test_cuda.py`. What crosses
the wire and what is checkpointed stays on the CPU (adapter_state copies there), so these tests pin down that a run
on the GPU trains there, keeps its states on the CPU and, in fp32, matches the same run on the CPU.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import TINY_FEDMKT, hetero_models, tiny_config

from fedcollm.algorithms.training import (
    Stepper,
    cycle_batches,
    mutual_distill,
    mutual_distill_step,
    sft_steps,
)
from fedcollm.config import TrainConfig
from fedcollm.engines.inprocess import run_method
from fedcollm.errors import ConfigError
from fedcollm.methods import REGISTRY
from fedcollm.models.loading import load_model, resolve_device, resolve_dtype
from fedcollm.models.lora import adapter_state
from fedcollm.models.tiny import tiny_llama, tiny_pair
from fedcollm.runs import RunDir
from fedcollm.workbench import Workbench

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CUDA = torch.device("cuda")
METHODS = list(REGISTRY)


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


# ---- [train] on the GPU -----------------------------------------------------------------------------------------

def _paths(wb: Workbench, train: TrainConfig) -> list[float]:
    """Client SFT then mutual distillation (eval-mode teachers) on the tiny pair: their losses."""
    sft = sft_steps(wb.slm, wb.client_data[0], 4, 1e-2, 4, seed=0, train=train)
    kd = mutual_distill(wb.llm, wb.slm, wb.aux_data, 3, 1.0, 1.0, "forward", 0, 1e-2, 1e-2, 4, seed=0,
                        teacher_eval=True, train=train)
    return sft.losses + kd.losses


@pytest.mark.parametrize("mode", ["bf16", "fp16"])
def test_autocast_trains_close_to_fp32(data_dir, tokenizer, tmp_path, mode):
    losses = {autocast: _paths(_workbench(data_dir, tokenizer, tmp_path / autocast, CUDA, torch.float32),
                               TrainConfig(autocast=autocast)) for autocast in ("off", mode)}
    assert all(math.isfinite(x) for x in losses[mode])
    assert losses[mode] == pytest.approx(losses["off"], rel=5e-2)


def test_fp16_autocast_steps_through_a_loss_scaler_and_clips_unscaled_gradients(data_dir, tokenizer, tmp_path):
    wb = _workbench(data_dir, tokenizer, tmp_path, CUDA, torch.float32)
    opts = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2) for m in (wb.llm, wb.slm)]
    stepper = Stepper(opts, TrainConfig(autocast="fp16", max_grad_norm=0.01))
    wb.llm.train()
    wb.slm.train()
    stats = mutual_distill_step(wb.llm, wb.slm, next(cycle_batches(wb.aux_data, 4, seed=0)), stepper, 1.0, 1.0,
                                "forward", 0)
    assert stepper.scaler.is_enabled() and stepper.scaler.get_scale() > 1
    assert all(math.isfinite(v) for v in stats.values())
    for opt in opts:  # clipped after unscaling: the bound holds for the gradient the step used, not a scaled one
        norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in opt.param_groups[0]["params"]]))
        assert norm.item() <= 0.01 * (1 + 1e-3)


def test_autocast_refuses_weights_in_the_other_half_precision(data_dir, tokenizer, tmp_path):
    with pytest.raises(ConfigError, match="train.autocast = fp16 would recast the model's torch.bfloat16 weights"):
        _workbench(data_dir, tokenizer, tmp_path, CUDA, torch.bfloat16, model={"device": "cuda"},
                   train={"autocast": "fp16"})


def test_checkpointing_and_accumulation_on_the_gpu_step_as_the_plain_step(data_dir, tokenizer, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    runs = {}
    for name, train in (("plain", TrainConfig()), ("lean", TrainConfig(gradient_checkpointing=True, micro_batch_size=3))):
        wb = _workbench(data_dir, tokenizer, tmp_path / name, CUDA, torch.float32)
        runs[name] = (_paths(wb, train), [adapter_state(m) for m in (wb.llm, wb.slm)])
    assert runs["lean"][0] == pytest.approx(runs["plain"][0], rel=1e-4)
    for plain, lean in zip(runs["plain"][1], runs["lean"][1]):
        for key in plain:  # Adam turns rounding in near-zero gradient elements into lr-scaled steps (test_training)
            torch.testing.assert_close(lean[key], plain[key], rtol=1e-3, atol=2e-4)


@pytest.mark.parametrize("bits", ["4bit", "8bit"])
def test_lora_trains_over_quantized_base_weights(data_dir, tokenizer, tmp_path, bits):
    pytest.importorskip("bitsandbytes")
    tiny_llama(hidden=64, layers=3, seed=0).save_pretrained(tmp_path / "llm")
    llm = load_model(str(tmp_path / "llm"), torch.bfloat16, CUDA, bits)
    assert any(type(m).__name__ in ("Linear4bit", "Linear8bitLt") for m in llm.modules())
    slm = tiny_pair(seed=0)[1].to(CUDA)
    cfg = tiny_config(data_dir, str(tmp_path), model={"device": "cuda", "quantize": bits})
    wb = Workbench.from_models(cfg, llm, slm, tokenizer)
    train = TrainConfig(gradient_checkpointing=True, micro_batch_size=2, autocast="bf16")
    losses = _paths(wb, train) + sft_steps(wb.llm, wb.aux_data, 3, 1e-2, 4, seed=0, train=train).losses
    assert all(math.isfinite(x) for x in losses)
    assert any(not torch.equal(v, wb.llm_init[k]) for k, v in adapter_state(wb.llm).items())
