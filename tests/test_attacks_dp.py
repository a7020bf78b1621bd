"""Attacks on client-level DP, each run first against d614e59 (main before issue 26), where it won.

The clients here are crafted: each returns the adapter it was sent plus a known change of norm 10 C along one
random direction e (so the clip to C is exact and the noiseless release lies along e), which lets a test measure
what the server really released: the noise std (the components orthogonal to e) and, by running neighbouring
federations with the same noise, the sensitivity of the release.
"""

import math
import re

import pytest
import torch

from fedcollm.algorithms.training import unit_seed
from fedcollm.comm import Payload, pack, unpack
from fedcollm.engines.inprocess import (
    InProcessTransport,
    SimulatedClient,
    run_method,
    sample_clients,
)
from fedcollm.privacy import add_noise
from fedcollm.runs import RunDir

dp_accounting = pytest.importorskip("dp_accounting")
pytest.importorskip("flwr")

C, Z = 0.01, 1.0
SECRET = bytes(range(32))  # a fixed server secret keeps these tests deterministic (its Poisson sample is not empty)


def _direction(like, seed=0):
    gen = torch.Generator().manual_seed(seed)
    e = {k: torch.randn(v.shape, generator=gen, dtype=torch.float64) for k, v in like.items()}
    norm = math.sqrt(sum(float((t * t).sum()) for t in e.values()))
    return {k: t / norm for k, t in e.items()}


class CraftedClient(SimulatedClient):
    """Returns sent + sign x 10 C x e; records the rounds it was asked to train in."""

    def __init__(self, wb, k, sign, e):
        super().__init__(wb, k)
        self.sign, self.e, self.rounds = sign, e, []

    def fit(self, blob, round_idx, method):
        self.rounds.append(round_idx)
        sent = unpack(blob).tensors
        theta = {k: (v.double() + self.sign * 10 * C * self.e[k]).to(v.dtype) for k, v in sent.items()}
        return pack(Payload(theta, len(self.wb.client_data[self.k])))


class DroppingTransport(InProcessTransport):
    """In-process clients, of which those named in `absent` never answer (drop out)."""

    def __init__(self, clients, absent=()):
        super().__init__(clients)
        self.absent = set(absent)

    def fit(self, tasks, round_idx, method):
        return super().fit({n: t for n, t in tasks.items() if n not in self.absent}, round_idx, method)


def _run(make_workbench, out, federation, signs, absent=(), rounds=1, dp=None):
    """One DP FedAvg run with crafted clients (sign +1 / -1 each, `absent` ones drop out); returns the released
    change from the initial adapter (float64), the run's metrics, its clients, e and the workbench. Every run gets
    the same server secret, so runs draw the same noise and sample (d614e59 drew both from run.seed anyway)."""
    wb = make_workbench(str(out), dp={"noise_multiplier": Z, "clip_norm": C} | (dp or {}),
                        federation={"clients": len(signs), "rounds": rounds} | federation, data={"eval_limit": 2})
    (out / "server-private").mkdir(parents=True)
    (out / "server-private" / "secret").write_bytes(SECRET)
    e = _direction(wb.slm_init)
    clients = [CraftedClient(wb, k, s, e) for k, s in enumerate(signs)]
    run_method(wb, "fedavg", RunDir(out), DroppingTransport(clients, [f"client_{k}" for k in absent]))
    released = RunDir(out).load_round("fedavg", rounds, {"slm": wb.slm_init})["slm"]
    change = {k: released[k].double() - wb.slm_init[k].double() for k in released}
    return change, RunDir(out).read_metrics("fedavg"), clients, e, wb


def _noise_std(change, e):
    """Std of the released change orthogonal to e: pure noise, since the noiseless release lies along e."""
    along = sum(float((change[k] * e[k]).sum()) for k in e)
    perp = torch.cat([(change[k] - along * e[k]).flatten() for k in e])
    return float(perp.norm()) / math.sqrt(perp.numel() - 1)


def _distance(a, b):
    return math.sqrt(sum(float(((a[k] - b[k]) ** 2).sum()) for k in a))


def _true_epsilon(event_of_z, relation, z, rounds, delta=1e-5):
    from dp_accounting.rdp import RdpAccountant

    return RdpAccountant(neighboring_relation=relation).compose(
        dp_accounting.SelfComposedDpEvent(event_of_z(z), rounds)).get_epsilon(delta)


def test_the_broadcast_noise_cannot_be_regenerated_from_the_config(make_workbench, tmp_path):
    """Attack (a): with one client sampled, regenerate the noise from run.seed (in config.json and sent to every
    client) exactly as d614e59 drew it, subtract it, and compare with each client's clipped change.

    Against d614e59 it recovered the sampled client's clipped update to 6.0e-08 (noise norm 0.21). Now the noise
    comes from the server's secret: the nearest client's update is 0.49 away, the noise itself."""
    change, records, clients, e, wb = _run(make_workbench, tmp_path, {"fraction_fit": 0.3}, [1, -1, 1])
    seed = wb.cfg.run.seed
    std = Z * C / 1  # d614e59: z C / (clients sampled)
    zeros = {k: torch.zeros_like(v) for k, v in wb.slm_init.items()}
    regenerated = add_noise(zeros, std, unit_seed(seed, 1, -3))
    guess = {k: change[k] - regenerated[k].double() for k in change}
    errors = [_distance(guess, {k: c.sign * C * e[k] for k in e}) for c in clients]
    noise_norm = std * math.sqrt(sum(v.numel() for v in zeros.values()))
    assert min(errors) > 0.5 * noise_norm, f"recovered a client's clipped update to {min(errors):.2g}"


