"""`fedcollm run | derive-slm | eval | report | config-doc`."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from importlib import resources
from pathlib import Path

from fedcollm.config import Config, ConfigError, describe

log = logging.getLogger("fedcollm")


def default_config_path() -> Path:
    return Path(str(resources.files("fedcollm") / "configs" / "demo.toml"))


def load_config(path: str | None, overrides: list[str], limit: int | None = None) -> Config:
    overrides = overrides + ([f"data.eval_limit={limit}"] if limit else [])
    cfg = Config.from_toml(path or default_config_path())
    return cfg.override(overrides) if overrides else cfg


def run_experiment(cfg: Config, resume: bool = False) -> dict:
    """Run every configured method into cfg.run.out_dir and write results.json / results.md / accuracy.png."""
    import torch

    from fedcollm.algorithms.training import time_fwd_bwd, unit_seed
    from fedcollm.comm import Payload, num_params, pack
    from fedcollm.engines.inprocess import run_method
    from fedcollm.models.lora import count_parameters
    from fedcollm.report import build_results, write_report
    from fedcollm.runs import RunDir
    from fedcollm.workbench import Workbench

    run = RunDir(cfg.run.out_dir)
    if resume:
        cfg = Config.from_dict(run.read_config(), where=str(run.path / "config.json"))
    elif (run.path / "config.json").exists():
        raise SystemExit(f"{run.path} already holds a run: resume it with `fedcollm run --resume {run.path}` "
                         f"or choose another directory with --set run.out_dir=...")
    else:
        run.write_config(cfg.to_json())
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)

    wb = Workbench.build(cfg)
    print(f"data: {wb.split.describe()}; eval items: "
          + ", ".join(f"{t} {len(v)}" for t, v in wb.eval_sets.items()), flush=True)
    for method in cfg.run.methods:
        run_method(wb, method, run)

    adapter, base = count_parameters(wb.slm)
    fed_metrics = run.read_metrics("fedcollm") or run.read_metrics("fedavg")
    blob = len(pack(Payload(wb.slm_init, 1)))
    communication = {
        "slm_params": base, "adapter_params": adapter, "adapter_percent": 100.0 * adapter / base,
        "llm_adapter_params": count_parameters(wb.llm)[0], "payload_params": num_params(wb.slm_init),
        "bytes_up_per_round": fed_metrics[-1]["bytes_up"] if fed_metrics else blob * cfg.federation.clients,
        "bytes_down_per_round": fed_metrics[-1]["bytes_down"] if fed_metrics else blob * cfg.federation.clients,
    }
    extra_timing = {}
    if "fedcollm" in cfg.run.methods and cfg.distill.steps:
        seed = unit_seed(cfg.run.seed, 1, -1)
        steps = min(cfg.distill.steps, 5)
        extra_timing = {"fwd_bwd_f_s": time_fwd_bwd(wb.llm, wb.aux_data, cfg.distill.batch_size, steps, seed),
                        "fwd_bwd_g_s": time_fwd_bwd(wb.slm, wb.aux_data, cfg.distill.batch_size, steps, seed)}
    setting = {"llm": cfg.model.llm, "slm": cfg.model.slm, "clients": cfg.federation.clients,
               "rounds": cfg.federation.rounds, "limit": cfg.data.eval_limit, "seed": cfg.run.seed,
               "local_epochs": cfg.federation.local_epochs, "distill_steps": cfg.distill.steps,
               "kd_weight": cfg.distill.kd_weight, "kl_direction": cfg.distill.kl_direction,
               "partition": cfg.data.partition, "train_per_task": cfg.data.train_per_task,
               "client_examples": [len(c) for c in wb.split.clients], "aux_examples": len(wb.split.aux),
               "batch_size": cfg.federation.batch_size, "dtype": str(next(wb.slm.parameters()).dtype),
               "torch_threads": torch.get_num_threads(), "methods": cfg.run.methods}
    results = build_results(run, setting, communication, extra_timing)
    print(write_report(run, results))
    print(f"run directory: {run.path}")
    return results


def cmd_run(args) -> None:
    if args.resume:
        cfg = Config.from_dict(json.loads((Path(args.resume) / "config.json").read_text()))
        cfg.run.out_dir = args.resume
        run_experiment(cfg, resume=True)
        return
    cfg = load_config(args.config, args.set, args.limit)
    if args.out:
        cfg.run.out_dir = args.out
    run_experiment(cfg)


def cmd_derive(args) -> None:
    from fedcollm.models.derive import derive_slm

    cfg = load_config(args.config, args.set)
    derive = cfg.derive
    if args.layers:
        derive.layers = args.layers
    derive_slm(args.base, derive, cfg.data.data_dir)


def cmd_eval(args) -> None:
    from fedcollm.data.tasks import load_eval_split
    from fedcollm.evaluate import evaluate_tasks
    from fedcollm.models.derive import resolve_model_dir
    from fedcollm.models.loading import load_model, load_tokenizer, resolve_device, resolve_dtype

    cfg = load_config(args.config, args.set, args.limit)
    device = resolve_device(cfg.model.device)
    model_dir = resolve_model_dir(args.model, cfg.derive, cfg.data.data_dir)
    model = load_model(model_dir, resolve_dtype(cfg.model.dtype, device), device)
    if args.adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, args.adapter)
    tokenizer = load_tokenizer(model_dir)
    sets = {t: load_eval_split(cfg.data.data_dir, t, cfg.data.eval_limit) for t in cfg.data.tasks}
    res = evaluate_tasks(model, tokenizer, sets, cfg.model.max_length, cfg.run.eval_batch_size, args.model)
    for task, m in res.items():
        print(f"{task:15s} acc {m['acc']:.4f}  acc_norm {m['acc_norm']:.4f}  (n={m['n']})")


def cmd_report(args) -> None:
    from fedcollm.report import write_report
    from fedcollm.runs import RunDir

    run = RunDir(args.run_dir)
    results = json.loads((run.path / "results.json").read_text())
    print(write_report(run, results))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="fedcollm", description="Federated co-tuning of an LLM with clients' SLMs")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command")

    def common(p):
        p.add_argument("--config", help="TOML config (default: the embedded demo config)")
        p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                       help="override a config field, e.g. --set federation.rounds=3 (repeatable)")
        p.add_argument("--limit", type=int, help="evaluate on the first N items per task (= --set data.eval_limit=N)")

    p = sub.add_parser("run", help="run the configured methods (default: the embedded FedCoLLM demo)")
    common(p)
    p.add_argument("--out", help="run directory (overrides run.out_dir)")
    p.add_argument("--resume", metavar="DIR", help="continue an interrupted run from its last completed round")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("derive-slm", help="derive a same-vocabulary SLM from a registry LLM (cached)")
    common(p)
    p.add_argument("--base", default="smollm2-135m")
    p.add_argument("--layers", type=int, default=0, help="layers to keep (default: derive.layers)")
    p.set_defaults(func=cmd_derive)

    p = sub.add_parser("eval", help="zero-shot multiple-choice accuracy of one model (optionally + adapter)")
    common(p)
    p.add_argument("model", help="registry name, derived:BASE:N, HF dir or .gguf")
    p.add_argument("--adapter", help="peft adapter directory (e.g. RUN/fedcollm/round_002/slm)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("report", help="rebuild results.md and accuracy.png from RUN/results.json")
    p.add_argument("run_dir")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("config-doc", help="print the reference of every config knob")
    p.set_defaults(func=lambda a: print(describe()))

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not args.command:
        args = parser.parse_args(["run"] + (argv or sys.argv[1:]))
    try:
        args.func(args)
    except ConfigError as err:
        raise SystemExit(f"config error: {err}") from err


if __name__ == "__main__":
    main()
