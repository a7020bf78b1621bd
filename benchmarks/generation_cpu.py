"""Generation benchmark on CPU (issue 28): Zero-Shot, Standalone, FedAvg, FedCoLLM and FedMKT on a generative QA
task (clients: SQuAD v1.1 questions; server: the Alpaca subset as D^a), scored on held-out articles by what each
model writes, with intervals over items, and the speed of batched generation beside one prompt at a time.

    python benchmarks/generation_cpu.py          # runs (or resumes) runs/bench-generation-cpu

Writes benchmarks/results/generation-cpu/: throughput.json (timed first, on the untrained models, kept when the
run resumes), results.json (per method and model: each metric with its 95 % interval over items; the paired
claims of plan.md with Holm's correction; the throughput block), samples.md (generations side by side) and the
run's results.md, and summary.md (the tables). plan.md states the claims before the run.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
from common import (  # benchmarks/ is the script's folder, on sys.path
    bench_config,
    machine,
    run_benchmark,
)

from fedcollm.config import Config
from fedcollm.generation import generate, prompt_ids
from fedcollm.methods import REGISTRY
from fedcollm.runs import RunDir
from fedcollm.stats import (
    bootstrap_ci,
    bootstrap_ratio_ci,
    holm_intervals,
    paired_distribution,
)

HERE = Path(__file__).resolve().parent
TEXT_METRICS = ("token_f1", "exact_match", "rouge_l")
SPEED_PROMPTS = 48
# The claims of plan.md, one Holm family: (model, method a, method b), each on token F1 and on the reference's
# mean token NLL (perplexity's logarithm; lower is better).
CLAIMS = [("slm", "standalone", "zero_shot"), ("slm", "fedavg", "standalone"), ("slm", "fedcollm", "fedavg"),
          ("slm", "fedmkt", "fedavg"), ("llm", "fedcollm", "zero_shot"), ("llm", "fedmkt", "zero_shot")]


def throughput(cfg: Config) -> dict:
    """Tokens per second of the evaluation path (run.eval_batch_size prompts per `generate` call) and of one prompt
    per call, on the same first SPEED_PROMPTS held-out prompts, greedy, for the untrained SLM and LLM."""
    import torch

    from fedcollm.data.tasks import load_scored_split
    from fedcollm.models.derive import resolve_model_dir
    from fedcollm.models.loading import (
        load_model,
        load_tokenizer,
        resolve_device,
        resolve_dtype,
    )

    torch.set_num_threads(cfg.run.threads or torch.get_num_threads())
    task = cfg.data.tasks[0]
    spec = cfg.task_specs([task])[task]
    examples = load_scored_split(task, spec, cfg.data)[:SPEED_PROMPTS]
    out = {"task": task, "prompts": len(examples), "batch_size": cfg.run.eval_batch_size,
           "max_new_tokens": spec.max_new_tokens, "stop": spec.stop, "decoding": "greedy", "machine": machine()}
    device = resolve_device(cfg.model.device)
    for which, name in (("slm", cfg.model.slm), ("llm", cfg.model.llm)):
        folder = resolve_model_dir(name, cfg.derive, cfg.data.data_dir)
        model = load_model(folder, resolve_dtype(cfg.model.dtype, device, folder), device)
        tok = load_tokenizer(folder)
        prompts = [prompt_ids(tok, ex, cfg.model.max_length, spec.max_new_tokens) for ex in examples]
        generate(model, tok, prompts[:4], spec.max_new_tokens, spec.stop, 4)  # warm-up, not timed
        runs = {}
        for arm, batch in (("batched", cfg.run.eval_batch_size), ("one_at_a_time", 1)):
            t0 = time.perf_counter()
            written = generate(model, tok, prompts, spec.max_new_tokens, spec.stop, batch)
            seconds = time.perf_counter() - t0
            tokens = sum(g.tokens for g in written)
            runs[arm] = {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
                         "texts": [g.text for g in written]}
        same = sum(a == b for a, b in zip(runs["batched"].pop("texts"), runs["one_at_a_time"].pop("texts")))
        out[which] = runs | {"model": name, "dtype": str(next(model.parameters()).dtype),
                             "identical_generations": same,
                             "ratio": runs["batched"]["tokens_per_s"] / runs["one_at_a_time"]["tokens_per_s"]}
        del model
    out["ratio"] = out["slm"]["ratio"]  # the clients' model: the evaluation path every method runs most
    return out


def per_item(final: dict, which: str, task: str) -> list[dict]:
    """Each item's scores for one row: the model's items, or for per-client SLMs (Standalone, FedMKT) each item's
    scores averaged over the clients (nll and tokens summed stay per-client means)."""
    clients = final.get("slm_clients") if which == "slm" else None
    blocks = [c[task]["items"] for c in clients.values()] if clients else [final[which][task]["items"]]
    keys = [k for k in (*TEXT_METRICS, "nll", "tokens") if k in blocks[0][0]]
    return [{k: sum(b[i][k] for b in blocks) / len(blocks) for k in keys} for i in range(len(blocks[0]))]


def metric_block(items: list[dict]) -> dict:
    """Each metric's mean with its 95 % bootstrap interval over items; perplexity as exp of total NLL / tokens."""
    out = {}
    for m in TEXT_METRICS:
        values = np.array([it[m] for it in items])
        out[m] = {"value": float(values.mean()), "ci95": list(bootstrap_ci(values))}
    nll, tokens = np.array([it["nll"] for it in items]), np.array([it["tokens"] for it in items])
    lo, hi = bootstrap_ratio_ci(nll, tokens)
    out["perplexity"] = {"value": math.exp(nll.sum() / tokens.sum()), "ci95": [math.exp(lo), math.exp(hi)]}
    return out


