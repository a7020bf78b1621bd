"""The study of issue 8: does co-tuning help, with every method tuned on validation data and 3 seeds?

    python benchmarks/study.py run [--plan benchmarks/study_plan.toml] [--hours 2.5] [--only GLOB] [--commit]
    python benchmarks/study.py report [--plan ...]
    python benchmarks/study.py status [--plan ...]

The plan (study_plan.toml) names a base config and, per method, the same number of tuning candidates. The work is
cut into units, one `fedcollm` run of one method each:
  tune:   each candidate once (plan's tune_seed), scored on validation items (data.scored = "validation");
  final:  each method with its chosen candidate, once per seed, scored on the full test splits.
A unit that finishes writes results/study/units/<unit>.json (accuracies, which items it got right, budget,
seconds, CPU) and, with --commit, commits it; an interrupted unit resumes from its run directory's last round.
`run` is one piece: it runs one unit, then starts more while its time budget (--hours) leaves room for them
(see _estimate) and records the piece in pieces.json, so the study goes on, on another machine too, with the
next `run`. `--only` keeps a piece to the units whose names match a glob, in plan order (`final-zero_shot-*`:
a short unit for a short slot; `final-*-s1`: one seed's finals). `report` turns the unit files into
results.json and results.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass, field
from datetime import datetime, timezone
from fnmatch import fnmatch
from pathlib import Path

import numpy as np
from common import machine  # benchmarks/ is the script's folder, on sys.path

from fedcollm.experiment import load_config, run_experiment
from fedcollm.fileio import atomic_write_json
from fedcollm.runs import RunDir
from fedcollm.stats import (
    bootstrap_ci,
    holm_intervals,
    item_outcomes,
    paired_difference,
    seed_item_difference,
)

HERE = Path(__file__).resolve().parent
log = logging.getLogger("study")
MODELS = ("llm", "slm")


@dataclass
class Plan:
    path: Path
    config: Path
    results: Path
    runs: Path
    methods: list[str]
    seeds: list[int]
    tune_seed: int
    tune_eval_limit: int | None
    resamples: int
    select_by: dict[str, list[str]]
    search: dict[str, list[dict]]
    inherit: dict[str, dict[str, str]] = field(default_factory=dict)
    claims: list[list[str]] = field(default_factory=list)

    @classmethod
    def load(cls, path: Path) -> "Plan":
        raw = tomllib.loads(path.read_text())
        base = path.parent
        plan = cls(path=path, config=base / raw["config"], results=base / raw["results"], runs=base / raw["runs"],
                   methods=raw["methods"], seeds=raw["seeds"], tune_seed=raw.get("tune_seed", 0),
                   tune_eval_limit=raw.get("tune_eval_limit"), resamples=raw.get("resamples", 10_000),
                   select_by=raw.get("select_by", {}), search=raw.get("search", {}),
                   inherit=raw.get("inherit", {}), claims=raw.get("claims", {}).get("pairs", []))
        sizes = {m: len(plan.search.get(m, [])) for m in plan.methods if m != "zero_shot"}
        if len(set(sizes.values())) > 1:
            raise SystemExit(f"{path}: every trained method needs the same search budget, got {sizes}")
        for m in sizes:
            if m not in plan.select_by:
                raise SystemExit(f"{path}: [select_by] has no entry for {m}")
        return plan


@dataclass(frozen=True)
class Unit:
    phase: str  # tune or final
    method: str
    seed: int
    candidate: int | None = None  # index into the plan's search for tune units

    @property
    def name(self) -> str:
        tag = f"-c{self.candidate}" if self.candidate is not None else ""
        return f"{self.phase}-{self.method}{tag}-s{self.seed}"


def units(plan: Plan) -> list[Unit]:
    """Every unit in the order they run: all tuning, then the final runs seed by seed."""
    tune = [Unit("tune", "zero_shot", plan.tune_seed)] if "zero_shot" in plan.methods else []
    tune += [Unit("tune", m, plan.tune_seed, c) for m in plan.methods if m != "zero_shot"
             for c in range(len(plan.search.get(m, [])) or 1)]
    final = [Unit("final", "zero_shot", plan.seeds[0])] if "zero_shot" in plan.methods else []
    final += [Unit("final", m, s) for s in plan.seeds for m in plan.methods if m != "zero_shot"]
    return tune + final


def unit_path(plan: Plan, unit: Unit) -> Path:
    return plan.results / "units" / f"{unit.name}.json"


def read_unit(plan: Plan, unit: Unit) -> dict | None:
    path = unit_path(plan, unit)
    return json.loads(path.read_text()) if path.exists() else None


def model_means(result: dict) -> dict[str, float]:
    """A unit's mean acc over tasks, per model it scored."""
    return {w: sum(b["acc"] for b in result["final"][w].values()) / len(result["final"][w])
            for w in MODELS if w in result["final"]}


