"""Micro-benchmark: one mutual-KD step against a plain fwd+bwd of each model, on the same D^a batches.

    python benchmarks/kd_step.py [--steps 8] [--config benchmarks/cpu_default.toml]

The three timings are interleaved batch by batch, so drift in machine speed hits all three alike.
The target is kd_step <= 1.1 x (fwd+bwd f + fwd+bwd g). Writes benchmarks/results/kd-step/results.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
from common import (  # benchmarks/ is the script's folder, on sys.path
    timed,
    use_shared_data,
)

from fedcollm.algorithms.training import (
    Stepper,
    cycle_batches,
    fwd_bwd,
    mutual_distill_step,
)
from fedcollm.config import Config
from fedcollm.workbench import Workbench

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(HERE / "cpu_default.toml"))
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--out", default=str(HERE / "results" / "kd-step" / "results.json"))
    args = parser.parse_args()

    use_shared_data()
    cfg = Config.from_toml(args.config)
    wb = Workbench.build(cfg)
    d = cfg.distill
    opt_f = torch.optim.AdamW([p for p in wb.llm.parameters() if p.requires_grad], lr=d.llm_lr)
    opt_g = torch.optim.AdamW([p for p in wb.slm.parameters() if p.requires_grad], lr=d.slm_lr)
    pair = Stepper([opt_f, opt_g])
    wb.llm.train()
    wb.slm.train()
    batches = cycle_batches(wb.aux_data, d.batch_size, seed=0)
    rows = []
    for i in range(args.steps + 1):  # step 0 warms up and is dropped
        batch = next(batches)
        row = {"f": timed(lambda: fwd_bwd(wb.llm, batch)), "g": timed(lambda: fwd_bwd(wb.slm, batch)),
               "kd": timed(lambda: mutual_distill_step(wb.llm, wb.slm, batch, pair, d.kd_weight,
                                                        d.temperature, d.kl_direction, d.top_k)),
               "answer_tokens": int(batch.target_mask.sum()), "keep": batch.keep}
        if i:
            rows.append(row)
    f, g, kd = (statistics.mean(r[k] for r in rows) for k in ("f", "g", "kd"))
    result = {"setting": {"llm": cfg.model.llm, "slm": cfg.model.slm, "batch_size": d.batch_size,
                          "kl_direction": d.kl_direction, "temperature": d.temperature, "top_k": d.top_k,
                          "steps": args.steps, "torch_threads": torch.get_num_threads()},
              "fwd_bwd_f_s": f, "fwd_bwd_g_s": g, "kd_step_s": kd, "ratio": kd / (f + g),
              "target_ratio": 1.1, "met": kd <= 1.1 * (f + g), "per_step": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"fwd+bwd f {f:.3f} s, g {g:.3f} s; KD step {kd:.3f} s = {kd / (f + g):.3f} x (target <= 1.1): "
          f"{'met' if result['met'] else 'NOT met'}")


if __name__ == "__main__":
    main()
