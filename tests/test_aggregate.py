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


def _norm(state) -> float:
    return float(torch.sqrt(sum((t.double() ** 2).sum() for t in state.values())))


def test_bound_update_caps_counts_and_clips_or_rejects_big_changes(caplog):
    from fedcollm.aggregate import bound_update

    sent = _state(0)
    small = {k: v + 0.01 for k, v in sent.items()}
    assert bound_update(small, sent, 10, "c1", 100, 2.0, "clip") == (small, 10)
    with caplog.at_level("WARNING"):
        _, n = bound_update(small, sent, 10**12, "c2", 100, 2.0, "clip")
    assert n == 100 and "client c2: claimed 1000000000000 examples" in caplog.text

    for scale in (1e6, 3e38 / 10):  # scaled up, and values near the float32 maximum
        big = {k: v * scale for k, v in sent.items()}
        clipped, _ = bound_update(big, sent, 5, "c3", 100, 2.0, "clip")
        delta = {k: clipped[k] - sent[k] for k in sent}
        assert abs(_norm(delta) - 2.0 * _norm(sent)) < 1e-3 * _norm(sent)
        assert all(torch.isfinite(t).all() for t in clipped.values())
        with pytest.raises(InvalidUpdate, match="client c4: update norm .* exceeds the bound"):
            bound_update(big, sent, 5, "c4", 100, 2.0, "reject")
