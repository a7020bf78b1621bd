"""Issue 27's decisive probe: does any channel carry the strongest teacher's knowledge into the study's SLM?

    python benchmarks/channel.py base                 # the two starting points (resumable runs, ~1 h on 2 cores)
    python benchmarks/channel.py probe [--only GLOB]  # one probe unit per channel (resumable: done units are kept)
    python benchmarks/channel.py report               # results/channel/results.json (probe block) and probe.md

Teacher: the Centralized-trained LLM (study.toml, its chosen rate 3e-4, seed 0, tuning split: validation rows
held out). Student: the study's 20-layer SLM in its FedAvg state (chosen client rate 3e-3, seed 0). Each channel
trains a copy of that SLM adapter for the same number of optimizer steps on the server's data (D^a, or the
unlabelled public pool) and is scored on the validation items of the four tasks (never the test splits). A
label-only control (SFT on D^a for the same steps) separates what the teacher adds from what more training adds.
The parameters and the decision rule are in channel.toml, written before any probe unit ran.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
import tomllib
from dataclasses import replace
from datetime import datetime, timezone
from fnmatch import fnmatch
from fractions import Fraction
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from common import (  # benchmarks/ is the script's folder, on sys.path
    machine,
    use_shared_data,
)

from fedcollm.algorithms.training import (
    choice_distill_steps,
    distill_steps,
    public_topk,
    sft_steps,
)
from fedcollm.alignment.transfer import row_targets
from fedcollm.data.batching import SFTData
from fedcollm.data.partition import unlabelled_pool
from fedcollm.evaluate import choice_logprobs, evaluate_tasks
from fedcollm.experiment import load_config, resume_experiment, run_experiment
from fedcollm.fileio import atomic_write_json
from fedcollm.models.lora import adapter_state, load_adapter_state
from fedcollm.runs import RunDir
from fedcollm.stats import holm_intervals, seed_item_difference
from fedcollm.workbench import Workbench

HERE = Path(__file__).resolve().parent
log = logging.getLogger("channel")


def read_plan(path: Path) -> dict:
    raw = tomllib.loads(path.read_text())
    raw["results"] = HERE / raw["results"]
    raw["runs"] = HERE / raw["runs"]
    return raw


def config(plan: dict, extra: list[str]):
    sets = [f"{k}={json.dumps(v)}" for k, v in plan["setting"].items()] + extra
    return load_config(str(HERE / plan["config"]), sets)


def cmd_base(plan: dict) -> None:
    """Train (or resume) the teacher's and the student's starting runs."""
    for method, overrides in plan["base"].items():
        out = plan["runs"] / f"base-{method}"
        if (out / "results.json").exists():
            continue
        if (out / "config.json").exists():
            resume_experiment(out)
            continue
        sets = [f"{k}={json.dumps(v)}" for k, v in overrides.items()]
        run_experiment(config(plan, sets + [f'run.methods=["{method}"]', f"run.out_dir={json.dumps(str(out))}"]))


def base_adapter(plan: dict, method: str, which: str, reference):
    run = RunDir(plan["runs"] / f"base-{method}")
    rounds = run.load_config().federation.rounds
    return run.load_round(method, rounds, {which: reference})[which]


class Probe:
    """The workbench, the teacher's cached outputs on D^a and the pool, and the student's starting adapter."""

    def __init__(self, plan: dict):
        p = plan["probe"]
        self.plan, self.p = plan, p
        self.cfg = config(plan, [f"data.public_pool={p['pool_per_task']}"]
                          + ([f"data.eval_limit={p['eval_limit']}"] if p.get("eval_limit") else []))
        self.wb = Workbench.build(self.cfg)
        self.pool = unlabelled_pool(self.cfg.task_specs(self.cfg.data.tasks), self.cfg.data, self.cfg.run.seed)
        self.start = base_adapter(plan, "fedavg", "slm", self.wb.slm_init)
        self.cache = plan["runs"] / "teacher-cache.pt"
        self._t: dict | None = None

    @cached_property
    def teacher(self):
        """The teacher's adapter, loaded into the LLM (only units that need the teacher wait for its run)."""
        state = base_adapter(self.plan, "centralized", "llm", self.wb.llm_init)
        load_adapter_state(self.wb.llm, state)
        return state

    @property
    def t(self) -> dict:
        """Per-choice log-likelihoods on D^a and the pool and top-k logits on D^a (and on the pool's pseudo-labels),
        computed once with the teacher in eval mode (what every channel reads), cached on disk."""
        if self._t is None:
            # our own file in the runs folder (TopK dataclasses inside), so weights_only is off
            self._t = torch.load(self.cache, weights_only=False) if self.cache.exists() else self._teacher_outputs()
        return self._t

    def _teacher_outputs(self) -> dict:
        _ = self.teacher  # loads the teacher's adapter into the LLM
        wb, p, t0 = self.wb, self.p, time.perf_counter()
        bs, max_len = self.cfg.run.eval_batch_size, self.cfg.model.max_length
        aux_scores = choice_logprobs(wb.llm, wb.tokenizer, wb.split.aux, max_len, bs, "teacher D^a choices")
        pool_scores = choice_logprobs(wb.llm, wb.tokenizer, self.pool, max_len, bs, "teacher pool choices")
        pseudo = [replace(ex, answer=int(np.argmax(s))) for ex, s in zip(self.pool, pool_scores)]
        aux_top = public_topk(wb.llm, wb.aux_data, p["top_k"], len(wb.tokenizer), p["batch_size"])
        pseudo_data = SFTData(pseudo, wb.tokenizer, max_len)
        pool_top = public_topk(wb.llm, pseudo_data, p["top_k"], len(wb.tokenizer), p["batch_size"])
        out = {"aux_scores": aux_scores, "pool_scores": pool_scores, "pseudo": [ex.answer for ex in pseudo],
               "aux_top": aux_top, "pool_top": pool_top, "seconds": time.perf_counter() - t0}
        torch.save(out, self.cache.with_suffix(".tmp"))
        self.cache.with_suffix(".tmp").replace(self.cache)  # whole or absent: another probe process may read it
        return out

    def pseudo_pool(self) -> list:
        return [replace(ex, answer=a) for ex, a in zip(self.pool, self.t["pseudo"])]

    def evaluate(self, which: str, state, label: str) -> dict:
        held = self.wb.held(which)
        load_adapter_state(held.model, state)
        return evaluate_tasks(held.model, held.tokenizer, self.wb.eval_sets, self.cfg.model.max_length,
                              self.cfg.run.eval_batch_size, label)

    def train(self, channel: dict, seed: int) -> float:
        """One channel's training of the student from its starting adapter; returns seconds."""
        wb, p = self.wb, self.p
        slm, tok, max_len = wb.slm, wb.tokenizer, self.cfg.model.max_length
        load_adapter_state(slm, self.start)
        steps, lr, bs = p["steps"], channel.get("lr", p["lr"]), p["batch_size"]
        kind, data = channel["kind"], channel["data"]
        t0 = time.perf_counter()
        if kind == "sft":
            sft_steps(slm, wb.aux_data, steps, lr, bs, seed, "control SFT")
        elif kind == "tokens":
            examples, top = ((wb.split.aux, self.t["aux_top"]) if data == "aux"
                             else (self.pseudo_pool(), self.t["pool_top"]))
            sft = wb.aux_data if data == "aux" else SFTData(examples, tok, max_len)
            targets = row_targets(top, sft.encoded, channel.get("temperature", 1.0))
            whole, rest = divmod(steps, sft.steps_per_epoch(bs))  # epochs that come to exactly `steps` steps
            distill_steps(slm, sft, targets, whole + rest * bs / len(sft), lr, bs, channel["weight"], seed,
                          f"tokens {data}")
        elif kind == "choices":
            examples = (wb.split.aux if data == "aux" else self.pool if data == "pool"
                        else wb.split.aux + self.pool)
            scores = (self.t["aux_scores"] if data == "aux" else self.t["pool_scores"] if data == "pool"
                      else self.t["aux_scores"] + self.t["pool_scores"])
            choice_distill_steps(slm, tok, examples, scores, steps, lr, bs, channel["weight"],
                                 channel.get("temperature", 1.0), seed, max_len, f"choices {data}")
        else:
            raise SystemExit(f"channel.toml: unknown channel kind {kind!r}")
        return time.perf_counter() - t0


