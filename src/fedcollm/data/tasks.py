"""Multiple-choice QA tasks: validated JSONL loading and lm-evaluation-harness-style zero-shot prompts.

ARC and (by our choice) CommonsenseQA use "Question: {q}\\nAnswer:" + " {choice}"; OpenBookQA uses the bare
question stem + " {choice}", as lm-evaluation-harness formats them. Always score by the `answer` index.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


class DataError(ValueError):
    """A data file is missing or malformed; the message names file, line and field."""


@dataclass(frozen=True)
class MCExample:
    id: str
    task: str
    question: str
    choices: tuple[str, ...]
    answer: int

    @property
    def context(self) -> str:
        return format_context(self.task, self.question)

    def continuation(self, i: int) -> str:
        return " " + self.choices[i]


EVAL_SPLIT = {"commonsenseqa": "dev", "openbookqa": "test", "arc_challenge": "test", "arc_easy": "test"}


def format_context(task: str, question: str) -> str:
    if task == "openbookqa":
        return question
    return f"Question: {question}\nAnswer:"


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        raise DataError(f"{path}: file not found")
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}, line {lineno}: not valid JSON ({err.msg})") from err
            if not isinstance(row, dict):
                raise DataError(f"{path}, line {lineno}: expected a JSON object")
            rows.append((lineno, row))
    return rows


def _validate_mc(path: Path, lineno: int, row: dict, task: str) -> MCExample:
    where = f"{path}, line {lineno}"
    for key, kind in (("id", str), ("question", str), ("choices", list), ("answer", int)):
        if key not in row:
            raise DataError(f"{where}: missing field '{key}'")
        if not isinstance(row[key], kind) or (kind is int and isinstance(row[key], bool)):
            raise DataError(f"{where}: field '{key}' must be {kind.__name__}, got {type(row[key]).__name__}")
    choices = row["choices"]
    if len(choices) < 2 or not all(isinstance(c, str) for c in choices):
        raise DataError(f"{where}: field 'choices' must be a list of at least 2 strings")
    if not 0 <= row["answer"] < len(choices):
        raise DataError(f"{where}: field 'answer' = {row['answer']} is out of range for {len(choices)} choices")
    return MCExample(row["id"], task, row["question"], tuple(choices), row["answer"])


def load_task(data_dir: str | Path, task: str, split: str) -> list[MCExample]:
    path = Path(data_dir) / task / f"{split}.jsonl"
    return [_validate_mc(path, n, row, task) for n, row in read_jsonl(path)]


def load_eval_split(data_dir: str | Path, task: str, limit: int | None = None) -> list[MCExample]:
    examples = load_task(data_dir, task, EVAL_SPLIT[task])
    return examples[:limit] if limit else examples


def load_alpaca_texts(data_dir: str | Path) -> list[str]:
    """Alpaca rows as plain instruction/response text (generic text for healing a derived SLM)."""
    path = Path(data_dir) / "alpaca_subset5k" / "train.jsonl"
    texts = []
    for lineno, row in read_jsonl(path):
        for key in ("instruction", "input", "output"):
            if not isinstance(row.get(key), str):
                raise DataError(f"{path}, line {lineno}: field '{key}' must be a string")
        prompt = row["instruction"] + (f"\n{row['input']}" if row["input"] else "")
        texts.append(f"Question: {prompt}\nAnswer: {row['output']}")
    return texts
