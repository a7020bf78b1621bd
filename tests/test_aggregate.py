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
