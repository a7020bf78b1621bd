import pytest
import torch

from fedcollm.aggregate import fedavg, validate_update
from fedcollm.errors import InvalidUpdate


def _state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"a.lora_A.weight": torch.randn(4, 8, generator=g), "a.lora_B.weight": torch.randn(8, 4, generator=g)}


def test_fedavg_is_sample_weighted_mean_exactly():
    updates = [(_state(0), 10), (_state(1), 30), (_state(2), 60)]
    out = fedavg(updates)
    for key in out:
        expected = sum(s[key].double() * n for s, n in updates) / 100
        assert torch.equal(out[key], expected.float())
    # not the unweighted mean
    plain = sum(s["a.lora_A.weight"] for s, _ in updates) / 3
    assert not torch.allclose(out["a.lora_A.weight"], plain)


def test_fedavg_of_identical_updates_is_identity():
    s = _state(3)
    assert all(torch.equal(fedavg([(s, 5), (s, 7)])[k], s[k]) for k in s)


@pytest.mark.parametrize("mutate, message", [
    (lambda s: s.pop("a.lora_B.weight"), "keys differ"),
    (lambda s: s.__setitem__("a.lora_A.weight", torch.zeros(4, 9)), "shape"),
    (lambda s: s.__setitem__("a.lora_A.weight", torch.zeros(4, 8, dtype=torch.float64)), "dtype"),
    (lambda s: s["a.lora_A.weight"].__setitem__((0, 0), float("nan")), "NaN"),
    (lambda s: s["a.lora_B.weight"].__setitem__((0, 0), float("inf")), "NaN or Inf"),
])
def test_validate_rejects_and_names_client(mutate, message):
    bad = _state(0)
    mutate(bad)
    with pytest.raises(InvalidUpdate, match=f"client c7: .*{message}"):
        validate_update(bad, _state(1), 5, "c7")


def test_validate_rejects_bad_count():
    with pytest.raises(InvalidUpdate, match="num_examples"):
        validate_update(_state(0), _state(1), 0, "c1")


def test_validate_rejects_a_count_above_the_declared_one():
    validate_update(_state(0), _state(1), 7, "c1", declared=7)
    with pytest.raises(InvalidUpdate, match="client c1: claims 8 examples but declared 7 before training"):
        validate_update(_state(0), _state(1), 8, "c1", declared=7)


def _norm(state) -> float:
    return float(torch.sqrt(sum((t.double() ** 2).sum() for t in state.values())))


def _moved(sent, scale: float, seed: int):
    """`sent` plus a change of L2 norm `scale` in a seeded random direction."""
    step = _state(seed)
    return {k: sent[k] + step[k] * (scale / _norm(step)) for k in sent}


def test_the_norm_bound_is_a_multiple_of_the_rounds_lower_median_change(caplog):
    """Replaces the test of the old per-client bound, 2 x ||adapter sent|| (which one client could compound)."""
    from fedcollm.aggregate import bound_changes, change_norm

    sent = _state(0)
    updates = {"c1": _moved(sent, 1.0, 1), "c2": _moved(sent, 2.0, 2), "c3": _moved(sent, 3.0, 3),
               "c4": _moved(sent, 100.0, 4)}
    with caplog.at_level("WARNING"):
        out = bound_changes(updates, sent, 0.0, 3.0, "clip")  # lower median 2.0: bound 6.0
    assert all(out[c] is updates[c] for c in ("c1", "c2", "c3"))
    assert change_norm(out["c4"], sent) == pytest.approx(6.0, rel=1e-5)
    assert "client c4: update norm 100 clipped to the round's bound 6" in caplog.text
    assert set(bound_changes(updates, sent, 0.0, 3.0, "reject")) == {"c1", "c2", "c3"}
    assert set(bound_changes(updates, sent, 2.5, 3.0, "reject")) == {"c1", "c2"}  # a fixed bound instead
    # two updates: the bound follows the smaller, so the larger cannot lift it
    two = bound_changes({"c1": updates["c1"], "c4": updates["c4"]}, sent, 0.0, 3.0, "clip")
    assert change_norm(two["c4"], sent) == pytest.approx(3.0, rel=1e-5)
    for scale in (1e6, 3e38 / 10):  # scaled up, and values near the float32 maximum: clipped, finite
        big = {k: v * scale for k, v in sent.items()}
        clipped = bound_changes({"c1": updates["c1"], "c2": updates["c2"], "c5": big}, sent, 0.0, 3.0, "clip")
        assert change_norm(clipped["c5"], sent) == pytest.approx(6.0, rel=1e-4)
        assert all(torch.isfinite(t).all() for t in clipped["c5"].values())


