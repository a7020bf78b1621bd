import pytest
import torch

from fedcollm.distill.losses import answer_ce, distill_kl, mutual_losses


def _logits(seed, shape=(2, 3, 11)):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_answer_ce_ignores_masked_tokens():
    logits, targets = _logits(0), torch.randint(0, 11, (2, 3))
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    changed = logits.clone()
    changed[0, 0] += 100.0  # a masked position
    assert torch.allclose(answer_ce(logits, targets, mask), answer_ce(changed, targets, mask))
    per_tok = torch.nn.functional.cross_entropy(logits.reshape(-1, 11), targets.reshape(-1), reduction="none")
    assert torch.allclose(answer_ce(logits, targets, mask), per_tok[mask.reshape(-1).bool()].mean())


@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_kl_zero_iff_same_distribution(direction):
    a = _logits(1)
    mask = torch.ones(2, 3)
    assert distill_kl(a, a + 3.0, mask, direction=direction).abs() < 1e-5  # shift-invariant softmax
    assert distill_kl(a, _logits(2), mask, direction=direction) > 0.1


def test_forward_and_reverse_are_the_two_kl_orders():
    s, t = _logits(3), _logits(4)
    mask = torch.ones(2, 3)
    ps, pt = s.log_softmax(-1), t.log_softmax(-1)
    fwd = (pt.exp() * (pt - ps)).sum(-1).mean()
    rev = (ps.exp() * (ps - pt)).sum(-1).mean()
    assert torch.allclose(distill_kl(s, t, mask, direction="forward"), fwd)
    assert torch.allclose(distill_kl(s, t, mask, direction="reverse"), rev)
    assert not torch.allclose(fwd, rev)


def test_kl_is_a_mean_over_answer_tokens_not_a_sum():
    s, t = _logits(5, (1, 4, 11)), _logits(6, (1, 4, 11))
    repeated_s, repeated_t = s.repeat(1, 3, 1), t.repeat(1, 3, 1)
    one = distill_kl(s, t, torch.ones(1, 4))
    three = distill_kl(repeated_s, repeated_t, torch.ones(1, 12))
    assert torch.allclose(one, three)


def test_top_k_with_full_k_equals_full_kl_and_small_k_differs():
    s, t = _logits(7), _logits(8)
    mask = torch.ones(2, 3)
    assert torch.allclose(distill_kl(s, t, mask, top_k=11), distill_kl(s, t, mask))
    assert not torch.allclose(distill_kl(s, t, mask, top_k=2), distill_kl(s, t, mask))


def test_temperature_scales_and_softens():
    s, t = _logits(9), _logits(10)
    mask = torch.ones(2, 3)
    assert not torch.allclose(distill_kl(s, t, mask, temperature=2.0), distill_kl(s, t, mask))


def test_mutual_losses_send_gradient_only_to_each_student():
    f = _logits(11).requires_grad_()
    g = _logits(12).requires_grad_()
    targets, mask = torch.randint(0, 11, (2, 3)), torch.ones(2, 3)
    loss_f, loss_g, stats = mutual_losses(f, g, targets, mask, kd_weight=1.0)
    (gf,) = torch.autograd.grad(loss_f, f, retain_graph=True)
    assert gf.abs().sum() > 0
    assert torch.autograd.grad(loss_f, g, allow_unused=True, retain_graph=True)[0] is None  # g is a detached target
    assert torch.autograd.grad(loss_g, f, allow_unused=True, retain_graph=True)[0] is None
    assert torch.autograd.grad(loss_g, g)[0].abs().sum() > 0
    assert stats["kl_f"] > 0 and stats["kl_g"] > 0


def test_kd_weight_zero_leaves_plain_ce():
    f, g = _logits(13), _logits(14)
    targets, mask = torch.randint(0, 11, (2, 3)), torch.ones(2, 3)
    loss_f, loss_g, _ = mutual_losses(f, g, targets, mask, kd_weight=0.0)
    assert torch.allclose(loss_f, answer_ce(f, targets, mask))
    assert torch.allclose(loss_g, answer_ce(g, targets, mask))


@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_mutual_fast_path_equals_the_general_losses_values_and_gradients(direction):
    f = _logits(15, (3, 4, 11)).requires_grad_()
    g = _logits(16, (3, 4, 11)).requires_grad_()
    targets = torch.randint(0, 11, (3, 4), generator=torch.Generator().manual_seed(0))
    mask = torch.tensor([[0, 0, 1, 1], [0, 1, 1, 1], [1, 1, 1, 1]])
    loss_f, loss_g, _ = mutual_losses(f, g, targets, mask, kd_weight=0.7, direction=direction)
    ref_f = answer_ce(f, targets, mask) + 0.7 * distill_kl(f, g, mask, direction=direction)
    ref_g = answer_ce(g, targets, mask) + 0.7 * distill_kl(g, f, mask, direction=direction)
    torch.testing.assert_close(loss_f, ref_f)
    torch.testing.assert_close(loss_g, ref_g)
    got = torch.autograd.grad(loss_f + loss_g, (f, g))
    want = torch.autograd.grad(ref_f + ref_g, (f, g))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
