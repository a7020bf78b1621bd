"""A corpus of malformed inputs fed to the real entry points. Each must raise the named error type, with a
message that names the culprit (file and line, config field, flag, run directory or client): no input here may
be accepted silently, and none may end in a raw library exception."""

from __future__ import annotations

import json
import math
import shutil
import struct
from pathlib import Path

import pytest
import torch

from fedcollm import cli
from fedcollm.aggregate import validate_update
from fedcollm.comm import Payload, pack, unpack
from fedcollm.config import Config, TaskConfig
from fedcollm.data.tasks import load_alpaca_texts, load_split
from fedcollm.errors import (
    ConfigError,
    DataError,
    FedcollmError,
    InvalidUpdate,
    ModelError,
    RunDirError,
)

GOOD = {"id": "g", "question": "Which is a fruit?", "choices": ["apple", "stone"], "answer": 0}


def _row(**changes) -> str:
    row = dict(GOOD, id="x")
    for key, value in changes.items():
        if value is ...:
            row.pop(key)
        else:
            row[key] = value
    return json.dumps(row)


# ---- data rows: (second line of train.jsonl, text the message must contain) -------------------------------------
ROWS = [
    ('{"id": "x", "question": "q", "choi', "line 2: not valid JSON"),
    ('{"id": "x", "question": "unterminated', "line 2: not valid JSON"),
    (b"\xff\xfe{}", "line 2: not valid UTF-8"),
    (b'{"id": "x\xc3", "question": "q"}', "line 2: not valid UTF-8"),
    ("[1, 2]", "line 2: expected a JSON object, got list"),
    ('"a string"', "line 2: expected a JSON object, got str"),
    ("42", "line 2: expected a JSON object, got int"),
    ("null", "line 2: expected a JSON object, got NoneType"),
    ("\ufeff" + _row(), "line 2: not valid JSON"),  # a byte-order mark is accepted only at the start of the file
    ("\x00\x00", "line 2: not valid JSON"),
    ('{"id": "x", "id": "y", "question": "q", "choices": ["a", "b"], "answer": 0}', "line 2: duplicate key(s) 'id'"),
    ('{"id": "x", "question": "q", "choices": ["a", "b"], "answer": 0, "answer": 1}', "duplicate key(s) 'answer'"),
    ('{"id": "x", "question": "q", "choices": ["a", "b"], "answer": NaN}', "line 2: NaN is not valid JSON"),
    ('{"id": "x", "question": "q", "choices": ["a", "b"], "answer": Infinity}', "line 2: Infinity is not valid JSON"),
    ('{"id": "x", "question": "q", "choices": ["a", "b"], "answer": -Infinity}', "line 2: -Infinity is not valid"),
    (_row(id=...), "line 2: missing field 'id'"),
    (_row(question=...), "line 2: missing field 'question'"),
    (_row(choices=...), "line 2: missing field 'choices'"),
    (_row(answer=...), "line 2: missing field 'answer'"),
    (_row(id=True), "line 2: field 'id'"),
    (_row(id=None), "line 2: field 'id'"),
    (_row(id=["x"]), "line 2: field 'id'"),
    (_row(id=""), "line 2: field 'id'"),
    (_row(id="   "), "line 2: field 'id'"),
    (_row(id=1.5), "line 2: field 'id'"),
    (_row(question=5), "line 2: field 'question' must be a string, got int"),
    (_row(question=None), "line 2: field 'question' must be a string"),
    (_row(question=["q"]), "line 2: field 'question' must be a string, got list"),
    (_row(question={}), "line 2: field 'question' must be a string, got dict"),
    (_row(question=""), "line 2: field 'question' is empty"),
    (_row(question="  \n\t "), "line 2: field 'question' is empty"),
    (_row(choices="ab"), "line 2: field 'choices' must be a list of at least 2"),
    (_row(choices=[]), "line 2: field 'choices' must be a list of at least 2"),
    (_row(choices=["only"]), "line 2: field 'choices' must be a list of at least 2"),
    (_row(choices={"a": 1, "b": 2}), "line 2: field 'choices' must be a list"),
    (_row(choices=None), "line 2: field 'choices' must be a list"),
    (_row(choices=[1, 2]), "line 2: field 'choices[0]' must be a string, got int"),
    (_row(choices=["a", None]), "line 2: field 'choices[1]' must be a string, got NoneType"),
    (_row(choices=["a", ""]), "line 2: field 'choices[1]' is empty"),
    (_row(choices=["a", "   "]), "line 2: field 'choices[1]' is empty"),
    (_row(choices=[["a"], "b"]), "line 2: field 'choices[0]' must be a string, got list"),
    (_row(choices=["a", "b", "a"]), "line 2: two choices have the same text"),
    (_row(answer=2), "line 2: field 'answer' = 2 is out of range for 2 choices"),
    (_row(answer=-1), "line 2: field 'answer' = -1 is out of range"),
    (_row(answer=10**30), "line 2: field 'answer' = 1000000000000000000000000000000 is out of range"),
    (_row(answer=True), "line 2: field 'answer' must be a 0-based choice index or a label string, got bool"),
    (_row(answer=1.0), "line 2: field 'answer' must be a 0-based choice index or a label string, got float"),
    (_row(answer=None), "line 2: field 'answer' must be a 0-based choice index"),
    (_row(answer=[0]), "line 2: field 'answer' must be a 0-based choice index"),
    (_row(answer="A"), "line 2: missing field 'labels'"),
    (_row(answer="C", labels=["A", "B"]), "line 2: field 'answer' = 'C' is not exactly one of the labels"),
    (_row(answer="A", labels=["A", "A"]), "line 2: field 'answer' = 'A' is not exactly one of the labels"),
    (_row(answer="A", labels=["A"]), "line 2: field 'labels' must list one string label per choice (2)"),
    (_row(answer="A", labels="AB"), "line 2: field 'labels' must list one string label per choice"),
    (_row(answer="A", labels=[1, 2]), "line 2: field 'labels' must list one string label per choice"),
    (_row(id="g"), "line 2: duplicate id 'g' (first at"),
    # against d614e59 these four got through: a RecursionError traceback for the first; the other three passed
    # validation (a lone surrogate then crashed the tokenizer with a TypeError after the models had loaded)
    (_row(deep=[[[[]]]]).replace("[[[[]]]]", "[" * 100_000 + "]" * 100_000), "line 2: JSON nested too deeply"),
    (_row(question="Which \ud800 is a fruit?"), "line 2: field 'question' holds a lone surrogate '\\ud800' (at "
     "character 7)"),
    (_row(choices=["apple", "st\udfffone"]), "line 2: field 'choices[1]' holds a lone surrogate"),
    (_row(question="Which\x00 is a fruit?"), "line 2: field 'question' holds a NUL character (at character 6)"),
]


