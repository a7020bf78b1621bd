"""Profile of the training steps, before and after the contiguous lm_head input, side by side in one run.

    python benchmarks/step_profile.py [--steps 8] [--config benchmarks/cpu_default.toml]

Steps timed, on the same D^a batches, each arm's step right after the other's (drift in machine speed hits both):
  client step   one AdamW step of answer CE on the SLM (what a client runs E epochs of), and the same on the LLM
                (issue 8's yardstick: SLM step <= 0.4 x LLM step);
  distill step  one mutual-distillation step (FedCoLLM's server: both models' logits, CE + KL each, both updated).
Arms: "before" computes answer logits as fedcollm did up to 8243aac, `logits_to_keep=keep + 1`, which transformers
applies as a strided slice of the hidden states; "after" passes the positions as an index tensor
(`fedcollm.data.batching.answer_logits`), so the lm_head gets a contiguous input. A torch.profiler table of the
SLM client step (top ops by self CPU time) is kept for both arms. Writes benchmarks/results/step-profile.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
from common import (  # benchmarks/ is the script's folder, on sys.path
    machine,
    sft_step,
    timed,
    use_shared_data,
)
from torch.profiler import ProfilerActivity, profile

from fedcollm.algorithms import training
from fedcollm.algorithms.training import Stepper, cycle_batches, mutual_distill_step
from fedcollm.config import Config
from fedcollm.data.batching import answer_logits
from fedcollm.workbench import Workbench

HERE = Path(__file__).resolve().parent


def strided_answer_logits(model, batch):
    """fedcollm's answer logits before this change, verbatim: the last keep + 1 positions by count."""
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
                logits_to_keep=batch.keep + 1)
    return out.logits[:, :-1].float()


ARMS = {"before": strided_answer_logits, "after": answer_logits}


def top_ops(fn, rows: int = 6) -> list[dict]:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in events)
    return [{"op": e.key, "self_ms": round(e.self_cpu_time_total / 1000, 1), "share": round(e.self_cpu_time_total / total, 3),
             "calls": e.count} for e in events[:rows]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(HERE / "cpu_default.toml"))
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--out", default=str(HERE / "results" / "step-profile.json"))
    args = parser.parse_args()

    use_shared_data()
    cfg = Config.from_toml(args.config)
    wb = Workbench.build(cfg)
    d = cfg.distill
    opts = {name: (torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4), m)
            for name, m in (("slm", wb.slm), ("llm", wb.llm))}
    pair = Stepper([opts["llm"][0], opts["slm"][0]])
    wb.llm.train()
    wb.slm.train()
    batches = cycle_batches(wb.aux_data, d.batch_size, seed=0)
    seconds = {arm: {"slm_step": [], "llm_step": [], "distill_step": []} for arm in ARMS}

    def distill(batch, logits_fn):
        training.answer_logits = logits_fn  # mutual_distill_step reads the module's name
        try:
            mutual_distill_step(wb.llm, wb.slm, batch, pair, d.kd_weight, d.temperature,
                                d.kl_direction, d.top_k)
        finally:
            training.answer_logits = answer_logits

    for i in range(args.steps + 1):  # step 0 warms up and is dropped
        batch = next(batches)
        for arm, logits_fn in ARMS.items():
            row = {f"{name}_step": timed(lambda: sft_step(model, opt, batch, logits_fn))
                   for name, (opt, model) in opts.items()}
            row["distill_step"] = timed(lambda: distill(batch, logits_fn))
            if i:
                for key, value in row.items():
                    seconds[arm][key].append(value)
    batch = next(batches)
    profiles = {arm: top_ops(lambda: sft_step(wb.slm, opts["slm"][0], batch, fn)) for arm, fn in ARMS.items()}

    mean = {arm: {k: statistics.mean(v) for k, v in per.items()} for arm, per in seconds.items()}
    for arm in ARMS:
        mean[arm]["slm_over_llm"] = mean[arm]["slm_step"] / mean[arm]["llm_step"]
    result = {"setting": {"llm": cfg.model.llm, "slm": cfg.model.slm, "batch_size": d.batch_size,
                          "dtype": str(next(wb.slm.parameters()).dtype), "steps": args.steps} | machine(),
              "mean_s": mean,
              "speedup": {k: mean["before"][k] / mean["after"][k] for k in ("slm_step", "llm_step", "distill_step")},
              "goal_slm_over_llm": 0.4, "met": mean["after"]["slm_over_llm"] <= 0.4,
              "profile_slm_step": profiles, "per_step_s": seconds}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    for arm in ARMS:
        m = mean[arm]
        print(f"{arm:6s}: SLM step {m['slm_step']:.3f} s, LLM step {m['llm_step']:.3f} s (SLM/LLM "
              f"{m['slm_over_llm']:.2f}), distill step {m['distill_step']:.3f} s")
    print("speed-up", {k: round(v, 2) for k, v in result["speedup"].items()}, "| SLM/LLM <= 0.4:",
          "met" if result["met"] else "NOT met")


if __name__ == "__main__":
    main()
