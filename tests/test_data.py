import json

import pytest
import torch

from fedcollm.config import Config, DataConfig, TaskConfig, preset_tasks
from fedcollm.data.batching import SFTData, collate, encode_pair
from fedcollm.data.partition import load_train_pool, partition
from fedcollm.data.tasks import (
    bundled_data_dir,
    load_eval_split,
    load_scored_split,
    load_split,
    load_train_split,
)
from fedcollm.errors import ConfigError, DataError

PRESETS = preset_tasks()


def test_real_tasks_load_with_expected_sizes(data_dir):
    assert len(load_eval_split("arc_challenge", PRESETS["arc_challenge"], data_dir)) == 1172
    assert len(load_eval_split("commonsenseqa", PRESETS["commonsenseqa"], data_dir)) == 1221  # CSQA: scored on dev
    ex = load_eval_split("arc_easy", PRESETS["arc_easy"], data_dir, limit=3)[0]
    row = json.loads(open(f"{data_dir}/arc_easy/test.jsonl").readline())
    assert ex.context == f"Question: {row['question']}\nAnswer:"
    assert ex.continuations[ex.answer] == " " + row["choices"][row["answer"]]


def test_tuning_reads_validation_items_that_no_run_trains_on_or_reports(data_dir):
    """data.scored = "validation": the official dev split for ARC/OpenBookQA; for CommonsenseQA, whose dev split
    is the reported one, the last 1000 train rows, which are dropped from training in every run."""
    tuning = DataConfig(data_dir=data_dir, scored="validation")
    dev_ids = {e.id for e in load_scored_split("arc_easy", PRESETS["arc_easy"], tuning)}
    assert dev_ids == {e.id for e in load_split("arc_easy", PRESETS["arc_easy"], "dev", data_dir)}
    assert not dev_ids & {e.id for e in load_eval_split("arc_easy", PRESETS["arc_easy"], data_dir)}
    held = load_scored_split("commonsenseqa", PRESETS["commonsenseqa"], tuning)
    trained = load_train_split("commonsenseqa", PRESETS["commonsenseqa"], data_dir)
    reported = load_eval_split("commonsenseqa", PRESETS["commonsenseqa"], data_dir)
    assert len(held) == 1000 and len(trained) + 1000 == len(load_split(
        "commonsenseqa", PRESETS["commonsenseqa"], "train", data_dir))
    assert not {e.id for e in held} & ({e.id for e in trained} | {e.id for e in reported})


def test_a_task_without_validation_data_is_refused_by_name_when_tuning(data_dir):
    spec = TaskConfig(path="arc_easy", train_split="train")
    with pytest.raises(DataError, match="task 'mine' has no validation data.*tasks.mine.validation_split"):
        load_scored_split("mine", spec, DataConfig(data_dir=data_dir, scored="validation"))
    with pytest.raises(ConfigError, match="validation_holdout.*not both"):
        Config.from_dict({"tasks": {"mine": {"path": "arc_easy", "train_split": "train", "validation_split": "dev",
                                             "validation_holdout": 5}}})
    with pytest.raises(DataError, match="holds out every one"):
        load_train_split("mine", TaskConfig(path="arc_easy", train_split="train", validation_holdout=10**6), data_dir)


def test_presets_are_valid_task_configs_in_one_table():
    assert set(PRESETS) == {"arc_easy", "arc_challenge", "openbookqa", "commonsenseqa", "alpaca", "squad"}
    for name, spec in PRESETS.items():
        spec.validate(f"preset {name}")
    assert PRESETS["openbookqa"].context == "{question}"  # lm-evaluation-harness: bare stem
    assert PRESETS["commonsenseqa"].eval_split == "dev"


def test_bundled_data_serves_the_default_without_a_data_folder(data_dir):
    bundled = load_train_split("arc_easy", PRESETS["arc_easy"], None)
    shared = load_train_split("arc_easy", PRESETS["arc_easy"], data_dir)
    assert bundled == shared and len(bundled) == 2251
    assert (bundled_data_dir() / "alpaca_subset5k" / "train.jsonl").exists()
    with pytest.raises(DataError, match="task 'openbookqa': no folder 'openbookqa' .*set FEDCOLLM_DATA"):
        load_train_split("openbookqa", PRESETS["openbookqa"], None)


def test_labels_nested_fields_and_extra_template_fields(tmp_path):
    row = {"uid": 7, "q": {"stem": "Sky?"}, "fact": "Air scatters blue light.",
           "opts": {"text": ["blue", "green"], "label": ["A", "B"]}, "key": "A"}
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "test.jsonl").write_text(json.dumps(row) + "\n")
    spec = TaskConfig(path=str(tmp_path / "t"), context="{fact} {topic}?", continuation=" {choice}.",
                      choices_field="opts.text", labels_field="opts.label", answer_field="key", id_field="uid")
    with pytest.raises(DataError, match="line 1: missing field 'topic'"):
        load_split("t", spec, "test", None)
    row["topic"] = "colour"
    (tmp_path / "t" / "test.jsonl").write_text(json.dumps(row) + "\n")
    ex = load_split("t", spec, "test", None)[0]
    assert (ex.id, ex.context, ex.continuations, ex.answer) == ("7", "Air scatters blue light. colour?",
                                                               (" blue.", " green."), 0)


