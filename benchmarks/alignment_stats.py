"""Benchmark: how many answer positions align 1:1 between two real tokenizations of fedcollm's training text.

    python benchmarks/alignment_stats.py [--limit 500] [--tasks arc_easy ...] [--data-dir /work/shared/data]

For every ordered pair (student, teacher) of SmolLM2-135M, Gemma-3-270M and Qwen2.5-Coder-0.5B and each task,
the first `--limit` train examples are rendered by the task presets (configs/tasks.toml, through
`fedcollm.data.tasks`), so the text is exactly what fedcollm trains on: context + gold continuation, tokenized
per model by `fedcollm.data.batching.encode_pair` (left-truncated to model.max_length). The two token-id
sequences become normalised surface strings (`token_strings`), are aligned by `dtw_align` (student = A,
teacher = B), and the 1:1 pairs (`one_to_one`, optionally `keep_exact`) give each student position its teacher
position (`next_token_positions`; logits at i predict token i+1, see fedcollm.alignment.sequence).

Counted, per pair and task:
  answer positions: the student positions predicting a continuation token (the last n_answer positions);
    `one_to_one`, `exact` (= one_to_one + keep_exact) and `exact_in_teacher_answer` (exact, and the teacher
    token is itself one of the teacher's answer tokens: what survives when only answer rows are exchanged);
  all positions: every position 0..n-2 of the sequence, `one_to_one` and `exact`;
  examples whose every answer position is `exact`-aligned;
  wall time of `dtw_align` per example, and of the whole per-example alignment (DTW + 1:1 + keep_exact +
    positions), each the fastest of `--repeats` runs (the machine may be shared: the 1-minute load average
    at start and end is recorded).
Tokenizers come from `fedcollm.models.loading.registry_tokenizer` (GGUF once, then $FEDCOLLM_CACHE/tokenizers).
Writes benchmarks/results/alignment-stats.json.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from importlib.metadata import version
from itertools import permutations
from pathlib import Path

import numpy as np
import torch

from fedcollm.alignment.exchange import TopK, to_tensors
from fedcollm.alignment.sequence import (
    dtw_align,
    keep_exact,
    next_token_positions,
    one_to_one,
)
from fedcollm.alignment.vocab import token_strings
from fedcollm.comm import Payload, pack
from fedcollm.config import ModelConfig, preset_tasks
from fedcollm.data.batching import encode_pair
from fedcollm.data.tasks import load_train_split
from fedcollm.fileio import atomic_write_json
from fedcollm.models.loading import registry_tokenizer

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # benchmarks/ is not a package: reuse the tokenizer loader of its sibling

from fedcollm.models.loading import cpu_model  # noqa: E402

MODELS = ["smollm2-135m", "gemma3-270m", "qwen2.5-coder-0.5b"]
TASKS = ["arc_easy", "arc_challenge", "openbookqa", "commonsenseqa"]
COUNTS = ("answer_positions", "answer_one_to_one", "answer_exact", "answer_exact_in_teacher_answer",
          "all_positions", "all_one_to_one", "all_exact", "examples", "examples_answer_fully_exact")


def align_example(s_ids: list[int], s_cont: int, t_ids: list[int], t_cont: int, s_str: list[str],
                  t_str: list[str], repeats: int = 1) -> tuple[dict[str, int], float, float]:
    """Counts for one example, DTW seconds, whole-alignment seconds (each the fastest of `repeats` runs)."""
    a, b = [s_str[i] for i in s_ids], [t_str[i] for i in t_ids]
    dtw_s = total_s = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        path = dtw_align(a, b)
        t1 = time.perf_counter()
        m = one_to_one(path, len(a))
        m_exact = keep_exact(m, a, b)
        pos, pos_exact = next_token_positions(m), next_token_positions(m_exact)
        t2 = time.perf_counter()
        dtw_s, total_s = min(dtw_s, t1 - t0), min(total_s, t2 - t0)
    ans = slice(len(pos) - s_cont, None)  # positions predicting the last s_cont tokens
    teacher_tok = m_exact[1:][ans]  # the teacher token each answer position's target predicts
    in_t_answer = (teacher_tok >= len(t_ids) - t_cont)
    exact_ans = pos_exact[ans] >= 0
    counts = {"answer_positions": s_cont, "answer_one_to_one": int((pos[ans] >= 0).sum()),
              "answer_exact": int(exact_ans.sum()),
              "answer_exact_in_teacher_answer": int((exact_ans & in_t_answer).sum()),
              "all_positions": len(pos), "all_one_to_one": int((pos >= 0).sum()),
              "all_exact": int((pos_exact >= 0).sum()),
              "examples": 1, "examples_answer_fully_exact": int(bool(exact_ans.all()))}
    return counts, dtw_s, total_s


def summarise(counts: dict[str, int], dtw_s: list[float], total_s: list[float], s_len: list[int],
              t_len: list[int]) -> dict:
    ap, allp = counts["answer_positions"], counts["all_positions"]
    ms = np.array(dtw_s) * 1e3
    return {
        **counts,
        "answer_fraction_one_to_one": counts["answer_one_to_one"] / ap,
        "answer_fraction_exact": counts["answer_exact"] / ap,
        "answer_fraction_exact_in_teacher_answer": counts["answer_exact_in_teacher_answer"] / ap,
        "all_fraction_one_to_one": counts["all_one_to_one"] / allp,
        "all_fraction_exact": counts["all_exact"] / allp,
        "examples_fraction_answer_fully_exact": counts["examples_answer_fully_exact"] / counts["examples"],
        "student_tokens_mean": statistics.fmean(s_len), "teacher_tokens_mean": statistics.fmean(t_len),
        "dtw_ms": {"mean": round(float(ms.mean()), 3), "median": round(float(np.median(ms)), 3),
                   "p95": round(float(np.percentile(ms, 95)), 3), "max": round(float(ms.max()), 3),
                   "total_s": round(float(ms.sum()) / 1e3, 3)},
        "align_ms_mean": round(statistics.fmean(total_s) * 1e3, 3),
    }


def packed_bytes(lengths: list[int], k: int, vocab: int) -> int:
    """Bytes of `comm.pack` for a synthetic TopK with one example per entry of `lengths` rows, k logits a row."""
    g = torch.Generator().manual_seed(0)
    values = [torch.randn(n, k, generator=g).to(torch.float16) for n in lengths]
    ids = [torch.randint(0, vocab, (n, k), generator=g, dtype=torch.int32) for n in lengths]
    top = TopK.from_examples(values, ids, torch.rand(len(lengths), generator=g),
                             torch.arange(len(lengths), dtype=torch.int64))
    return len(pack(Payload(to_tensors(top), num_examples=len(lengths))))


def exchange_bytes(encoded: dict, models: list[str], tasks: list[str], vocab: dict[str, int]) -> dict:
    """What one upload of top-k logits costs through the serialization seam, measured with `comm.pack`.

    per_token: the marginal bytes of one more token row (pack of 2000 one-row examples minus 1000, with the
    per-example fields held fixed by comparing at equal example counts). per_example: the marginal bytes of
    one more example of one row. Then whole uploads of this run's examples: answer rows only, and every
    position of the sequence (n - 1 rows an example).
    """
    out = {}
    for k in (16, 128):
        v = vocab[models[0]]
        per_token = (packed_bytes([2] * 1000, k, v) - packed_bytes([1] * 1000, k, v)) / 1000
        per_example = (packed_bytes([1] * 2000, k, v) - packed_bytes([1] * 1000, k, v)) / 1000 - per_token
        row = {"per_token_row": per_token, "per_example_extra": per_example, "empty_payload": packed_bytes([], k, v),
               "uploads": {}}
        for n in models:
            answer = [e[1] for t in tasks for e in encoded[n, t]]
            whole = [len(e[0]) - 1 for t in tasks for e in encoded[n, t]]
            row["uploads"][n] = {"examples": len(answer), "answer_rows": sum(answer),
                                 "answer_rows_bytes": packed_bytes(answer, k, vocab[n]),
                                 "all_rows": sum(whole), "all_rows_bytes": packed_bytes(whole, k, vocab[n])}
        out[f"k={k}"] = row
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, default=500, help="first N train examples per task")
    parser.add_argument("--tasks", nargs="+", default=TASKS)
    parser.add_argument("--models", nargs="+", default=MODELS, help="registry names; every ordered pair is run")
    parser.add_argument("--data-dir", default=os.environ.get("FEDCOLLM_DATA") or "/work/shared/data")
    parser.add_argument("--max-length", type=int, default=ModelConfig.max_length,
                        help="encode_pair's left truncation (fedcollm's model.max_length default)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="time each example's alignment this many times and keep the fastest")
    parser.add_argument("--out", default=str(HERE / "results" / "alignment-stats.json"))
    args = parser.parse_args()

    load_before = os.getloadavg()[0]
    specs = preset_tasks()
    data = {t: load_train_split(t, specs[t], args.data_dir)[:args.limit] for t in args.tasks}
    toks = {n: registry_tokenizer(n) for n in args.models}
    strings = {n: token_strings(t) for n, t in toks.items()}
    encoded = {(n, t): [encode_pair(toks[n], ex.context, ex.continuations[ex.answer], args.max_length)
                        for ex in data[t]] for n in args.models for t in args.tasks}
    truncated = {n: {t: sum(len(ids) == args.max_length and
                            len(toks[n](ex.context + ex.continuations[ex.answer], add_special_tokens=False)
                                ["input_ids"]) > args.max_length
                            for ex, (ids, _) in zip(data[t], encoded[n, t])) for t in args.tasks}
                 for n in args.models}

    pairs = []
    for student, teacher in permutations(args.models, 2):
        per_task, pooled = {}, dict.fromkeys(COUNTS, 0)
        pooled_dtw, pooled_total = [], []
        for task in args.tasks:
            counts = dict.fromkeys(COUNTS, 0)
            dtw_s, total_s = [], []
            for (s_ids, s_cont), (t_ids, t_cont) in zip(encoded[student, task], encoded[teacher, task]):
                c, d, tot = align_example(s_ids, s_cont, t_ids, t_cont, strings[student], strings[teacher],
                                              args.repeats)
                for k, v in c.items():
                    counts[k] += v
                dtw_s.append(d)
                total_s.append(tot)
            per_task[task] = summarise(counts, dtw_s, total_s, [len(e[0]) for e in encoded[student, task]],
                                       [len(e[0]) for e in encoded[teacher, task]])
            for k in COUNTS:
                pooled[k] += counts[k]
            pooled_dtw += dtw_s
            pooled_total += total_s
            r = per_task[task]
            print(f"{student} <- {teacher} {task}: answer 1:1 {r['answer_fraction_one_to_one']:.3f}, "
                  f"exact {r['answer_fraction_exact']:.3f}, all 1:1 {r['all_fraction_one_to_one']:.3f}, "
                  f"DTW {r['dtw_ms']['mean']:.2f} ms/example", flush=True)
        s_all = [len(e[0]) for t in args.tasks for e in encoded[student, t]]
        t_all = [len(e[0]) for t in args.tasks for e in encoded[teacher, t]]
        pairs.append({"student": student, "teacher": teacher, "tasks": per_task,
                      "all_tasks": summarise(pooled, pooled_dtw, pooled_total, s_all, t_all)})

    vocab = {n: len(toks[n]) for n in args.models}
    exchange = exchange_bytes(encoded, args.models, args.tasks, vocab)
    for key, row in exchange.items():
        print(f"top-k {key}: {row['per_token_row']:.1f} B per token row, {row['per_example_extra']:.1f} B per "
              f"example, {row['empty_payload']} B empty payload", flush=True)
    result = {
        "setting": {"cpu": cpu_model(), "threads": len(os.sched_getaffinity(0)), "python": platform.python_version(),
                    "numpy": version("numpy"), "rapidfuzz": version("rapidfuzz"), "torch": version("torch"),
                    "tokenizers": version("tokenizers"), "transformers": version("transformers"),
                    "limit_per_task": args.limit, "timing_repeats_min_of": args.repeats,
                    "split": {t: specs[t].train_split for t in args.tasks},
                    "data_dir": args.data_dir, "max_length": args.max_length,
                    "examples": {t: len(data[t]) for t in args.tasks},
                    "truncated_examples": truncated,
                    "text": "task preset context + gold continuation, encode_pair per model",
                    "alignment": "dtw_align(student strings, teacher strings) -> one_to_one [-> keep_exact] "
                                 "-> next_token_positions",
                    "loadavg_1min": {"start": round(load_before, 2), "end": round(os.getloadavg()[0], 2)},
                    "command": "python benchmarks/alignment_stats.py"},
        "pairs": pairs,
        "exchange_bytes": exchange,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
