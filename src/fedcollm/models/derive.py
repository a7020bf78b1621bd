"""Derive a same-vocabulary SLM from an LLM by layer pruning plus distillation healing.

The paper's SLM (Sheared-LLaMA) was derived from its LLM; we do the CPU-sized analogue:
1. choose N decoder layers: greedily, each time adding the layer that lowers calibration loss most, or in one
   forward pass by each layer's Block Influence (`derive.selection`);
2. heal the pruned model by full-parameter KL distillation from the full model on teacher-sampled
   continuations plus generic Alpaca text (never evaluation or client data).
Everything is seeded, so the same base, N and seed give the same SLM; the result is cached.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import random
import time
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from fedcollm.config import DeriveConfig, parse_derived_spec
from fedcollm.data.tasks import load_alpaca_texts
from fedcollm.errors import ModelError
from fedcollm.fileio import atomic_write_text
from fedcollm.models.loading import cache_dir, cache_lock, load_model, load_tokenizer

HELD_OUT_TEXTS = 128  # last Alpaca rows, never used for selection or healing


def derived_dir(base: str, n_layers: int, cfg: DeriveConfig) -> Path:
    """Cache location keyed by every derive knob, so a changed knob never reuses a stale SLM."""
    knobs = asdict(cfg) | {"layers": n_layers}
    if knobs["selection"] == "greedy":  # the only selection before it was a knob: earlier SLMs keep their keys
        del knobs["selection"]
    key = hashlib.sha256(json.dumps(knobs, sort_keys=True).encode()).hexdigest()[:8]
    return cache_dir() / "models" / f"derived-{base}-{n_layers}l-{key}"


def _layers(model) -> torch.nn.ModuleList:
    return model.model.layers


def with_layers(model, layer_ids: list[int], all_layers: torch.nn.ModuleList):
    """Point `model` at the chosen decoder layers in place (weights shared, no copy)."""
    model.model.layers = torch.nn.ModuleList([all_layers[i] for i in layer_ids])
    model.config.num_hidden_layers = len(layer_ids)
    return model


def autocast_for(model):
    dtype = next(model.parameters()).dtype
    device = next(model.parameters()).device
    if dtype == torch.float32 and device.type == "cpu" and torch.cpu._is_avx512_bf16_supported():
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return nullcontext()


def tokenize_texts(tokenizer, texts: list[str], seq_len: int) -> dict[str, torch.Tensor]:
    enc = tokenizer(texts, max_length=seq_len, truncation=True, padding="max_length", return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


@torch.no_grad()
def mean_nll(model, batch: dict[str, torch.Tensor], chunk: int = 16) -> float:
    """Token-averaged negative log-likelihood of the batch (perplexity = exp of it)."""
    total, count = 0.0, 0
    for s in range(0, batch["input_ids"].shape[0], chunk):
        ids = batch["input_ids"][s:s + chunk]
        mask = batch["attention_mask"][s:s + chunk]
        with autocast_for(model):
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1].float()
        target = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        nll = F.cross_entropy(logits.transpose(1, 2), target, ignore_index=-100, reduction="sum")
        total += nll.item()
        count += int((target != -100).sum())
    return total / max(count, 1)


def greedy_select(model, batch: dict[str, torch.Tensor], n_layers: int) -> tuple[list[int], float]:
    """Add layers one at a time, keeping each time the one that lowers calibration NLL most."""
    all_layers = _layers(model)
    n_total = len(all_layers)
    chosen: list[int] = []
    best_nll = math.inf
    with tqdm(total=sum(n_total - k for k in range(n_layers)), desc="select layers", leave=False) as bar:
        for _ in range(n_layers):
            scores = {}
            for cand in range(n_total):
                if cand in chosen:
                    continue
                with_layers(model, sorted(chosen + [cand]), all_layers)
                scores[cand] = mean_nll(model, batch)
                bar.update(1)
            best = min(scores, key=lambda c: (scores[c], c))
            chosen.append(best)
            best_nll = scores[best]
    with_layers(model, list(range(n_total)), all_layers)
    return sorted(chosen), best_nll


@torch.no_grad()
def block_influence_select(model, batch: dict[str, torch.Tensor], n_layers: int) -> tuple[list[int], float]:
    """Keep the `n_layers` layers that change the hidden state most, from one forward pass.

    ShortGPT's Block Influence (Men et al. 2024, arXiv 2403.03853): 1 - cosine similarity between a layer's input
    and output, averaged over the calibration tokens. Written here because no maintained library exposes it; it
    costs one pass where greedy selection costs about N x layers passes (minutes on a CPU for 20 of 30 layers).
    """
    layers = _layers(model)
    captured: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def keep(idx):
        def hook(module, args, kwargs, output):
            inputs = kwargs.get("hidden_states", args[0] if args else None)
            captured[idx] = (inputs, output[0] if isinstance(output, tuple) else output)
        return hook

    handles = [layer.register_forward_hook(keep(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        with autocast_for(model):
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    real = batch["attention_mask"].bool()
    influence = [float(1 - F.cosine_similarity(captured[i][0][real].float(), captured[i][1][real].float(), dim=-1).mean())
                 for i in range(len(layers))]
    chosen = sorted(sorted(range(len(layers)), key=lambda i: (-influence[i], i))[:n_layers])
    with_layers(model, chosen, layers)
    nll = mean_nll(model, batch)
    with_layers(model, list(range(len(layers))), layers)
    return chosen, nll


@torch.no_grad()
def sample_continuations(model, tokenizer, prompts: list[str], max_new_tokens: int, seed: int) -> list[str]:
    """Teacher-sampled text: the teacher's own distribution is what healing should match."""
    torch.manual_seed(seed)
    tokenizer.padding_side = "left"
    out = []
    for s in tqdm(range(0, len(prompts), 32), desc="teacher samples", leave=False):
        enc = tokenizer(prompts[s:s + 32], return_tensors="pt", padding=True, truncation=True, max_length=64)
        with autocast_for(model):
            gen = model.generate(**enc, do_sample=True, temperature=1.0, top_p=0.95, max_new_tokens=max_new_tokens,
                                 pad_token_id=tokenizer.pad_token_id)
        out.extend(tokenizer.batch_decode(gen, skip_special_tokens=True))
    tokenizer.padding_side = "right"
    return out


