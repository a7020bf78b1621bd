"""GPU check: which attention kernels give finite gradients on a left-padded batch, per dtype.

    python benchmarks/cuda_attention_nan.py [--data-dir DIR] [--out benchmarks/results/cuda-attention-nan.json]

A tiny random Llama (3 layers, hidden 64, fedcollm.models.tiny) gets 8 real ARC-Easy (question, gold answer) pairs,
left-padded by fedcollm's collate (pad rows attend to nothing). For bf16, fp32 and fp16, and for PyTorch's default
choice of scaled-dot-product kernel, each kernel on its own, all but cuDNN (what fedcollm's `answer_logits` asks for
on CUDA), and eager attention, it records whether the answer logits hold NaN and whether one backward of their sum
leaves NaN in any gradient. Needs a CUDA device; prints a table and writes JSON with the torch version and GPU name.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from fedcollm.config import preset_tasks
from fedcollm.data.batching import (
    TRAINABLE_ATTENTION,
    collate,
    encode_pair,
    last_positions,
)
from fedcollm.data.tasks import load_train_split
from fedcollm.models.tiny import tiny_llama, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]

KERNELS = {"default": None, "all but cuDNN (fedcollm)": TRAINABLE_ATTENTION,
           **{f"only {b.name}": [b] for b in (SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                                              SDPBackend.FLASH_ATTENTION, SDPBackend.MATH)},
           "eager": "eager"}


def check(batch, dtype: torch.dtype, kernels) -> dict:
    model = tiny_llama(hidden=64, layers=3, seed=0)
    model.config._attn_implementation = "eager" if kernels == "eager" else "sdpa"
    model = model.to("cuda", dtype)
    ids = batch.input_ids
    try:  # answer_logits' own forward, without its kernel choice (which would override the one under test)
        with sdpa_kernel(kernels) if isinstance(kernels, list) else torch.enable_grad():
            logits = model(input_ids=ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
                           logits_to_keep=last_positions(ids.shape[1], batch.keep, ids.device, end=1)).logits
            logits.float().sum().backward()
    except RuntimeError as err:
        return {"error": str(err).splitlines()[0][:120]}
    return {"logits_nan": bool(torch.isnan(logits).any()),
            "grad_nan": any(bool(torch.isnan(p.grad).any()) for p in model.parameters() if p.grad is not None)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=os.environ.get("FEDCOLLM_DATA", str(ROOT.parent / "shared" / "data")))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "cuda-attention-nan.json"))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA device")
    examples = load_train_split("arc_easy", preset_tasks()["arc_easy"], args.data_dir)[:300]
    tok = tiny_tokenizer([e.context + " " + " ".join(e.choices) for e in examples])
    examples = examples[:8]
    batch = collate([encode_pair(tok, e.context, e.continuations[e.answer], 64) for e in examples],
                    tok.pad_token_id or 0).to("cuda")
    rows = [{"dtype": str(dtype).removeprefix("torch."), "kernels": name, **check(batch, dtype, kernels)}
            for dtype in (torch.bfloat16, torch.float32, torch.float16) for name, kernels in KERNELS.items()]
    for r in rows:
        outcome = r.get("error") or f"logits NaN {r['logits_nan']!s:5}  gradients NaN {r['grad_nan']}"
        print(f"{r['dtype']:9} {r['kernels']:26} {outcome}")
    result = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
              "pad_tokens_per_row": (batch.attention_mask == 0).sum(1).tolist(), "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
