import math
from dataclasses import replace
from importlib.util import find_spec

import pytest
import torch
from conftest import TINY_FEDMKT, tiny_config
from torch.optim.optimizer import register_optimizer_step_pre_hook

from fedcollm.algorithms.training import (
    PLAIN,
    choice_distill_steps,
    cycle_batches,
    distill_steps,
    mutual_distill,
    one_way_distill,
    public_topk,
    sft_steps,
)
from fedcollm.alignment.transfer import row_targets
from fedcollm.comm import states_equal
from fedcollm.config import TrainConfig
from fedcollm.data.batching import answer_logits, collate
from fedcollm.distill.losses import answer_ce, distill_kl
from fedcollm.engines.inprocess import run_method
from fedcollm.errors import ConfigError, ModelError
from fedcollm.evaluate import choice_logprobs
from fedcollm.models.loading import load_model
from fedcollm.models.lora import adapter_state, load_adapter_state
from fedcollm.models.tiny import tiny_pair
from fedcollm.runs import RunDir
from fedcollm.workbench import Workbench


def _kl_f_g(wb, n_batches=3) -> float:
    """Mean KL(P_f || P_g) on D^a batches, as the FedCoLLM server sees them."""
    batches = cycle_batches(wb.aux_data, 4, seed=123)
    vals = []
    with torch.no_grad():
        for _ in range(n_batches):
            b = next(batches)
            vals.append(distill_kl(answer_logits(wb.slm, b), answer_logits(wb.llm, b), b.target_mask).item())
    return sum(vals) / len(vals)


def test_lambda_zero_server_step_is_plain_sft(make_workbench):
    wb = make_workbench()
    d = wb.cfg.distill
    mutual_distill(wb.llm, wb.slm, wb.aux_data, d.steps(len(wb.aux_data)), 0.0, 1.0, "forward", 0, d.llm_lr, d.slm_lr, 4, seed=5)
    after_kd = adapter_state(wb.llm), adapter_state(wb.slm)

    load_adapter_state(wb.llm, wb.llm_init)
    load_adapter_state(wb.slm, wb.slm_init)
    sft_steps(wb.llm, wb.aux_data, d.steps(len(wb.aux_data)), d.llm_lr, 4, seed=5)
    sft_steps(wb.slm, wb.aux_data, d.steps(len(wb.aux_data)), d.slm_lr, 4, seed=5)
    for kd, sft in zip(after_kd, (adapter_state(wb.llm), adapter_state(wb.slm))):
        for key in kd:
            torch.testing.assert_close(kd[key], sft[key], rtol=1e-5, atol=1e-6)


def test_mutual_distillation_lowers_kl_and_moves_both_adapters(make_workbench):
    wb = make_workbench()
    sft_steps(wb.llm, wb.client_data[0], 20, 3e-2, 4, seed=0)  # make f differ from g before distilling
    wb.llm_init = adapter_state(wb.llm)
    before = _kl_f_g(wb)
    log = mutual_distill(wb.llm, wb.slm, wb.aux_data, 25, 5.0, 1.0, "forward", 0, 1e-2, 1e-2, 4, seed=1)
    after = _kl_f_g(wb)
    assert after < 0.9 * before, (before, after)  # measured: 1.09 -> 0.92
    assert not states_equal(adapter_state(wb.llm), wb.llm_init)
    assert not states_equal(adapter_state(wb.slm), wb.slm_init)
    assert log.stats[-1]["kl_g"] < log.stats[0]["kl_g"]


def test_base_weights_stay_frozen(make_workbench):
    wb = make_workbench()
    base = {n: p.clone() for n, p in wb.slm.named_parameters() if "lora_" not in n}
    sft_steps(wb.slm, wb.client_data[0], 3, 1e-2, 4, seed=0)
    assert all(torch.equal(p, base[n]) for n, p in wb.slm.named_parameters() if "lora_" not in n)
    assert all(not p.requires_grad for n, p in wb.slm.named_parameters() if "lora_" not in n)


