"""Tasks as data: rows from JSONL split files or a `datasets` source, validated row by row, rendered into
(context, continuation) prompts by each task's templates (`TaskConfig`): multiple-choice rows (`MCExample`) or
prompt/response rows (`GenExample`).

JSONL files are read here rather than through `datasets`' JSON loader: that loader parses with pyarrow, which
reports neither line numbers nor duplicate keys, and this reader must name the file, line and field of every
bad row. Sources given as `hf:ID` do go through `datasets` (a hub id where a hub is reachable, or a folder
written by `save_to_disk`), and their rows pass the same checks.
Accepted on purpose: a UTF-8 byte-order mark, CRLF or CR-only line ends, blank lines, any length of text.
Refused: text that is not text (a NUL character, a lone UTF-16 surrogate from a bad \\u escape), which tokenizers
would reject or mangle after the models have loaded, and JSON nested deeper than Python's recursion limit.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Iterable

from fedcollm.config import DataConfig, TaskConfig
from fedcollm.errors import DataError
from fedcollm.fileio import read_bytes

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MCExample:
    id: str
    task: str
    context: str
    choices: tuple[str, ...]  # the choice texts as in the data
    continuations: tuple[str, ...]  # each choice rendered by the task's continuation template
    answer: int

    @property
    def target(self) -> str:
        """The continuation trained on: the gold choice's."""
        return self.continuations[self.answer]


@dataclass(frozen=True)
class GenExample:
    id: str
    task: str
    context: str
    target: str  # the response rendered by the task's continuation template: what is trained on
    references: tuple[str, ...]  # the response field's text, then any further references: what is scored against
    chat: bool = False  # the context is a user turn for each tokenizer's chat template


Example = MCExample | GenExample


def bundled_data_dir() -> Path:
    """The data that ships inside the package (what the embedded default needs)."""
    return Path(str(resources.files("fedcollm") / "data" / "bundled"))


def resolve_folder(relative: str, data_dir: str | None, what: str) -> Path:
    """`relative` under data.data_dir if it is there, else under the bundled data; absolute paths as given."""
    path = Path(relative).expanduser()
    if path.is_absolute():
        if not path.is_dir():
            raise DataError(f"{what}: folder {path} does not exist")
        return path
    if data_dir and not Path(data_dir).expanduser().is_dir():
        raise DataError(f"data.data_dir: folder {data_dir} does not exist (set by the config or FEDCOLLM_DATA)")
    candidates = ([Path(data_dir).expanduser() / path] if data_dir else []) + [bundled_data_dir() / path]
    for folder in candidates:
        if folder.is_dir():
            if data_dir and folder != candidates[0]:
                log.info("%s: %s not found, using the bundled copy %s", what, candidates[0], folder)
            return folder
    where = f"data.data_dir ({data_dir})" if data_dir else "data.data_dir (unset)"
    shipped = ", ".join(sorted(p.name for p in bundled_data_dir().iterdir() if p.is_dir()))
    raise DataError(f"{what}: no folder {relative!r} in {where} nor in the bundled data (which holds {shipped}); "
                    f"set FEDCOLLM_DATA or data.data_dir to the folder that holds {relative}/")


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict:
    keys = [k for k, _ in pairs]
    dupes = sorted({k for k in keys if keys.count(k) > 1})
    if dupes:
        raise ValueError(f"duplicate key(s) {', '.join(map(repr, dupes))}")
    return dict(pairs)


def _no_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def read_jsonl(path: Path) -> list[tuple[str, dict]]:
    """(location, object) for every non-blank line; any undecodable line is a DataError naming file and line."""
    raw = read_bytes(path, "JSONL file", DataError)
    rows = []
    for lineno, line in enumerate(raw.splitlines(), 1):  # \n, \r\n or \r; none can occur inside a UTF-8 character
        where = f"{path}, line {lineno}"
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as err:
            raise DataError(f"{where}: not valid UTF-8 (byte 0x{line[err.start]:02x} at column {err.start + 1})") from err
        text = text.removeprefix("\ufeff") if lineno == 1 else text
        if not text.strip():
            continue
        try:
            row = json.loads(text, object_pairs_hook=_no_duplicate_keys, parse_constant=_no_constant)
        except json.JSONDecodeError as err:
            raise DataError(f"{where}: not valid JSON ({err.msg} at column {err.colno})") from err
        except RecursionError as err:
            raise DataError(f"{where}: JSON nested too deeply to read (arrays or objects within each other)") from err
        except ValueError as err:
            raise DataError(f"{where}: {err}") from err
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
        rows.append((where, row))
    return rows


def _field(row: dict, dotted: str, where: str) -> Any:
    node: Any = row
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            raise DataError(f"{where}: missing field '{dotted}'")
        node = node[part]
    return node


def _has_field(row: dict, dotted: str) -> bool:
    try:
        _field(row, dotted, "")
    except DataError:
        return False
    return True