def selection_score(plan: Plan, method: str, result: dict) -> float:
    """Mean validation acc of the models the method is chosen by (each model's mean over the same tasks)."""
    means = model_means(result)
    return sum(means[w] for w in plan.select_by[method]) / len(plan.select_by[method])


def chosen(plan: Plan, method: str) -> tuple[int, dict] | None:
    """(candidate index, overrides) with the best validation score, once every candidate of `method` is done
    and every method it inherits from is chosen; None before. Overrides include what it inherits."""
    if method == "zero_shot":
        return 0, {}
    candidates = plan.search.get(method) or [{}]  # a method with nothing to search runs once, as it is
    done = [read_unit(plan, Unit("tune", method, plan.tune_seed, c)) for c in range(len(candidates))]
    if any(d is None for d in done):
        return None
    overrides = {}
    for key, source in plan.inherit.get(method, {}).items():
        parent = chosen(plan, source)
        if parent is None:
            return None
        overrides[key] = parent[1][key]
    best = max(range(len(done)), key=lambda c: selection_score(plan, method, done[c]))
    return best, overrides | candidates[best]


def overrides_of(plan: Plan, unit: Unit) -> dict | None:
    """The config overrides a unit runs with; None while it cannot run yet (its tuning is not finished)."""
    if unit.phase == "final":
        pick = chosen(plan, unit.method)
        return None if pick is None else pick[1]
    inherited = {}
    for key, source in plan.inherit.get(unit.method, {}).items():
        parent = chosen(plan, source)
        if parent is None:
            return None
        inherited[key] = parent[1][key]
    return inherited | ((plan.search.get(unit.method) or [{}])[unit.candidate] if unit.candidate is not None else {})


def unit_config(plan: Plan, unit: Unit, overrides: dict):
    sets = [f"{k}={json.dumps(v)}" for k, v in overrides.items()]
    sets += [f"run.methods={json.dumps([unit.method])}", f"run.seed={unit.seed}",
             f"run.out_dir={json.dumps(str(plan.runs / unit.name))}"]
    if unit.phase == "tune":
        sets += ['data.scored="validation"']
        if plan.tune_eval_limit:
            sets += [f"data.eval_limit={plan.tune_eval_limit}", f"run.round_eval_limit={plan.tune_eval_limit}"]
    return load_config(str(plan.config), sets)


def _curves(records: list[dict]) -> dict:
    """Per-round accuracy on the curve items, per model and task: {model: {task: [[round, acc], ...]}}."""
    out: dict = {}
    for rec in records:
        for which in MODELS:
            for task, block in rec.get("eval", {}).get(which, {}).items():
                out.setdefault(which, {}).setdefault(task, []).append([rec["round"], block["curve"]["acc"]])
    return out


def _final_blocks(final: dict) -> dict:
    """What a unit keeps of a method's final evaluation: per model and task acc, acc_norm, n and the items it got
    right; for per-client rows (Standalone, FedMKT) every client's items, as "clients"."""
    keep = ("acc", "acc_norm", "n", "correct", "correct_norm")
    out = {which: {t: {k: b[k] for k in keep if k in b} for t, b in final[which].items()}
           for which in MODELS if which in final}
    if "slm_clients" in final:
        for task in out["slm"]:
            out["slm"][task]["clients"] = [c[task]["correct"] for _, c in sorted(final["slm_clients"].items())]
            out["slm"][task]["clients_norm"] = [c[task]["correct_norm"] for _, c in sorted(final["slm_clients"].items())]
    return out


