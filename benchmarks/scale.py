"""Memory and time of one training step at user sizes, with the [train] memory knobs off and on.

    python benchmarks/scale.py                              # CPU: qwen2.5-coder-1.5b LLM, qwen2.5-coder-0.5b SLM
    python benchmarks/scale.py --llm smollm2-135m --slm derived:smollm2-135m:10 --batch 4 --seq 48 --steps 2  # smoke
    python benchmarks/scale.py --device cuda                # random tiny Llamas on a GPU, autocast arms too

Two steps, each the production training function run for one optimizer step: the server's mutual distillation
(`mutual_distill`: LLM and SLM, eval-mode teachers as distill.teacher_mode's default) and a client's SFT step
(`sft_steps`: the SLM), both under LoRA as model.lora's default, on --batch synthetic examples of --seq tokens whose
last --answer are trained (every batch the same shape). Arms: train.gradient_checkpointing off/on x
train.micro_batch_size off/--micro (batch 8 as 1 x 8 or 4 x 2), and on CUDA x train.autocast off/bf16/fp16.

Each arm runs in a fresh process, so that memory one arm freed cannot hide another's peak: it loads the models
(weights: their parameters' and buffers' bytes; safetensors are mapped, so resident memory grows only as a step
touches them), takes one warm-up step, one memory step and --steps timed steps (median). The memory step starts from glibc's free memory handed back to the OS (malloc_trim); activation memory is
the peak resident memory during it (the kernel's VmHWM, reset through /proc/self/clear_refs, or where that cannot
be written, RSS sampled every millisecond) minus the resident memory just before: activations, the LoRA gradients
and AdamW's state. On CUDA the figures are torch.cuda.memory_allocated and max_memory_allocated instead.
Writes --out (default benchmarks/results/scale-{cpu,gpu}/results.json) with every arm's raw figures, the machine,
and per step the ratios of checkpointing on to off (issue goal: activation memory at least 2x lower for at most
1.4x the time), and prints a table.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from common import (  # benchmarks/ is the script's folder, on sys.path
    machine,
    timed,
    use_shared_data,
)

from fedcollm.algorithms.training import mutual_distill, sft_steps
from fedcollm.config import DeriveConfig, DistillConfig, LoraConfig, TrainConfig
from fedcollm.data.batching import SFTData

HERE = Path(__file__).resolve().parent
MB = 2**20
DEFAULTS = {"cpu": ("qwen2.5-coder-1.5b", "qwen2.5-coder-0.5b"), "cuda": ("random:1024:12", "random:512:6")}
GOAL = {"activation_memory_ratio": 2.0, "step_time_ratio": 1.4}


class Synthetic(SFTData):
    """`n` examples of `seq` random token ids (seeded) whose last `answer` are trained: batches of one shape."""

    def __init__(self, n: int, seq: int, answer: int, vocab: int, pad_id: int):
        gen = torch.Generator().manual_seed(0)
        self.examples = list(range(n))
        self.encoded = [(torch.randint(vocab, (seq,), generator=gen).tolist(), answer) for _ in range(n)]
        self.pad_id = pad_id


def load(spec: str, dtype: torch.dtype, device: torch.device):
    """(LoRA-wrapped model, vocabulary size, pad id) of `spec`: random:HIDDEN:LAYERS is a random Llama (32,000 ids,
    fedcollm.models.tiny); anything else loads through the project's loader and cache, as a run does."""
    from fedcollm.models.lora import add_lora

    if spec.startswith("random:"):
        from fedcollm.models.tiny import tiny_llama

        hidden, layers = (int(x) for x in spec.split(":")[1:])
        model, vocab, pad_id = tiny_llama(hidden=hidden, layers=layers, vocab=32000), 32000, 0
    else:
        from fedcollm.models.derive import resolve_model_dir
        from fedcollm.models.loading import load_model, load_tokenizer

        path = resolve_model_dir(spec, DeriveConfig(), use_shared_data())
        tokenizer = load_tokenizer(path)
        model, vocab, pad_id = load_model(path, dtype), len(tokenizer), tokenizer.pad_token_id
    return add_lora(model.to(device, dtype), LoraConfig(), seed=0), vocab, pad_id