def _sensitivity_and_noise(make_workbench, tmp_path, federation, base, neighbours, dp=None):
    """Run `base` = (signs, absent) and each neighbour with the same noise; return the largest change of the
    release between neighbours (a lower bound on its sensitivity), the noise std, and the base run's record."""
    first, records, _, e, _ = _run(make_workbench, tmp_path / "base", federation, *base, dp=dp)
    gaps = [_distance(first, _run(make_workbench, tmp_path / f"n{i}", federation, *nb, dp=dp)[0])
            for i, nb in enumerate(neighbours)]
    return max(gaps), _noise_std(first, e), records[-1]


CASES = {
    # 4 clients, 2 sampled without replacement: replace-one neighbours (one client's +e becomes -e)
    "fixed m<K": ({"fraction_fit": 0.5}, ([1, 1, 1, 1], ()),
                  [([1 if j != k else -1 for j in range(4)], ()) for k in range(4)],
                  lambda z: dp_accounting.SampledWithoutReplacementDpEvent(4, 2, dp_accounting.GaussianDpEvent(z)),
                  "REPLACE_ONE"),
    # every client, every round: add-or-remove-one neighbours (client 0 is there or drops out)
    "fixed m=K": ({"fraction_fit": 1.0}, ([1, -1, -1, -1], ()), [([1, -1, -1, -1], (0,))],
                  lambda z: dp_accounting.GaussianDpEvent(z), "ADD_OR_REMOVE_ONE"),
    # each client with probability 1/2: add-or-remove-one (client k is there or drops out)
    "poisson": ({"fraction_fit": 0.5}, ([1, -1, -1, -1], ()), [([1, -1, -1, -1], (k,)) for k in range(4)],
                lambda z: dp_accounting.PoissonSampledDpEvent(0.5, dp_accounting.GaussianDpEvent(z)),
                "ADD_OR_REMOVE_ONE"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_reported_epsilon_is_not_below_the_true_one(make_workbench, tmp_path, case):
    """Attack (b): measure the release's sensitivity between neighbouring federations (same noise) and its noise
    std, so the noise multiplier it really has is std / sensitivity; dp-accounting at that multiplier gives a
    lower bound on the true epsilon, which the reported one must not undercut.

    Against d614e59: fixed m<K (4 clients, 2 sampled), effective z 0.51 (told 1.0): reported 4.09 after one round,
    true >= 9.98 (over 10 rounds: 16.4 reported, 42.7 true); fixed m=K, effective z 0.51: reported 4.73, true >=
    10.6 (the mean divided by the clients who answered, so a removed client moved it by 2C/K, not C/K); poisson
    did not exist there. Now the effective z is 1.03 in all three and the reported epsilon is not undercut."""
    federation, base, neighbours, event_of_z, relation = CASES[case]
    dp = {"sampling": "poisson"} if case == "poisson" else None  # d614e59 had no dp.sampling
    sensitivity, std, record = _sensitivity_and_noise(make_workbench, tmp_path, federation, base, neighbours, dp)
    z_true = std / sensitivity
    relation = getattr(dp_accounting.NeighboringRelation, relation)
    true_eps = _true_epsilon(event_of_z, relation, z_true, 1)
    reported = record["dp"]["epsilon"] if "dp" in record else record["dp_epsilon"]  # d614e59: dp_epsilon
    assert reported >= 0.9 * true_eps, (
        f"effective z {z_true:.2f} (told {Z}): reported {reported:.3g}, true >= {true_eps:.3g}; "
        f"over 10 rounds {_true_epsilon(event_of_z, relation, Z, 10):.3g} vs "
        f"{_true_epsilon(event_of_z, relation, z_true, 10):.3g}")


def test_a_dropout_does_not_lower_the_noise(make_workbench, tmp_path):
    """Attack (c): the noise multiplier the release really has (noise std / change of the release when client 0's
    +e becomes -e, same noise) with both of 2 clients answering and with client 1 dropped out.

    Against d614e59 it fell from 0.51 to 0.25 when client 1 dropped (the noise stayed z C / 2 while the mean
    divided by the one client that answered), epsilon unchanged. Now it is 0.52 either way."""
    z_eff = []
    for absent in ((), (1,)):
        out = tmp_path / f"absent{len(absent)}"
        sensitivity, std, _ = _sensitivity_and_noise(make_workbench, out, {"fraction_fit": 1.0},
                                                     ([1, 1], absent), [([-1, 1], absent)])
        z_eff.append(std / sensitivity)
    assert z_eff[1] >= 0.9 * z_eff[0], f"effective z {z_eff[0]:.2f} with both, {z_eff[1]:.2f} with one dropped"


def test_who_was_sampled_is_neither_recorded_nor_predictable_from_the_config(make_workbench, tmp_path):
    """Attack (d): under DP, read who trained from the metrics, and predict the sample of every round from
    run.seed with the engine's public sampler.

    Against d614e59 the metrics named the 2 clients sampled in each round and the seed predicted all 8 rounds'
    samples. Now the metrics hold counts only, and the sample (drawn from the server's secret) differs from the
    seed's prediction (all 8 rounds agreeing by chance: (1/6)^8 = 6e-7)."""
    _, records, clients, _, wb = _run(make_workbench, tmp_path, {"fraction_fit": 0.5}, [1, -1, 1, -1], rounds=8)
    metrics = (tmp_path / "fedavg" / "metrics.jsonl").read_text()
    assert not re.search(r'"client_\d+"', metrics), "the metrics name the sampled clients"
    names = [c.name for c in clients]
    actual = [sorted(c.name for c in clients if r in c.rounds) for r in range(1, 9)]
    predicted = [sample_clients(names, 0.5, 1, wb.cfg.run.seed, r) for r in range(1, 9)]
    assert all(len(a) == 2 for a in actual)
    assert actual != predicted, "the config's seed predicted every round's sample"
