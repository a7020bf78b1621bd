"""FedMKT and heterogeneous FedCoLLM on CPU with real models of different tokenizers and real data (issue 7).

    python benchmarks/fedmkt_cpu.py            # runs (or resumes) runs/bench-fedmkt-cpu, writes results/fedmkt-cpu/

results.json is cpu-default's schema (FedMKT and FedCoLLM beside the baselines under "llm" and "slm"), plus an
"alignment" block: the vocabulary maps both ways (built afresh and timed here, then cached), and the share of
answer positions whose teacher distribution arrived through a 1:1 alignment in the runs.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

from common import (  # benchmarks/ is the script's folder, on sys.path
    bench_config,
    machine,
    run_benchmark,
)

from fedcollm.alignment.vocab import map_vocab
from fedcollm.config import Config
from fedcollm.models.derive import resolve_model_dir
from fedcollm.models.loading import load_tokenizer
from fedcollm.runs import RunDir

HERE = Path(__file__).resolve().parent


def build_maps(cfg: Config) -> dict:
    """Both vocabulary maps of the LLM/SLM pair, built in a fresh cache folder so the time is a real build."""
    tok = {w: load_tokenizer(resolve_model_dir(name, cfg.derive, cfg.data.data_dir))
           for w, name in (("llm", cfg.model.llm), ("slm", cfg.model.slm))}
    out = {"vocab_a": cfg.model.llm, "vocab_b": cfg.model.slm, "vocab_a_size": len(tok["llm"]),
           "vocab_b_size": len(tok["slm"])}
    with tempfile.TemporaryDirectory() as fresh:
        for src, dst in (("llm", "slm"), ("slm", "llm")):
            t0 = time.perf_counter()
            vmap = map_vocab(tok[src], tok[dst], cache_dir=fresh)
            out[f"mapping_build_s_{src}_to_{dst}"] = time.perf_counter() - t0
            out[f"exact_match_fraction_{src}_to_{dst}"] = vmap.exact_fraction
            map_vocab(tok[src], tok[dst])  # into the run's cache, so the runs below do not build it again
    out["mapping_build_s"] = out["mapping_build_s_llm_to_slm"] + out["mapping_build_s_slm_to_llm"]
    out["exact_match_fraction"] = out["exact_match_fraction_slm_to_llm"]
    return out


def aligned_answer_fraction(run: RunDir) -> dict:
    """Per method and direction, the mean share of D^a answer positions aligned 1:1 (from the round records)."""
    out = {}
    for rec in run.read_metrics("fedcollm"):
        for direction, share in rec.get("aligned_fraction", {}).items():
            out.setdefault(f"fedcollm_to_{direction}", []).append(share)
    for rec in run.read_metrics("fedmkt"):
        if "aligned_fraction" in rec:
            out.setdefault("fedmkt_to_llm", []).append(rec["aligned_fraction"])
    return {k: sum(v) / len(v) for k, v in out.items()}


def main() -> None:
    cfg, out = bench_config(__doc__, HERE / "fedmkt_cpu.toml", HERE / "results" / "fedmkt-cpu")
    maps_file = out / "alignment-maps.json"
    if not maps_file.exists():  # timed once; a resumed benchmark keeps the first build's figures
        maps_file.write_text(json.dumps(build_maps(cfg) | {"machine": machine()}, indent=2))
    t0 = time.time()
    results, run_dir = run_benchmark(cfg, out)
    results["alignment"] = json.loads(maps_file.read_text()) | {
        "aligned_answer_fraction": aligned_answer_fraction(RunDir(run_dir))}
    results["setting"]["machine"] = machine()
    results["setting"]["benchmark_wall_s_this_invocation"] = time.time() - t0
    (out / "results.json").write_text(json.dumps(results, indent=2))
    shutil.copy(run_dir / "results.md", out / "results.md")
    print(json.dumps(results["alignment"], indent=2))


if __name__ == "__main__":
    main()
