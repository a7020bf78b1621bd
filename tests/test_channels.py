"""Issue 27: the faithful FedCoLLM server phase (eval-mode teachers, separate SLM/LLM weights and temperatures,
FATE-LLM's sequential schedule) and the channels that can carry more than the label (choice-level distillation,
the unlabelled public pool), pure pieces first, then on tiny models."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from fedcollm.algorithms.training import (
    Stepper,
    choice_distill_steps,
    cycle_batches,
    mutual_distill_step,
    one_way_distill,
    unit_seed,
)
from fedcollm.comm import states_equal
from fedcollm.config import Config
from fedcollm.data.batching import answer_logits
from fedcollm.distill.losses import (
    answer_ce,
    choice_distill_loss,
    choice_kl,
    distill_kl,
    mutual_losses,
    pad_choices,
)
from fedcollm.errors import ConfigError
from fedcollm.evaluate import choice_logprobs, choice_requests, packed_choice_logprobs
from fedcollm.methods.federated import FedCoLLM
from fedcollm.models.lora import adapter_state, load_adapter_state

# ---- pure losses -----------------------------------------------------------------------------------------------


def test_choice_kl_is_zero_on_agreement_and_ignores_missing_choices():
    s = pad_choices([torch.tensor([-1.0, -2.0, -3.0]), torch.tensor([-1.0, -2.0, -3.0, -4.0])])
    assert s[0, 3] == -torch.inf
    assert choice_kl(s, s) == 0
    student = torch.tensor([[-1.0, -2.0, -3.0, -torch.inf]], requires_grad=True)
    teacher = torch.tensor([[-3.0, -1.0, -2.0, -torch.inf]])
    loss = choice_kl(student, teacher, temperature=2.0)
    loss.backward()
    assert loss > 0 and torch.isfinite(student.grad).all() and student.grad[0, 3] == 0
    # the teacher prefers choice 1: descending the gradient raises the student's choice 1 and lowers choice 0
    assert student.grad[0, 1] < 0 < student.grad[0, 0]
    t = torch.tensor([-3.0, -1.0, -2.0]) / 2
    expected = (t.softmax(-1) * (t.log_softmax(-1) - (torch.tensor([-1.0, -2.0, -3.0]) / 2).log_softmax(-1))).sum()
    torch.testing.assert_close(loss, expected * 4)


def test_choice_distill_loss_uses_the_label_only_where_there_is_one():
    scores = [torch.tensor([-2.0, -4.0]), torch.tensor([-1.0, -3.0, -5.0])]
    teacher = pad_choices([torch.tensor([-2.0, -4.0]), torch.tensor([-3.0, -1.0, -5.0])])
    loss, stats = choice_distill_loss(scores, teacher, [1, -1], [2, 0], kd_weight=0.5)
    assert stats["ce"] == pytest.approx(4.0 / 2)  # only item 0 is labelled: its gold choice over its 2 tokens
    assert loss.item() == pytest.approx(stats["ce"] + 0.5 * stats["kl"])
    _, unlabelled = choice_distill_loss(scores, teacher, [-1, -1], [0, 0], kd_weight=1.0)
    assert unlabelled["ce"] == 0 and unlabelled["kl"] == pytest.approx(stats["kl"])


def test_mutual_losses_take_separate_slm_weight_temperature_and_targets():
    torch.manual_seed(0)
    f, g = torch.randn(2, 3, 11), torch.randn(2, 3, 11)
    targets, mask = torch.randint(0, 11, (2, 3)), torch.tensor([[0, 1, 1], [1, 1, 1]])
    loss_f, loss_g, stats = mutual_losses(f, g, targets, mask, kd_weight=0.7, slm_kd_weight=0.0)
    assert loss_g.item() == pytest.approx(answer_ce(g, targets, mask).item())  # lambda_g = 0: the SLM's CE alone
    assert loss_f.item() == pytest.approx(stats["ce_f"] + 0.7 * stats["kl_f"], rel=1e-5)
    teacher = torch.randn(2, 3, 11)
    _, loss_g, stats = mutual_losses(f, g, targets, mask, 1.0, slm_temperature=2.0, llm_teacher=teacher)
    assert stats["kl_g"] == pytest.approx(distill_kl(g, teacher, mask, 2.0).item(), rel=1e-5)
    assert stats["kl_f"] == pytest.approx(distill_kl(f, g, mask, 1.0).item(), rel=1e-5)


# ---- choice scoring with gradients ------------------------------------------------------------------------------

def test_packed_scores_with_gradients_equal_the_evaluation_scores(make_workbench):
    wb = make_workbench()
    items = wb.split.aux[:5]
    expected = choice_logprobs(wb.slm, wb.tokenizer, items, wb.cfg.model.max_length, batch_size=2)
    requests = choice_requests(wb.tokenizer, items, wb.cfg.model.max_length)
    got = packed_choice_logprobs(wb.slm, requests, wb.tokenizer.pad_token_id)
    for e, g in zip(expected, got):
        torch.testing.assert_close(g.detach(), torch.tensor(e), rtol=1e-5, atol=1e-5)
    sum(x.sum() for x in got).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in wb.slm.parameters() if p.requires_grad)


def test_choice_distillation_moves_the_student_towards_the_teachers_ranking(make_workbench):
    wb = make_workbench()
    items, max_len = [replace(ex, answer=-1) for ex in wb.split.aux[:8]], wb.cfg.model.max_length
    teacher = choice_logprobs(wb.llm, wb.tokenizer, items, max_len)

    def kl() -> float:
        student = choice_logprobs(wb.slm, wb.tokenizer, items, max_len)
        return choice_kl(pad_choices([torch.tensor(s) for s in student]),
                         pad_choices([torch.tensor(t) for t in teacher])).item()

    before = kl()
    choice_distill_steps(wb.slm, wb.tokenizer, items, teacher, 20, 2e-2, 4, 1.0, 1.0, 0, max_len)
    assert kl() < 0.5 * before


# ---- the faithful server phase ----------------------------------------------------------------------------------

def test_eval_mode_teachers_carry_no_lora_dropout(make_workbench):
    """With LoRA dropout, teacher_eval takes each target from a no-dropout forward: the step's KL equals the one
    computed by hand from eval-mode targets, and differs from the old train-mode targets' KL."""
    wb = make_workbench(model={"lora": {"r": 4, "alpha": 8, "dropout": 0.5}})
    for m in (wb.llm, wb.slm):  # a non-zero LoRA B, so that dropout on the LoRA path changes the logits
        for n, p in m.named_parameters():
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.5)
    batch = next(cycle_batches(wb.aux_data, 4, seed=0))
    with torch.no_grad():
        wb.llm.eval()
        wb.slm.eval()
        t_f = answer_logits(wb.llm, batch)
        wb.llm.train()
        wb.slm.train()
        torch.manual_seed(3)
        _, s_g = answer_logits(wb.llm, batch), answer_logits(wb.slm, batch)
    expected = distill_kl(s_g, t_f, batch.target_mask).item()

    def step(teacher_eval: bool) -> dict:
        opt_f = torch.optim.SGD([p for p in wb.llm.parameters() if p.requires_grad], lr=0.0)
        opt_g = torch.optim.SGD([p for p in wb.slm.parameters() if p.requires_grad], lr=0.0)
        torch.manual_seed(3)
        return mutual_distill_step(wb.llm, wb.slm, batch, Stepper([opt_f, opt_g]), 1.0, 1.0, "forward", 0,
                                   teacher_eval=teacher_eval)

    assert step(True)["kl_g"] == pytest.approx(expected, rel=1e-5)
    assert step(False)["kl_g"] != pytest.approx(expected, rel=1e-3)


