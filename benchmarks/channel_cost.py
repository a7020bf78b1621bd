"""What issue 27's faithful and new server steps cost, per optimizer step, on the study's models (fp32).

    python benchmarks/channel_cost.py [--steps 6] [--config benchmarks/study.toml]

Interleaved batch by batch on the same D^a batches (batch 8), so drift in machine speed hits every variant alike:
  joint_train_targets  the joint FedCoLLM step before issue 27 (each target from the other's training forward)
  joint_eval_targets   the default now (each target from a no-gradient eval-mode forward, no LoRA dropout)
  sequential_pair      one SLM half-step (fixed LLM teacher) plus one LLM half-step (fixed SLM teacher)
  choices_pair         one choice-level step of each model (every choice of 8 items in one packed forward)
  teacher_choice_scores  the per-choice scores of 8 items by both models, which the choice path computes once a
                       round (cached for all its steps) instead of once a step
Prints the median seconds per step (robust to a step slowed by another process); writes
benchmarks/results/channel/cost.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
from common import (  # benchmarks/ is the script's folder, on sys.path
    machine,
    timed,
    use_shared_data,
)

from fedcollm.algorithms.training import Stepper, cycle_batches, mutual_distill_step
from fedcollm.data.batching import answer_logits
from fedcollm.distill.losses import choice_distill_loss, one_way_loss, pad_choices
from fedcollm.evaluate import choice_logprobs, choice_requests, packed_choice_logprobs
from fedcollm.experiment import load_config
from fedcollm.workbench import Workbench

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(HERE / "study.toml"))
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--out", default=str(HERE / "results" / "channel" / "cost.json"))
    args = parser.parse_args()

    use_shared_data()
    cfg = load_config(args.config, ['data.scored="validation"', "data.eval_limit=8"])
    wb = Workbench.build(cfg)
    max_len = cfg.model.max_length
    opt = {m: torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
           for m, model in (("f", wb.llm), ("g", wb.slm))}
    pair = Stepper([opt["f"], opt["g"]])
    batches = cycle_batches(wb.aux_data, 8, seed=0)
    items = wb.split.aux
    requests = {"f": choice_requests(wb.tokenizer, items, max_len), "g": choice_requests(wb.tokenizer, items, max_len)}

    def joint(teacher_eval: bool, batch) -> None:
        wb.llm.train()
        wb.slm.train()
        mutual_distill_step(wb.llm, wb.slm, batch, pair, 1.0, 1.0, "forward", 0,
                            teacher_eval=teacher_eval)

    def half(student, teacher, key: str, batch) -> None:
        teacher.eval()
        with torch.no_grad():
            target = answer_logits(teacher, batch)
        student.train()
        loss, _ = one_way_loss(answer_logits(student, batch), target, batch.targets, batch.target_mask, 1.0)
        opt[key].zero_grad(set_to_none=True)
        loss.backward()
        opt[key].step()

    def choice_step(model, key: str, idx: list[int], teacher) -> None:
        model.train()
        scores = packed_choice_logprobs(model, [requests[key][i] for i in idx], wb.tokenizer.pad_token_id)
        loss, _ = choice_distill_loss(scores, pad_choices([torch.tensor(teacher[i]) for i in range(len(idx))]),
                                      [items[i].answer for i in idx], [len(requests[key][i][1][items[i].answer])
                                                                        for i in idx], 1.0)
        opt[key].zero_grad(set_to_none=True)
        loss.backward()
        opt[key].step()

    rows = []
    for i in range(args.steps + 1):  # step 0 warms up and is dropped
        batch = next(batches)
        idx = list(range(8 * i, 8 * i + 8))
        group = [items[j] for j in idx]
        scores = {}
        row = {"joint_train_targets": timed(lambda: joint(False, batch)),
               "joint_eval_targets": timed(lambda: joint(True, batch)),
               "sequential_pair": timed(lambda: (half(wb.slm, wb.llm, "g", batch), half(wb.llm, wb.slm, "f", batch))),
               "teacher_choice_scores": timed(lambda: scores.update(
                   f=choice_logprobs(wb.llm, wb.tokenizer, group, max_len, 8),
                   g=choice_logprobs(wb.slm, wb.tokenizer, group, max_len, 8))),
               }
        row["choices_pair"] = timed(lambda: (choice_step(wb.slm, "g", idx, scores["f"]),
                                             choice_step(wb.llm, "f", idx, scores["g"])))
        if i:
            rows.append(row)
    keys = list(rows[0])
    mean = {k: statistics.mean(r[k] for r in rows) for k in keys}
    median = {k: statistics.median(r[k] for r in rows) for k in keys}  # robust to a step hit by another process
    result = {"setting": {"config": str(Path(args.config).name), "llm": cfg.model.llm, "slm": cfg.model.slm,
                          "dtype": cfg.model.dtype, "batch_size": 8, "steps": args.steps,
                          "torch_threads": torch.get_num_threads()},
              "machine": machine(), "mean_s": mean, "median_s": median,
              "eval_targets_over_train_targets": median["joint_eval_targets"] / median["joint_train_targets"],
              "per_step": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: round(v, 3) for k, v in median.items()}
                     | {"eval/train targets": round(result["eval_targets_over_train_targets"], 3)}))


if __name__ == "__main__":
    main()
