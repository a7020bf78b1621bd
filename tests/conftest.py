"""Shared fixtures: tiny random Llama pair, a tiny tokenizer trained on a real data slice, a tiny config."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from fedcollm.config import Config, preset_tasks
from fedcollm.data.tasks import load_train_split
from fedcollm.models.tiny import tiny_llama, tiny_pair, tiny_qwen2, tiny_tokenizer

TINY_FEDMKT = {"top_k": 8, "llm_lr": 1e-2, "slm_lr": 1e-2, "batch_size": 4}
"""The fedmkt table of the tiny setting: top-k 8 and rates that move tiny models in a few steps."""

DATA_DIR = os.environ.get("FEDCOLLM_DATA", str(Path(__file__).resolve().parents[1].parent / "shared" / "data"))


@pytest.fixture(scope="session")
def data_dir() -> str:
    if not Path(DATA_DIR, "arc_easy", "train.jsonl").exists():
        pytest.fail(f"real data not found at {DATA_DIR}; set FEDCOLLM_DATA")
    return DATA_DIR


def _texts(data_dir: str) -> list[str]:
    texts = []
    for task in ("arc_easy", "openbookqa"):
        for ex in load_train_split(task, preset_tasks()[task], data_dir)[:300]:
            texts.append(ex.context + " " + " ".join(ex.choices))
    return texts


@pytest.fixture(scope="session")
def tokenizer(data_dir):
    return tiny_tokenizer(_texts(data_dir))


@pytest.fixture(scope="session")
def client_tokenizers(data_dir):
    """Two more tokenizers whose vocabularies differ from `tokenizer`'s and from each other (300 and 400 ids)."""
    texts = _texts(data_dir)
    return tiny_tokenizer(texts, vocab=300), tiny_tokenizer(texts[::-1], vocab=400)


def hetero_models(client_tokenizers) -> dict:
    """Client SLMs of two families and sizes, by the names model.client_slms uses: a 1-layer Llama on the
    300-id tokenizer and a 2-layer Qwen2 on the 400-id one."""
    tok_a, tok_b = client_tokenizers
    return {"tiny-llama": (tiny_llama(hidden=32, layers=1, vocab=len(tok_a), seed=2), tok_a),
            "tiny-qwen2": (tiny_qwen2(hidden=48, layers=2, vocab=len(tok_b), seed=3), tok_b)}


@pytest.fixture
def models():
    return tiny_pair(seed=0)


def tiny_sections(data_dir: str, out_dir: str = "runs/test", **sections) -> dict:
    """The tiny test setting as config tables; `sections` override keys table by table."""
    base = {
        "model": {"llm": "tiny", "slm": "tiny", "dtype": "fp32", "device": "cpu", "max_length": 64,
                  "lora": {"r": 4, "alpha": 8, "dropout": 0.0}},
        "data": {"data_dir": data_dir, "tasks": ["arc_easy"], "train_per_task": 40, "eval_limit": 6},
        "federation": {"clients": 3, "rounds": 2, "local_epochs": 1, "batch_size": 4, "client_lr": 1e-2},
        "distill": {"epochs": 1.5, "batch_size": 4, "llm_lr": 1e-2, "slm_lr": 1e-2},
        "run": {"methods": ["fedcollm"], "out_dir": out_dir, "eval_batch_size": 16},
    }
    for section, values in sections.items():
        base[section] = {**base.get(section, {}), **values}
    return base


def tiny_config(data_dir: str, out_dir: str = "runs/test", **sections) -> Config:
    return Config.from_dict(tiny_sections(data_dir, out_dir, **sections))


def tiny_toml(data_dir: str, **sections) -> str:
    """The tiny setting as a TOML file's text, for code paths that read a config file (CLI, Flower, study)."""
    def value(v):
        if isinstance(v, dict):
            return "{ " + ", ".join(f"{k} = {value(x)}" for k, x in v.items()) + " }"
        return json.dumps(v)

    tables = tiny_sections(data_dir, **sections)
    return "\n".join(f"[{name}]\n" + "".join(f"{k} = {value(v)}\n" for k, v in table.items())
                     for name, table in tables.items())


@pytest.fixture
def make_workbench(data_dir, tokenizer):
    from fedcollm.workbench import Workbench

    def make(out_dir: str = "runs/test", **sections):
        llm, slm = tiny_pair(seed=0)
        return Workbench.from_models(tiny_config(data_dir, out_dir, **sections), llm, slm, tokenizer)

    return make


@pytest.fixture
def make_hetero_workbench(data_dir, tokenizer, client_tokenizers):
    """A workbench whose clients run model.client_slms = tiny-llama, tiny-qwen2, tiny-llama: three vocabularies in
    all (LLM 512, clients 300 and 400 ids)."""
    from fedcollm.workbench import Workbench

    def make(out_dir: str = "runs/test", **sections):
        model = {"client_slms": ["tiny-llama", "tiny-qwen2", "tiny-llama"]} | sections.pop("model", {})
        llm, slm = tiny_pair(seed=0)
        return Workbench.from_models(tiny_config(data_dir, out_dir, model=model, **sections), llm, slm, tokenizer,
                                     client_slms=hetero_models(client_tokenizers))

    return make


def patch_tiny_build(mp: pytest.MonkeyPatch, tokenizer) -> None:
    """Make Workbench.build load tiny models (whatever model the config names), so CLI paths run in seconds."""
    from fedcollm.workbench import Workbench, load_data

    def build(cls, cfg, clients=True):
        llm, slm = tiny_pair(seed=0)
        return Workbench.from_models(cfg, llm, slm, tokenizer, "tiny-llm", "tiny-slm", data=load_data(cfg, clients))

    mp.setattr(Workbench, "build", classmethod(build))


@pytest.fixture
def tiny_build(monkeypatch, tokenizer):
    patch_tiny_build(monkeypatch, tokenizer)


NOTES_TASK = """
[tasks.notes]
kind = "generation"
path = "{path}"
train_split = "train"
eval_split = "test"
context = "Request: {{request}}\\nDetails: {{details}}\\nReply:"
context_without_optional = "Request: {{request}}\\nReply:"
optional_fields = ["details"]
response_field = "reply"
references_field = "also"
max_new_tokens = 8
stop = ["\\n"]
"""
"""A prompt/response task declared only in TOML, as a user declares one (`write_notes_task` writes its rows)."""


def write_rows(folder: Path, split: str, rows: list[dict]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def write_notes_task(folder: Path, data_dir: str) -> str:
    """Rows of the generation task `notes` (request/reply rows made from Alpaca rows past those any test's D^a
    holds; every other row has the optional `details`) in `folder`, and its [tasks.notes] table."""
    examples = load_train_split("alpaca", preset_tasks()["alpaca"], data_dir)[4000:4106]
    rows = []
    for i, ex in enumerate(examples):
        row = {"id": f"n{i}", "request": ex.context.split("### Instruction:\n")[1].split("\n\n")[0],
               "reply": ex.references[0][:80], "also": [ex.references[0][:20]]}
        rows.append(row | ({"details": "urgent"} if i % 2 else {}))
    write_rows(folder, "train", rows[:100])
    write_rows(folder, "test", rows[100:])
    return NOTES_TASK.format(path=folder.as_posix())
