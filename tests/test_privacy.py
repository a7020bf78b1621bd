"""Client-level DP: clipped changes, seeded Gaussian noise, and epsilon exactly as the accountant computes it."""

import pytest
import torch

from fedcollm.privacy import add_noise, clip_change
from fedcollm.runs import RunDir

dp_accounting = pytest.importorskip("dp_accounting")
pytest.importorskip("flwr")


def _norm(state):
    return float(torch.sqrt(sum((t.double() ** 2).sum() for t in state.values())))


def test_clip_change_bounds_the_change_not_the_adapter():
    sent = {"a": torch.ones(4, 4)}
    big = {"a": torch.ones(4, 4) * 3}
    clipped = clip_change(big, sent, 0.5)
    assert abs(_norm({"a": clipped["a"] - sent["a"]}) - 0.5) < 1e-6
    small = {"a": torch.ones(4, 4) * 1.01}
    assert torch.equal(clip_change(small, sent, 0.5)["a"], small["a"])
    noisy = add_noise({"a": torch.zeros(200, 200)}, 0.1, seed=3)["a"]
    assert abs(noisy.std().item() - 0.1) < 0.005 and torch.equal(noisy, add_noise({"a": torch.zeros(200, 200)}, 0.1, 3)["a"])


def _independent_epsilon(rounds, z, sampled, population, delta):
    from dp_accounting import (
        GaussianDpEvent,
        SampledWithoutReplacementDpEvent,
        SelfComposedDpEvent,
    )
    from dp_accounting.rdp import RdpAccountant
    from dp_accounting.rdp.rdp_privacy_accountant import NeighborRel

    if sampled == population:
        event, rel = GaussianDpEvent(z), NeighborRel.ADD_OR_REMOVE_ONE
    else:
        event, rel = SampledWithoutReplacementDpEvent(population, sampled, GaussianDpEvent(z)), NeighborRel.REPLACE_ONE
    return RdpAccountant(neighboring_relation=rel).compose(SelfComposedDpEvent(event, rounds)).get_epsilon(delta)


@pytest.mark.parametrize("fraction, sampled", [(1.0, 3), (0.6, 2)])
def test_dp_run_reports_the_accountants_epsilon_and_adds_noise(make_workbench, tmp_path, fraction, sampled):
    from fedcollm.engines.inprocess import run_method

    dp = {"noise_multiplier": 1.1, "clip_norm": 0.05, "delta": 1e-5}
    wb = make_workbench(str(tmp_path / "dp"), dp=dp, federation={"fraction_fit": fraction})
    run_method(wb, "fedavg", RunDir(tmp_path / "dp"))
    records = RunDir(tmp_path / "dp").read_metrics("fedavg")
    assert [len(r["sampled"]) for r in records] == [sampled, sampled]
    for r in records:
        assert r["dp_epsilon"] == pytest.approx(_independent_epsilon(r["round"], 1.1, sampled, 3, 1e-5), rel=1e-9)

    plain = make_workbench(str(tmp_path / "plain"), federation={"fraction_fit": fraction})
    run_method(plain, "fedavg", RunDir(tmp_path / "plain"))
    refs = {"slm": wb.slm_init}
    private = RunDir(tmp_path / "dp").load_round("fedavg", 1, refs)["slm"]
    change = {k: private[k] - wb.slm_init[k] for k in private}
    # noise of std z*C/m on every entry dominates the clipped mean change (norm <= C)
    n_entries = sum(t.numel() for t in change.values())
    expected = 1.1 * 0.05 / sampled * n_entries ** 0.5
    assert 0.8 * expected < _norm(change) < 1.2 * expected + 0.05
