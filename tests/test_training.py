import torch

from fedcollm.algorithms.training import cycle_batches, mutual_distill, sft_steps
from fedcollm.comm import states_equal
from fedcollm.data.batching import answer_logits
from fedcollm.distill.losses import distill_kl
from fedcollm.models.lora import adapter_state, load_adapter_state


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
