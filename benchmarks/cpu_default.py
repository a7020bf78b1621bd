"""CPU benchmark: all methods x all tasks on the default CPU setting; writes benchmarks/results/cpu-default/.

    python benchmarks/cpu_default.py            # runs (or resumes) runs/bench-cpu-default, then copies results
    python benchmarks/cpu_default.py --set federation.rounds=2   # any config override

Targets checked and recorded in results.json["targets"]:
  framework overhead <= 5 % of round wall time;  one mutual-KD step <= 1.1 x (fwd+bwd of f + fwd+bwd of g).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from common import (  # benchmarks/ is the script's folder, on sys.path
    bench_config,
    run_benchmark,
)

HERE = Path(__file__).resolve().parent


def main() -> None:
    cfg, out = bench_config(__doc__, HERE / "cpu_default.toml", HERE / "results" / "cpu-default")
    t0 = time.time()
    results, run_dir = run_benchmark(cfg, out)
    t = results["timing"]
    kd_budget = 1.1 * (t["fwd_bwd_f_s"] + t["fwd_bwd_g_s"])
    results["targets"] = {
        "overhead_fraction": t["overhead_fraction"], "overhead_target": 0.05,
        "overhead_ok": t["overhead_fraction"] <= 0.05,
        "kd_step_s": t["kd_step_s"], "kd_step_budget_s": kd_budget, "kd_step_ok": t["kd_step_s"] <= kd_budget,
    }
    results["setting"]["benchmark_wall_s_this_invocation"] = time.time() - t0
    (out / "results.json").write_text(json.dumps(results, indent=2))
    shutil.copy(run_dir / "accuracy.png", out / "accuracy.png")
    tg = results["targets"]
    (out / "results.md").write_text((run_dir / "results.md").read_text() + (
        "\n## Targets\n\n| target | measured | limit | met |\n|---|---|---|---|\n"
        f"| framework overhead (share of round wall time) | {tg['overhead_fraction']:.4f} | 0.05 | {tg['overhead_ok']} |\n"
        f"| one mutual-KD step (s) | {tg['kd_step_s']:.3f} | {tg['kd_step_budget_s']:.3f} "
        f"(1.1 x fwd+bwd f + g) | {tg['kd_step_ok']} |\n"))
    print(json.dumps(results["targets"], indent=2))


if __name__ == "__main__":
    main()