def _string(value: Any, name: str, where: str) -> str:
    """`value` if it is a string a tokenizer can take: no NUL character, no lone surrogate."""
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{name}' must be a string, got {type(value).__name__}")
    if "\0" in value:
        raise DataError(f"{where}: field '{name}' holds a NUL character (at character {value.index(chr(0)) + 1})")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise DataError(f"{where}: field '{name}' holds a lone surrogate {value[err.start]!r} (at character "
                        f"{err.start + 1}), which is not text: fix its \\u escape") from err
    return value


def _text(value: Any, name: str, where: str) -> str:
    if not _string(value, name, where).strip():
        raise DataError(f"{where}: field '{name}' is empty")
    return value


def _answer_index(row: dict, spec: TaskConfig, n_choices: int, where: str) -> int:
    answer = _field(row, spec.answer_field, where)
    if isinstance(answer, str):
        labels = _field(row, spec.labels_field, where)
        if not (isinstance(labels, list) and all(isinstance(x, str) for x in labels) and len(labels) == n_choices):
            raise DataError(f"{where}: field '{spec.labels_field}' must list one string label per choice "
                            f"({n_choices}) when '{spec.answer_field}' is a label")
        if labels.count(answer) != 1:
            raise DataError(f"{where}: field '{spec.answer_field}' = {answer!r} is not exactly one of the labels "
                            f"{labels}")
        return labels.index(answer)
    if not isinstance(answer, int) or isinstance(answer, bool):
        raise DataError(f"{where}: field '{spec.answer_field}' must be a 0-based choice index or a label string, "
                        f"got {type(answer).__name__} {answer!r}")
    if not 0 <= answer < n_choices:
        raise DataError(f"{where}: field '{spec.answer_field}' = {answer} is out of range for {n_choices} choices")
    return answer


def _template_values(row: dict, spec: TaskConfig, where: str) -> tuple[dict[str, str], bool]:
    """The row's template fields, and whether an optional one is missing or empty (rendered as "")."""
    values, short = {}, False
    for f in spec.template_fields:
        if f in spec.optional_fields:
            value = _string(_field(row, f, where), f, where) if _has_field(row, f) else ""
            short = short or not value.strip()
            values[f] = value
        else:
            values[f] = _text(_field(row, f, where), f, where)
    return values, short


def _context(spec: TaskConfig, values: dict[str, str], short: bool, where: str) -> str:
    template = spec.context_without_optional if short and spec.context_without_optional is not None else spec.context
    context = template.format_map(values)
    if not context.strip():
        raise DataError(f"{where}: the context template renders to empty text")
    return context


def _example_id(row: dict, spec: TaskConfig, where: str) -> str:
    ex_id = _field(row, spec.id_field, where)
    if isinstance(ex_id, bool) or not isinstance(ex_id, (str, int)) or not str(ex_id).strip():
        raise DataError(f"{where}: field '{spec.id_field}' must be a non-empty string or integer id")
    return str(ex_id)


def _empty_response(row: dict, spec: TaskConfig, where: str) -> bool:
    return not _string(_field(row, spec.response_field, where), spec.response_field, where).strip()


def _generation_example(row: dict, name: str, spec: TaskConfig, where: str) -> GenExample:
    response = _text(_field(row, spec.response_field, where), spec.response_field, where)
    references = [response]
    if spec.references_field and _has_field(row, spec.references_field):
        extra = _field(row, spec.references_field, where)
        if not isinstance(extra, list):
            raise DataError(f"{where}: field '{spec.references_field}' must be a list of reference strings")
        references += [_text(r, f"{spec.references_field}[{i}]", where) for i, r in enumerate(extra)]
    values, short = _template_values(row, spec, where)
    return GenExample(_example_id(row, spec, where), name, _context(spec, values, short, where),
                      spec.continuation.format_map(values | {"response": response}),
                      tuple(dict.fromkeys(references)), spec.chat_template)


def to_example(row: dict, name: str, spec: TaskConfig, where: str) -> Example:
    """One validated row rendered into prompts; every refusal names `where` and the field."""
    if spec.generative:
        return _generation_example(row, name, spec, where)
    ex_id = _example_id(row, spec, where)
    choices = _field(row, spec.choices_field, where)
    if not isinstance(choices, list) or len(choices) < 2:
        raise DataError(f"{where}: field '{spec.choices_field}' must be a list of at least 2 choice strings")
    for i, choice in enumerate(choices):
        _text(choice, f"{spec.choices_field}[{i}]", where)
    values, short = _template_values(row, spec, where)
    context = _context(spec, values, short, where)
    continuations = tuple(spec.continuation.format_map(values | {"choice": c}) for c in choices)
    return MCExample(ex_id, name, context, tuple(choices), continuations,
                     _answer_index(row, spec, len(choices), where))