def claims(rows: dict[str, dict[str, list[dict]]]) -> list[dict]:
    """The plan's claims with their paired differences (a - b) over items and Holm-adjusted intervals."""
    listed, dists = [], []
    for which, a, b in CLAIMS:
        if a not in rows[which] or b not in rows[which]:
            continue
        for metric in ("token_f1", "nll_per_token"):
            def values(method):
                its = rows[which][method]
                if metric == "token_f1":
                    return np.array([it["token_f1"] for it in its])
                return np.array([it["nll"] / it["tokens"] for it in its])
            diff = values(a) - values(b)
            listed.append({"model": which, "a": a, "b": b, "metric": metric, "difference": float(diff.mean())})
            dists.append(paired_distribution(values(a), values(b)))
    for claim, holm in zip(listed, holm_intervals(dists)):
        claim |= {"holm_interval": [float(x) for x in holm["interval"]], "p": holm["p"],
                  "holm_alpha": holm["holm_alpha"], "significant": holm["significant"]}
    return listed


def samples_markdown(finals: dict, task: str, count: int = 8) -> str:
    lines = [f"# Sample generations: {task}, the first {count} held-out questions", "",
             "Greedy decoding; per-client SLM rows (Standalone, FedMKT) show client 0's.", ""]
    first = next(iter(finals.values()))
    for i in range(count):
        item = first["llm"][task]["items"][i]
        lines += [f"## {item['id']}", "", "```", item["prompt"].strip()[-600:], "```", "",
                  f"reference: {item['reference']!r}", "", "| method | model | generation | token F1 |", "|---|---|---|---|"]
        for m, final in finals.items():
            for which in ("llm", "slm"):
                block = (final["slm_clients"]["client_0"] if which == "slm" and "slm_clients" in final
                         else final.get(which, {}))
                if task in block:
                    it = block[task]["items"][i]
                    text = it["generation"].replace("|", "\\|").replace("\n", " ")
                    lines.append(f"| {m} | {which.upper()} | {text!r} | {100 * it['token_f1']:.0f} |")
        lines.append("")
    return "\n".join(lines)


