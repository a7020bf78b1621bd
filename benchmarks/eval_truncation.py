"""PIQA dev with SmolLM2-135M zero-shot, as `fedcollm eval` scores it, at the old evaluation cap and the new default.

    python benchmarks/eval_truncation.py 128 none     # run.eval_max_length values; none = the model's own length

Before issue 29, evaluation cut every prompt to model.max_length (128 by default) without saying so; now it reads
items whole up to the model's context length and counts what a shorter cap cuts. lm-evaluation-harness's PIQA acc
for this model is 64.31. Writes benchmarks/results/eval-truncation.json.
"""
import json
import sys
import time
from pathlib import Path

import torch
from common import (  # benchmarks/ is the script's folder, on sys.path
    machine,
    use_shared_data,
)

from fedcollm.config import Config
from fedcollm.data.tasks import load_scored_split
from fedcollm.evaluate import eval_length, evaluate_tasks
from fedcollm.models.derive import resolve_model_dir
from fedcollm.models.loading import (
    load_model,
    load_tokenizer,
    resolve_device,
    resolve_dtype,
)

HERE = Path(__file__).resolve().parent

use_shared_data()
torch.set_num_threads(2)
base = Config.from_toml(HERE / "eval_truncation.toml")
exs = load_scored_split("piqa", base.task_specs()["piqa"], base.data)
model_dir = resolve_model_dir("smollm2-135m", base.derive, base.data.data_dir)
device = resolve_device(base.model.device)
model = load_model(model_dir, resolve_dtype(base.model.dtype, device, model_dir), device)
tokenizer = load_tokenizer(model_dir)
out = {"machine": machine(), "dtype": "fp32", "lm_eval_acc_as_issue_29_reports": 0.6431, "caps": {}}
for cap in sys.argv[1:] or ["128", "none"]:
    cfg = base.override([f"run.eval_max_length={cap}"])
    t0 = time.perf_counter()
    m = evaluate_tasks(model, tokenizer, {"piqa": exs}, cfg, f"cap={cap}")["piqa"]
    out["caps"][cap] = {k: m[k] for k in ("acc", "acc_norm", "n", "truncated")} | {
        "eval_length": eval_length(cfg, model, tokenizer), "seconds": round(time.perf_counter() - t0)}
    print(cap, json.dumps(out["caps"][cap]), flush=True)
(HERE / "results" / "eval-truncation.json").write_text(json.dumps(out, indent=1) + "\n")