def test_one_client_cannot_raise_the_bound_however_large_its_change():
    from fedcollm.aggregate import bound_changes, change_norm

    sent = _state(0)
    honest = {f"c{i}": _moved(sent, 1.0 + i / 10, i) for i in range(3)}
    for attack in (1e3, 1e9):
        out = bound_changes(honest | {"bad": _moved(sent, attack, 9)}, sent, 0.0, 3.0, "clip")
        assert change_norm(out["bad"], sent) <= 3.0 * 1.1 * (1 + 1e-6)  # 3 x an honest norm, whatever `attack`


@pytest.mark.parametrize("counts, share, expected", [
    ([10, 10, 10, 10], 0.3, [0.25] * 4),
    ([10**12, 10, 10, 10], 0.3, [0.3, 0.7 / 3, 0.7 / 3, 0.7 / 3]),  # one cut, the rest renormalised
    ([50, 40, 5, 5], 0.3, [0.3, 0.3, 0.2, 0.2]),  # 40 is over 0.3 only once 50 is cut: a second pass
    ([10**6, 1], 0.3, [0.5, 0.5]),  # fewer than 1 / 0.3 updates: equal weights
    ([3, 1], 1.0, [0.75, 0.25]),  # no cap
])
def test_capped_weights_water_fill(counts, share, expected):
    from fedcollm.aggregate import capped_weights

    assert capped_weights(counts, share) == pytest.approx(expected)


def _vec(*values) -> dict[str, torch.Tensor]:
    return {"w": torch.tensor(values, dtype=torch.float32)}


def test_median_trimmed_mean_and_krum_by_hand():
    from fedcollm.aggregate import coordinate_median, krum, trimmed_mean

    states = [_vec(1, 10), _vec(2, 40), _vec(3, 20), _vec(4, 30), _vec(100, -50)]
    assert coordinate_median(states)["w"].tolist() == [3, 20]
    assert coordinate_median(states[:4])["w"].tolist() == [2.5, 25]  # even count: mean of the two middle ones
    assert trimmed_mean(states, 1)["w"].tolist() == [3, 20]  # drops 1 and 100, then 40 and -50
    assert trimmed_mean(states, 0)["w"].tolist() == pytest.approx([22, 10])
    # Krum, n = 5, f = 1: summed squared distances to each one's 2 nearest others. [1,10]: 104 + 409; [2,40]:
    # 104 + 401; [3,20]: 101 + 104 = 205; [4,30]: 101 + 104 = 205 too (the first of a tie wins); [100,-50]: far.
    assert krum(states, 1)["w"].tolist() == [3, 20]


@pytest.mark.parametrize("aggregator", ["median", "trimmed_mean", "krum"])
def test_one_byzantine_update_in_five_moves_fedavg_far_but_not_the_robust_aggregate(aggregator):
    from fedcollm.aggregate import combine
    from fedcollm.config import FederationConfig

    honest = [_moved(_state(0), 0.1, seed) for seed in range(1, 5)]
    bad = {k: v + 1e4 for k, v in _state(0).items()}
    fed = FederationConfig(clients=5, aggregator=aggregator, trim_fraction=0.2, max_share=1.0)
    mean = combine([(s, 1) for s in honest], FederationConfig(clients=5, max_share=1.0))

    def dist(a):
        return _norm({k: a[k] - mean[k] for k in a})
    poisoned_mean = combine([(s, 1) for s in honest + [bad]], FederationConfig(clients=5, max_share=1.0))
    robust = combine([(s, 1) for s in honest + [bad]], fed)
    assert dist(poisoned_mean) > 1e4 and dist(robust) < 0.5


@pytest.mark.parametrize("tables, message", [
    ({"federation": {"aggregator": "median"}, "secagg": {"enabled": True}}, "server sees only their sum"),
    ({"federation": {"aggregator": "trimmed_mean"}, "dp": {"noise_multiplier": 1.0},
      "run": {"methods": ["fedavg"]}}, "would be ignored: under DP"),
    ({"federation": {"aggregator": "krum", "clients": 4, "byzantine": 1}}, "federation.byzantine: krum tolerates"),
])
def test_config_refuses_robust_aggregators_where_they_cannot_run(tables, message):
    from fedcollm.config import Config
    from fedcollm.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        Config.from_dict(tables)
