"""Run directory layout, per-round checkpoints and resume.

```
RUN/config.json                 resolved config
RUN/<method>/metrics.jsonl      one line per completed round
RUN/<method>/round_NNN/         adapters of that round in peft format (slm/, llm/, client_K/) + done.json
RUN/<method>/final.json         final evaluation
RUN/results.json, results.md, accuracy.png
```
A round counts as completed only once its `done.json` exists; resume restarts after the last such round.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from safetensors.torch import load_file

from fedcollm.models.lora import AdapterState, load_adapter_state


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    def method_dir(self, method: str) -> Path:
        return self.path / method

    def round_dir(self, method: str, r: int) -> Path:
        return self.method_dir(method) / f"round_{r:03d}"

    # ---- config ---------------------------------------------------------------------------
    def write_config(self, config_json: str) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / "config.json").write_text(config_json)

    def read_config(self) -> dict:
        path = self.path / "config.json"
        if not path.exists():
            raise FileNotFoundError(f"{path}: no run to resume here (config.json missing)")
        return json.loads(path.read_text())

    # ---- rounds ---------------------------------------------------------------------------
    def last_completed_round(self, method: str) -> int:
        done = [int(p.parent.name.split("_")[1]) for p in self.method_dir(method).glob("round_*/done.json")]
        return max(done, default=0)

    def save_round(self, method: str, r: int, states: dict[str, AdapterState], models: dict[str, object]) -> None:
        """Write each adapter in peft format (loadable with PeftModel.from_pretrained); not yet marked done."""
        target = self.round_dir(method, r)
        tmp = target.with_name(target.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        for name, state in states.items():
            model = models[name.split("_")[0]]  # "client_2" is saved through the SLM
            load_adapter_state(model, state)
            model.save_pretrained(tmp / name)
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)

    def mark_done(self, method: str, r: int, record: dict) -> None:
        """The commit point of a round: its done.json and its metrics line."""
        (self.round_dir(method, r) / "done.json").write_text(json.dumps(record))
        with open(self.method_dir(method) / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    def load_round(self, method: str, r: int) -> dict[str, AdapterState]:
        target = self.round_dir(method, r)
        return {p.parent.name: load_file(p) for p in sorted(target.glob("*/adapter_model.safetensors"))}

    def truncate_metrics(self, method: str, last_round: int) -> None:
        """Drop metric lines of rounds after `last_round` (left by an interrupted run)."""
        path = self.method_dir(method) / "metrics.jsonl"
        if path.exists():
            keep = [line for line in path.read_text().splitlines() if line and json.loads(line)["round"] <= last_round]
            path.write_text("".join(line + "\n" for line in keep))

    def read_metrics(self, method: str) -> list[dict]:
        path = self.method_dir(method) / "metrics.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines() if line] if path.exists() else []

    # ---- final ----------------------------------------------------------------------------
    def write_final(self, method: str, final: dict) -> None:
        self.method_dir(method).mkdir(parents=True, exist_ok=True)
        (self.method_dir(method) / "final.json").write_text(json.dumps(final, indent=2))

    def read_final(self, method: str) -> dict | None:
        path = self.method_dir(method) / "final.json"
        return json.loads(path.read_text()) if path.exists() else None