def rss() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def trim() -> None:
    """Hand glibc's free memory back to the OS, so that resident memory is what is in use."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: its free memory stays resident, and the figure is a lower bound
        pass


@contextmanager
def peak_rss(out: dict):
    """out["peak"]: the largest resident memory during the block: the kernel's high-water mark (VmHWM), reset on
    entry through /proc/self/clear_refs, or where that cannot be written, the largest of samples every millisecond."""
    samples, done, thread = [rss()], threading.Event(), None
    try:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := the current RSS
    except OSError:
        def sample():
            while not done.wait(0.001):
                samples.append(rss())

        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
    yield
    if thread is None:
        status = Path("/proc/self/status").read_text().splitlines()
        out["peak"] = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))
    else:
        done.set()
        thread.join()
        out["peak"] = max(samples + [rss()])


def run_arm(arm: dict, args) -> dict:
    """One arm in this process: its models, one warm-up, one memory step and `args.steps` timed steps."""
    from fedcollm.models.loading import resolve_dtype

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    torch.manual_seed(0)
    slm, vocab, pad_id = load(args.slm, resolve_dtype(args.dtype, device, None), device)
    llm = load(args.llm, resolve_dtype(args.dtype, device, None), device)[0] if arm["step"] == "distill" else None
    weights = sum(t.nbytes for m in (slm, llm) if m is not None for t in (*m.parameters(), *m.buffers()))
    loaded = torch.cuda.memory_allocated() if cuda else rss()
    data = Synthetic(4 * args.batch, args.seq, args.answer, vocab, pad_id)
    train = TrainConfig(gradient_checkpointing=arm["checkpointing"], micro_batch_size=arm["micro_batch_size"],
                        autocast=arm["autocast"])
    d = DistillConfig()

    def step() -> float:
        if llm is None:
            return sft_steps(slm, data, 1, 1e-4, args.batch, seed=0, train=train).losses[0]
        return mutual_distill(llm, slm, data, 1, d.kd_weight, d.temperature, d.kl_direction, d.top_k, d.llm_lr,
                              d.slm_lr, args.batch, seed=0, teacher_eval=d.teacher_mode == "eval",
                              train=train).losses[0]

    loss = step()  # warm-up: one-off allocations (thread pools, kernels' caches) are not the step's
    if cuda:
        torch.cuda.synchronize()
        start = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        peak = torch.cuda.max_memory_allocated()
    else:
        trim()
        start, out = rss(), {}
        with peak_rss(out):
            step()
        peak = out["peak"]
    seconds = [timed(step) for _ in range(args.steps)]
    return arm | {"weights_mb": weights / MB, "after_load_mb": loaded / MB, "before_step_mb": start / MB, "peak_mb": peak / MB,
                  "activation_mb": (peak - start) / MB, "step_s": statistics.median(seconds), "step_times_s": seconds,
                  "loss": loss, "dtype": str(next(slm.parameters()).dtype).removeprefix("torch.")}


def arms(args) -> list[dict]:
    modes = ["off", "bf16", "fp16"] if args.device == "cuda" else ["off"]
    return [{"step": step, "checkpointing": ckpt, "micro_batch_size": micro, "autocast": mode}
            for step in ("distill", "sft") for mode in modes for micro in (0, args.micro) for ckpt in (False, True)]


def ratios(rows: list[dict]) -> list[dict]:
    """Checkpointing on against off, arm by arm: how many times less activation memory, how many times the time."""
    out = []
    for on in (r for r in rows if r["checkpointing"]):
        off = next(r for r in rows if not r["checkpointing"] and all(r[k] == on[k] for k in
                                                                     ("step", "micro_batch_size", "autocast")))
        memory, slower = off["activation_mb"] / on["activation_mb"], on["step_s"] / off["step_s"]
        out.append({k: on[k] for k in ("step", "micro_batch_size", "autocast")}
                   | {"activation_memory_ratio": memory, "step_time_ratio": slower,
                      "met": memory >= GOAL["activation_memory_ratio"] and slower <= GOAL["step_time_ratio"]})
    return out


def headline(found: list[dict]) -> dict:
    """The issue's figures: checkpointing on against off for one server distillation step, without accumulation."""
    row = next(r for r in found if r["step"] == "distill" and not r["micro_batch_size"] and r["autocast"] == "off")
    return {k: row[k] for k in ("activation_memory_ratio", "step_time_ratio")}


