"""Client-level DP: clipped changes, Gaussian noise keyed by the server's secret, epsilon exactly as dp-accounting
computes it, a bit-identical resume, and the SecAgg+ release."""

import json
import stat

import pytest
import torch

from fedcollm.comm import Payload
from fedcollm.config import DPConfig
from fedcollm.engines.inprocess import run_method
from fedcollm.privacy import (
    add_noise,
    clip_change,
    expected_clients,
    sum_noise_std,
    sum_sensitivity,
)
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
    dp = {"noise_multiplier": 1.1, "clip_norm": 0.05, "delta": 1e-5}
    wb = make_workbench(str(tmp_path / "dp"), dp=dp, federation={"fraction_fit": fraction})
    run_method(wb, "fedavg", RunDir(tmp_path / "dp"))
    records = RunDir(tmp_path / "dp").read_metrics("fedavg")
    assert [r["sampled"] for r in records] == [sampled, sampled]  # a count under DP: who is the server's secret
    for r in records:
        assert r["dp"]["epsilon"] == pytest.approx(_independent_epsilon(r["round"], 1.1, sampled, 3, 1e-5), rel=1e-9)
        assert r["dp"]["epsilon_round"] == pytest.approx(_independent_epsilon(1, 1.1, sampled, 3, 1e-5), rel=1e-9)
        assert r["dp"]["neighbouring"] == ("add_or_remove_one" if sampled == 3 else "replace_one")

    plain = make_workbench(str(tmp_path / "plain"), federation={"fraction_fit": fraction})
    run_method(plain, "fedavg", RunDir(tmp_path / "plain"))
    refs = {"slm": wb.slm_init}
    private = RunDir(tmp_path / "dp").load_round("fedavg", 1, refs)["slm"]
    change = {k: private[k] - wb.slm_init[k] for k in private}
    # noise of std z x (sum's sensitivity: C, or 2C when m < K) / m on every entry dominates the mean change
    # (d614e59 added z C / m whatever the sampling: half the noise the accountant was told about when m < K)
    n_entries = sum(t.numel() for t in change.values())
    expected = 1.1 * 0.05 * (1 if sampled == 3 else 2) / sampled * n_entries ** 0.5
    assert 0.8 * expected < _norm(change) < 1.2 * expected + 0.05


def test_the_noise_contract():
    fixed, poisson = DPConfig(noise_multiplier=1.0, clip_norm=0.5), DPConfig(1.0, 0.5, sampling="poisson")
    assert expected_clients(fixed, 4, 0.5, 1) == 2 and expected_clients(poisson, 4, 0.3, 1) == pytest.approx(1.2)
    assert sum_sensitivity(fixed, 4, 2) == 1.0 and sum_sensitivity(fixed, 4, 4) == 0.5
    assert sum_sensitivity(poisson, 4, 1.2) == 0.5 and sum_noise_std(fixed, 4, 2) == 1.0


