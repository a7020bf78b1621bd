"""Turn a run directory into results.json, paper-style tables (results.md) and a per-round accuracy plot: accuracy
tables for the choice tasks, per-metric tables and side-by-side generations for the generation tasks."""

from __future__ import annotations

import json
from pathlib import Path

from fedcollm.errors import RunDirError
from fedcollm.fileio import (
    atomic_write,
    atomic_write_json,
    atomic_write_text,
    read_json_file,
)
from fedcollm.methods import REGISTRY, headline
from fedcollm.runs import RunDir
from fedcollm.stats import item_outcomes, paired_difference

TIMING_KEYS = ("round_s", "client_train_s", "aggregate_s", "server_kd_s", "eval_s", "checkpoint_s", "kd_step_s")


def table_rows(which: str) -> list[str]:
    """The methods with a row in the `which` ("llm" or "slm") tables, in registry order."""
    return [m for m, spec in REGISTRY.items() if which in spec.scores]


def _metric(final: dict, which: str, metric: str) -> dict[str, float]:
    return {task: m[metric] for task, m in final.get(which, {}).items() if metric in m}


GENERATION_FIELDS = ("rouge_l", "token_f1", "exact_match", "perplexity", "nll_per_token", "n", "truncated")
SAMPLES = 3  # items per generation task shown side by side in results.md


def generation_results(finals: dict[str, dict], tasks: list[str]) -> dict:
    """Per model, method and generation task: its metrics and generation speed (tokens per second)."""
    out: dict = {}
    for which in ("llm", "slm"):
        for m, final in finals.items():
            for task in tasks:
                block = final.get(which, {}).get(task)
                if block:
                    row = {k: block[k] for k in GENERATION_FIELDS if k in block}
                    if "generation" in block:
                        row["tokens_per_s"] = block["generation"]["tokens_per_s"]
                    out.setdefault(which, {}).setdefault(m, {})[task] = row
    return out


def generation_samples(finals: dict[str, dict], tasks: list[str], count: int = SAMPLES) -> dict:
    """The first `count` items of each generation task: prompt, reference and what every model wrote."""
    out: dict = {}
    for task in tasks:
        items: list[dict] = []
        for m, final in finals.items():
            clients = final.get("slm_clients", {})  # per-client SLMs: the mean has no items; show client 0's
            models = {"llm": final.get("llm", {})} | ({"slm client_0": clients["client_0"]} if clients else
                                                      {"slm": final.get("slm", {})})
            for which, blocks in models.items():
                for i, item in enumerate(blocks.get(task, {}).get("items", [])[:count]):
                    if "generation" not in item:
                        continue
                    if len(items) <= i:
                        items.append({k: item[k] for k in ("id", "prompt", "reference")} | {"written": {}})
                    items[i]["written"][f"{m} {which}"] = item["generation"]
        if items:
            out[task] = items
    return out


def build_results(run: RunDir, setting: dict, communication: dict, extra_timing: dict | None = None) -> dict:
    cfg = run.load_config()
    specs = cfg.task_specs()
    everything = list(specs)
    tasks = [t for t in everything if not specs[t].generative]
    generative = [t for t in everything if specs[t].generative]
    finals = {m: run.read_final(m) for m in cfg.run.methods}
    finals = {m: f for m, f in finals.items() if f is not None}
    results: dict = {"setting": setting, "tasks": tasks, "llm": {}, "slm": {}, "acc_norm": {"llm": {}, "slm": {}},
                     "truncated": {"llm": {}, "slm": {}}}
    if generative:
        results |= {"generation_tasks": generative, "generation": generation_results(finals, generative),
                    "samples": generation_samples(finals, generative)}
    for which in ("llm", "slm"):
        for m in table_rows(which):
            if m in finals and which in finals[m]:
                results[which][m] = _metric(finals[m], which, "acc")
                results["acc_norm"][which][m] = _metric(finals[m], which, "acc_norm")
                results["truncated"][which][m] = _metric(finals[m], which, "truncated")
    if "standalone" in finals:
        results["slm_standalone_clients"] = {c: _metric({"x": f}, "x", "acc")
                                             for c, f in finals["standalone"]["slm_clients"].items()}
    any_final = next(iter(finals.values()), {})
    any_block = next(iter(any_final.values()), {}) if any_final else {}
    results["n_eval"] = {t: any_block[t]["n"] for t in everything if t in any_block}
    results["paired"] = paired_differences(finals, tasks)
    results["budget"] = {m: training_budget(run, m) for m in finals}
    results["communication"] = communication
    results["timing"] = round_timing(run, headline() if headline() in finals else None) | (extra_timing or {})
    spent = {m: dp_spent(run, m) for m in finals}
    if any(spent.values()):
        results["dp"] = {m: s for m, s in spent.items() if s}
    return results