def test_sequential_schedule_distils_the_slm_first_then_the_llm_from_the_updated_slm(make_workbench):
    wb = make_workbench(distill={"schedule": "sequential", "kd_weight": 2.0, "slm_kd_weight": 0.5})
    method, d = FedCoLLM(wb), wb.cfg.distill
    states = {"llm": wb.llm_init, "slm": wb.slm_init}
    new, record, _ = method.server_update(states, 1)
    steps, seed = d.steps(len(wb.aux_data)), unit_seed(wb.cfg.run.seed, 1, -1)
    load_adapter_state(wb.llm, wb.llm_init)
    load_adapter_state(wb.slm, wb.slm_init)
    one_way_distill(wb.slm, wb.llm, wb.aux_data, steps, 0.5, 1.0, "forward", 0, d.slm_lr, 4, seed, "g")
    one_way_distill(wb.llm, wb.slm, wb.aux_data, steps, 2.0, 1.0, "forward", 0, d.llm_lr, 4, seed, "f")
    assert states_equal(new["slm"], adapter_state(wb.slm)) and states_equal(new["llm"], adapter_state(wb.llm))
    assert record["budget"].slm_steps == record["budget"].llm_steps == steps


def test_fedcollm_choice_target_and_pool_train_both_models_and_count_the_pool(make_workbench):
    wb = make_workbench(distill={"target": "choices", "pool_epochs": 1.0}, data={"public_pool": 5})
    assert len(wb.split.pool) == 5 and all(ex.answer == -1 for ex in wb.split.pool)
    new, record, timing = FedCoLLM(wb).server_update({"llm": wb.llm_init, "slm": wb.slm_init}, 1)
    steps = wb.cfg.distill.steps(len(wb.aux_data))
    assert record["budget"].llm_steps == steps and record["budget"].slm_steps == steps + 2  # ceil(5 / 4) pool steps
    assert "pool_kd_last" in record and timing["server_scores_s"] > 0
    assert not states_equal(new["slm"], wb.slm_init) and not states_equal(new["llm"], wb.llm_init)


def test_the_pool_holds_only_rows_no_client_or_aux_set_uses_without_labels(make_workbench):
    wb = make_workbench(data={"public_pool": 100})
    used = {ex.id for ex in wb.split.aux} | {ex.id for shard in wb.split.clients for ex in shard}
    assert wb.split.pool and not used & {ex.id for ex in wb.split.pool}
    assert all(ex.answer == -1 for ex in wb.split.pool)


def test_channel_options_are_checked():
    with pytest.raises(ConfigError, match="distill.pool_epochs"):
        Config.from_dict({"distill": {"pool_epochs": 1.0}})
    with pytest.raises(ConfigError, match="data.public_pool"):
        Config.from_dict({"data": {"public_pool": 10}})  # no train_per_task: no rows past it
    with pytest.raises(ConfigError, match="fedmkt.target"):
        Config.from_dict({"fedmkt": {"target": "choices", "slm_when": "next_round"}})
    with pytest.raises(ConfigError, match="distill.schedule"):
        Config.from_dict({"distill": {"schedule": "alternate"}})