def run_unit(plan: Plan, unit: Unit, overrides: dict) -> dict:
    cfg = unit_config(plan, unit, overrides)
    out = Path(cfg.run.out_dir)
    run, resuming = RunDir(out), (out / "config.json").exists()
    # an interrupted unit resumes after its last finished round; those rounds' time is part of what it cost
    before = run.read_metrics(unit.method) if resuming else []
    t0 = time.perf_counter()
    if resuming:
        from fedcollm.experiment import resume_experiment

        results = resume_experiment(out)
    else:
        results = run_experiment(cfg)
    seconds = time.perf_counter() - t0 + sum(r.get("timing", {}).get("round_s", 0.0) for r in before)
    result = {"unit": unit.name, "phase": unit.phase, "method": unit.method, "seed": unit.seed,
              "candidate": unit.candidate, "overrides": overrides, "scored": cfg.data.scored,
              "final": _final_blocks(run.read_final(unit.method)),
              "curves": _curves(run.read_metrics(unit.method)) if unit.method != "zero_shot" else {},
              "budget": results["budget"].get(unit.method, {}), "seconds": seconds, "resumed_after_rounds": len(before),
              "setting": {k: results["setting"][k] for k in ("train_per_task", "rounds", "client_examples",
                                                             "aux_examples", "dtype")},
              "machine": machine(), "finished": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    unit_path(plan, unit).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(unit_path(plan, unit), result)
    return result


def _estimate(plan: Plan, unit: Unit) -> float:
    """Seconds a unit should take: the mean of finished units of the same phase and method. With none yet, twice
    the longest finished unit: the costliest methods add server-side training to a cheaper method's clients (the
    first FedCoLLM tuning unit took about 1.7x FedAvg's), and overrating a unit only ends a piece early, while
    underrating it overruns the piece. Needs at least one finished unit."""
    done = {u: d["seconds"] for u in units(plan) for d in [read_unit(plan, u)] if d is not None}
    same = [s for u, s in done.items() if (u.phase, u.method) == (unit.phase, unit.method)]
    if same:
        return sum(same) / len(same)
    return 2 * max(done.values())


def _commit(paths: list[Path], message: str) -> None:
    repo = HERE.parent
    subprocess.run(["git", "add", *map(str, paths)], cwd=repo, check=True)
    subprocess.run(["git", "commit", "-q", "-m", message, "--", *map(str, paths)], cwd=repo, check=False)


def cmd_run(plan: Plan, hours: float, commit: bool, only: str = "*") -> None:
    if not any(fnmatch(u.name, only) for u in units(plan)):
        raise SystemExit(f"--only {only!r} matches no unit of {plan.path} (see `study.py status`)")
    budget, t0, ran = hours * 3600, time.perf_counter(), []
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    piece = len(_read_pieces(plan))  # this piece's place in pieces.json: two pieces may start in the same second
    while True:
        todo = [(u, o) for u in units(plan) if read_unit(plan, u) is None and fnmatch(u.name, only)
                for o in [overrides_of(plan, u)] if o is not None]
        if not todo:
            break
        unit, overrides = todo[0]
        if ran:  # a piece runs at least one unit, then only those its budget leaves room for
            left, need = budget - (time.perf_counter() - t0), _estimate(plan, unit)
            if need > left:
                log.info("piece budget: %.0f s left, %s needs about %.0f s; stopping", left, unit.name, need)
                break
        log.info("unit %s with %s", unit.name, overrides)
        result = run_unit(plan, unit, overrides)
        ran.append(unit.name)
        log.info("unit %s done in %.0f s", unit.name, result["seconds"])
        _record_piece(plan, piece, started, time.perf_counter() - t0, ran)
        if commit:
            _commit([unit_path(plan, unit), plan.results / "pieces.json"], f"study: unit {unit.name}")
    if ran:
        cmd_report(plan)
        if commit:
            _commit([plan.results / "results.json", plan.results / "results.md"], "study: report")
    left = [u.name for u in units(plan) if read_unit(plan, u) is None]
    print(f"piece ran {len(ran)} unit(s) in {(time.perf_counter() - t0) / 3600:.2f} h; {len(left)} left")


def _read_pieces(plan: Plan) -> list[dict]:
    path = plan.results / "pieces.json"
    return json.loads(path.read_text()) if path.exists() else []


def _record_piece(plan: Plan, index: int, started: str, seconds: float, ran: list[str]) -> None:
    """Write (or, after its next unit, rewrite) the piece at `index` of pieces.json."""
    pieces = _read_pieces(plan)
    pieces[index:index + 1] = [{"started": started, "hours": round(seconds / 3600, 3), "units": ran} | machine()]
    atomic_write_json(plan.results / "pieces.json", pieces)


# ---- report --------------------------------------------------------------------------------------------------------
def _outcomes(blocks: list[dict], metric: str = "correct") -> list[str]:
    """Every run's correctness string of one task: one per seed, or one per seed and client for per-client rows."""
    key = "clients" if metric == "correct" else "clients_norm"
    return [s for b in blocks for s in (b.get(key) or [b[metric]])]


def _cell(plan: Plan, blocks: list[dict]) -> dict:
    accs = [b["acc"] for b in blocks]
    mean = sum(accs) / len(accs)
    std = math.sqrt(sum((a - mean) ** 2 for a in accs) / (len(accs) - 1)) if len(accs) > 1 else 0.0
    lo, hi = bootstrap_ci(item_outcomes(_outcomes(blocks)), plan.resamples)
    return {"mean": mean, "std": std, "ci95": [lo, hi], "n": blocks[0]["n"], "seeds": len(blocks)}


def collect(plan: Plan) -> dict:
    """Final units by method: {method: [unit result, ...]} over the seeds done so far."""
    out: dict = {}
    for u in units(plan):
        if u.phase == "final" and (d := read_unit(plan, u)) is not None:
            out.setdefault(u.method, []).append(d)
    return out


def run_counts(runs: list[dict], which: str, task: str) -> tuple[np.ndarray, int]:
    """Per seed and item, how many of a row's models got the item right ([seeds, items]), and how many models a
    seed has (1, or one per client for per-client rows)."""
    blocks = [r["final"][which][task] for r in runs]
    per_seed = [b.get("clients") or [b["correct"]] for b in blocks]
    counts = np.array([[sum(s[i] == "1" for s in strings) for i in range(len(strings[0]))] for strings in per_seed])
    return counts, len(per_seed[0])


def build_claims(plan: Plan, finals: dict, table: dict, tasks: list[str]) -> list[dict]:
    """Every claim of the plan per task, as one family: the difference, the old interval (items resampled, no
    correction, kept to show what changed), and a bootstrap that resamples seeds and items together, Holm-corrected
    over the family; `significant` is Holm's verdict."""
    claims, dists = [], []
    for which, a, b in plan.claims:
        if a not in finals or b not in finals or a not in table[which] or b not in table[which]:
            continue
        for task in tasks:
            oa = item_outcomes(_outcomes([r["final"][which][task] for r in finals[a]]))
            ob = item_outcomes(_outcomes([r["final"][which][task] for r in finals[b]]))
            _, ci, item_only = paired_difference(oa, ob, plan.resamples)
            (ca, na), (cb, nb) = run_counts(finals[a], which, task), run_counts(finals[b], which, task)
            diff, scaled = seed_item_difference(ca, cb, plan.resamples, a_clients=na, b_clients=nb)
            dists.append(scaled / (len(ca) * na * len(cb) * nb * ca.shape[1]))
            claims.append({"claim": f"{which.upper()} {a} vs {b}", "model": which, "a": a, "b": b, "task": task,
                           "diff": diff, "ci95_items": list(ci), "significant_items_uncorrected": item_only})
    for claim, holm in zip(claims, holm_intervals(dists)):
        claim.update({"holm_interval": [float(x) for x in holm["interval"]], "holm_alpha": holm["holm_alpha"],
                      "p": float(holm["p"]), "significant": holm["significant"]})
    return claims


def build_results(plan: Plan) -> dict:
    finals = collect(plan)
    tasks = load_config(str(plan.config), []).data.tasks
    table: dict = {w: {} for w in MODELS}
    for method, runs in finals.items():
        for which in MODELS:
            if all(which in r["final"] for r in runs):
                table[which][method] = {t: _cell(plan, [r["final"][which][t] for r in runs]) for t in tasks}
    claims = build_claims(plan, finals, table, tasks)
    tune = {u.name: read_unit(plan, u) for u in units(plan) if u.phase == "tune"}
    search = {m: [{"candidate": c, "overrides": plan.search[m][c]}
                  | ({"score": selection_score(plan, m, d), "means": model_means(d), "seconds": d["seconds"]}
                     if (d := tune.get(Unit("tune", m, plan.tune_seed, c).name)) else {"score": None})
                  for c in range(len(plan.search.get(m, [])))] for m in plan.methods if m != "zero_shot"}
    picks = {m: chosen(plan, m) for m in plan.methods}
    zero = tune.get(Unit("tune", "zero_shot", plan.tune_seed).name)
    zero_validation = model_means(zero) if zero else {}
    pieces = _read_pieces(plan)
    any_unit = next((d for d in tune.values() if d), None) or next((r[0] for r in finals.values()), None) or {}
    setting = {"seeds": plan.seeds, "tune_seed": plan.tune_seed, "tune_eval_limit": plan.tune_eval_limit,
               "train_per_task": any_unit.get("setting", {}).get("train_per_task"),
               "rounds": any_unit.get("setting", {}).get("rounds"),
               "piece_hours": [p["hours"] for p in pieces], "pieces": pieces,
               "cpu": (any_unit.get("machine") or {}).get("cpu"), "dtype": any_unit.get("setting", {}).get("dtype"),
               "threads": (any_unit.get("machine") or {}).get("torch_threads"),
               "unit_hours": {name: round(d["seconds"] / 3600, 3) for name, d in tune.items() if d}
               | {r["unit"]: round(r["seconds"] / 3600, 3) for rs in finals.values() for r in rs},
               "units_done": sum(read_unit(plan, u) is not None for u in units(plan)), "units_total": len(units(plan)),
               "metric": "acc (lm-evaluation-harness definition), items of the full test splits (CSQA: dev)"}
    return {"setting": setting, "tasks": tasks, "llm": table["llm"], "slm": table["slm"], "claims": claims,
            "budget": {m: runs[0]["budget"] for m, runs in finals.items()},
            "hparams": {"search": search, "select_by": plan.select_by, "inherit": plan.inherit,
                        "zero_shot_validation": zero_validation,
                        "chosen": {m: {"candidate": p[0], "overrides": p[1]} for m, p in picks.items() if p}},
            "curves": {m: {f"seed {r['seed']}": r["curves"] for r in runs} for m, runs in finals.items()}}


def _pct(x: float, digits: int = 1) -> str:
    return f"{100 * x:.{digits}f}"


def to_markdown(plan: Plan, res: dict) -> str:
    s, tasks = res["setting"], res["tasks"]
    lines = ["# The study: does co-tuning help? (issue 8)", "",
             f"Generated by `python benchmarks/study.py report` from {s['units_done']} of {s['units_total']} units "
             f"(`units/`); every figure below is from those runs.", "",
             f"- CPU: {s['cpu']}, dtype {s['dtype']}, {s['threads']} torch threads; pieces of "
             f"{', '.join(f'{h:.2f}' for h in s['piece_hours']) or '-'} h.",
             f"- Scale: {s['train_per_task']} train examples per task, {s['rounds']} rounds, seeds {s['seeds']}; "
             f"metric: {s['metric']}.",
             "- Cells: mean over seeds ± std over seeds [95 % paired-bootstrap interval over test items "
             "(item outcomes averaged over seeds and, for per-client rows, clients)].", ""]
    for which, title in (("llm", "Table 1: the server LLM"), ("slm", "Table 2: the client SLMs")):
        lines += [f"## {title}", "", "| method | " + " | ".join(tasks) + " | mean |",
                  "|---|" + "---|" * (len(tasks) + 1)]
        for method, cells in res[which].items():
            row = [f"{_pct(c['mean'])} ± {_pct(c['std'])} [{_pct(c['ci95'][0])}, {_pct(c['ci95'][1])}]"
                   for c in (cells[t] for t in tasks)]
            mean = sum(cells[t]["mean"] for t in tasks) / len(tasks)
            lines.append(f"| {method} (seeds: {cells[tasks[0]]['seeds']}) | " + " | ".join(row) + f" | {_pct(mean)} |")
        lines.append("")
    lines += ["## Claims (one Holm family; paired bootstrap resampling seeds and items)", "",
              f"{len(res['claims'])} claims. `items only` is the interval this report printed before issue 27 (items "
              "resampled, seeds averaged, no correction for the number of claims); the verdict is Holm's, on the "
              "interval that resamples seeds and items at each claim's Holm level.", "",
              "| claim | task | diff (points) | items only, 95 % | seeds + items, Holm level | Holm interval | "
              "significant (Holm) | was (items only) |", "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {c['claim']} | {c['task']} | {100 * c['diff']:+.1f} | [{100 * c['ci95_items'][0]:+.1f}, "
              f"{100 * c['ci95_items'][1]:+.1f}] | {c['holm_alpha']:.4f} | [{100 * c['holm_interval'][0]:+.1f}, "
              f"{100 * c['holm_interval'][1]:+.1f}] | {'yes' if c['significant'] else 'no'} | "
              f"{'yes' if c['significant_items_uncorrected'] else 'no'} |" for c in res["claims"]]
    lines += ["", "## Budgets (optimizer steps and training examples over the whole run, seed 0)", "",
              "| method | LLM steps | SLM steps (all clients + server) | LLM examples | SLM examples |",
              "|---|---|---|---|---|"]
    lines += [f"| {m} | {b.get('llm_steps', 0)} | {b.get('slm_steps', 0)} | {b.get('llm_examples', 0)} | "
              f"{b.get('slm_examples', 0)} |" for m, b in res["budget"].items()]
    lines += ["", "## Tuning (validation items; the same number of candidates per method)", ""]
    if res["hparams"]["zero_shot_validation"]:
        lines += ["Zero-Shot on the same validation items, mean acc: " + ", ".join(
            f"{w.upper()} {_pct(a, 2)}" for w, a in res["hparams"]["zero_shot_validation"].items()) + ".", ""]
    lines += ["| method | candidate | overrides | LLM | SLM | score (chosen by) | unit hours | chosen |",
              "|---|---|---|---|---|---|---|---|"]
    chosen_ = res["hparams"]["chosen"]
    for m, cands in res["hparams"]["search"].items():
        by = "+".join(w.upper() for w in res["hparams"]["select_by"].get(m, []))
        for c in cands:
            pick = "yes" if m in chosen_ and chosen_[m]["candidate"] == c["candidate"] else ""
            cells = (["", "", "not run", ""] if c["score"] is None else
                     [_pct(c["means"][w], 2) if w in c["means"] else "" for w in MODELS]
                     + [f"{_pct(c['score'], 2)} ({by})", f"{c['seconds'] / 3600:.2f}"])
            lines.append("| " + " | ".join([m, str(c["candidate"]), f"`{json.dumps(c['overrides'])}`", *cells, pick])
                         + " |")
    lines += ["", "## Curves per round (acc on the first items of each test split, the same items every round)", ""]
    for m, by_seed in res["curves"].items():
        for seed, curves in by_seed.items():
            for which, per_task in curves.items():
                pts = "; ".join(f"{t}: " + ", ".join(f"r{r} {_pct(a)}" for r, a in p) for t, p in per_task.items())
                lines.append(f"- {m} {which.upper()} {seed}: {pts}")
    findings = plan.results / "findings.md"
    if findings.exists():
        lines += ["", findings.read_text().strip()]
    return "\n".join(lines) + "\n"


def cmd_report(plan: Plan) -> dict:
    res = build_results(plan)
    atomic_write_json(plan.results / "results.json", res)
    (plan.results / "results.md").write_text(to_markdown(plan, res))
    return res


def cmd_status(plan: Plan) -> None:
    for u in units(plan):
        d = read_unit(plan, u)
        state = f"done in {d['seconds'] / 60:.1f} min" if d else ("ready" if overrides_of(plan, u) is not None
                                                                  else "waits for tuning")
        print(f"{u.name:32s} {state}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=["run", "report", "status"])
    parser.add_argument("--plan", default=str(HERE / "study_plan.toml"))
    parser.add_argument("--hours", type=float, default=2.5, help="time budget of this piece")
    parser.add_argument("--only", default="*", help="run only the units whose names match this glob")
    parser.add_argument("--commit", action="store_true", help="git-commit each finished unit")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    plan = Plan.load(Path(args.plan).resolve())
    if args.command == "run":
        cmd_run(plan, args.hours, args.commit, args.only)
    elif args.command == "report":
        cmd_report(plan)
    else:
        cmd_status(plan)


if __name__ == "__main__":
    sys.exit(main())