@pytest.mark.parametrize("line, expected", ROWS, ids=[f"row{i}" for i in range(len(ROWS))])
def test_bad_data_row(tmp_path, line, expected):
    first = json.dumps(GOOD).encode()
    second = line if isinstance(line, bytes) else line.encode("utf-8")
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "train.jsonl").write_bytes(first + b"\n" + second + b"\n")
    with pytest.raises(DataError) as err:
        load_split("t", TaskConfig(path="t", train_split="train"), "train", str(tmp_path))
    assert "t/train.jsonl, line 2" in str(err.value) and expected in str(err.value)


FILES = [
    (b"", "train.jsonl: no examples"),
    (b"\n\n  \n\r\n", "train.jsonl: no examples"),
    (b"\xef\xbb\xbf", "train.jsonl: no examples"),
    ("\ufeff".encode("utf-16"), "line 1: not valid UTF-8"),
    (json.dumps(GOOD).encode("utf-16"), "line 1: not valid UTF-8"),
    (b'{"id": "g", "question": "q", "choices": ["a", "b"], "answer": 0', "line 1: not valid JSON"),
]


@pytest.mark.parametrize("content, expected", FILES, ids=[f"file{i}" for i in range(len(FILES))])
def test_bad_data_file(tmp_path, content, expected):
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "train.jsonl").write_bytes(content)
    with pytest.raises(DataError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        load_split("t", TaskConfig(path="t", train_split="train"), "train", str(tmp_path))


def test_cr_only_line_ends_are_accepted(tmp_path):
    """Old Mac line ends (CR alone) are line ends too; against d614e59 such a file was one line, refused as
    "line 1: not valid JSON (Extra data ...)"."""
    (tmp_path / "t").mkdir()
    rows = [json.dumps(GOOD), json.dumps(GOOD | {"id": "h"})]
    (tmp_path / "t" / "train.jsonl").write_bytes("\r".join(rows).encode() + b"\r")
    examples = load_split("t", TaskConfig(path="t", train_split="train"), "train", str(tmp_path))
    assert [ex.id for ex in examples] == ["g", "h"]
    (tmp_path / "t" / "train.jsonl").write_bytes(f"{rows[0]}\r{rows[0]}\r".encode())  # and lines are counted
    with pytest.raises(DataError, match="train.jsonl, line 2: duplicate id 'g'"):
        load_split("t", TaskConfig(path="t", train_split="train"), "train", str(tmp_path))


def test_text_a_tokenizer_cannot_take_is_refused_before_any_model_loads(tmp_path, monkeypatch):
    """Against d614e59 a question holding a lone surrogate passed validation and the run went on to load the
    models (here: reached resolve_model_dir); the tokenizer then failed on it with a raw TypeError."""
    import fedcollm.models.derive

    def no_models(*args, **kwargs):
        raise AssertionError("a model was resolved before the data was validated")

    monkeypatch.setattr(fedcollm.models.derive, "resolve_model_dir", no_models)
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "train.jsonl").write_text(json.dumps(GOOD) + "\n" + _row(question="Which \udc80?") + "\n")
    (tmp_path / "t" / "test.jsonl").write_text(json.dumps(GOOD) + "\n")
    config = tmp_path / "c.toml"
    config.write_text(f'[data]\ndata_dir = "{tmp_path}"\ntasks = ["t"]\n\n'
                      '[tasks.t]\npath = "t"\ntrain_split = "train"\n')
    _dispatch_error(["run", "--config", str(config), "--out", str(tmp_path / "run")], DataError,
                    f"{tmp_path / 't' / 'train.jsonl'}, line 2: field 'question' holds a lone surrogate")


def test_missing_split_file_folder_and_directory_in_place_of_a_file(tmp_path):
    (tmp_path / "t").mkdir()
    spec = TaskConfig(path="t", train_split="train")
    with pytest.raises(DataError, match="t/train.jsonl: JSONL file not found"):
        load_split("t", spec, "train", str(tmp_path))
    (tmp_path / "t" / "train.jsonl").mkdir()
    with pytest.raises(DataError, match="train.jsonl: is a directory"):
        load_split("t", spec, "train", str(tmp_path))
    with pytest.raises(DataError, match="task 'u': no folder 'nowhere' in data.data_dir"):
        load_split("u", TaskConfig(path="nowhere"), "test", str(tmp_path))
    with pytest.raises(DataError, match="task 'u': folder /no/such/folder does not exist"):
        load_split("u", TaskConfig(path="/no/such/folder"), "test", None)


@pytest.mark.parametrize("context, row_extra, expected", [
    ("{topic}: {question}", {}, "line 1: missing field 'topic'"),
    ("{topic}: {question}", {"topic": 3}, "line 1: field 'topic' must be a string, got int"),
    ("{topic}: {question}", {"topic": " "}, "line 1: field 'topic' is empty"),
    ("{meta}", {"meta": {"a": "b"}}, "line 1: field 'meta' must be a string, got dict"),
])
def test_template_fields_missing_from_rows(tmp_path, context, row_extra, expected):
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "test.jsonl").write_text(json.dumps(GOOD | row_extra) + "\n")
    with pytest.raises(DataError, match=expected):
        load_split("t", TaskConfig(path="t", context=context), "test", str(tmp_path))


def test_data_dir_that_does_not_exist(tmp_path):
    with pytest.raises(DataError, match=f"data.data_dir: folder {tmp_path / 'typo'} does not exist"):
        load_split("arc_easy", TaskConfig(path="arc_easy"), "test", str(tmp_path / "typo"))


@pytest.mark.parametrize("targets, expected", [
    (["nope"], "['nope'] match no linear module of this llama model; available: ['q_proj'"),
    (["q_proj", "c_attn"], "['c_attn'] match no linear module"),
    (["layers"], "['layers'] match no linear module"),
])
def test_lora_targets_that_match_nothing(targets, expected):
    from fedcollm.config import LoraConfig
    from fedcollm.models.lora import add_lora
    from fedcollm.models.tiny import tiny_llama

    with pytest.raises(ConfigError) as err:
        add_lora(tiny_llama(), LoraConfig(target_modules=targets), 0)
    assert "model.lora.target_modules" in str(err.value) and expected in str(err.value)