def _check_split(examples: list[Example], wheres: list[str], name: str, spec: TaskConfig, source: str) -> None:
    if not examples:
        raise DataError(f"{source}: no examples (task {name!r} needs at least one row)")
    first: dict[str, str] = {}
    for ex, where in zip(examples, wheres):
        if ex.id in first:
            raise DataError(f"{where}: duplicate id {ex.id!r} (first at {first[ex.id]})")
        first[ex.id] = where
    dupes = [where for ex, where in zip(examples, wheres)
             if isinstance(ex, MCExample) and len(set(ex.choices)) < len(ex.choices)]
    if dupes and spec.duplicate_choices == "error":
        raise DataError(f"{dupes[0]}: two choices have the same text (set tasks.{name}.duplicate_choices = "
                        f"\"warn\" to keep such rows)")
    if dupes:
        log.warning("%s: %d row(s) have two identical choice texts (first: %s); kept and scored by index",
                    source, len(dupes), dupes[0])


def _hf_rows(spec: TaskConfig, split: str, name: str) -> tuple[str, Iterable[tuple[str, dict]]]:
    source = spec.path.removeprefix("hf:")
    try:
        import datasets
    except ImportError as err:
        raise DataError(f"task {name!r}: source {spec.path} needs the `datasets` package (pip install datasets)") from err
    # datasets raises many exception types (hub, file system, arrow); each is reported as one line naming the source
    try:
        if Path(source).expanduser().is_dir():
            loaded = datasets.load_from_disk(str(Path(source).expanduser()))
            rows = loaded[split] if isinstance(loaded, datasets.DatasetDict) else loaded
        else:
            rows = datasets.load_dataset(source, spec.subset, split=split)
    except Exception as err:  # noqa: BLE001 - see the comment above
        raise DataError(f"task {name!r}: cannot load split {split!r} of {spec.path}: {type(err).__name__}: "
                        f"{str(err).splitlines()[0] if str(err) else ''}") from err
    label = f"{spec.path}[{split}]"
    return label, ((f"{label} row {i}", dict(row)) for i, row in enumerate(rows))


def load_split(name: str, spec: TaskConfig, split: str, data_dir: str | None) -> list[Example]:
    """Every row of one split of task `name`, validated; errors name the file and line (or row) and field."""
    if spec.path.startswith("hf:"):
        source, rows = _hf_rows(spec, split, name)
    else:
        path = resolve_folder(spec.path, data_dir, f"task {name!r}") / f"{split}.jsonl"
        source, rows = str(path), read_jsonl(path)
    wheres, examples, skipped = [], [], []
    for where, row in rows:
        if spec.generative and spec.empty_responses == "skip" and _empty_response(row, spec, where):
            skipped.append(where)
            continue
        wheres.append(where)
        examples.append(to_example(row, name, spec, where))
    if skipped:
        log.warning("%s: skipped %d row(s) with an empty '%s' (tasks.%s.empty_responses = \"skip\"; first: %s)",
                    source, len(skipped), spec.response_field, name, skipped[0])
    _check_split(examples, wheres, name, spec, source)
    return examples


def _train_rows(name: str, spec: TaskConfig, data_dir: str | None) -> list[Example]:
    if spec.train_split is None:
        raise DataError(f"task {name!r} has no train split (evaluation-only); set tasks.{name}.train_split")
    rows = load_split(name, spec, spec.train_split, data_dir)
    if spec.validation_holdout >= len(rows):
        raise DataError(f"task {name!r}: tasks.{name}.validation_holdout = {spec.validation_holdout} holds out every "
                        f"one of the {len(rows)} rows of split {spec.train_split!r}")
    return rows


def load_train_split(name: str, spec: TaskConfig, data_dir: str | None) -> list[Example]:
    """The rows that may be trained on: the train split less its validation holdout."""
    rows = _train_rows(name, spec, data_dir)
    return rows[:len(rows) - spec.validation_holdout]


def load_eval_split(name: str, spec: TaskConfig, data_dir: str | None, limit: int | None = None) -> list[Example]:
    examples = load_split(name, spec, spec.eval_split, data_dir)
    return examples if limit is None else examples[:limit]


def load_scored_split(name: str, spec: TaskConfig, data: DataConfig) -> list[Example]:
    """The items every accuracy is read on: the eval split, or with data.scored = "validation" the validation
    split or holdout; the first data.eval_limit of them."""
    if data.scored == "eval":
        return load_eval_split(name, spec, data.data_dir, data.eval_limit)
    if spec.validation_split:
        examples = load_split(name, spec, spec.validation_split, data.data_dir)
    elif spec.validation_holdout:
        examples = _train_rows(name, spec, data.data_dir)[-spec.validation_holdout:]
    else:
        raise DataError(f"task {name!r} has no validation data for data.scored = \"validation\": set "
                        f"tasks.{name}.validation_split or tasks.{name}.validation_holdout")
    return examples if data.eval_limit is None else examples[:data.eval_limit]


def load_alpaca_texts(data_dir: str | None) -> list[str]:
    """Alpaca rows as plain instruction/response text (generic text for healing a derived SLM)."""
    path = resolve_folder("alpaca_subset5k", data_dir, "Alpaca subset") / "train.jsonl"
    texts = []
    for where, row in read_jsonl(path):
        for key in ("instruction", "input", "output"):
            _string(_field(row, key, where), key, where)
        prompt = row["instruction"] + (f"\n{row['input']}" if row["input"] else "")
        texts.append(f"Question: {prompt}\nAnswer: {row['output']}")
    return texts