def _item_outcomes(final: dict, which: str, task: str):
    """Per-item correctness of a model on a choice task (Standalone's SLM: averaged over its clients), or None."""
    blocks = list(final.get("slm_clients", {}).values()) if which == "slm" and "slm_clients" in final else \
        [final.get(which, {})]
    correct = [b[task]["correct"] for b in blocks if "correct" in b.get(task, {})]
    return item_outcomes(correct) if correct and len(correct) == len(blocks) else None


def paired_differences(finals: dict[str, dict], tasks: list[str]) -> dict:
    """The method under study against each baseline, per model and choice task: the accuracy difference on the
    same items with its paired-bootstrap 95 % interval, so that a table's gain says how far it is from noise."""
    name, out = headline(), {}
    for which in ("llm", "slm"):
        for base in table_rows(which):
            if name not in finals or base == name or base not in finals:
                continue
            for task in tasks:
                ours, theirs = _item_outcomes(finals[name], which, task), _item_outcomes(finals[base], which, task)
                if ours is None or theirs is None or ours.shape != theirs.shape:
                    continue
                diff, (lo, hi), _ = paired_difference(ours, theirs)
                out.setdefault(which, {}).setdefault(base, {})[task] = {"difference": diff, "ci95": [lo, hi],
                                                                        "n": len(ours)}
    return out


def dp_spent(run: RunDir, method: str) -> dict | None:
    """The privacy a method's run spent: its last round's accounting (`privacy.dp_record`: epsilon at delta after
    all its rounds and for one round, sampling, neighbouring relation, sensitivity and noise, expected clients,
    mode); None without DP."""
    records = [r for r in run.read_metrics(method) if "dp" in r]
    return records[-1]["dp"] | {"rounds": records[-1]["round"]} if records else None


def training_budget(run: RunDir, method: str) -> dict[str, int]:
    """Optimizer steps and examples each model trained on over the whole run (the rounds' "budget" fields);
    examples_seen adds both models' examples."""
    keys = ("llm_steps", "slm_steps", "llm_examples", "slm_examples")
    total = {k: sum(r.get("budget", {}).get(k, 0) for r in run.read_metrics(method)) for k in keys}
    return total | {"examples_seen": total["llm_examples"] + total["slm_examples"]}


def round_timing(run: RunDir, method: str | None) -> dict:
    """Mean per-round wall time by phase; overhead = what no phase accounts for, plus checkpointing."""
    if method is None:
        return {}
    records = [r["timing"] for r in run.read_metrics(method)]
    if not records:
        return {}
    mean = {k: sum(r.get(k, 0.0) for r in records) / len(records) for k in TIMING_KEYS}
    phases = sum(mean[k] for k in ("client_train_s", "aggregate_s", "server_kd_s", "eval_s"))
    mean["overhead_fraction"] = max(mean["round_s"] - phases, 0.0) / mean["round_s"]
    return mean


def _row(values: dict[str, float], tasks: list[str]) -> str:
    cells = [f"{100 * values[t]:.1f}" if t in values else "–" for t in tasks]
    avg = f"{100 * sum(values[t] for t in tasks) / len(tasks):.1f}" if all(t in values for t in tasks) else "–"
    return " | ".join(cells + [avg])


def _verdicts(results: dict, which: str) -> list[str]:
    """Plain statements of where the method under study does and does not beat each baseline (no cherry-picking)."""
    name = headline()
    ours = results[which].get(name)
    out = []
    if not ours:
        return out
    for base in table_rows(which):
        if base == name or base not in results[which]:
            continue
        theirs = results[which][base]
        common = [t for t in results["tasks"] if t in ours and t in theirs]
        if not common:
            continue
        wins = [t for t in common if ours[t] > theirs[t]]
        losses = [t for t in common if ours[t] < theirs[t]]
        d = 100 * sum(ours[t] - theirs[t] for t in common) / len(common)
        paired = results.get("paired", {}).get(which, {}).get(base, {})
        intervals = "; ".join(f"{t} {100 * p['difference']:+.1f} [{100 * p['ci95'][0]:+.1f}, {100 * p['ci95'][1]:+.1f}]"
                              f" on {p['n']} items" for t, p in paired.items())
        out.append(f"- {which.upper()} {REGISTRY[name].title} vs {REGISTRY[base].title}: {d:+.1f} points on average; better on "
                   f"{', '.join(wins) or 'no task'}; worse on {', '.join(losses) or 'no task'}."
                   + (f" Paired-bootstrap 95 % interval over items: {intervals}." if intervals else ""))
    return out