def heal(student, teacher, batch: dict[str, torch.Tensor], cfg: DeriveConfig) -> list[float]:
    """Full-parameter KL(teacher || student) distillation over all tokens; returns the loss curve."""
    student.train()
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.heal_lr, weight_decay=0.0)
    warmup = max(1, cfg.heal_steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, cfg.heal_steps) / cfg.heal_steps)))
    gen = torch.Generator().manual_seed(cfg.seed)
    n = batch["input_ids"].shape[0]
    order: list[int] = []
    losses = []
    for _ in tqdm(range(cfg.heal_steps), desc="heal"):
        if len(order) < cfg.heal_batch:
            order += torch.randperm(n, generator=gen).tolist()
        idx, order = order[:cfg.heal_batch], order[cfg.heal_batch:]
        ids, mask = batch["input_ids"][idx], batch["attention_mask"][idx]
        with torch.no_grad(), autocast_for(teacher):
            t_logp = F.log_softmax(teacher(input_ids=ids, attention_mask=mask, use_cache=False).logits.float(), -1)
        with autocast_for(student):
            s_logits = student(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
        s_logp = F.log_softmax(s_logits, -1)
        kl = (t_logp.exp() * (t_logp - s_logp)).sum(-1)
        loss = (kl * mask).sum() / mask.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
    student.eval()
    return losses


def derive_slm(base: str, n_layers: int, cfg: DeriveConfig, data_dir: str | None, out_dir: Path | None = None) -> Path:
    """Build (or reuse) the `n_layers`-layer SLM derived from `base` and return its directory."""
    out_dir = out_dir or derived_dir(base, n_layers, cfg)
    if (out_dir / "config.json").exists():
        return out_dir
    with cache_lock(out_dir):
        if (out_dir / "config.json").exists():  # derived while we waited
            return out_dir
        return _derive(base, n_layers, cfg, data_dir, out_dir)


def _derive(base: str, n_layers: int, cfg: DeriveConfig, data_dir: str | None, out_dir: Path) -> Path:
    t0 = time.time()
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    tokenizer = load_tokenizer(base)
    tokenizer.padding_side = "right"
    texts = load_alpaca_texts(data_dir)
    held_out, pool = texts[-HELD_OUT_TEXTS:], texts[:-HELD_OUT_TEXTS]
    rng = random.Random(cfg.seed)
    rng.shuffle(pool)
    calib, heal_texts = pool[:cfg.calib_texts], pool[cfg.calib_texts:]

    teacher = load_model(base, dtype=torch.float32)
    held = tokenize_texts(tokenizer, held_out, cfg.seq_len)
    calib_batch = tokenize_texts(tokenizer, calib, cfg.calib_len)
    n_total = len(_layers(teacher))
    if n_layers >= n_total:
        raise ModelError(f"derived:{base}:{n_layers}: {base} has only {n_total} decoder layers; keep fewer")
    ppl_teacher = math.exp(mean_nll(teacher, held))

    how = "" if cfg.selection == "greedy" else f"-{cfg.selection}"
    selection = out_dir.with_name(f"selection-{base}-{n_layers}l-c{cfg.calib_texts}x{cfg.calib_len}-s{cfg.seed}{how}.json")
    if selection.exists():  # greedy selection is the slow half: keep it across interrupted derivations
        layer_ids = json.loads(selection.read_text())["layers"]
    else:
        select = greedy_select if cfg.selection == "greedy" else block_influence_select
        layer_ids, nll = select(teacher, calib_batch, n_layers)
        atomic_write_text(selection, json.dumps({"layers": layer_ids, "calib_nll": nll}))
    student = copy.deepcopy(teacher)
    all_layers = _layers(student)
    with_layers(student, layer_ids, all_layers)
    for new_idx, layer in enumerate(_layers(student)):
        layer.self_attn.layer_idx = new_idx
    if hasattr(student.config, "layer_types") and student.config.layer_types:
        student.config.layer_types = [student.config.layer_types[i] for i in layer_ids]
    ppl_pruned = math.exp(mean_nll(student, held))

    prompts = [t.split("\nAnswer:")[0] + "\nAnswer:" for t in heal_texts[:cfg.sampled_texts]]
    sampled = sample_continuations(teacher, tokenizer, prompts, max_new_tokens=cfg.seq_len // 2, seed=cfg.seed)
    n_generic = max(cfg.heal_steps * cfg.heal_batch - len(sampled), 0)
    heal_batch = tokenize_texts(tokenizer, sampled + heal_texts[cfg.sampled_texts:cfg.sampled_texts + n_generic],
                                cfg.seq_len)
    losses = heal(student, teacher, heal_batch, cfg) if cfg.heal_steps else []
    ppl_healed = math.exp(mean_nll(student, held))

    info = {"base": base, "layers": layer_ids, "config": asdict(cfg) | {"layers": n_layers}, "params": sum(p.numel() for p in student.parameters()),
            "perplexity_held_out": {"teacher": ppl_teacher, "pruned": ppl_pruned, "healed": ppl_healed},
            "held_out": f"last {HELD_OUT_TEXTS} Alpaca-subset rows, {cfg.seq_len} tokens",
            "heal_loss_first_last": [losses[0], losses[-1]] if losses else None, "seconds": time.time() - t0}
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    student.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "derive_info.json").write_text(json.dumps(info, indent=2))
    tmp.rename(out_dir)
    print(f"derived {n_layers}-layer SLM from {base}: layers {layer_ids}, {info['params'] / 1e6:.1f}M params\n"
          f"  held-out perplexity: teacher {ppl_teacher:.1f}, pruned {ppl_pruned:.1f}, healed {ppl_healed:.1f}"
          f"  ({info['seconds']:.0f} s) -> {out_dir}")
    return out_dir


def resolve_model_dir(spec: str, cfg: DeriveConfig, data_dir: str | None) -> str:
    """Turn `derived:BASE:N` into a model directory (deriving it on first use); other specs pass through."""
    parsed = parse_derived_spec(spec)
    if parsed is None:
        return spec
    base, n = parsed
    return str(derive_slm(base, n, cfg, data_dir))