def test_sft_lowers_training_loss(make_workbench):
    wb = make_workbench()
    log = sft_steps(wb.slm, wb.client_data[0], 30, 2e-2, 4, seed=0)
    assert sum(log.losses[-5:]) / 5 < sum(log.losses[:5]) / 5


# ---- [train]: every knob off trains as before; accumulation, checkpointing, schedule, clipping, autocast ---------

def _fingerprint(model) -> list[float]:
    """Sum and L2 norm of a model's adapter: what the recorded values pin."""
    state = adapter_state(model)
    return [float(sum(v.double().sum() for v in state.values())),
            float(sum((v.double() ** 2).sum() for v in state.values()).sqrt())]


def _train(path: str, wb, train: TrainConfig = PLAIN):
    """One training call of `path` on the tiny workbench (the calls the recorded values came from): its log and the
    models it trains."""
    if path == "sft":
        return sft_steps(wb.slm, wb.client_data[0], 6, 1e-2, 4, seed=3, train=train), [wb.slm]
    mutual = {"mutual_eval": (1.0, 1.0, "forward", 0, {"teacher_eval": True}),
              "mutual_fast": (0.5, 1.0, "forward", 0, {}),
              "mutual_topk": (1.0, 2.0, "reverse", 8, {"slm_kd_weight": 0.5})}
    if path in mutual:
        kd, temp, direction, top_k, extra = mutual[path]
        return mutual_distill(wb.llm, wb.slm, wb.aux_data, 5, kd, temp, direction, top_k, 1e-2, 2e-2, 4, seed=4,
                              train=train, **extra), [wb.llm, wb.slm]
    if path == "one_way":
        return one_way_distill(wb.slm, wb.llm, wb.aux_data, 5, 2.0, 1.5, "forward", 0, 2e-2, 4, 6, "g",
                               train=train), [wb.slm]
    if path == "distill":  # FedMKT's loss; every third example without a target (CE alone)
        top = public_topk(wb.llm, wb.aux_data, 8, len(wb.tokenizer), 4)
        targets = [t if i % 3 else None for i, t in enumerate(row_targets(top, wb.aux_data.encoded, 1.0))]
        return distill_steps(wb.slm, wb.aux_data, targets, 1.5, 2e-2, 4, 0.3, seed=7, train=train), [wb.slm]
    # choice-level distillation, every other item unlabelled
    items = [ex if i % 2 else replace(ex, answer=-1) for i, ex in enumerate(wb.split.aux[:10])]
    teacher = choice_logprobs(wb.llm, wb.tokenizer, items, 64)
    return choice_distill_steps(wb.slm, wb.tokenizer, items, teacher, 5, 2e-2, 4, 0.7, 1.5, 8, 64,
                                train=train), [wb.slm]


PATHS = ["sft", "mutual_eval", "mutual_fast", "mutual_topk", "one_way", "distill", "choice"]
RECORDED = {  # losses and (sum, norm) of each trained adapter, run before [train] existed, LoRA dropout 0.1
    "sft": ([6.7708964348, 6.1694612503, 6.4389791489, 6.1419820786, 6.5074944496, 6.8267126083],
            [[-0.347189205, 1.7539788905]]),
    "mutual_eval": ([15.8019877672, 15.421984911, 15.1318479776, 15.2834460735, 14.6152751446],
                    [[-3.8022890407, 3.334973633], [1.5312954911, 2.1205689324]]),
    "mutual_fast": ([14.7131071687, 14.3230546117, 14.0228537321, 14.2099522352, 13.541324079],
                    [[-4.1002095821, 3.3371841714], [1.490602843, 2.1114749193]]),
    "mutual_topk": ([14.4816125333, 14.0345872492, 13.7659244537, 13.9665073007, 13.2329576463],
                    [[-4.0642058997, 3.3231048449], [1.9296224713, 2.1129969569]]),
    "one_way": ([8.7090187073, 8.6721076965, 8.5295829773, 8.5985193253, 8.5024681091], [[1.6908469461, 2.204098091]]),
    "distill": ([6.5673675537, 6.5242571831, 6.4285211563], [[0.661062577, 1.8008105128]]),
    "choice": ([7.1311159134, 6.7298269272, 6.8386983871, 6.4756598473, 6.1688961983], [[-2.5918289386, 2.0808914959]]),
}