def test_bad_alpaca_row(tmp_path):
    (tmp_path / "alpaca_subset5k").mkdir()
    (tmp_path / "alpaca_subset5k" / "train.jsonl").write_text('{"instruction": "x", "input": "", "output": 3}\n')
    with pytest.raises(DataError, match="train.jsonl, line 1: field 'output' must be a string"):
        load_alpaca_texts(str(tmp_path))


def test_unreachable_datasets_source():
    with pytest.raises(DataError, match=r"task 'h': cannot load split 'test' of hf:no-such-owner/no-such-set"):
        load_split("h", TaskConfig(path="hf:no-such-owner/no-such-set"), "test", None)


# ---- config fields: (dotted field, bad value, text the message must contain besides the field) ------------------
FIELDS = [
    ("model.llm", "", "must not be empty"), ("model.llm", "   ", "must not be empty"), ("model.llm", 5, "expected str"),
    ("model.llm", "derived:smollm2-135m:0", "N >= 1"), ("model.llm", "derived:smollm2-135m", "derived:BASE:N"),
    ("model.slm", "derived::3", "derived:BASE:N"), ("model.slm", "derived:x:abc", "derived:BASE:N"),
    ("model.slm", None, "expected str"), ("model.slm", [], "expected str"),
    ("model.client_slms", "tiny", "expected a list"), ("model.client_slms", ["a", "", "a", "a"], "must not be empty"),
    ("model.client_slms", [1, 2, 3, 4], "expected str"), ("model.client_slms", ["a"], "federation.clients = 4"),
    ("model.client_slms", ["a", "derived:x:0", "a", "a"], "derived:BASE:N"),
    ("model.client_slms", ["a", "b", "a", "b"], "fedcollm average one SLM adapter"),
    ("model.dtype", "int8", "auto, bf16, fp16 or fp32"), ("model.dtype", 16, "expected str"),
    ("model.device", "gpu", "auto, cpu, cuda or cuda:N"), ("model.device", "cuda:x", "auto, cpu, cuda"),
    ("model.device", 1, "expected str"),
    ("model.max_length", 0, ">= 16"), ("model.max_length", 15, ">= 16"), ("model.max_length", -1, ">= 16"),
    ("model.max_length", 1.5, "expected int"), ("model.max_length", "128", "expected int"),
    ("model.max_length", True, "expected int, got bool"),
    ("model.lora.r", 0, ">= 1"), ("model.lora.r", -1, ">= 1"), ("model.lora.r", 2.5, "expected int"),
    ("model.lora.r", True, "expected int"),
    ("model.lora.alpha", 0, "> 0"), ("model.lora.alpha", -16, "> 0"), ("model.lora.alpha", "16", "expected int"),
    ("model.lora.dropout", 1.0, "[0, 1)"), ("model.lora.dropout", -0.1, "[0, 1)"),
    ("model.lora.dropout", math.nan, "finite"), ("model.lora.dropout", math.inf, "finite"),
    ("model.lora.dropout", "0.1", "expected float"),
    ("model.lora.target_modules", "q_proj", "expected a list"),
    ("model.lora.target_modules", ["q_proj", "q_proj"], "'q_proj' more than once"),
    ("model.lora.target_modules", [""], "must not be empty"), ("model.lora.target_modules", [1], "expected str"),
    ("data.data_dir", "", "must not be empty"), ("data.data_dir", 3, "expected str"),
    ("data.tasks", [], "at least one task"), ("data.tasks", "arc_easy", "expected a list"),
    ("data.tasks", ["arc_easy", "arc_easy"], "more than once"), ("data.tasks", ["mmlu"], "unknown task 'mmlu'"),
    ("data.tasks", [1], "expected str"),
    ("data.eval_tasks", ["arc_easy"], "already in data.tasks"), ("data.eval_tasks", ["nope"], "unknown task 'nope'"),
    ("data.eval_tasks", "piqa", "expected a list"),
    ("data.train_per_task", 0, "> 0"), ("data.train_per_task", -5, "> 0"), ("data.train_per_task", 1.5, "expected int"),
    ("data.train_per_task", True, "expected int"),
    ("data.partition", "random", "iid, dirichlet or task"), ("data.partition", "", "must not be empty"),
    ("data.dirichlet_alpha", 0, "> 0"), ("data.dirichlet_alpha", -1.0, "> 0"),
    ("data.dirichlet_alpha", math.inf, "finite"), ("data.dirichlet_alpha", math.nan, "finite"),
    ("data.aux_fraction", 0, "(0, 1)"), ("data.aux_fraction", 1, "(0, 1)"), ("data.aux_fraction", 1.5, "(0, 1)"),
    ("data.aux_fraction", -0.1, "(0, 1)"), ("data.aux_fraction", math.nan, "finite"),
    ("data.eval_limit", 0, "> 0"), ("data.eval_limit", -1, "> 0"), ("data.eval_limit", "all", "expected int"),
    ("federation.clients", 0, ">= 1"), ("federation.clients", -1, ">= 1"), ("federation.clients", 2.0, "expected int"),
    ("federation.clients", True, "expected int"),
    ("federation.rounds", 0, ">= 1"), ("federation.rounds", -2, ">= 1"), ("federation.rounds", math.inf, "expected int"),
    ("federation.local_epochs", 0, ">= 1"),
    ("federation.client_lr", 0, "> 0"), ("federation.client_lr", -1e-3, "> 0"),
    ("federation.client_lr", math.inf, "finite"), ("federation.client_lr", math.nan, "finite"),
    ("federation.client_lr", "3e-4", "expected float"),
    ("federation.batch_size", 0, ">= 1"),
    ("federation.fraction_fit", 0, "(0, 1]"), ("federation.fraction_fit", 1.5, "(0, 1]"),
    ("federation.fraction_fit", math.nan, "finite"), ("federation.min_fit_clients", 0, "[1, federation.clients"),
    ("federation.min_fit_clients", 9, "[1, federation.clients = 4]"), ("federation.max_examples", 0, ">= 1"),
    ("federation.max_update_ratio", 0, "> 0"), ("federation.max_update_ratio", math.inf, "finite"),
    ("federation.norm_action", "ignore", "clip or reject"),
    ("distill.epochs", -1, ">= 0"), ("distill.epochs", "one", "expected float"),
    ("distill.kd_weight", -1.0, ">= 0"), ("distill.kd_weight", math.inf, "finite"),
    ("distill.kd_weight", math.nan, "finite"),
    ("distill.temperature", 0, "> 0"), ("distill.temperature", -1.0, "> 0"), ("distill.temperature", math.inf, "finite"),
    ("distill.kl_direction", "both", "forward or reverse"), ("distill.kl_direction", "", "must not be empty"),
    ("distill.top_k", -1, ">= 0"),
    ("distill.llm_lr", 0, "> 0"), ("distill.llm_lr", math.inf, "finite"),
    ("distill.slm_lr", -1.0, "> 0"), ("distill.slm_lr", math.nan, "finite"),
    ("distill.batch_size", 0, ">= 1"),
    ("dp.noise_multiplier", -1.0, ">= 0"), ("dp.noise_multiplier", math.inf, "finite"), ("dp.clip_norm", 0, "> 0"),
    ("dp.delta", 0, "(0, 1)"), ("dp.delta", 1.0, "(0, 1)"),
    ("secagg.enabled", 1, "expected bool"), ("secagg.num_shares", 2, "> 2"),
    ("secagg.reconstruction_threshold", 3, "[2, secagg.num_shares = 3)"), ("secagg.clipping_range", 0, "> 0"),
    ("secagg.clipping_range", math.nan, "finite"), ("secagg.quantization_range", 2**31, "[2, 2^30]"),
    ("derive.calib_texts", 0, ">= 1"), ("derive.calib_len", 4, ">= 8"), ("derive.heal_steps", -1, ">= 0"),
    ("derive.heal_lr", -1e-4, "> 0"), ("derive.heal_lr", 0, "> 0"), ("derive.heal_lr", math.inf, "finite"),
    ("derive.heal_batch", 0, ">= 1"), ("derive.sampled_texts", -1, ">= 0"), ("derive.seq_len", 0, ">= 8"),
    ("derive.seed", -1, ">= 0"),
    ("run.methods", [], "at least one method"), ("run.methods", ["magic"], "unknown method 'magic'"),
    ("run.methods", ["fedavg", "fedavg"], "more than once"), ("run.methods", "fedavg", "expected a list"),
    ("run.seed", -1, ">= 0"), ("run.seed", 1.5, "expected int"),
    ("run.out_dir", "", "must not be empty"), ("run.out_dir", "   ", "must not be empty"),
    ("run.out_dir", 7, "expected str"),
    ("run.eval_every", -1, ">= 0"),
    ("run.round_eval_limit", 0, "> 0"), ("run.round_eval_limit", -3, "> 0"),
    ("run.eval_batch_size", 0, ">= 1"), ("run.eval_batch_size", -1, ">= 1"),
    ("run.eval_batch_tokens", 0, ">= 1"), ("run.eval_max_length", 15, ">= 16"),
    ("run.eval_max_length", 1.5, "expected int"),
    ("run.threads", -1, ">= 0"),
]


