"""Turn a run directory into results.json, paper-style tables (results.md) and a per-round accuracy plot."""

from __future__ import annotations

import json
from pathlib import Path

from fedcollm.runs import RunDir

LLM_ROWS = ("zero_shot", "centralized", "fedcollm")
SLM_ROWS = ("zero_shot", "standalone", "fedavg", "fedcollm")
NAMES = {"zero_shot": "Zero-Shot", "standalone": "Standalone", "fedavg": "FedAvg", "centralized": "Centralized",
         "fedcollm": "FedCoLLM"}
TIMING_KEYS = ("round_s", "client_train_s", "aggregate_s", "server_kd_s", "eval_s", "checkpoint_s", "kd_step_s")


def _metric(final: dict, which: str, metric: str) -> dict[str, float]:
    return {task: m[metric] for task, m in final.get(which, {}).items()}


def build_results(run: RunDir, setting: dict, communication: dict, extra_timing: dict | None = None) -> dict:
    cfg = run.read_config()
    tasks = cfg["data"]["tasks"]
    finals = {m: run.read_final(m) for m in cfg["run"]["methods"]}
    finals = {m: f for m, f in finals.items() if f is not None}
    results: dict = {"setting": setting, "tasks": tasks, "llm": {}, "slm": {}, "acc_norm": {"llm": {}, "slm": {}}}
    for which, rows in (("llm", LLM_ROWS), ("slm", SLM_ROWS)):
        for m in rows:
            if m in finals and which in finals[m]:
                results[which][m] = _metric(finals[m], which, "acc")
                results["acc_norm"][which][m] = _metric(finals[m], which, "acc_norm")
    if "standalone" in finals:
        results["slm_standalone_clients"] = {c: _metric({"x": f}, "x", "acc")
                                             for c, f in finals["standalone"]["slm_clients"].items()}
    any_final = next(iter(finals.values()), {})
    any_block = next(iter(any_final.values()), {}) if any_final else {}
    results["n_eval"] = {t: any_block[t]["n"] for t in tasks if t in any_block}
    results["communication"] = communication
    results["timing"] = round_timing(run, "fedcollm" if "fedcollm" in finals else None) | (extra_timing or {})
    return results


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


def _verdicts(results: dict, which: str, rows: tuple[str, ...]) -> list[str]:
    """Plain statements of where FedCoLLM does and does not beat each baseline (no cherry-picking)."""
    ours = results[which].get("fedcollm")
    out = []
    if not ours:
        return out
    for base in rows:
        if base == "fedcollm" or base not in results[which]:
            continue
        theirs = results[which][base]
        wins = [t for t in results["tasks"] if ours[t] > theirs[t]]
        losses = [t for t in results["tasks"] if ours[t] < theirs[t]]
        d = 100 * sum(ours[t] - theirs[t] for t in results["tasks"]) / len(results["tasks"])
        out.append(f"- {which.upper()} FedCoLLM vs {NAMES[base]}: {d:+.1f} points on average; better on "
                   f"{', '.join(wins) or 'no task'}; worse on {', '.join(losses) or 'no task'}.")
    return out


def to_markdown(results: dict) -> str:
    tasks = results["tasks"]
    s = results["setting"]
    head = "| method | " + " | ".join(tasks) + " | avg |\n|---|" + "---|" * (len(tasks) + 1)
    n = ", ".join(f"{t} {results['n_eval'].get(t, '?')}" for t in tasks)
    lines = [f"# Results: LLM {s.get('llm')} / SLM {s.get('slm')}",
             "",
             f"{s.get('clients')} clients, {s.get('rounds')} rounds, seed {s.get('seed')}. Zero-shot accuracy (%, "
             f"lm-evaluation-harness `acc`) on the first N test items per task (CSQA: dev): N = {n}.",
             "", "## Table 1: server LLM", "", head]
    lines += [f"| {NAMES[m]} | {_row(v, tasks)} |" for m, v in results["llm"].items()]
    lines += ["", "## Table 2: client SLMs (FedAvg/FedCoLLM: the broadcast adapter every client holds; Standalone: "
              "mean over clients)", "", head]
    lines += [f"| {NAMES[m]} | {_row(v, tasks)} |" for m, v in results["slm"].items()]
    for client, v in results.get("slm_standalone_clients", {}).items():
        lines.append(f"| Standalone {client} | {_row(v, tasks)} |")
    lines += ["", "### FedCoLLM against each baseline", ""]
    lines += _verdicts(results, "llm", LLM_ROWS) + _verdicts(results, "slm", SLM_ROWS) or ["- (FedCoLLM not run)"]
    for which in ("llm", "slm"):
        if results["acc_norm"][which]:
            lines += ["", f"acc_norm ({which.upper()}):", "", head]
            lines += [f"| {NAMES[m]} | {_row(v, tasks)} |" for m, v in results["acc_norm"][which].items()]
    c = results.get("communication", {})
    if c:
        lines += ["", "## Table 3: communication per round", "",
                  "| SLM params | adapter params | adapter % of SLM | bytes up (all clients) | bytes down (all clients) |",
                  "|---|---|---|---|---|",
                  f"| {c['slm_params']:,} | {c['adapter_params']:,} | {c['adapter_percent']:.3f} % | "
                  f"{c['bytes_up_per_round']:,} | {c['bytes_down_per_round']:,} |"]
    t = results.get("timing", {})
    if t:
        lines += ["", "## Timing (FedCoLLM, mean per round, seconds)", "", "| " + " | ".join(t) + " |",
                  "|" + "---|" * len(t), "| " + " | ".join(f"{v:.3f}" for v in t.values()) + " |"]
    lines += ["", "Setting: `" + json.dumps(s) + "`", ""]
    return "\n".join(lines)


def plot_rounds(run: RunDir, results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = results["tasks"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=False)
    for ax, which in zip(axes, ("llm", "slm")):
        for method in ("fedcollm", "fedavg", "centralized", "standalone"):
            pts = [(r["round"], r["eval"][which]) for r in run.read_metrics(method) if which in r.get("eval", {})]
            if pts:
                ax.plot([p[0] for p in pts], [100 * sum(v[t]["acc"] for t in tasks) / len(tasks) for _, v in pts],
                        marker="o", label=NAMES[method])
        zs = results[which].get("zero_shot")
        if zs:
            ax.axhline(100 * sum(zs.values()) / len(zs), ls="--", color="gray", label="Zero-Shot")
        ax.set_title(f"{which.upper()} mean accuracy over {len(tasks)} task(s)")
        ax.set_xlabel("round")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_ylabel("acc (%)")
        ax.legend()
    fig.text(0.5, 0.01, "intermediate rounds may use fewer items (run.round_eval_limit); the last round uses all",
             ha="center", fontsize=8)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(run: RunDir, results: dict) -> str:
    (run.path / "results.json").write_text(json.dumps(results, indent=2))
    md = to_markdown(results)
    (run.path / "results.md").write_text(md)
    plot_rounds(run, results, run.path / "accuracy.png")
    return md