@pytest.mark.parametrize("path", PATHS)
def test_every_path_with_the_train_knobs_off_reproduces_the_values_recorded_before_they_existed(make_workbench, path):
    """Same losses, same adapters, LoRA dropout on (so the RNG stream is pinned too)."""
    wb = make_workbench(model={"lora": {"r": 4, "alpha": 8, "dropout": 0.1}})
    log, models = _train(path, wb)
    losses, fingerprints = RECORDED[path]
    assert log.losses == pytest.approx(losses, rel=1e-4)
    assert [_fingerprint(m) for m in models] == [pytest.approx(f, rel=1e-4) for f in fingerprints]


def test_sft_with_the_knobs_off_is_a_plain_adamw_loop(make_workbench):
    wb = make_workbench(model={"lora": {"r": 4, "alpha": 8, "dropout": 0.1}})
    log = sft_steps(wb.slm, wb.client_data[0], 4, 1e-2, 4, seed=3)
    trained = adapter_state(wb.slm)

    load_adapter_state(wb.slm, wb.slm_init)
    torch.manual_seed(3)
    opt = torch.optim.AdamW([p for p in wb.slm.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    wb.slm.train()
    batches, losses = cycle_batches(wb.client_data[0], 4, seed=3), []
    for _ in range(4):
        batch = next(batches)
        opt.zero_grad()
        loss = answer_ce(answer_logits(wb.slm, batch), batch.targets, batch.target_mask)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert log.losses == losses
    assert states_equal(trained, adapter_state(wb.slm))


def test_a_micro_batch_is_what_collate_makes_of_its_rows(make_workbench):
    wb = make_workbench()
    data = wb.client_data[0]
    rows = data.encoded[:5]
    whole = collate(rows, data.pad_id)
    for part, alone in zip([whole.rows(slice(0, 2)), whole.rows(slice(2, 5))], [rows[:2], rows[2:]]):
        expected = collate(alone, data.pad_id)
        for name in ("input_ids", "attention_mask", "position_ids", "targets", "target_mask"):
            assert torch.equal(getattr(part, name), getattr(expected, name)), name
    assert len(whole) == 5 and whole.tokens == sum(n for _, n in rows)


@pytest.mark.parametrize("lean", [TrainConfig(micro_batch_size=3),
                                  TrainConfig(micro_batch_size=3, gradient_checkpointing=True)],
                         ids=["accumulation", "accumulation_and_checkpointing"])
@pytest.mark.parametrize("path", PATHS)
def test_micro_batches_step_as_their_whole_batch(make_workbench, path, lean):
    """Batches of 4 as micro-batches of 3 + 1 (uneven, so each must be weighted by its share of the tokens or items,
    not by 1/k), with and without checkpointing: the same losses, the same gradients at the first step, and the same
    adapters after every step within float tolerance. Adam divides each gradient element by its own magnitude, so
    where one is near zero it turns fp32 rounding into a visible part of a learning-rate-sized step; hence the
    adapters' atol of 1% of it."""
    runs = []
    for train in (PLAIN, lean):
        wb, grads = make_workbench(), []
        hook = _recording_steps(grads, lambda opt: [p.grad.clone() for g in opt.param_groups for p in g["params"]])
        try:
            log, models = _train(path, wb, train)
        finally:
            hook.remove()
        runs.append((log.losses, grads[:len(models)], [adapter_state(m) for m in models]))
    (losses, first, states), (micro_losses, micro_first, micro_states) = runs
    assert micro_losses == pytest.approx(losses, rel=1e-5)
    for whole, micro in zip(sum(first, []), sum(micro_first, [])):
        torch.testing.assert_close(micro, whole, rtol=0, atol=1e-5 * whole.abs().max().item())
    for state, micro in zip(states, micro_states):
        for key in state:
            torch.testing.assert_close(micro[key], state[key], rtol=1e-3, atol=2e-4)


def test_checkpointing_recomputes_the_layers_and_gives_the_same_gradients(make_workbench):
    """Mutual distillation with eval-mode teachers and LoRA dropout: with checkpointing the LLM's first attention
    runs once more (the recompute, with the same dropout masks), gradients agree, and the model is left as it was."""
    grads, losses = {}, {}
    for on in (False, True):
        wb = make_workbench(model={"lora": {"r": 4, "alpha": 8, "dropout": 0.1}})
        calls = []
        hook = wb.llm.base_model.model.model.layers[0].self_attn.register_forward_hook(lambda *_: calls.append(1))
        log = mutual_distill(wb.llm, wb.slm, wb.aux_data, 1, 1.0, 1.0, "forward", 0, 1e-2, 1e-2, 4, seed=0,
                             teacher_eval=True, train=TrainConfig(gradient_checkpointing=on))
        hook.remove()
        assert len(calls) == (3 if on else 2)  # the teacher's forward, the training forward (and its recompute)
        assert not wb.llm.is_activation_checkpointing and not wb.slm.is_activation_checkpointing
        losses[on] = log.losses
        grads[on] = [p.grad for m in (wb.llm, wb.slm) for p in m.parameters() if p.requires_grad]
    assert losses[True] == pytest.approx(losses[False], rel=1e-6)
    for on, off in zip(grads[True], grads[False]):
        torch.testing.assert_close(on, off, rtol=1e-5, atol=1e-7)


def _recording_steps(into: list, what):
    """A global optimizer pre-step hook appending `what(optimizer)` at every step."""
    return register_optimizer_step_pre_hook(lambda opt, args, kwargs: into.append(what(opt)))


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine"])
def test_the_learning_rate_follows_its_schedule_over_the_steps_of_one_call(make_workbench, schedule):
    steps, warmup, lr = 8, 2, 1e-2  # warmup_ratio 0.25 of 8 steps
    decay = {"constant": lambda p: 1.0, "linear": lambda p: 1.0 - p, "cosine": lambda p: 0.5 * (1 + math.cos(math.pi * p))}
    expected = [lr * (s / warmup if s < warmup else decay[schedule]((s - warmup) / (steps - warmup)))
                for s in range(steps)]
    wb, seen = make_workbench(), []
    hook = _recording_steps(seen, lambda opt: opt.param_groups[0]["lr"])
    try:
        sft_steps(wb.slm, wb.client_data[0], steps, lr, 4, seed=0,
                  train=TrainConfig(lr_schedule=schedule, warmup_ratio=0.25))
    finally:
        hook.remove()
    assert seen == pytest.approx(expected, abs=1e-12)


def test_clipping_bounds_each_models_gradient_and_so_its_update(make_workbench):
    """A bound far below the gradients' norm: each model's gradient reaches its optimizer at that norm (the LLM's
    and the SLM's apart), and Adam's first update, lr x g / (|g| + eps), shrinks with it."""
    def grad_norm(opt) -> float:
        return torch.linalg.vector_norm(torch.stack([p.grad.norm() for g in opt.param_groups for p in g["params"]
                                                     if p.grad is not None])).item()

    moved = {}
    for bound in (0.0, 1e-9):
        wb, norms = make_workbench(), []
        hook = _recording_steps(norms, grad_norm)
        try:
            mutual_distill(wb.llm, wb.slm, wb.aux_data, 1, 1.0, 1.0, "forward", 0, 1e-2, 1e-2, 4, seed=0,
                           train=TrainConfig(max_grad_norm=bound))
        finally:
            hook.remove()
        assert len(norms) == 2 and (all(n > 1e-3 for n in norms) if not bound else
                                    norms == pytest.approx([bound, bound], rel=1e-3))
        moved[bound] = [sum((a - b).norm() ** 2 for a, b in zip(adapter_state(m).values(), init.values())) ** 0.5
                        for m, init in ((wb.llm, wb.llm_init), (wb.slm, wb.slm_init))]
    assert all(clipped < 0.01 * free for clipped, free in zip(moved[1e-9], moved[0.0])), moved


def test_autocast_is_refused_off_cuda(data_dir, tokenizer, make_workbench):
    with pytest.raises(ConfigError, match="train.autocast: bf16 runs on CUDA only, but model.device = cpu"):
        tiny_config(data_dir, train={"autocast": "bf16"})
    with pytest.raises(ConfigError, match="model.dtype = bf16 weights into the other half precision"):
        tiny_config(data_dir, model={"device": "auto", "dtype": "bf16"}, train={"autocast": "fp16"})
    if not torch.cuda.is_available():  # model.device = auto resolves to the CPU: refused before anything runs
        cfg = tiny_config(data_dir, model={"device": "auto"}, train={"autocast": "fp16"})
        with pytest.raises(ConfigError, match="train.autocast = fp16 runs on CUDA only, but the model is on cpu"):
            Workbench.from_models(cfg, *tiny_pair(seed=0), tokenizer)
    wb = make_workbench()
    with pytest.raises(ConfigError, match="runs on CUDA only"):
        sft_steps(wb.slm, wb.client_data[0], 1, 1e-2, 4, seed=0, train=TrainConfig(autocast="bf16"))


@pytest.mark.parametrize("field, value", [("micro_batch_size", -1), ("lr_schedule", "step"), ("warmup_ratio", 1.0),
                                          ("max_grad_norm", -0.1), ("autocast", "fp8")])
def test_train_knobs_are_validated(data_dir, field, value):
    with pytest.raises(ConfigError, match=f"train.{field}"):
        tiny_config(data_dir, train={field: value})


def test_quantized_weights_without_bitsandbytes_fail_at_load_naming_the_fix(data_dir, tmp_path):
    with pytest.raises(ConfigError, match="model.quantize"):
        tiny_config(data_dir, model={"quantize": "2bit"})
    if find_spec("bitsandbytes"):
        pytest.skip("bitsandbytes is installed (tests/test_cuda.py trains on quantized weights)")
    tiny_pair(seed=0)[1].save_pretrained(tmp_path)
    with pytest.raises(ModelError, match=r"model.quantize = 4bit needs bitsandbytes.*pip install 'fedcollm\[quant\]'"):
        load_model(str(tmp_path), quantize="4bit")


def test_every_training_call_of_every_method_steps_with_the_configured_knobs(make_workbench, monkeypatch, tmp_path):
    """One round of each training method (client SFT, FedCoLLM's server distillation, FedMKT's on both sides,
    Centralized): every Stepper gets the run's [train] table."""
    from fedcollm.algorithms import training

    seen = []

    class Recording(training.Stepper):
        def __init__(self, optimizers, train=PLAIN, steps=1):
            seen.append(train)
            super().__init__(optimizers, train, steps)

    monkeypatch.setattr(training, "Stepper", Recording)
    train = {"micro_batch_size": 3, "gradient_checkpointing": True, "lr_schedule": "cosine", "warmup_ratio": 0.1,
             "max_grad_norm": 1.0}
    for method in ("centralized", "fedcollm", "fedmkt"):
        seen.clear()
        wb = make_workbench(str(tmp_path / method), run={"methods": [method], "eval_every": 0},
                            federation={"rounds": 1}, data={"eval_limit": 2}, fedmkt=TINY_FEDMKT, train=train)
        run_method(wb, method, RunDir(tmp_path / method))
        assert seen and all(t is wb.cfg.train for t in seen), method
        assert len(seen) == {"centralized": 1, "fedcollm": 4, "fedmkt": 7}[method]