def _nested(dotted: str, value) -> dict:
    out: dict = {}
    node = out
    parts = dotted.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value
    return out


@pytest.mark.parametrize("key, value, expected", FIELDS, ids=[f"{k}={v!r}" for k, v, _ in FIELDS])
def test_bad_config_field(key, value, expected):
    with pytest.raises(ConfigError) as err:
        Config.from_dict(_nested(key, value))
    assert key in str(err.value) and expected in str(err.value)


SECTIONS = [
    ({"model": 3}, "config.model: expected a table"),
    ({"federation": []}, "config.federation: expected a table"),
    ({"extra": {"a": 1}}, "config: unknown field(s) extra"),
    ({"derive": {"layers": 10}}, "config.derive: unknown field(s) layers"),
    ({"model": {"lora": "r8"}}, "config.model.lora: expected a table"),
    ({"tasks": []}, "config.tasks: expected a table"),
    ({"tasks": {"t": 3}}, "config.tasks.t: expected a table"),
]


@pytest.mark.parametrize("data, expected", SECTIONS, ids=[f"section{i}" for i in range(len(SECTIONS))])
def test_bad_config_section(data, expected):
    with pytest.raises(ConfigError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        Config.from_dict(data)


# ---- task tables: (fields of [tasks.t], text the message must contain) ------------------------------------------
TASKS = [
    ({}, "tasks.t.path: must name a folder or hf:ID"),
    ({"path": ""}, "tasks.t.path: must not be empty"),
    ({"path": "t", "context": "{question"}, "tasks.t.context: not a valid template"),
    ({"path": "t", "context": "{question!r}"}, "tasks.t.context: placeholder {question} must be a plain"),
    ({"path": "t", "context": "{q.attr}"}, "tasks.t.context: placeholder {q.attr} must be a plain"),
    ({"path": "t", "context": "{0}"}, "tasks.t.context: placeholder {0} must be a plain"),
    ({"path": "t", "context": "Q: {}"}, "tasks.t.context: placeholder {} must be a plain"),
    ({"path": "t", "context": "{question:>10}"}, "tasks.t.context: placeholder {question} must be a plain"),
    ({"path": "t", "context": "{question} {choice}"}, "tasks.t.context: must not use {choice}"),
    ({"path": "t", "continuation": " answer"}, "tasks.t.continuation: must contain {choice} exactly once"),
    ({"path": "t", "continuation": "{choice}{choice}"}, "tasks.t.continuation: must contain {choice} exactly once"),
    ({"path": "t", "continuation": "{choice"}, "tasks.t.continuation: not a valid template"),
    ({"path": "t", "duplicate_choices": "ignore"}, "tasks.t.duplicate_choices: error or warn"),
    ({"path": "t", "train_split": "test"}, "tasks.t.train_split: is the evaluation split 'test'"),
    ({"path": "t", "subset": "ARC-Easy"}, "tasks.t.subset: applies only to hf: sources"),
    ({"path": "t", "split": "train"}, "tasks.t: unknown field(s) split"),
    ({"path": "t", "eval_split": ""}, "tasks.t.eval_split: must not be empty"),
    ({"path": "t", "answer_field": 3}, "tasks.t.answer_field: expected str"),
    ({"path": "t", "context": ""}, "tasks.t.context: must not be empty"),
    ({"path": "t", "choices_field": " "}, "tasks.t.choices_field: must not be empty"),
]


@pytest.mark.parametrize("table, expected", TASKS, ids=[f"task{i}" for i in range(len(TASKS))])
def test_bad_task_table(table, expected):
    with pytest.raises(ConfigError) as err:
        Config.from_dict({"tasks": {"t": table}, "data": {"tasks": ["arc_easy"], "eval_tasks": ["t"]}})
    assert expected in str(err.value)


def test_bad_task_names_and_training_an_evaluation_only_task():
    with pytest.raises(ConfigError, match="tasks.my task: task names may use"):
        Config.from_dict({"tasks": {"my task": {"path": "t"}}})
    with pytest.raises(ConfigError, match="data.tasks: task 't' has no train split"):
        Config.from_dict({"tasks": {"t": {"path": "t"}}, "data": {"tasks": ["t"]}})


# ---- TOML files -----------------------------------------------------------------------------------------------
TOML = [
    (b"[federation\n", "not valid TOML"),
    (b"[federation]\nclients = 2\nclients = 3\n", "not valid TOML"),
    (b"[run]\n[run]\n", "not valid TOML"),
    (b"[run]\nout_dir = \"\xff\"\n", "not UTF-8 text"),
    (b"[federation]\nclient_lr = inf\n", "federation.client_lr: must be a finite number"),
    (b"[distill]\nkd_weight = nan\n", "distill.kd_weight: must be a finite number"),
    (b"[extras]\na = 1\n", "unknown field(s) extras"),
    (b"model = \"x\"\n", "model: expected a table"),
    (b"[federation]\nclientz = 3\n", "federation: unknown field(s) clientz"),
    (b"[data]\ntasks = [\"arc_easy\", \"mmlu\"]\n", "data.tasks: unknown task 'mmlu'"),
    (b"a = " + b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),  # d614e59: a raw RecursionError
]


@pytest.mark.parametrize("content, expected", TOML, ids=[f"toml{i}" for i in range(len(TOML))])
def test_bad_toml_file(tmp_path, content, expected):
    path = tmp_path / "c.toml"
    path.write_bytes(content)
    with pytest.raises(ConfigError) as err:
        Config.from_toml(path)
    assert expected in str(err.value) and "c.toml" in str(err.value)


def test_missing_or_unreadable_toml(tmp_path):
    with pytest.raises(ConfigError, match="nope.toml: config file not found"):
        Config.from_toml(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match="is a directory, expected the config file"):
        Config.from_toml(tmp_path)


# ---- --set overrides --------------------------------------------------------------------------------------------
OVERRIDES = [
    ("federation.rounds", "override must look like section.key=value"),
    ("=3", "override must look like section.key=value"),
    ("federation.round=3", "federation.round: no such config field"),
    ("federations.rounds=3", "federations.rounds: no config section 'federations'"),
    ("model=3", "model: is a section"),
    ("model.lora=3", "model.lora: is a section"),
    ("federation.rounds=abc", "federation.rounds: expected int, got str 'abc'"),
    ("federation.rounds=2.5", "federation.rounds: expected int, got float"),
    ("federation.client_lr=inf", "federation.client_lr: must be a finite number"),
    ("federation.client_lr=nan", "federation.client_lr: must be a finite number"),
    ("data.tasks=arc_easy", "data.tasks: expected a list"),
    ("data.eval_limit=0", "data.eval_limit: must be > 0"),
    ("run.out_dir=", "run.out_dir: must not be empty"),
    ("run.methods=['x']", "run.methods: unknown method 'x'"),
    ("federation.clients=true", "federation.clients: expected int, got bool"),
    ("data.tasks=['mmlu']", "data.tasks: unknown task 'mmlu'"),
    ("tasks.zzz.path=x", "tasks.zzz.path: no config section 'tasks.zzz'"),
    ("model.lora.target_modules=[]x", "model.lora.target_modules: expected a list"),
]


@pytest.mark.parametrize("item, expected", OVERRIDES, ids=[f"set{i}" for i in range(len(OVERRIDES))])
def test_bad_override(item, expected):
    with pytest.raises(ConfigError) as err:
        Config().override([item])
    assert expected in str(err.value)


# ---- CLI flags and run directories ----------------------------------------------------------------------------
def _dispatch_error(argv: list[str], kind: type[FedcollmError], expected: str) -> None:
    with pytest.raises(kind) as err:
        cli.dispatch(argv)
    assert expected in str(err.value), str(err.value)


@pytest.mark.parametrize("argv, kind, expected", [
    (["run", "--limit", "0"], ConfigError, "--limit: must be >= 1"),
    (["run", "--limit", "-1"], ConfigError, "--limit: must be >= 1"),
    (["eval", "smollm2-135m", "--limit", "0"], ConfigError, "--limit: must be >= 1"),
    (["run", "--out", ""], ConfigError, "run.out_dir: must not be empty"),
    (["run", "--config", "/no/such.toml"], ConfigError, "/no/such.toml: config file not found"),
    (["run", "--set", "federation.rounds"], ConfigError, "override must look like"),
    (["derive-slm", "--layers", "0"], ConfigError, "--layers: must be >= 1"),
    (["run", "--resume", "/no/such/run"], RunDirError, "/no/such/run: no such run directory"),
    (["report", "/no/such/run"], RunDirError, "/no/such/run: no such run directory"),
    (["eval", "/no/such/model", "--limit", "2"], ModelError, "model /no/such/model: path does not exist"),
    (["eval", "derived:smollm2-135m:0"], ConfigError, "model: 'derived:smollm2-135m:0' is not derived:BASE:N"),
    (["eval", "no-such-model-anywhere", "--limit", "2"], ModelError, "model no-such-model-anywhere: cannot load it"),
])
def test_bad_cli_flags(argv, kind, expected):
    _dispatch_error(argv, kind, expected)


@pytest.mark.parametrize("flag", [["--set", "federation.rounds=3"], ["--out", "elsewhere"], ["--limit", "5"],
                                  ["--config", "c.toml"]])
def test_resume_refuses_flags_it_would_ignore(tmp_path, flag):
    _dispatch_error(["run", "--resume", str(tmp_path), *flag], ConfigError, "cannot be combined with --resume")


def test_resume_on_a_file_or_a_directory_without_a_run(tmp_path):
    (tmp_path / "file").write_text("x")
    _dispatch_error(["run", "--resume", str(tmp_path / "file")], RunDirError, "no such run directory")
    _dispatch_error(["run", "--resume", str(tmp_path)], RunDirError, "no config.json")
    _dispatch_error(["report", str(tmp_path)], RunDirError, "results.json: results file not found")


def test_device_that_is_not_there(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    _dispatch_error(["run", "--out", str(tmp_path / "r"), "--set", "model.device=cuda"], ModelError,
                    "model.device = 'cuda', but torch sees no CUDA device")
    assert not (tmp_path / "r").exists()  # a start that fails leaves nothing behind


# ---- a finished tiny run, damaged in every way a resume or report must refuse ----------------------------------
@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, data_dir, tokenizer):
    from conftest import patch_tiny_build

    out = tmp_path_factory.mktemp("finished") / "run"
    with pytest.MonkeyPatch.context() as mp:
        patch_tiny_build(mp, tokenizer)
        cli.dispatch(tiny_run_args(out, data_dir))
    return out


def tiny_run_args(out: Path, data_dir: str) -> list[str]:
    return ["run", "--out", str(out), "--set", f"data.data_dir='{data_dir}'", "--set", "data.tasks=['arc_easy']",
            "--set", "data.train_per_task=24", "--limit", "4", "--set", "federation.clients=2",
            "--set", "distill.epochs=1", "--set", "model.max_length=64", "--set", "model.lora.dropout=0.0",
            "--set", "run.methods=['zero_shot','fedcollm']"]


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _nan_adapter(path: Path) -> None:
    from safetensors.torch import load_file, save_file

    state = load_file(path)
    next(iter(state.values()))[0, 0] = float("nan")
    save_file(state, path)


def _shrunk_adapter(path: Path) -> None:
    from safetensors.torch import load_file, save_file

    save_file({k: v[..., :1].contiguous() for k, v in load_file(path).items()}, path)


def _beyond_rounds(run: Path) -> None:
    shutil.copytree(run / "fedcollm" / "round_002", run / "fedcollm" / "round_005")
    done = run / "fedcollm" / "round_005" / "done.json"
    done.write_text(json.dumps(json.loads(done.read_text()) | {"round": 5}))


ROUND = Path("fedcollm") / "round_002"
RESUME_DAMAGE = [
    (lambda r: _truncate(r / "config.json"), RunDirError, "config.json: run config is not valid JSON"),
    (lambda r: (r / "config.json").write_text("[1, 2]"), ConfigError, "config.json: expected a table"),
    (lambda r: (r / "config.json").write_bytes(b"\xff\xfe"), RunDirError, "config.json: run config is not UTF-8"),
    (lambda r: (r / "config.json").write_text('{"federation": {"clientz": 1}}'), ConfigError,
     "config.json.federation: unknown field(s) clientz"),
    (lambda r: (r / "config.json").write_text('{"federation": {"clients": 0}}'), ConfigError,
     "federation.clients: must be >= 1"),
    (lambda r: _truncate(r / ROUND / "done.json"), RunDirError, "round_002/done.json: round record is not valid JSON"),
    # against d614e59: a stray round_abc was a raw ValueError (invalid literal for int()); round_2 was taken for
    # round 2 (resumed without a word); a round number written as true passed for round 1, then a raw KeyError
    (lambda r: shutil.copytree(r / ROUND, r / "fedcollm" / "round_abc"), RunDirError,
     "fedcollm/round_abc: not a round folder (round_NNN"),
    (lambda r: shutil.copytree(r / ROUND, r / "fedcollm" / "round_2"), RunDirError, "round_2: not a round folder"),
    (lambda r: (r / "fedcollm" / "round_001" / "done.json").write_text('{"round": true}'), RunDirError,
     "round_001/done.json: not the record of round_001"),
    (lambda r: (r / "config.json").write_text("[" * 100_000 + "]" * 100_000), RunDirError,  # d614e59: RecursionError
     "config.json: run config is JSON nested too deeply"),
    (lambda r: shutil.copytree(r / ROUND, r / "fedcollm" / "round_003"), RunDirError,
     "round_003/done.json: not the record of round_003"),
    (_beyond_rounds, RunDirError, "round 5 is complete but the run's config has federation.rounds = 2"),
    (lambda r: _truncate(r / ROUND / "slm" / "adapter_model.safetensors"), RunDirError,
     "slm/adapter_model.safetensors: not a readable safetensors adapter"),
    (lambda r: _truncate(r / ROUND / "llm" / "adapter_model.safetensors"), RunDirError,
     "llm/adapter_model.safetensors: not a readable safetensors adapter"),
    (lambda r: _nan_adapter(r / ROUND / "slm" / "adapter_model.safetensors"), RunDirError,
     "holds NaN or Inf; refusing to use this checkpoint"),
    (lambda r: _shrunk_adapter(r / ROUND / "llm" / "adapter_model.safetensors"), RunDirError, "has shape"),
    (lambda r: (r / ROUND / "slm" / "adapter_model.safetensors").unlink(), RunDirError, "adapter file missing"),
]


def _snapshot(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("damage, kind, expected", RESUME_DAMAGE, ids=[f"resume{i}" for i in range(len(RESUME_DAMAGE))])
def test_resume_refuses_a_damaged_run_and_changes_nothing(finished_run, tmp_path, tiny_build, damage, kind, expected):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    (run / "fedcollm" / "final.json").unlink()  # so that resuming has to read the last round back
    damage(run)
    before = _snapshot(run)
    _dispatch_error(["run", "--resume", str(run)], kind, expected)
    assert _snapshot(run) == before


FINAL_DAMAGE = [
    (lambda f: _truncate(f), "final.json: final evaluation is not valid JSON"),
    (lambda f: f.write_text("[]"), "final.json: not a final evaluation"),
    (lambda f: f.write_bytes(b"\xff"), "final.json: final evaluation is not UTF-8"),
]


@pytest.mark.parametrize("damage, expected", FINAL_DAMAGE, ids=[f"final{i}" for i in range(len(FINAL_DAMAGE))])
def test_damaged_final_evaluation_is_refused(finished_run, tmp_path, tiny_build, damage, expected):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    damage(run / "fedcollm" / "final.json")
    before = _snapshot(run)
    _dispatch_error(["run", "--resume", str(run)], RunDirError, expected)
    assert _snapshot(run) == before


REPORT_DAMAGE = [
    (lambda r: (r / "results.json").unlink(), "results.json: results file not found"),
    (lambda r: _truncate(r / "results.json"), "results.json: results file is not valid JSON"),
    (lambda r: (r / "results.json").write_text('{"foo": 1}'), "key 'setting' missing"),
    (lambda r: (r / "results.json").write_text("[]"), "expected a JSON object of results"),
    (lambda r: (r / "results.json").write_text(json.dumps(
        json.loads((r / "results.json").read_text()) | {"tasks": "arc_easy"})), "key 'tasks' missing or not a list"),
    (lambda r: (r / "results.json").write_text(json.dumps(
        json.loads((r / "results.json").read_text()) | {"llm": {"fedcollm": {"arc_easy": "high"}}})),
     "llm.fedcollm is not a row of per-task accuracies"),
    (lambda r: (r / "results.json").write_text(json.dumps(
        json.loads((r / "results.json").read_text()) | {"slm": {"magic": {"arc_easy": 0.5}}})),
     "slm.magic is not a row"),
]


@pytest.mark.parametrize("damage, expected", REPORT_DAMAGE, ids=[f"report{i}" for i in range(len(REPORT_DAMAGE))])
def test_report_refuses_what_is_not_a_results_file(finished_run, tmp_path, damage, expected):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    damage(run)
    before = _snapshot(run)
    _dispatch_error(["report", str(run)], RunDirError, expected)
    assert _snapshot(run) == before


@pytest.mark.parametrize("leftover", ["results.json", "config.json", "fedcollm", "notes.txt"])
def test_new_run_refuses_any_earlier_file(finished_run, tmp_path, data_dir, tiny_build, leftover):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    for p in run.iterdir():  # keep only the one leftover
        if p.name != leftover:
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    if leftover == "notes.txt":
        (run / "notes.txt").write_text("mine")
    before = _snapshot(run)
    _dispatch_error(tiny_run_args(run, data_dir), RunDirError, f"{run}: already holds {leftover}")
    assert _snapshot(run) == before


def test_new_run_where_a_file_stands(tmp_path, data_dir, tiny_build):
    (tmp_path / "run").write_text("not a directory")
    _dispatch_error(tiny_run_args(tmp_path / "run", data_dir), RunDirError, "exists and is not a directory")


# ---- eval --adapter ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_and_adapter(tmp_path_factory):
    from fedcollm.config import LoraConfig
    from fedcollm.models.lora import add_lora
    from fedcollm.models.tiny import tiny_llama, tiny_tokenizer

    root = tmp_path_factory.mktemp("eval")
    tiny_llama().save_pretrained(root / "model")
    tiny_tokenizer([json.dumps(GOOD)] * 8).save_pretrained(root / "model")
    add_lora(tiny_llama(), LoraConfig(r=4), 0).save_pretrained(root / "adapter")
    add_lora(tiny_llama(hidden=32), LoraConfig(r=4), 0).save_pretrained(root / "other")
    return root


ADAPTER_DAMAGE = [
    (lambda a: shutil.rmtree(a), "no adapter_config.json"),
    (lambda a: (a / "adapter_config.json").unlink(), "no adapter_config.json"),
    (lambda a: _truncate(a / "adapter_model.safetensors"), "not a readable safetensors adapter"),
    (lambda a: _nan_adapter(a / "adapter_model.safetensors"), "holds NaN or Inf"),
    (lambda a: (a / "adapter_model.safetensors").unlink(), "adapter file missing"),
    (lambda a: (shutil.rmtree(a), shutil.copytree(a.parent / "other", a)), "adapter does not fit this model"),
]


@pytest.mark.parametrize("damage, expected", ADAPTER_DAMAGE, ids=[f"adapter{i}" for i in range(len(ADAPTER_DAMAGE))])
def test_eval_refuses_a_bad_adapter(model_and_adapter, tmp_path, damage, expected):
    adapter = tmp_path / "adapter"
    shutil.copytree(model_and_adapter / "adapter", adapter)
    (tmp_path / "other").symlink_to(model_and_adapter / "other")
    damage(adapter)
    with pytest.raises(RunDirError) as err:
        cli.dispatch(["eval", str(model_and_adapter / "model"), "--adapter", str(adapter), "--limit", "2",
                      "--set", "model.dtype='fp32'", "--set", "model.device='cpu'"])
    assert str(err.value).startswith(str(adapter)) and expected in str(err.value)


# ---- client payloads --------------------------------------------------------------------------------------------
REFERENCE = {"a.lora_A.weight": torch.zeros(4, 8), "a.lora_B.weight": torch.zeros(8, 4)}


def _blob(tensors=None, count="5") -> bytes:
    from safetensors.torch import save

    metadata = None if count is None else {"num_examples": count}
    return save(tensors if tensors is not None else REFERENCE, metadata=metadata)


PAYLOADS = [
    (b"", "payload is not a safetensors blob (0 bytes)"),
    (b"garbage", "payload is not a safetensors blob (7 bytes)"),
    (struct.pack("<Q", 10**9) + b"{}", "payload is truncated"),
    (struct.pack("<Q", 5) + b"notjs", "payload is not a valid safetensors blob"),
    (struct.pack("<Q", 2) + b"[]", "payload is not a valid safetensors blob"),
    (_blob()[: len(_blob()) - 40], "payload is not a valid safetensors blob"),
    (_blob()[:20], "payload is truncated"),
    (_blob(count="True"), "num_examples must be a decimal count, got 'True'"),
    (_blob(count="-3"), "num_examples must be a decimal count, got '-3'"),
    (_blob(count="1e3"), "num_examples must be a decimal count"),
    (_blob(count=""), "num_examples must be a decimal count"),
    (_blob(count=None), "num_examples must be a decimal count"),
    (_blob(count="0"), "num_examples must be a positive int, got 0"),
    (_blob({**REFERENCE, "a.lora_A.weight": torch.full((4, 8), float("nan"))}), "a.lora_A.weight holds NaN or Inf"),
    (_blob({**REFERENCE, "a.lora_B.weight": torch.full((8, 4), float("inf"))}), "a.lora_B.weight holds NaN or Inf"),
    (_blob({**REFERENCE, "a.lora_A.weight": torch.zeros(4, 9)}), "has shape (4, 9), expected (4, 8)"),
    (_blob({"a.lora_A.weight": torch.zeros(4, 8)}), "adapter keys differ"),
    (_blob({**REFERENCE, "extra": torch.zeros(1)}), "adapter keys differ"),
    (_blob({**REFERENCE, "a.lora_A.weight": torch.zeros(4, 8, dtype=torch.float16)}), "has dtype torch.float16"),
    (_blob({**REFERENCE, "a.lora_A.weight": torch.zeros(4, 8, dtype=torch.int64)}), "has dtype torch.int64"),
]


@pytest.mark.parametrize("blob, expected", PAYLOADS, ids=[f"payload{i}" for i in range(len(PAYLOADS))])
def test_bad_client_payload(blob, expected):
    with pytest.raises(InvalidUpdate) as err:
        payload = unpack(blob, "client_3")
        validate_update(payload.tensors, REFERENCE, payload.num_examples, "client_3")
    assert str(err.value).startswith("client client_3: ") and expected in str(err.value)


@pytest.mark.parametrize("count", [True, 0, -1, 2.0, "5", None])
def test_bad_example_count(count):
    with pytest.raises(InvalidUpdate, match="client c9: num_examples must be a positive int"):
        validate_update(REFERENCE, REFERENCE, count, "c9")


def test_a_good_payload_round_trips():
    payload = unpack(pack(Payload(REFERENCE, 7)), "c")
    validate_update(payload.tensors, REFERENCE, payload.num_examples, "c")
    assert payload.num_examples == 7


# ---- what d614e59 accepted silently (issue 26, item 9) ----------------------------------------------------------
def test_a_top_k_row_that_names_one_token_k_times_is_refused():
    """A client's top-k in its own vocabulary names k distinct tokens. Against d614e59 from_tensors accepted a row
    naming token 5 three times (logits 3, 2, 1); distilled, it became probability 1.0 on token 5, where an honest
    top-3 with these logits gives it 0.67. A realigned top-k (with `aligned`) may repeat ids and still passes."""
    from fedcollm.alignment.exchange import TopK, from_tensors, to_tensors

    values = torch.tensor([[3.0, 2.0, 1.0], [3.0, 2.0, 1.0]], dtype=torch.float16)
    ids = torch.tensor([[7, 8, 9], [5, 5, 5]], dtype=torch.int32)
    top = TopK.from_examples([values], [ids], torch.tensor([1.0]), torch.tensor([0]))
    with pytest.raises(InvalidUpdate, match="top-k from client_1: field topk.ids repeats id 5 within row 1"):
        from_tensors(to_tensors(top), "client_1", 100, 3)
    top.aligned = torch.tensor([True, False])
    assert from_tensors(to_tensors(top), "server", 100, 3).ids.equal(ids)


COMBINATIONS = [  # each accepted by d614e59's Config
    ({"dp": {"noise_multiplier": 1.0}, "run": {"methods": ["zero_shot", "standalone", "centralized"]}},
     "dp.noise_multiplier: noises the shared SLM adapter, but none of run.methods = ['zero_shot', 'standalone', "
     "'centralized'] shares one"),
    ({"secagg": {"enabled": True, "num_shares": 5, "reconstruction_threshold": 3}, "federation": {"clients": 3}},
     "secagg.num_shares: 5 shares, but 3 client(s) are sampled a round"),
    ({"secagg": {"enabled": True}, "federation": {"clients": 4, "fraction_fit": 0.5}},
     "secagg.num_shares: 3 shares, but 2 client(s) are sampled a round (federation.clients = 4, fraction_fit = 0.5)"),
    ({"secagg": {"enabled": True}, "federation": {"clients": 2}}, "secagg.num_shares: 3 shares, but 2 client(s)"),
]


@pytest.mark.parametrize("data, expected", COMBINATIONS, ids=[f"combination{i}" for i in range(len(COMBINATIONS))])
def test_config_that_would_silently_do_less_than_it_says(data, expected):
    with pytest.raises(ConfigError) as err:
        Config.from_dict(data)
    assert expected in str(err.value)
    Config.from_dict(data | {"secagg": {"enabled": False}, "dp": {"noise_multiplier": 0.0}})  # each alone is fine


def test_secagg_on_the_in_process_engine_is_refused(tmp_path, monkeypatch):
    """The in-process engine has no SecAgg+: against d614e59 `fedcollm run --set secagg.enabled=true` ran plain
    FedAvg with every client's adapter in the server's hands, and said nothing. Refused before anything loads,
    for a new run and a resumed one."""
    from fedcollm.workbench import Workbench

    def no_build(cls, cfg, **kwargs):
        raise AssertionError("the run started")

    monkeypatch.setattr(Workbench, "build", classmethod(no_build))
    expected = "secagg.enabled = true needs the Flower engine"
    _dispatch_error(["run", "--out", str(tmp_path / "new"), "--set", "secagg.enabled=true"], ConfigError, expected)
    assert not (tmp_path / "new").exists()
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "config.json").write_text(Config().with_field("secagg.enabled", True).to_json())
    _dispatch_error(["run", "--resume", str(tmp_path / "old")], ConfigError, expected)


# ---- a Flower client's node config and data-config ----------------------------------------------------------------
@pytest.fixture(scope="module")
def client_setup(tmp_path_factory, data_dir, tokenizer):
    """The server setup a Flower client receives (tiny models saved to disk), as `_client_side` reads it."""
    from conftest import tiny_config

    from fedcollm.models.tiny import tiny_pair

    root = tmp_path_factory.mktemp("client")
    for name, model in zip(("llm", "slm"), tiny_pair(seed=0)):
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    cfg = tiny_config(data_dir, str(root / "run"), model={"llm": str(root / "llm"), "slm": str(root / "slm")})
    return cfg.to_json()


def _client(setup: str, node: dict):
    from flwr.app import ConfigRecord, Context, RecordDict

    from fedcollm.engines.flower import client_app

    state = RecordDict({"fedcollm": ConfigRecord({"config": setup})})
    return client_app._client_side(Context(run_id=7, node_id=1, node_config=node, state=state, run_config={}))


NODE_CONFIGS = [  # against d614e59: 1.5 was cut to client 1, "1" read as client 1, the rest were run as described
    ({"partition-id": 1.5}, ConfigError, "node config: partition-id must be a whole number", "got float 1.5"),
    ({"partition-id": "1"}, ConfigError, "node config: partition-id must be a whole number", "got str '1'"),
    ({"partition-id": True}, ConfigError, "node config: partition-id must be a whole number", "got bool True"),
    # an empty data-config: trained on the four default tasks instead of the server's
    ({"partition-id": 0, "data-config": ""}, ConfigError, "mine.toml: a data-config must name the tasks", "default"),
    ({"partition-id": 0, "data-config": "[data]\ndata_dir = '/x'\n"}, ConfigError, "must name the tasks", ""),
    # other tables were dropped without a word
    ({"partition-id": 0, "data-config": "[data]\ntasks = ['arc_easy']\n[federation]\nrounds = 9\n"}, ConfigError,
     "mine.toml: a data-config holds only [data] and [tasks.NAME] tables, but it has [federation]", ""),
    ({"partition-id": 0, "data-config": "[dp]\nnoise_multiplier = 1.0\n"}, ConfigError, "but it has [dp]", ""),
]


@pytest.mark.parametrize("node, kind, expected, detail", NODE_CONFIGS, ids=[f"node{i}" for i in range(len(NODE_CONFIGS))])
def test_bad_node_config_is_refused_before_the_client_loads_anything(client_setup, tmp_path, node, kind, expected,
                                                                    detail):
    pytest.importorskip("flwr")
    if "data-config" in node:
        (tmp_path / "mine.toml").write_text(node["data-config"])
        node = node | {"data-config": str(tmp_path / "mine.toml")}
    with pytest.raises(kind) as err:
        _client(client_setup, node)
    assert expected in str(err.value) and detail in str(err.value), str(err.value)
