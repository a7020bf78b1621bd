"""The study's training steps on a CPU and on a GPU, side by side in one JSON (issue 8: "where a GPU is lent, say
how it compares").

    python benchmarks/device_steps.py [--device cpu] [--dtype fp32] [--steps 8] [--model-dir DIR]

Timed, on the same D^a batches of benchmarks/study.toml (8 pairs, LoRA as configured there): one AdamW step of
answer CE on the SLM (a client's step) and on the LLM, and one mutual-distillation step (FedCoLLM's server, both
models updated). The models have the study's shapes, SmolLM2-135M (30 layers) as the LLM and the 20-layer SLM, built
from the config.json and tokenizer in --model-dir with random weights: a step's time does not depend on the weight
values, and the real weights are larger than what the lent GPU machine takes (64 MiB). Each time is one step's wall
time, after torch.cuda.synchronize on a GPU; step 0 warms up and is dropped; the median is reported (a shared
machine's stray slow step moves a mean). Adds a row per (device, dtype) to --out.
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
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from fedcollm.algorithms.training import Stepper, cycle_batches, mutual_distill_step
from fedcollm.config import Config
from fedcollm.data.batching import SFTData
from fedcollm.models.loading import cache_dir
from fedcollm.models.lora import add_lora
from fedcollm.workbench import load_data

HERE = Path(__file__).resolve().parent
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def random_model(model_dir: Path, layers: int | None, dtype: torch.dtype, device: str, cfg: Config, seed: int):
    """The model of `model_dir`'s config (cut to `layers` decoder layers, if given) with random weights, plus LoRA."""
    config = AutoConfig.from_pretrained(model_dir)
    config.num_hidden_layers = layers or config.num_hidden_layers
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype).to(device)
    return add_lora(model, cfg.model.lora, seed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--config", default=str(HERE / "study.toml"))
    parser.add_argument("--model-dir", default=str(cache_dir() / "models" / "smollm2-135m"))
    parser.add_argument("--slm-layers", type=int, default=20)
    parser.add_argument("--out", default=str(HERE / "results" / "device-steps.json"))
    args = parser.parse_args()
    if args.steps < 1:
        parser.error(f"--steps must be >= 1 (timed steps after the warm-up), got {args.steps}")

    use_shared_data()
    cfg = Config.from_toml(args.config)
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    aux = SFTData(load_data(cfg)[0].aux, tokenizer, cfg.model.max_length)
    dtype = DTYPES[args.dtype]
    llm = random_model(Path(args.model_dir), None, dtype, args.device, cfg, 0)
    slm = random_model(Path(args.model_dir), args.slm_layers, dtype, args.device, cfg, 1)
    opts = {name: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)
            for name, m in (("slm", slm), ("llm", llm))}
    pair = Stepper([opts["llm"], opts["slm"]])
    llm.train()
    slm.train()
    d = cfg.distill

    seconds: dict[str, list[float]] = {"slm_step": [], "llm_step": [], "distill_step": []}
    batches = cycle_batches(aux, d.batch_size, seed=0)
    for i in range(args.steps + 1):
        batch = next(batches).to(args.device)
        row = {"slm_step": timed(lambda: sft_step(slm, opts["slm"], batch)),
               "llm_step": timed(lambda: sft_step(llm, opts["llm"], batch)),
               "distill_step": timed(lambda: mutual_distill_step(llm, slm, batch, pair,
                                                                 d.kd_weight, d.temperature, d.kl_direction,
                                                                 d.top_k))}
        if i:
            for key, value in row.items():
                seconds[key].append(value)

    median = {k: statistics.median(v) for k, v in seconds.items()}
    gpu = torch.cuda.get_device_name() if args.device.startswith("cuda") else None
    label = f"{gpu or 'cpu'} {args.dtype}"
    row = {"device": gpu or "cpu", "dtype": args.dtype, "steps": args.steps, "batch_size": d.batch_size,
           "llm_layers": llm.config.num_hidden_layers, "slm_layers": args.slm_layers, "median_s": median,
           "slm_over_llm": median["slm_step"] / median["llm_step"], "per_step_s": seconds} | machine()
    out = Path(args.out)
    rows = json.loads(out.read_text()) if out.exists() else {}
    rows[label] = row
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=1) + "\n")
    print(f"{label}: median SLM step {median['slm_step'] * 1e3:.1f} ms, LLM step {median['llm_step'] * 1e3:.1f} ms, "
          f"distill step {median['distill_step'] * 1e3:.1f} ms ({row['cpu']}, {row['torch_threads']} threads)")


if __name__ == "__main__":
    main()
