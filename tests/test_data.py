import json

import pytest
import torch

from fedcollm.config import DataConfig
from fedcollm.data.batching import SFTData, collate, encode_pair
from fedcollm.data.partition import load_train_pool, partition
from fedcollm.data.tasks import DataError, format_context, load_eval_split, load_task


def test_real_tasks_load_with_expected_sizes(data_dir):
    assert len(load_task(data_dir, "arc_challenge", "test")) == 1172
    assert len(load_eval_split(data_dir, "commonsenseqa")) == 1221  # CSQA is scored on dev
    ex = load_eval_split(data_dir, "arc_easy", limit=3)[0]
    assert ex.context == f"Question: {ex.question}\nAnswer:"
    assert ex.continuation(ex.answer) == " " + ex.choices[ex.answer]


def test_prompt_formats_follow_lm_eval():
    assert format_context("openbookqa", "The sun is") == "The sun is"
    assert format_context("arc_challenge", "Why?") == "Question: Why?\nAnswer:"
    assert format_context("commonsenseqa", "Where?") == "Question: Where?\nAnswer:"


@pytest.mark.parametrize("line, message", [
    ('{"id": "x", "question": "q", "choices": ["a", "b"]}', "line 2: missing field 'answer'"),
    ('{"id": "x", "question": "q", "choices": ["a", "b"], "answer": 2}', "line 2: field 'answer' = 2 is out of range"),
    ('{"id": "x", "question": "q", "choices": "ab", "answer": 0}', "line 2: field 'choices' must be list"),
    ('{"id": "x", "question": 5, "choices": ["a", "b"], "answer": 0}', "line 2: field 'question' must be str"),
    ('{"id": "x", "question": "q", "choi', "line 2: not valid JSON"),
])
def test_malformed_rows_name_file_line_and_field(tmp_path, line, message):
    good = json.dumps({"id": "g", "question": "q", "choices": ["a", "b"], "answer": 0})
    (tmp_path / "arc_easy").mkdir()
    (tmp_path / "arc_easy" / "train.jsonl").write_text(good + "\n" + line + "\n")
    with pytest.raises(DataError, match=message) as err:
        load_task(tmp_path, "arc_easy", "train")
    assert "arc_easy/train.jsonl, line 2" in str(err.value)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(DataError, match="train.jsonl: file not found"):
        load_task(tmp_path, "arc_easy", "train")


def _cfg(data_dir, **kw):
    return DataConfig(data_dir=data_dir, tasks=["arc_easy", "openbookqa"], train_per_task=100, **kw)


def test_iid_split_is_equal_five_way_and_disjoint(data_dir):
    cfg = _cfg(data_dir)
    split = partition(load_train_pool(cfg, 0), 4, cfg, 0)
    assert len(split.aux) == 40
    assert [len(c) for c in split.clients] == [40, 40, 40, 40]
    ids = [ex.id for ex in split.aux] + [ex.id for c in split.clients for ex in c]
    assert len(ids) == len(set(ids)) == 200
    again = partition(load_train_pool(cfg, 0), 4, cfg, 0)
    assert [ex.id for ex in again.clients[2]] == [ex.id for ex in split.clients[2]]
    other = partition(load_train_pool(cfg, 1), 4, cfg, 1)
    assert [ex.id for ex in other.clients[2]] != [ex.id for ex in split.clients[2]]


def test_task_split_gives_each_client_one_task(data_dir):
    cfg = _cfg(data_dir, partition="task")
    split = partition(load_train_pool(cfg, 0), 2, cfg, 0)
    assert [{ex.task for ex in c} for c in split.clients] == [{"arc_easy"}, {"openbookqa"}]


def test_dirichlet_split_is_skewed(data_dir):
    cfg = _cfg(data_dir, partition="dirichlet", dirichlet_alpha=0.3)
    split = partition(load_train_pool(cfg, 0), 4, cfg, 0)
    assert sum(len(c) for c in split.clients) == 160
    shares = [sum(ex.task == "arc_easy" for ex in c) / len(c) for c in split.clients]
    assert max(shares) - min(shares) > 0.3


def test_left_padded_batch_marks_only_continuation_tokens(tokenizer):
    a = encode_pair(tokenizer, "Question: what is it?\nAnswer:", " a red apple", 64)
    b = encode_pair(tokenizer, "Question: no?\nAnswer:", " yes", 64)
    batch = collate([a, b], tokenizer.pad_token_id)
    assert batch.target_mask.sum(1).tolist() == [a[1], b[1]]
    assert batch.input_ids[0, -1].item() == a[0][-1]
    assert batch.attention_mask[1, : batch.input_ids.shape[1] - len(b[0])].sum() == 0
    assert torch.equal(batch.targets[0, -a[1]:], torch.tensor(a[0][-a[1]:]))
    assert tokenizer.decode(a[0][-a[1]:]) == " a red apple"


def test_long_context_is_cut_from_the_left(tokenizer):
    ids, n = encode_pair(tokenizer, "word " * 200, " answer", 32)
    assert len(ids) == 32 and tokenizer.decode(ids[-n:]) == " answer"


def test_sft_batches_cover_the_shard_once_per_epoch(data_dir, tokenizer):
    data = SFTData(load_task(data_dir, "arc_easy", "train")[:10], tokenizer, 64)
    batches = list(data.batches(4, torch.Generator().manual_seed(0)))
    assert [b.input_ids.shape[0] for b in batches] == [4, 4, 2]
    assert data.steps_per_epoch(4) == 3


def test_dirichlet_split_that_empties_a_client_says_so(data_dir):
    cfg = _cfg(data_dir, partition="dirichlet", dirichlet_alpha=0.01)
    with pytest.raises(ValueError, match="without examples"):
        partition(load_train_pool(cfg, 0), 8, cfg, 0)