def table(rows: list[dict], found: list[dict]) -> str:
    lines = [f"{'step':8s} {'ckpt':4s} {'micro':>5s} {'autocast':8s} {'weights MB':>10s} {'activ. MB':>10s} "
             f"{'peak MB':>9s} {'step s':>8s}"]
    lines += [f"{r['step']:8s} {'on' if r['checkpointing'] else 'off':4s} {r['micro_batch_size'] or '-':>5} "
              f"{r['autocast']:8s} {r['weights_mb']:10.0f} {r['activation_mb']:10.0f} {r['peak_mb']:9.0f} "
              f"{r['step_s']:8.3f}" for r in rows]
    lines += [f"checkpointing on/off, {r['step']} micro {r['micro_batch_size'] or '-'} {r['autocast']}: activation "
              f"memory {r['activation_memory_ratio']:.2f}x lower, time {r['step_time_ratio']:.2f}x "
              f"({'met' if r['met'] else 'not met'}: >= {GOAL['activation_memory_ratio']}x lower, <= "
              f"{GOAL['step_time_ratio']}x the time)" for r in found]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--llm", help="server LLM (default: qwen2.5-coder-1.5b; random:1024:12 on cuda)")
    parser.add_argument("--slm", help="client SLM (default: qwen2.5-coder-0.5b; random:512:6 on cuda)")
    parser.add_argument("--dtype", default="fp32", help="model.dtype: fp32, bf16, fp16 or auto")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--micro", type=int, default=2, help="micro-batch size of the accumulation arms")
    parser.add_argument("--seq", type=int, default=64, help="tokens per example")
    parser.add_argument("--answer", type=int, default=16, help="trained (answer) tokens per example")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per arm (median), after the others")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0 = torch's default")
    parser.add_argument("--out")
    parser.add_argument("--arm", help=argparse.SUPPRESS)  # a worker process: run this one arm (JSON), print its row
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device here (run it on a GPU machine, or use --device cpu)")
    args.llm, args.slm = args.llm or DEFAULTS[args.device][0], args.slm or DEFAULTS[args.device][1]
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.arm:
        print(json.dumps(run_arm(json.loads(args.arm), args)))
        return

    rows = []
    for arm in arms(args):
        t0 = time.perf_counter()
        worker = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--arm", json.dumps(arm)], check=True,
                                stdout=subprocess.PIPE, text=True)
        rows.append(json.loads(worker.stdout.splitlines()[-1]))
        print(f"{arm} done in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    found = ratios(rows)
    setting = {k: getattr(args, k) for k in ("device", "llm", "slm", "dtype", "batch", "micro", "seq", "answer",
                                             "steps")} | {"lora": vars(LoraConfig())}
    gpu = {"gpu": torch.cuda.get_device_name()} if args.device == "cuda" else {}
    result = {"setting": setting, "machine": machine() | gpu, **headline(found), "arms": rows, "ratios": found,
              "goal": GOAL}
    out = Path(args.out or HERE / "results" / f"scale-{'gpu' if args.device == 'cuda' else 'cpu'}" / "results.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(table(rows, found))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
