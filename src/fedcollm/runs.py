"""Run directory layout, per-round checkpoints and resume; nothing completed is ever overwritten or lost.

```
RUN/config.json                 resolved config
RUN/<method>/round_NNN/         adapters of that round in peft format (slm/, llm/, client_K/) + done.json
RUN/<method>/metrics.jsonl      one line per completed round (rebuilt from the done.json files)
RUN/<method>/final.json         final evaluation
RUN/results.json, results.md, accuracy.png
RUN/server-private/secret       the server's 256-bit secret (mode 0600): seeds DP noise and sampling; never sent
```
A round counts as completed only once its `done.json` exists; resume restarts after the last such round.
Every file is written atomically (temp file + rename). A new run refuses a directory that holds any file.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import shutil
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file

from fedcollm.aggregate import state_problem
from fedcollm.comm import AdapterState
from fedcollm.config import Config
from fedcollm.errors import RunDirError
from fedcollm.fileio import atomic_write_json, atomic_write_text, read_json_file
from fedcollm.models.lora import load_adapter_state

log = logging.getLogger(__name__)


def load_adapter_file(path: Path, reference: AdapterState | None = None) -> AdapterState:
    """A saved adapter, refused (naming its path) when unreadable, non-finite, or not shaped like `reference`."""
    try:
        state = load_file(path)
    except FileNotFoundError as err:
        raise RunDirError(f"{path}: adapter file missing") from err
    except (SafetensorError, OSError, ValueError) as err:
        raise RunDirError(f"{path}: not a readable safetensors adapter (truncated or damaged: {err})") from err
    problem = state_problem(state, reference)
    if problem:
        raise RunDirError(f"{path}: {problem}; refusing to use this checkpoint")
    return state


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    def method_dir(self, method: str) -> Path:
        return self.path / method

    def round_dir(self, method: str, r: int) -> Path:
        return self.method_dir(method) / f"round_{r:03d}"

    # ---- config ---------------------------------------------------------------------------
    def check_fresh(self) -> None:
        """A new run may only start in a missing or empty directory: any file there may be earlier work."""
        if self.path.exists() and not self.path.is_dir():
            raise RunDirError(f"{self.path}: exists and is not a directory; choose another run.out_dir / --out")
        if self.path.is_dir():
            held = sorted(p.name for p in self.path.iterdir())
            if held:
                hint = (f"resume it with `fedcollm run --resume {self.path}`" if "config.json" in held
                        else "it is not a resumable run (no config.json), so nothing there is touched")
                raise RunDirError(f"{self.path}: already holds {', '.join(held[:5])}{' ...' if len(held) > 5 else ''}; "
                                  f"{hint}, or choose another directory with --out")

    def write_config(self, config_json: str) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path / "config.json", config_json)

    def read_config(self) -> dict:
        return read_json_file(self.path / "config.json", "run config")

    def load_config(self) -> Config:
        """The config a run started with, for --resume and report; refused with the path when unusable."""
        if not self.path.is_dir():
            raise RunDirError(f"{self.path}: no such run directory")
        if not (self.path / "config.json").exists():
            raise RunDirError(f"{self.path}: no config.json, so this is not a fedcollm run directory")
        return Config.from_dict(self.read_config(), where=str(self.path / "config.json"))

    # ---- server-private state ---------------------------------------------------------------
    def server_secret(self) -> bytes:
        """The run's 256-bit secret from OS entropy, made on first use in server-private/secret (mode 0600). It keys
        DP noise and sampling (`privacy.round_seed`): unlike run.seed it is in no config, metric, log or message,
        so only the server can regenerate them, and a resumed run reads it back and repeats them exactly."""
        path = self.path / "server-private" / "secret"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            tmp = path.with_name("secret.tmp")
            tmp.unlink(missing_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(secrets.token_bytes(32))
                f.flush()
                os.fsync(f.fileno())
            tmp.rename(path)
        secret = path.read_bytes()
        if len(secret) != 32:
            raise RunDirError(f"{path}: holds {len(secret)} bytes, not a 32-byte server secret; the run directory is "
                              f"damaged (delete the file only if no round of a DP run has completed)")
        return secret

    # ---- rounds ---------------------------------------------------------------------------
    def done_records(self, method: str) -> dict[int, dict]:
        """Round number -> its done.json record, for every completed round."""
        records = {}
        for path in sorted(self.method_dir(method).glob("round_*/done.json")):
            number = re.fullmatch(r"round_(\d+)", path.parent.name)
            if not number or path.parent != self.round_dir(method, int(number[1])):
                raise RunDirError(f"{path.parent}: not a round folder (round_NNN, as this program names them); "
                                  f"move it out of the run directory")
            record = read_json_file(path, "round record")
            if not (isinstance(record, dict) and type(record.get("round")) is int and record["round"] == int(number[1])):
                raise RunDirError(f"{path}: not the record of {path.parent.name}; the run directory is damaged")
            records[record["round"]] = record
        return records

    def last_completed_round(self, method: str, rounds: int | None = None) -> int:
        done = sorted(self.done_records(method))
        if rounds is not None and done and done[-1] > rounds:
            raise RunDirError(f"{self.round_dir(method, done[-1])}: round {done[-1]} is complete but the run's "
                              f"config has federation.rounds = {rounds}; this directory belongs to another run")
        return done[-1] if done else 0

    def save_round(self, method: str, r: int, states: dict[str, AdapterState], models: dict[str, object]) -> None:
        """Write each adapter in peft format (loadable with PeftModel.from_pretrained) through the model of the same
        name in `models`; not yet marked done."""
        target = self.round_dir(method, r)
        if (target / "done.json").exists():
            raise RunDirError(f"{target}: round {r} is already complete; refusing to overwrite it")
        tmp = target.with_name(target.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        for name, state in states.items():
            model = models[name]
            load_adapter_state(model, state)
            model.save_pretrained(tmp / name)
        shutil.rmtree(target, ignore_errors=True)  # a half-written round left by a crash
        tmp.rename(target)

    def mark_done(self, method: str, r: int, record: dict) -> None:
        """The commit point of a round: its done.json; metrics.jsonl is then rebuilt from all done records."""
        atomic_write_json(self.round_dir(method, r) / "done.json", record)
        self.rebuild_metrics(method)

    def load_round(self, method: str, r: int, references: dict[str, AdapterState]) -> dict[str, AdapterState]:
        """Adapters of a completed round, each checked against its reference (keys, shapes, dtypes, finite)."""
        target = self.round_dir(method, r)
        return {name: load_adapter_file(target / name / "adapter_model.safetensors", ref)
                for name, ref in references.items()}

    def rebuild_metrics(self, method: str) -> None:
        """metrics.jsonl = the done.json records in round order (drops lines of rounds that never completed)."""
        self.read_metrics(method)  # warns about any line a crash cut short before it is replaced
        records = self.done_records(method)
        self.method_dir(method).mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.method_dir(method) / "metrics.jsonl",
                          "".join(json.dumps(records[r]) + "\n" for r in sorted(records)))

    def read_metrics(self, method: str) -> list[dict]:
        """Metric lines of a method; a line cut by a crash (or otherwise unreadable) is skipped with a warning."""
        path = self.method_dir(method) / "metrics.jsonl"
        if not path.exists():
            return []
        records = []
        for lineno, line in enumerate(path.read_bytes().decode("utf-8", "replace").splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                record = None
            if not isinstance(record, dict) or not isinstance(record.get("round"), int):
                log.warning("%s, line %d: unreadable metrics line dropped (cut by a crash?)", path, lineno)
                continue
            records.append(record)
        return records

    # ---- final ----------------------------------------------------------------------------
    def write_final(self, method: str, final: dict) -> None:
        self.method_dir(method).mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.method_dir(method) / "final.json", final)

    def read_final(self, method: str) -> dict | None:
        path = self.method_dir(method) / "final.json"
        if not path.exists():
            return None
        final = read_json_file(path, "final evaluation")
        if not isinstance(final, dict):
            raise RunDirError(f"{path}: not a final evaluation (expected a JSON object); delete it to re-evaluate")
        return final