def unit_file(plan: dict, name: str) -> Path:
    return plan["results"] / "probe" / f"{name}.json"


def _keep(evaluation: dict) -> dict:
    return {t: {k: b[k] for k in ("acc", "acc_norm", "n", "correct")} for t, b in evaluation.items()}


def cmd_probe(plan: dict, only: str) -> None:
    names = ["teacher", "start"] + [c["name"] for c in plan["probe"]["channels"]]
    seeds = plan["probe"]["seeds"]
    todo = [(n, s) for n in names for s in (seeds if n not in ("teacher", "start") else [0])
            if fnmatch(n, only) and not unit_file(plan, f"{n}-s{s}").exists()]
    if not todo:
        return
    probe = Probe(plan)
    channels = {c["name"]: c for c in plan["probe"]["channels"]}
    for name, seed in todo:
        t0 = time.perf_counter()
        if name == "teacher":
            result, train_s = probe.evaluate("llm", probe.teacher, "teacher"), 0.0
        elif name == "start":
            result, train_s = probe.evaluate("slm", probe.start, "start"), 0.0
        else:
            train_s = probe.train(channels[name], seed)
            result = probe.evaluate("slm", adapter_state(probe.wb.slm), name)
        out = {"unit": name, "seed": seed, "channel": channels.get(name), "final": _keep(result),
               "train_seconds": train_s, "seconds": time.perf_counter() - t0,
               "teacher_cache_seconds": probe._t["seconds"] if probe._t else None, "pool_size": len(probe.pool),
               "aux_size": len(probe.wb.split.aux), "machine": machine(), "dtype": probe.cfg.model.dtype,
               "finished": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        unit_file(plan, name).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(unit_file(plan, f"{name}-s{seed}"), out)
        mean = sum(b["acc"] for b in out["final"].values()) / len(out["final"])
        log.info("probe unit %s seed %d: mean validation acc %.4f (%.0f s)", name, seed, mean, out["seconds"])


def runs_of(plan: dict, name: str, task: str) -> np.ndarray:
    files = sorted((plan["results"] / "probe").glob(f"{name}-s*.json"))
    return np.array([[c == "1" for c in json.loads(f.read_text())["final"][task]["correct"]] for f in files])


def power(scaled: np.ndarray, effect: float, alpha: float) -> float:
    """Chance that a true difference of `effect` is found significant at two-sided `alpha`, by a normal
    approximation with the bootstrap's spread of the difference (the spread barely depends on the true effect)."""
    from statistics import NormalDist

    se = float(np.std(scaled))
    if se == 0:  # no item differs in any resample: any true difference would show
        return 1.0
    z = NormalDist().inv_cdf(1 - alpha / 2)
    return 1 - NormalDist().cdf(z - effect / se) + NormalDist().cdf(-z - effect / se)


def exact_difference(a: np.ndarray, b: np.ndarray) -> Fraction:
    """Mean accuracy of a minus b ([runs, items] of 0/1 on the same items) as an exact fraction."""
    (sa, n), sb = a.shape, b.shape[0]
    return Fraction(int(a.sum()) * sb - int(b.sum()) * sa, sa * sb * n)


def moved_channels(channels: list[str], exact: dict[tuple[str, str], Fraction], control: str,
                   points: float) -> list[str]:
    """The plan's rule on exact differences (no float edge): a channel moves the SLM if it is at least `points`
    above both the start and the label-only control."""
    bar = Fraction(str(points)) / 100
    return [n for n in channels if all(exact.get((n, base), Fraction(-1)) >= bar for base in ("start", control))]


def cmd_report(plan: dict) -> dict:
    p = plan["probe"]
    tasks = config(plan, []).data.tasks
    names = [c["name"] for c in p["channels"]]
    acc = {n: {t: float(runs_of(plan, n, t).mean()) for t in tasks} for n in ["teacher", "start", *names]
           if any((plan["results"] / "probe").glob(f"{n}-s*.json"))}
    # the pooled comparison over all validation items of the four tasks, each channel against the start and the
    # label-only control: one Holm family
    def pooled(name: str) -> np.ndarray:
        return np.concatenate([runs_of(plan, name, t) for t in tasks], axis=1)

    comparisons, dists, exact = [], [], {}
    for n in names:
        if n not in acc:
            continue
        for base in ("start", p["control"]):
            if base == n or base not in acc:
                continue
            a, b = pooled(n), pooled(base)
            diff, scaled = seed_item_difference(a, b, p["resamples"])
            exact[n, base] = exact_difference(a, b)
            scale = a.shape[0] * b.shape[0] * a.shape[1]
            comparisons.append({"model": "slm", "a": n, "b": base, "task": "all", "diff": diff,
                                "items": int(a.shape[1]), "seeds": [int(a.shape[0]), int(b.shape[0])],
                                "power_1pt": power(scaled / scale, 0.01, 0.05),
                                "power_2pt": power(scaled / scale, 0.02, 0.05)})
            dists.append(scaled / scale)
    for c, h in zip(comparisons, holm_intervals(dists)):
        c.update({"holm_interval": [float(x) for x in h["interval"]], "holm_alpha": h["holm_alpha"],
                  "p": float(h["p"]), "significant": h["significant"]})
    mean = {n: sum(v.values()) / len(v) for n, v in acc.items()}
    teacher_channels = [n for n in names if n != p["control"] and n in acc]
    moved = moved_channels(teacher_channels, exact, p["control"], p["ceiling_points"])
    gap = mean.get("teacher", 0) - mean.get("start", 0)
    probe = {"teacher": "centralized LLM (base-centralized, round 2)", "student": "fedavg SLM (base-fedavg, round 2)",
             "rule": p["rule"], "accuracy": acc, "mean": mean, "gap_start_to_teacher": gap,
             "gap_closed": {n: (mean[n] - mean["start"]) / gap for n in names if n in mean and gap > 0},
             "comparisons": comparisons, "moved_by_1pt": moved,
             "ceiling": bool(teacher_channels) and not moved,
             "units": {f.stem: {"seconds": (d := json.loads(f.read_text()))["seconds"],
                                "train_seconds": d["train_seconds"], "machine": d["machine"], "dtype": d["dtype"]}
                       for f in sorted((plan["results"] / "probe").glob("*.json"))}}
    (plan["results"] / "probe.md").write_text(probe_markdown(probe, tasks))
    path = plan["results"] / "results.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    results["probe"] = probe
    results.setdefault("setting", {}).update(
        {"seeds": p["seeds"], "base_seed": 0, "scored": "validation", "items": comparisons[0]["items"] if comparisons
         else None, "steps": p["steps"], "lr": p["lr"], "batch_size": p["batch_size"], "eval_limit": p["eval_limit"]})
    if probe["ceiling"] or "claims" not in results:  # the probe's family is the claims until a grid's finals exist
        results["claims"] = [c | {"claim": f"SLM {c['a']} vs {c['b']} (probe)"} for c in comparisons]
    atomic_write_json(path, results)
    print(json.dumps({"mean": mean, "ceiling": probe["ceiling"],
                      "comparisons": [{k: c[k] for k in ("a", "b", "diff", "holm_interval", "significant",
                                                         "power_1pt")} for c in comparisons]}, indent=1))
    return probe


def probe_markdown(probe: dict, tasks: list[str]) -> str:
    """The probe's tables, generated from results.json's probe block."""
    lines = ["# Issue 27's probe (generated by `python benchmarks/channel.py report`)", "", probe["rule"].replace("\n", " "),
             "", f"Teacher: {probe['teacher']}. Student start: {probe['student']}. Validation items; mean acc over the "
             "tasks.", "", "| unit | " + " | ".join(tasks) + " | mean |", "|---|" + "---|" * (len(tasks) + 1)]
    for name, per_task in probe["accuracy"].items():
        lines.append(f"| {name} | " + " | ".join(f"{100 * per_task[t]:.1f}" for t in tasks)
                     + f" | {100 * probe['mean'][name]:.2f} |")
    lines += ["", "| a | b | diff (points) | Holm level | Holm interval | significant | power at +1 / +2 points |",
              "|---|---|---|---|---|---|---|"]
    lines += [f"| {c['a']} | {c['b']} | {100 * c['diff']:+.2f} | {c['holm_alpha']:.4f} | "
              f"[{100 * c['holm_interval'][0]:+.2f}, {100 * c['holm_interval'][1]:+.2f}] | "
              f"{'yes' if c['significant'] else 'no'} | {c['power_1pt']:.2f} / {c['power_2pt']:.2f} |"
              for c in probe["comparisons"]]
    lines += ["", "Fraction of the start-to-teacher gap "
              f"({100 * probe['gap_start_to_teacher']:.2f} points) each channel closes: "
              + ", ".join(f"{n} {100 * g:+.0f} %" for n, g in probe["gap_closed"].items()) + ".",
              "", f"Channels that moved the SLM by the rule: {', '.join(probe['moved_by_1pt']) or 'none'}; "
              f"ceiling: {str(probe['ceiling']).lower()}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=["base", "probe", "report"])
    parser.add_argument("--plan", default=str(HERE / "channel.toml"))
    parser.add_argument("--only", default="*", help="run only the probe units whose names match this glob")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    use_shared_data()
    plan = read_plan(Path(args.plan))
    {"base": lambda: cmd_base(plan), "probe": lambda: cmd_probe(plan, args.only),
     "report": lambda: cmd_report(plan)}[args.command]()


if __name__ == "__main__":
    main()
