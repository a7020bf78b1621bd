"""Writes that a crash cannot leave half-done, and reads that name the file when it is damaged."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

from fedcollm.errors import RunDirError


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp)` on a sibling temp path, then rename it over `path` (readers see old or new, never half)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2))


def read_bytes(path: str | Path, what: str, error: type[Exception]) -> bytes:
    """The bytes of `path`; missing, a directory or unreadable is `error` naming the path and what was expected."""
    path = Path(path)
    try:
        return path.read_bytes()
    except FileNotFoundError as err:
        raise error(f"{path}: {what} not found") from err
    except IsADirectoryError as err:
        raise error(f"{path}: is a directory, expected the {what}") from err
    except OSError as err:
        raise error(f"{path}: cannot read the {what} ({err.strerror})") from err


def read_json_file(path: str | Path, what: str, error: type[Exception] = RunDirError) -> Any:
    """Parse a JSON file this program wrote; a missing, unreadable or cut file is `error` naming the path."""
    raw = read_bytes(path, what, error)
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise error(f"{path}: {what} is not UTF-8 text (damaged file?)") from err
    except json.JSONDecodeError as err:
        raise error(f"{path}: {what} is not valid JSON (line {err.lineno}: {err.msg}); the file is damaged") from err
    except RecursionError as err:
        raise error(f"{path}: {what} is JSON nested too deeply to read; the file is damaged") from err
