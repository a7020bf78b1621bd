"""One FedCoLLM round in-process, over a loopback Flower deployment (TLS + SuperNode auth), and with SecAgg+,
in the same invocation on the same machine; writes benchmarks/results/flower-vs-inprocess.json.

    python benchmarks/flower_vs_inprocess.py                       # the CPU default setting, 1 round
    python benchmarks/flower_vs_inprocess.py --config "" --set data.eval_limit=20   # the embedded demo setting

Four arms: in-process; Flower with each SuperNode in `--isolation process` served by a long-lived
`fedcollm clientapp-worker` (the recommended deployment); the same with SecAgg+; and Flower's default
(a fresh `flwr-clientapp` process per message) for comparison. Evaluation is cut to the first 50 items per task
(server-side code identical on every arm, so a smaller evaluation makes the ratio harder to meet, not easier).

Round time is the round's wall time as the server's round loop measures it (client phase, aggregation, server
distillation, evaluation, checkpoint); evaluation and distillation are the same code on both engines, so the
difference is the transport. The SuperNodes and their ClientApp processes run at nice 10 (CLIENT_NICE): they
stand in for the clients' own machines, and at equal priority their idle polls (each worker asks its SuperNode
for a task every second, each SuperNode the SuperLink every 3 s) compete with the server's two torch threads: in
the run committed on 2026-11-25 its distillation and evaluation took 21 % and 26 % longer than in-process.
Real models: run `fedcollm run` once first so that FEDCOLLM_CACHE holds them.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from fedcollm.engines.flower.loopback import LoopbackFederation
from fedcollm.experiment import load_config, run_experiment
from fedcollm.models.loading import cpu_model, resolve_device, resolve_dtype
from fedcollm.runs import RunDir

HERE = Path(__file__).resolve().parent
BASE = ["federation.rounds=1", "run.methods=['fedcollm']", "data.eval_limit=50", "run.round_eval_limit=none"]
CPU_DEFAULT = HERE / "cpu_default.toml"
CLIENT_NICE = 10
FLOWER_ARMS = {"flower": ([], True), "secagg": (["secagg.enabled=true"], True), "subprocess": ([], False)}


def round_record(run: Path) -> dict:
    return RunDir(run).read_metrics("fedcollm")[-1]


def relative_l2(a: dict, b: dict) -> float:
    num = sum(float(((a[k].double() - b[k].double()) ** 2).sum()) for k in a)
    return (num / sum(float((b[k].double() ** 2).sum()) for k in b)) ** 0.5


def flower_run(work: Path, config: str, overrides: list[str], nodes: int, name: str,
               worker: bool = True) -> tuple[Path, float]:
    out = work / name
    t0 = time.perf_counter()
    with LoopbackFederation(work / f"deploy-{name}", nodes=nodes, worker=worker, client_nice=CLIENT_NICE) as fed:
        run_id = fed.submit({"config": config, "set": ";".join(overrides), "out-dir": str(out), "timeout": 1800.0})
        status = fed.wait(run_id, timeout=3600, poll=300.0, done_file=out / "results.json")
        if status != "finished:completed":
            raise RuntimeError(f"{name}: run {run_id} {status}:\n{fed.logs(run_id)[-4000:]}")
    return out, time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(CPU_DEFAULT), help="fedcollm TOML (\"\" = the embedded demo)")
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--arms", nargs="+", default=list(FLOWER_ARMS), choices=list(FLOWER_ARMS),
                        help="Flower arms to run after in-process (flower is required: the ratio is its)")
    parser.add_argument("--out", default=str(HERE / "results" / "flower-vs-inprocess.json"))
    args = parser.parse_args()
    if "flower" not in args.arms:
        parser.error("--arms must include flower")
    overrides = BASE + args.set
    cfg = load_config(args.config or None, overrides)
    work = Path(tempfile.mkdtemp(prefix="flower-bench-"))

    t0 = time.perf_counter()
    run_experiment(cfg.with_field("run.out_dir", str(work / "inprocess")))
    inprocess_wall = time.perf_counter() - t0
    k = cfg.federation.clients
    wall = {"inprocess": inprocess_wall}
    for arm in args.arms:
        extra, worker = FLOWER_ARMS[arm]
        wall[f"{arm}_incl_startup"] = flower_run(work, args.config, overrides + extra, k, arm, worker=worker)[1]

    rec = {name: round_record(work / name) for name in ("inprocess", *args.arms)}
    refs = {"llm": None, "slm": None}
    final = {name: RunDir(work / name).load_round("fedcollm", 1, refs) for name in rec}
    round_s = {name: r["timing"]["round_s"] for name, r in rec.items()}
    results = {
        "inprocess_round_s": round_s["inprocess"],
        "flower_round_s": round_s["flower"],
        "ratio": round_s["flower"] / round_s["inprocess"],
        "phases_s": {name: r["timing"] for name, r in rec.items()},
        "flower_equals_inprocess": all(torch.equal(final["flower"][w][k], final["inprocess"][w][k])
                                       for w in refs for k in final["inprocess"][w]),
        "bytes_up_per_round": rec["flower"]["bytes_up"], "bytes_down_per_round": rec["flower"]["bytes_down"],
        "inprocess_bytes_up_per_round": rec["inprocess"]["bytes_up"],
        "wall_s": wall,
        "setting": {"config": args.config or "embedded demo", "overrides": overrides, "llm": cfg.model.llm, "slm": cfg.model.slm,
                    "clients": cfg.federation.clients, "cpu": cpu_model(), "cores": torch.get_num_threads(),
                    "dtype": str(resolve_dtype(cfg.model.dtype, resolve_device(cfg.model.device))),
                    "torch": torch.__version__,
                    "flower": "1.42.0 loopback, TLS + SuperNode auth; flower/secagg: --isolation process + one "
                              "fedcollm clientapp-worker per SuperNode; subprocess: Flower's default",
                    "threads_per_supernode": max(1, (os.cpu_count() or 1) // k), "client_nice": CLIENT_NICE,
                    "secagg": {"num_shares": cfg.secagg.num_shares,
                               "reconstruction_threshold": cfg.secagg.reconstruction_threshold,
                               "clipping_range": cfg.secagg.clipping_range,
                               "quantization_range": cfg.secagg.quantization_range,
                               "max_weight": "largest declared shard size of the round"},
                    "work_dir": str(work)},
    }
    if "secagg" in rec:
        results |= {"secagg_round_s": round_s["secagg"], "secagg_ratio": round_s["secagg"] / round_s["inprocess"],
                    "secagg_rel_error": relative_l2(final["secagg"]["slm"], final["inprocess"]["slm"]),
                    "secagg_rel_error_llm": relative_l2(final["secagg"]["llm"], final["inprocess"]["llm"]),
                    "secagg_server_saw_only_the_average": rec["secagg"]["secagg_all_results_identical"],
                    "secagg_bytes_up_per_round": rec["secagg"]["bytes_up"],
                    "secagg_bytes_down_per_round": rec["secagg"]["bytes_down"]}
    if "subprocess" in rec:
        results |= {"flower_subprocess_round_s": round_s["subprocess"],
                    "flower_subprocess_ratio": round_s["subprocess"] / round_s["inprocess"]}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(json.dumps({k: v for k, v in results.items() if k != "setting"}, indent=2))


if __name__ == "__main__":
    main()