def truncation_note(results: dict, models: tuple[str, ...], tasks: list[str]) -> list[str]:
    """A line under a table naming, by method and model, each task whose items were scored on text cut to the
    evaluation length, with their count; none cut (or results from before the count): no line, the table as was."""
    cut = [f"{REGISTRY[m].title} {which.upper()} {t} {n} of {results['n_eval'].get(t, '?')}" for which in models
           for m, row in results.get("truncated", {}).get(which, {}).items()
           for t, n in row.items() if t in tasks and n]
    if not cut:
        return []
    return ["", f"Items scored on text cut to the evaluation length (run.eval_max_length): {'; '.join(cut)}."]


def accuracy_markdown(results: dict) -> list[str]:
    """Tables 1 and 2: the choice tasks' accuracy by method, with the verdicts of the method under study and
    acc_norm."""
    tasks = results["tasks"]
    head = "| method | " + " | ".join(tasks) + " | avg |\n|---|" + "---|" * (len(tasks) + 1)
    n = ", ".join(f"{t} {results['n_eval'].get(t, '?')}" for t in tasks)
    lines = [f"Zero-shot accuracy (%, lm-evaluation-harness `acc`) on the first N items of each task's evaluation "
             f"split: N = {n}.", "", "## Table 1: server LLM", "", head]
    lines += [f"| {REGISTRY[m].title} | {_row(v, tasks)} |" for m, v in results["llm"].items()]
    lines += truncation_note(results, ("llm",), tasks)
    shared = "/".join(spec.title for spec in REGISTRY.values() if spec.shares_adapter is True)
    lines += ["", f"## Table 2: client SLMs ({shared}: the broadcast adapter every client holds; Standalone: "
              "mean over clients)", "", head]
    lines += [f"| {REGISTRY[m].title} | {_row(v, tasks)} |" for m, v in results["slm"].items()]
    for client, v in results.get("slm_standalone_clients", {}).items():
        lines.append(f"| Standalone {client} | {_row(v, tasks)} |")
    lines += truncation_note(results, ("slm",), tasks)
    ours = REGISTRY[headline()].title
    lines += ["", f"### {ours} against each baseline", ""]
    lines += _verdicts(results, "llm") + _verdicts(results, "slm") or [f"- ({ours} not run)"]
    for which in ("llm", "slm"):
        norm = results.get("acc_norm", {}).get(which)
        if norm:
            lines += ["", f"acc_norm ({which.upper()}):", "", head]
            lines += [f"| {REGISTRY[m].title} | {_row(v, tasks)} |" for m, v in norm.items()]
    return lines


def to_markdown(results: dict) -> str:
    s = results["setting"]
    lines = [f"# Results: LLM {s.get('llm')} / SLM {s.get('slm')}", "",
             f"{s.get('clients')} clients, {s.get('rounds')} rounds, seed {s.get('seed')}."]
    if results["tasks"]:
        lines += accuracy_markdown(results)
    lines += generation_markdown(results)
    c = results.get("communication", {})
    if c:
        lines += ["", "## Table 3: communication per round", "",
                  "| SLM params | adapter params | adapter % of SLM | bytes up (all clients) | bytes down (all clients) |",
                  "|---|---|---|---|---|",
                  f"| {c['slm_params']:,} | {c['adapter_params']:,} | {c['adapter_percent']:.3f} % | "
                  f"{c['bytes_up_per_round']:,} | {c['bytes_down_per_round']:,} |"]
    t = results.get("timing", {})
    if t:
        lines += ["", f"## Timing ({REGISTRY[headline()].title}, mean per round, seconds)", "", "| " + " | ".join(t) + " |",
                  "|" + "---|" * len(t), "| " + " | ".join(f"{v:.3f}" for v in t.values()) + " |"]
    lines += ["", "Setting: `" + json.dumps(s) + "`", ""]
    return "\n".join(lines)


