import copy

import pytest
import torch

from fedcollm.config import DeriveConfig, parse_derived_spec
from fedcollm.errors import ConfigError
from fedcollm.models.derive import (
    block_influence_select,
    derived_dir,
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


def test_block_influence_drops_the_layers_that_leave_the_hidden_state_unchanged(tokenizer, texts):
    model = tiny_llama(layers=6, seed=3)
    for i in (1, 4):  # no attention or MLP output: the layer passes its input through (Block Influence 0)
        model.model.layers[i].self_attn.o_proj.weight.data.zero_()
        model.model.layers[i].mlp.down_proj.weight.data.zero_()
    batch = tokenize_texts(tokenizer, texts[:8], 32)
    chosen, nll = block_influence_select(model, batch, 4)
    assert chosen == [0, 2, 3, 5]
    assert len(model.model.layers) == 6  # the full model is restored
    with_layers(model, chosen, model.model.layers)
    assert nll == pytest.approx(mean_nll(model, batch))


def test_greedy_keeps_the_cache_key_it_had_before_selection_was_a_knob():
    greedy, shortgpt = DeriveConfig(), DeriveConfig(selection="block_influence")
    # the cache names of SLMs derived before `selection` existed (the benchmarks' 10- and 20-layer SLMs)
    assert derived_dir("smollm2-135m", 10, greedy).name == "derived-smollm2-135m-10l-18b2011d"
    assert derived_dir("smollm2-135m", 20, DeriveConfig(calib_texts=16, heal_steps=80)).name == "derived-smollm2-135m-20l-8b7162bd"
    assert derived_dir("b", 10, greedy) != derived_dir("b", 10, shortgpt)
    with pytest.raises(ConfigError, match="derive.selection"):
        DeriveConfig(selection="random")


def test_healing_moves_the_student_towards_the_teacher(tokenizer, texts):
    teacher = tiny_llama(layers=4, seed=3)
    student = copy.deepcopy(teacher)
    with_layers(student, [0, 3], student.model.layers)
    batch = tokenize_texts(tokenizer, texts, 32)
    losses = heal(student, teacher, batch, DeriveConfig(heal_steps=20, heal_batch=8, heal_lr=3e-3))
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3
    assert not torch.equal(student.model.layers[0].mlp.up_proj.weight, teacher.model.layers[0].mlp.up_proj.weight)
