"""Evaluation speed: fedcollm's multiple-choice scorer against lm-evaluation-harness on the same items, model,
dtype and threads, in one invocation.

    python benchmarks/eval_speed.py [--model smollm2-135m] [--limit 500] [--tasks arc_easy ...] [--repeats 1]

lm-evaluation-harness is not a dependency of fedcollm; give this script a Python that has it, e.g. a venv beside
the project's packages:
    python -m venv --system-site-packages /tmp/lmeval && /tmp/lmeval/bin/pip install lm-eval==0.4.13
    /tmp/lmeval/bin/python benchmarks/eval_speed.py
Items are each task's evaluation split as fedcollm renders it (configs/tasks.toml): the same context and
choices are written to JSON lines that an lm-eval task of `output_type: multiple_choice` reads (target delimiter
" "), so both score exactly the same requests. Both arms run in turn, `--repeats` times, fedcollm first; the
fastest run of each counts. The model is loaded once in fp32 (no CPU here has native bf16 unless the record says
so). Writes benchmarks/results/eval-speed.json with both times, the speed-up, and acc/acc_norm from both.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch
from common import (  # benchmarks/ is the script's folder, on sys.path
    machine,
    use_shared_data,
)

from fedcollm.config import Config
from fedcollm.data.tasks import load_eval_split
from fedcollm.evaluate import accuracy, choice_logprobs
from fedcollm.models.loading import load_model, load_tokenizer

HERE = Path(__file__).resolve().parent
TASKS = ["commonsenseqa", "openbookqa", "arc_challenge", "arc_easy"]

LM_EVAL_TASK = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
target_delimiter: " "
metric_list:
  - metric: acc
  - metric: acc_norm
"""


def write_lm_eval_tasks(sets: dict, folder: Path) -> list[str]:
    """One lm-eval task per fedcollm task, over exactly fedcollm's rendered items."""
    names = []
    for task, exs in sets.items():
        if not all(c.startswith(" ") for ex in exs for c in ex.continuations):
            raise SystemExit(f"{task}: a continuation does not start with the target delimiter ' '")
        data = folder / f"{task}.jsonl"
        data.write_text("".join(json.dumps({"context": ex.context, "answer": ex.answer,
                                            "choices": [c[1:] for c in ex.continuations]}) + "\n" for ex in exs))
        name = f"fedcollm_{task}"
        (folder / f"{name}.yaml").write_text(LM_EVAL_TASK.format(name=name, path=data))
        names.append(name)
    return names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tasks", nargs="+", default=TASKS)
    parser.add_argument("--limit", type=int, default=None, help="first N items of each split (default: all)")
    parser.add_argument("--batch-size", type=int, default=32, help="rows per forward, both arms")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--out", default=str(HERE / "results" / "eval-speed.json"))
    args = parser.parse_args()
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    data_dir = use_shared_data()

    specs = Config.from_dict({"data": {"tasks": args.tasks}}).task_specs()
    sets = {t: load_eval_split(t, specs[t], data_dir, args.limit) for t in args.tasks}
    tokenizer, model = load_tokenizer(args.model), load_model(args.model).eval()

    def ours() -> dict:
        return {t: accuracy(exs, choice_logprobs(model, tokenizer, exs, args.max_length, args.batch_size))
                for t, exs in sets.items()}

    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        lm_eval = None
        print("lm-evaluation-harness is not importable here: only fedcollm's time is measured (see --help)")

    folder = Path(tempfile.mkdtemp(prefix="eval-speed-"))
    names = write_lm_eval_tasks(sets, folder)

    def theirs() -> dict:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=args.batch_size, max_length=args.max_length)
        out = lm_eval.simple_evaluate(model=lm, tasks=names, task_manager=TaskManager(include_path=str(folder)),
                                      num_fewshot=0, log_samples=False)
        return {t: {"acc": out["results"][n]["acc,none"], "acc_norm": out["results"][n]["acc_norm,none"]}
                for t, n in zip(sets, names)}

    arms = {"fedcollm": ours} | ({"lm_eval": theirs} if lm_eval else {})
    seconds: dict[str, list[float]] = {a: [] for a in arms}
    scores: dict[str, dict] = {}
    for _ in range(args.repeats):
        for arm, fn in arms.items():
            t0 = time.perf_counter()
            scores[arm] = fn()
            seconds[arm].append(time.perf_counter() - t0)
            print(f"{arm}: {seconds[arm][-1]:.1f} s")
    best = {a: min(s) for a, s in seconds.items()}
    result = {"setting": {"model": args.model, "dtype": str(next(model.parameters()).dtype), "tasks": args.tasks,
                          "items": {t: len(exs) for t, exs in sets.items()}, "batch_size": args.batch_size,
                          "max_length": args.max_length, "repeats": args.repeats,
                          "lm_eval": getattr(lm_eval, "__version__", None)} | machine(),
              "seconds": seconds, "fedcollm_s": best["fedcollm"], "lm_eval_s": best.get("lm_eval"),
              "speedup": best["lm_eval"] / best["fedcollm"] if "lm_eval" in best else None,
              "goal_speedup": 2.0, "scores": scores}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    if result["speedup"]:
        print(f"fedcollm {best['fedcollm']:.1f} s, lm-evaluation-harness {best['lm_eval']:.1f} s: "
              f"{result['speedup']:.2f}x (goal >= 2x)")
    for arm, per_task in scores.items():
        print(arm, {t: round(100 * s["acc"], 2) for t, s in per_task.items()})


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
