"""What the benchmark scripts share: the machine they record beside every timing (CPU, bf16 support, threads) and
the way a benchmark takes its config and runs it."""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import time
from pathlib import Path


def machine() -> dict:
    import torch

    from fedcollm.models.loading import cpu_model, cpu_supports_bf16

    return {"cpu": cpu_model(), "avx512_bf16": cpu_supports_bf16(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version()}


def use_shared_data() -> str | None:
    """The project's data collection where it sits beside the checkout, as FEDCOLLM_DATA unless that is set;
    returns the data folder in effect (None: the bundled data only)."""
    shared = Path(__file__).resolve().parents[2] / "shared" / "data"
    if shared.is_dir():
        os.environ.setdefault("FEDCOLLM_DATA", str(shared))
    return os.environ.get("FEDCOLLM_DATA")


def timed(fn) -> float:
    """Wall seconds of one call of `fn`, waiting for queued GPU work before and after (CUDA runs asynchronously)."""
    import torch

    sync = torch.cuda.synchronize if torch.cuda.is_initialized() else (lambda: None)
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def sft_step(model, opt, batch, logits_fn=None) -> None:
    """One AdamW step of answer CE (a client's step), through `logits_fn` (default fedcollm's answer_logits)."""
    from fedcollm.data.batching import answer_logits
    from fedcollm.distill.losses import answer_ce

    opt.zero_grad(set_to_none=True)
    answer_ce((logits_fn or answer_logits)(model, batch), batch.targets, batch.target_mask).backward()
    opt.step()


def bench_config(doc: str, config: Path, results: Path):
    """(config, results folder) from the command line: --config, --set overrides, --results. The project's data
    collection is used where it sits beside the checkout (FEDCOLLM_DATA, unless already set)."""
    from fedcollm.config import Config

    use_shared_data()
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(config))
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--results", default=str(results))
    args = parser.parse_args()
    cfg = Config.from_toml(args.config)
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    return (cfg.override(args.set) if args.set else cfg), out


def run_benchmark(cfg, out: Path) -> tuple[dict, Path]:
    """Run the benchmark's config (resuming its run directory where it stopped); copy each method's round
    metrics into `out`. Returns the run's results and its directory."""
    from fedcollm.experiment import resume_experiment, run_experiment

    run_dir = Path(cfg.run.out_dir)
    results = resume_experiment(run_dir) if (run_dir / "config.json").exists() else run_experiment(cfg)
    for method in cfg.run.methods:
        if (run_dir / method / "metrics.jsonl").exists():
            shutil.copy(run_dir / method / "metrics.jsonl", out / f"metrics-{method}.jsonl")
    return results, run_dir