def generation_markdown(results: dict) -> list[str]:
    """Per generation task, a table of every metric by method and model, then a few generations side by side."""
    lines: list[str] = []
    for task in results.get("generation_tasks", []):
        lines += ["", f"## Generation task {task} (N = {results['n_eval'].get(task, '?')})", "",
                  "| method | model | ROUGE-L | token F1 | exact match | perplexity | tokens/s |", "|---|---|---|---|---|---|---|"]
        for which in ("llm", "slm"):
            for m, row in results["generation"].get(which, {}).items():
                r = row.get(task)
                if r:
                    pct = [f"{100 * r[k]:.1f}" if k in r else "–" for k in ("rouge_l", "token_f1", "exact_match")]
                    ppl = f"{r['perplexity']:.2f}" if "perplexity" in r else "–"
                    speed = f"{r['tokens_per_s']:.0f}" if "tokens_per_s" in r else "–"
                    lines.append(f"| {REGISTRY[m].title} | {which.upper()} | " + " | ".join(pct + [ppl, speed]) + " |")
        lines += truncation_note(results, ("llm", "slm"), [task])
        for item in results.get("samples", {}).get(task, []):
            lines += ["", f"**{task} {item['id']}**", "", "```", item["prompt"].strip()[-400:], "```",
                      f"- reference: {item['reference']!r}"]
            lines += [f"- {who}: {text!r}" for who, text in item["written"].items()]
    return lines


def _curve_points(records: list[dict], which: str, tasks: list[str]) -> dict[int, list[tuple[int, float]]]:
    """Mean-over-tasks accuracy per evaluated round, grouped by the items behind it (N per task).

    Each point is read from its round's "curve" block (the same first N items every round); records written
    before curves existed only hold whatever was evaluated, so their points are grouped by N and never joined
    across different N.
    """
    groups: dict[int, list[tuple[int, float]]] = {}
    for r in records:
        block = r.get("eval", {}).get(which)
        if not block or not all(t in block for t in tasks):
            continue
        cells = [block[t].get("curve", block[t]) for t in tasks]
        n = cells[0]["n"]
        score = sum(c.get("score", c.get("acc", 0.0)) for c in cells) / len(cells)  # "acc": older runs
        groups.setdefault(n, []).append((r["round"], 100 * score))
    return groups


def plot_rounds(run: RunDir, results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = results["tasks"] or results.get("generation_tasks", [])
    zero_shot = run.read_final("zero_shot") or {}
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=False)
    sizes: set[int] = set()
    for ax, which in zip(axes, ("llm", "slm")):
        start = _curve_points([{"round": 0, "eval": zero_shot}], which, tasks)
        for n, pts in start.items():
            ax.axhline(pts[0][1], ls="--", color="gray", label=f"Zero-Shot (N={n})")
        for method in REGISTRY:
            for n, pts in _curve_points(run.read_metrics(method), which, tasks).items():
                pts = start.get(n, []) + pts  # round 0 = the untrained model, on the same items
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{REGISTRY[method].title} (N={n})")
                sizes.add(n)
        ax.set_title(f"{which.upper()} mean {'accuracy' if results['tasks'] else 'score'} over {len(tasks)} task(s)")
        ax.set_xlabel("round")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_ylabel("acc (%)" if results["tasks"] else "headline metric (x100)")
        if ax.lines:
            ax.legend(fontsize=8)
    note = ("every point of a line is on the same first N items per task" if len(sizes) <= 1 else
            "lines with different N use different items and are not comparable point to point")
    fig.text(0.5, 0.01, note, ha="center", fontsize=8)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


RESULT_KEYS = {"setting": dict, "tasks": list, "llm": dict, "slm": dict, "n_eval": dict}


def load_results(run: RunDir) -> dict:
    """RUN/results.json, refused with its path when it is not a fedcollm results file."""
    path = run.path / "results.json"
    if not run.path.is_dir():
        raise RunDirError(f"{run.path}: no such run directory")
    results = read_json_file(path, "results file")
    if not isinstance(results, dict):
        raise RunDirError(f"{path}: expected a JSON object of results")
    for key, kind in RESULT_KEYS.items():
        if not isinstance(results.get(key), kind):
            raise RunDirError(f"{path}: key '{key}' missing or not a {kind.__name__}; not a fedcollm results file")
    tasks = results["tasks"]
    for which in ("llm", "slm"):
        for method, row in results[which].items():
            if method not in REGISTRY or not isinstance(row, dict) or not all(
                    isinstance(v, (int, float)) for v in row.values()) or not set(row) <= set(tasks):
                raise RunDirError(f"{path}: {which}.{method} is not a row of per-task accuracies for {tasks}")
    return results


def write_report(run: RunDir, results: dict) -> str:
    atomic_write_json(run.path / "results.json", results)
    md = to_markdown(results)
    atomic_write_text(run.path / "results.md", md)
    plot_rounds(run, results, run.path / "accuracy.png")
    return md