def summary_markdown(report: dict) -> str:
    """The metric tables (95 % intervals over items), the claims with Holm intervals, and the throughput."""
    def cell(block: dict, m: str) -> str:
        v, (lo, hi) = block[m]["value"], block[m]["ci95"]
        return f"{v:.1f} [{lo:.1f}, {hi:.1f}]" if m == "perplexity" else f"{100 * v:.2f} [{100 * lo:.2f}, {100 * hi:.2f}]"

    lines = [f"# Generation benchmark: {report['setting']['task']} ({report['n_items']} held-out items)", "",
             "Token F1, exact match, ROUGE-L in % and the reference's perplexity, each with its 95 % bootstrap "
             "interval over items (one seed).", ""]
    for which in ("slm", "llm"):
        lines += [f"## {which.upper()}", "", "| method | token F1 | exact match | ROUGE-L | perplexity |",
                  "|---|---|---|---|---|"]
        lines += [f"| {REGISTRY[m].title} | " + " | ".join(cell(b, k) for k in (*TEXT_METRICS, "perplexity")) + " |"
                  for m, b in report[which].items()]
        lines.append("")
    lines += ["## Claims (one Holm family)", "", "| model | a - b | metric | difference | Holm interval | p | significant |",
              "|---|---|---|---|---|---|---|"]
    for c in report["claims"]:
        scale = 100 if c["metric"] == "token_f1" else 1
        lo, hi = (scale * x for x in c["holm_interval"])
        pair = f"{REGISTRY[c['a']].title} - {REGISTRY[c['b']].title}"
        lines.append(f"| {c['model'].upper()} | {pair} | {c['metric']} | "
                     f"{scale * c['difference']:+.3f} | [{lo:+.3f}, {hi:+.3f}] | "
                     f"{c['p']:.4f} | {c['significant']} |".replace("| 0.0000 |", "| < 0.0001 |"))
    t = report["throughput"]
    lines += ["", f"## Throughput ({t['prompts']} prompts, greedy, {t['machine']['cpu']}, "
              f"{t['machine']['torch_threads']} threads)", "",
              "| model | dtype | batched tokens/s | one-at-a-time tokens/s | ratio | identical generations |",
              "|---|---|---|---|---|---|"]
    for which in ("slm", "llm"):
        r = t[which]
        lines.append(f"| {which.upper()} {r['model']} | {r['dtype']} | {r['batched']['tokens_per_s']:.1f} | "
                     f"{r['one_at_a_time']['tokens_per_s']:.1f} | {r['ratio']:.2f} | "
                     f"{r['identical_generations']}/{t['prompts']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    cfg, out = bench_config(__doc__, HERE / "generation_cpu.toml", HERE / "results" / "generation-cpu")
    speed_file = out / "throughput.json"
    if not speed_file.exists():  # timed once, before training; a resumed benchmark keeps these figures
        speed_file.write_text(json.dumps(throughput(cfg), indent=2))
    speed = json.loads(speed_file.read_text())
    print(f"throughput: SLM ratio {speed['slm']['ratio']:.2f}, LLM ratio {speed['llm']['ratio']:.2f}", flush=True)
    t0 = time.time()
    results, run_dir = run_benchmark(cfg, out)
    run = RunDir(run_dir)
    task = cfg.data.tasks[0]
    finals = {m: run.read_final(m) for m in cfg.run.methods}
    rows = {which: {m: per_item(f, which, task) for m, f in finals.items() if which in f} for which in ("llm", "slm")}
    report = {"setting": results["setting"] | {"machine": machine(), "task": task, "aux": cfg.data.aux_tasks,
                                               "benchmark_wall_s_this_invocation": time.time() - t0},
              "n_items": len(next(iter(rows["slm"].values()))),
              "slm": {m: metric_block(its) for m, its in rows["slm"].items()},
              "llm": {m: metric_block(its) for m, its in rows["llm"].items()},
              "claims": claims(rows), "throughput": speed, "budget": results["budget"],
              "timing": results["timing"], "plan": "plan.md"}
    (out / "results.json").write_text(json.dumps(report, indent=2))
    (out / "samples.md").write_text(samples_markdown(finals, task))
    (out / "summary.md").write_text(summary_markdown(report))
    shutil.copy(run_dir / "results.md", out / "results.md")
    for which in ("llm", "slm"):
        for m, block in report[which].items():
            print(which, m, {k: round(v["value"], 4) for k, v in block.items()})


if __name__ == "__main__":
    main()
