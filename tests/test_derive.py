import copy

import pytest
import torch

from fedcollm.config import DeriveConfig, parse_derived_spec
from fedcollm.errors import ConfigError
from fedcollm.models.derive import (
    greedy_select,
    heal,
    mean_nll,
    tokenize_texts,
    with_layers,
)
from fedcollm.models.tiny import tiny_llama


@pytest.fixture
def texts(data_dir):
    from fedcollm.data.tasks import load_alpaca_texts

    return load_alpaca_texts(data_dir)[:24]


def test_spec_parsing():
    assert parse_derived_spec("derived:smollm2-135m:10") == ("smollm2-135m", 10)
    assert parse_derived_spec("smollm2-135m") is None
    with pytest.raises(ConfigError, match="derived:BASE:N"):
        parse_derived_spec("derived:smollm2-135m")


def test_greedy_selection_picks_the_best_subset_of_its_size(tokenizer, texts):
    model = tiny_llama(layers=4, seed=3)
    batch = tokenize_texts(tokenizer, texts[:8], 32)
    chosen, nll = greedy_select(model, batch, 1)
    all_layers = model.model.layers
    singles = {}
    for i in range(4):
        with_layers(model, [i], all_layers)
        singles[i] = mean_nll(model, batch)
    with_layers(model, list(range(4)), all_layers)
    assert chosen == [min(singles, key=singles.get)] and nll == pytest.approx(min(singles.values()))
    assert len(model.model.layers) == 4 and model.config.num_hidden_layers == 4  # teacher restored


def test_healing_moves_the_student_towards_the_teacher(tokenizer, texts):
    teacher = tiny_llama(layers=4, seed=3)
    student = copy.deepcopy(teacher)
    with_layers(student, [0, 3], student.model.layers)
    batch = tokenize_texts(tokenizer, texts, 32)
    losses = heal(student, teacher, batch, DeriveConfig(heal_steps=20, heal_batch=8, heal_lr=3e-3))
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3
    assert not torch.equal(student.model.layers[0].mlp.up_proj.weight, teacher.model.layers[0].mlp.up_proj.weight)
