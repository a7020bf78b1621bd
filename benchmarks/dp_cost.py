"""What client-level DP costs in accuracy, at several client counts: FedAvg with DP off and on (noise multipliers
in --z), K in --clients, on benchmarks/dp_cost.toml; writes benchmarks/results/dp-cost/results.{json,md}.

    python benchmarks/dp_cost.py                          # K = 4, 16, 100; z = off, 0.5, 1.0 (resumes cells)
    python benchmarks/dp_cost.py --clients 100 --z 1.0    # adds these cells to the results of earlier invocations

With full participation the noise on the mean has std z * C / K, so the same z costs far less with many clients;
epsilon after the run (at dp.delta) is read from the run's own accounting, not recomputed here.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from common import machine, use_shared_data

HERE = Path(__file__).resolve().parent


def cell(base, clients: int, z: float | None, root: Path) -> dict:
    from fedcollm.experiment import resume_experiment, run_experiment

    name = f"k{clients}-" + ("nodp" if z is None else f"z{z:g}")
    out = root / name
    sets = [f"federation.clients={clients}", f"run.out_dir={out}"]
    if z is not None:
        sets.append(f"dp.noise_multiplier={z}")
    cfg = base.override(sets)
    t0 = time.time()
    results = resume_experiment(out) if (out / "config.json").exists() else run_experiment(cfg)
    metrics = [json.loads(line) for line in (out / "fedavg" / "metrics.jsonl").read_text().splitlines() if line]
    last = metrics[-1]
    return {"cell": name, "clients": clients, "noise_multiplier": z, "clip_norm": cfg.dp.clip_norm,
            "slm_acc": results["slm"]["fedavg"]["arc_easy"], "n_eval": results["n_eval"]["arc_easy"],
            "dp": last.get("dp"), "seconds_this_invocation": time.time() - t0}


def zero_shot(base, root: Path) -> float:
    """The untrained SLM on the same items: the floor that DP's noise can push FedAvg down to."""
    from fedcollm.experiment import resume_experiment, run_experiment

    out = root / "zero-shot"
    cfg = base.override([f"run.out_dir={out}", "run.methods=['zero_shot']"])
    results = resume_experiment(out) if (out / "config.json").exists() else run_experiment(cfg)
    return results["slm"]["zero_shot"]["arc_easy"]


def main() -> None:
    from fedcollm.config import Config

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, nargs="+", default=[4, 16, 100])
    parser.add_argument("--z", type=float, nargs="+", default=[0.5, 1.0])
    parser.add_argument("--runs", default="runs/bench-dp-cost")
    parser.add_argument("--results", default=str(HERE / "results" / "dp-cost"))
    args = parser.parse_args()
    use_shared_data()
    base = Config.from_toml(HERE / "dp_cost.toml")
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    done = json.loads((out / "results.json").read_text())["cells"] if (out / "results.json").exists() else []
    rows = {row["cell"]: row for row in done}  # cells of earlier invocations stay, re-run ones are replaced
    rows |= {row["cell"]: row for row in (cell(base, k, z, Path(args.runs)) for k in args.clients
                                          for z in [None, *args.z])}
    rows = sorted(rows.values(), key=lambda row: (row["clients"], row["noise_multiplier"] or 0.0))
    reference = zero_shot(base, Path(args.runs))
    (out / "results.json").write_text(json.dumps({"machine": machine(), "config": base.to_dict(),
                                                 "zero_shot_acc": reference, "cells": rows}, indent=2))
    lines = [f"Zero-Shot SLM acc: {100 * reference:.1f} % on the same {rows[0]['n_eval']} items.", "",
             "| clients | z | SLM acc (%) | epsilon | noise std on the mean |", "|---|---|---|---|---|"]
    for row in rows:
        dp = row["dp"] or {}
        eps = f"{dp['epsilon']:.2f}" if "epsilon" in dp else "-"
        std = f"{dp['noise_std_mean']:.2g}" if "noise_std_mean" in dp else "-"
        z = "off" if row["noise_multiplier"] is None else f"{row['noise_multiplier']:g}"
        lines.append(f"| {row['clients']} | {z} | {100 * row['slm_acc']:.1f} | {eps} | {std} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