def test_bom_crlf_and_blank_lines_are_accepted(tmp_path):
    rows = [{"id": str(i), "question": "q" * (1 << 20 if i == 0 else 3), "choices": ["a", "b"], "answer": 1}
            for i in range(2)]
    text = "\ufeff" + "\r\n\r\n".join(json.dumps(r) for r in rows) + "\r\n"
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "test.jsonl").write_bytes(text.encode("utf-8"))
    exs = load_split("t", TaskConfig(path="t"), "test", str(tmp_path))
    assert [e.id for e in exs] == ["0", "1"] and len(exs[0].context) > 1 << 20


def test_duplicate_choices_warn_when_the_task_says_so(tmp_path, caplog):
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "test.jsonl").write_text(json.dumps({"id": "x", "question": "q", "choices": ["a", "a", "b"],
                                                          "answer": 2}) + "\n")
    with pytest.raises(DataError, match="line 1: two choices have the same text"):
        load_split("t", TaskConfig(path="t"), "test", str(tmp_path))
    with caplog.at_level("WARNING"):
        assert len(load_split("t", TaskConfig(path="t", duplicate_choices="warn"), "test", str(tmp_path))) == 1
    assert "1 row(s) have two identical choice texts" in caplog.text


def test_hf_datasets_source_goes_through_the_same_checks(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = {"id": ["a", "b"], "question": ["Q1", "Q2"], "choices": [["x", "y"], ["u", "v"]], "answer": [0, 1]}
    datasets.DatasetDict({"validation": datasets.Dataset.from_dict(rows)}).save_to_disk(str(tmp_path / "ds"))
    spec = TaskConfig(path=f"hf:{tmp_path / 'ds'}", eval_split="validation")
    assert [e.answer for e in load_eval_split("mine", spec, None)] == [0, 1]
    rows["answer"] = [0, 5]
    datasets.DatasetDict({"validation": datasets.Dataset.from_dict(rows)}).save_to_disk(str(tmp_path / "bad"))
    with pytest.raises(DataError, match=r"\[validation\] row 1: field 'answer' = 5 is out of range"):
        load_eval_split("mine", TaskConfig(path=f"hf:{tmp_path / 'bad'}", eval_split="validation"), None)
    with pytest.raises(DataError, match="cannot load split 'test'"):
        load_eval_split("mine", TaskConfig(path=f"hf:{tmp_path / 'ds'}"), None)


def _cfg(data_dir, **kw):
    return DataConfig(data_dir=data_dir, tasks=["arc_easy", "openbookqa"], train_per_task=100, **kw)


def test_iid_split_is_equal_five_way_and_disjoint(data_dir):
    cfg = _cfg(data_dir)
    split = partition(load_train_pool(PRESETS, cfg, 0), 4, cfg, 0)
    assert len(split.aux) == 40
    assert [len(c) for c in split.clients] == [40, 40, 40, 40]
    ids = [ex.id for ex in split.aux] + [ex.id for c in split.clients for ex in c]
    assert len(ids) == len(set(ids)) == 200
    again = partition(load_train_pool(PRESETS, cfg, 0), 4, cfg, 0)
    assert [ex.id for ex in again.clients[2]] == [ex.id for ex in split.clients[2]]
    other = partition(load_train_pool(PRESETS, cfg, 1), 4, cfg, 1)
    assert [ex.id for ex in other.clients[2]] != [ex.id for ex in split.clients[2]]


def test_task_split_gives_each_client_one_task(data_dir):
    cfg = _cfg(data_dir, partition="task")
    split = partition(load_train_pool(PRESETS, cfg, 0), 2, cfg, 0)
    assert [{ex.task for ex in c} for c in split.clients] == [{"arc_easy"}, {"openbookqa"}]


def test_dirichlet_split_is_skewed(data_dir):
    cfg = _cfg(data_dir, partition="dirichlet", dirichlet_alpha=0.3)
    split = partition(load_train_pool(PRESETS, cfg, 0), 4, cfg, 0)
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
    data = SFTData(load_train_split("arc_easy", PRESETS["arc_easy"], data_dir)[:10], tokenizer, 64)
    batches = list(data.batches(4, torch.Generator().manual_seed(0)))
    assert [b.input_ids.shape[0] for b in batches] == [4, 4, 2]
    assert data.steps_per_epoch(4) == 3


def test_dirichlet_split_that_empties_a_client_says_so(data_dir):
    cfg = _cfg(data_dir, partition="dirichlet", dirichlet_alpha=0.01)
    with pytest.raises(ConfigError, match="without examples"):
        partition(load_train_pool(PRESETS, cfg, 0), 8, cfg, 0)


def test_evaluation_only_task_cannot_be_trained(tmp_path):
    table = {"tasks": {"piqa": {"path": "piqa", "eval_split": "dev"}}}
    with pytest.raises(ConfigError, match="task 'piqa' has no train split .*data.eval_tasks"):
        Config.from_dict(table | {"data": {"tasks": ["piqa"]}})
    cfg = Config.from_dict(table | {"data": {"tasks": ["arc_easy"], "eval_tasks": ["piqa"]}})
    assert list(cfg.task_specs()) == ["arc_easy", "piqa"]