def test_dp_resume_is_bit_identical_and_the_secret_stays_on_the_server(make_workbench, tmp_path):
    """Noise and sample come from server-private/secret, so a resumed DP run repeats them exactly; the secret is
    readable by its owner only and appears in no config, metrics or result file."""
    dp = {"noise_multiplier": 1.0, "clip_norm": 0.05}
    fed = {"clients": 4, "fraction_fit": 0.5}
    full = make_workbench(str(tmp_path / "full"), dp=dp, federation=fed)
    run_method(full, "fedavg", RunDir(tmp_path / "full"))
    secret_file = tmp_path / "full" / "server-private" / "secret"
    assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
    secret = secret_file.read_bytes()
    assert len(secret) == 32
    for path in (tmp_path / "full").rglob("*"):
        if path.is_file() and path != secret_file:
            data = path.read_bytes()
            assert secret not in data and secret.hex().encode() not in data, path

    (tmp_path / "part" / "server-private").mkdir(parents=True)  # the same server, interrupted after round 1
    (tmp_path / "part" / "server-private" / "secret").write_bytes(secret)
    run_method(make_workbench(str(tmp_path / "part"), dp=dp, federation=fed | {"rounds": 1}), "fedavg",
               RunDir(tmp_path / "part"))
    (tmp_path / "part" / "fedavg" / "final.json").unlink()
    run_method(make_workbench(str(tmp_path / "part"), dp=dp, federation=fed), "fedavg", RunDir(tmp_path / "part"))
    refs = {"slm": full.slm_init}
    a, b = (RunDir(tmp_path / d).load_round("fedavg", 2, refs)["slm"] for d in ("full", "part"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a[next(iter(a))], full.slm_init[next(iter(a))])

    other = make_workbench(str(tmp_path / "other"), dp=dp, federation=fed)  # a fresh secret: other noise
    run_method(other, "fedavg", RunDir(tmp_path / "other"))
    c = RunDir(tmp_path / "other").load_round("fedavg", 2, refs)["slm"]
    assert not all(torch.equal(a[k], c[k]) for k in a)


class SecureTransport:
    """Stands in for SecAgg+ (`FlowerTransport.fit_secure`'s contract): the equal-weight mean over the clients that
    answer, sent + mean change; each client's change is `changes[name]` (already clipped)."""

    secure = True

    def __init__(self, names, changes, absent=()):
        self.client_names, self.changes, self.absent = names, changes, set(absent)
        self.examples = {n: 10 for n in names}

    def fit_secure(self, task, names, round_idx):
        contributors = [n for n in names if n not in self.absent]
        mean = {k: sum(self.changes[n][k] for n in contributors) / len(contributors) for k in task.tensors}
        return Payload({k: task.tensors[k] + mean[k] for k in task.tensors}, len(contributors)), contributors, {}


@pytest.mark.parametrize("mode", ["central", "distributed"])
def test_secure_release_divides_the_sum_by_the_expected_clients(make_workbench, tmp_path, mode):
    """Under SecAgg+ the sum is (average - sent) x contributors over the fixed denominator, a dropout counting as a
    zero change; in distributed mode the clients noised their shares and the server adds nothing."""
    wb = make_workbench(str(tmp_path), dp={"noise_multiplier": 1.0, "clip_norm": 0.05, "mode": mode},
                        secagg={"enabled": True}, federation={"rounds": 1}, run={"methods": ["fedavg"]})
    names = [f"client_{k}" for k in range(3)]
    gen = torch.Generator().manual_seed(0)
    changes = {n: {k: torch.randn(v.shape, generator=gen) * 1e-3 for k, v in wb.slm_init.items()} for n in names}
    run_method(wb, "fedavg", RunDir(tmp_path), SecureTransport(names, changes, absent=["client_2"]))
    [record] = RunDir(tmp_path).read_metrics("fedavg")
    assert record["sampled"] == 3 and record["dropped"] == 1 and "contributors" not in record
    assert record["dp"]["noised_by"] == ("server" if mode == "central" else "clients")
    released = RunDir(tmp_path).load_round("fedavg", 1, {"slm": wb.slm_init})["slm"]
    clean = {k: wb.slm_init[k] + (changes["client_0"][k] + changes["client_1"][k]) / 3 for k in released}
    noise = torch.cat([(released[k].double() - clean[k].double()).flatten() for k in released])
    if mode == "distributed":
        assert noise.abs().max() < 1e-6
    else:  # std z C / 3 on every entry (all 3 of 3 sampled: add-or-remove-one, sensitivity C)
        assert noise.std().item() == pytest.approx(1.0 * 0.05 / 3, rel=0.1)


def test_results_json_holds_the_dp_accounting(make_workbench, tmp_path):
    from fedcollm.report import build_results

    wb = make_workbench(str(tmp_path), dp={"noise_multiplier": 1.0, "clip_norm": 0.05},
                        federation={"rounds": 1}, run={"methods": ["fedavg"]})
    RunDir(tmp_path).write_config(wb.cfg.to_json())
    run_method(wb, "fedavg", RunDir(tmp_path))
    dp = build_results(RunDir(tmp_path), {}, {})["dp"]["fedavg"]
    assert dp["epsilon"] == dp["epsilon_round"] > 0 and dp["rounds"] == 1 and dp["delta"] == 1e-5
    assert (dp["sampling"], dp["neighbouring"], dp["sum_sensitivity"], dp["expected_clients"], dp["mode"]) == (
        "fixed", "add_or_remove_one", 0.05, 3, "central")
    json.dumps(dp)
