"""`fedcollm run | derive-slm | eval | report | config-doc`."""

from __future__ import annotations

import argparse
import logging
import sys
import time
import traceback
from importlib import resources
from pathlib import Path

from fedcollm.config import Config, describe
from fedcollm.errors import ConfigError, FedcollmError

log = logging.getLogger("fedcollm")


def default_config_path() -> Path:
    return Path(str(resources.files("fedcollm") / "configs" / "demo.toml"))


def load_config(path: str | None, overrides: list[str], limit: int | None = None) -> Config:
    if limit is not None:
        if limit < 1:
            raise ConfigError(f"--limit: must be >= 1 (items per task), got {limit}")
        overrides = overrides + [f"data.eval_limit={limit}"]
    cfg = Config.from_toml(path or default_config_path())
    return cfg.override(overrides) if overrides else cfg


def run_experiment(cfg: Config, connect=None) -> dict:
    """Start a new run in cfg.run.out_dir; nothing is written there until the data, models and clients are ready.

    `connect(wb)` returns the transport to clients that hold their own data, which the workbench then does not
    load (default: simulated clients in this process, on shards cut here).
    """
    from fedcollm.runs import RunDir
    from fedcollm.workbench import Workbench

    _refuse_secagg_in_process(cfg, connect)
    run = RunDir(cfg.run.out_dir)
    run.check_fresh()
    _set_threads(cfg)
    wb = Workbench.build(cfg, clients=connect is None)
    transport = connect(wb) if connect else None
    run.check_fresh()  # still free after the (possibly long) model preparation
    run.write_config(cfg.to_json())
    return _run_all(wb, run, transport)


def resume_experiment(path: str | Path, connect=None) -> dict:
    """Continue the run in `path` with the config it started with, after its last completed round."""
    from fedcollm.runs import RunDir
    from fedcollm.workbench import Workbench

    run = RunDir(path)
    cfg = run.load_config()
    if Path(cfg.run.out_dir).resolve() != run.path.resolve():  # the directory was moved or copied: follow it
        cfg = cfg.with_field("run.out_dir", str(run.path))
    _refuse_secagg_in_process(cfg, connect)
    _set_threads(cfg)
    wb = Workbench.build(cfg, clients=connect is None)
    return _run_all(wb, run, connect(wb) if connect else None)


def _refuse_secagg_in_process(cfg: Config, connect) -> None:
    """The in-process engine has no SecAgg+: rather than run a secagg.enabled config without it, refuse."""
    if cfg.secagg.enabled and connect is None:
        raise ConfigError("secagg.enabled = true needs the Flower engine (flwr run, see README: Run across machines); "
                          "the in-process engine of `fedcollm run` would run without SecAgg+: turn it off here")


def _set_threads(cfg: Config) -> None:
    import torch

    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)


def _run_all(wb, run, transport=None) -> dict:
    """Run every configured method and write results.json / results.md / accuracy.png."""
    import torch

    from fedcollm.algorithms.training import time_fwd_bwd, unit_seed
    from fedcollm.comm import Payload, num_params, pack
    from fedcollm.engines.inprocess import run_method
    from fedcollm.methods.base import curve_items
    from fedcollm.models.lora import count_parameters
    from fedcollm.report import build_results, write_report

    cfg = wb.cfg
    print(f"data: {wb.split.describe()}; eval items: "
          + ", ".join(f"{t} {len(v)}" for t, v in wb.eval_sets.items()), flush=True)
    for method in cfg.run.methods:
        run_method(wb, method, run, transport)

    adapter, base = count_parameters(wb.slm)
    fed_metrics = run.read_metrics("fedcollm") or run.read_metrics("fedavg")
    blob = len(pack(Payload(wb.slm_init, 1)))
    communication = {
        "slm_params": base, "adapter_params": adapter, "adapter_percent": 100.0 * adapter / base,
        "llm_adapter_params": count_parameters(wb.llm)[0], "payload_params": num_params(wb.slm_init),
        "bytes_up_per_round": fed_metrics[-1].get("bytes_up", 0) if fed_metrics else blob * cfg.federation.clients,
        "bytes_down_per_round": fed_metrics[-1].get("bytes_down", 0) if fed_metrics else blob * cfg.federation.clients,
    }
    extra_timing = {}
    if "fedcollm" in cfg.run.methods and cfg.distill.steps(len(wb.aux_data)):
        seed = unit_seed(cfg.run.seed, 1, -1)
        steps = min(cfg.distill.steps(len(wb.aux_data)), 5)
        extra_timing = {"fwd_bwd_f_s": time_fwd_bwd(wb.llm, wb.aux_data, cfg.distill.batch_size, steps, seed),
                        "fwd_bwd_g_s": time_fwd_bwd(wb.slm, wb.held("slm").public, cfg.distill.batch_size, steps,
                                                    seed)}  # D^a in the SLM's own tokens: its vocabulary may differ
    setting = {"llm": cfg.model.llm, "slm": cfg.model.slm, "clients": cfg.federation.clients,
               "rounds": cfg.federation.rounds, "limit": cfg.data.eval_limit, "curve_items": curve_items(cfg),
               "seed": cfg.run.seed, "data_dir": cfg.data.data_dir or "bundled",
               "local_epochs": cfg.federation.local_epochs, "distill_epochs": cfg.distill.epochs,
               "kd_weight": cfg.distill.kd_weight, "kl_direction": cfg.distill.kl_direction,
               "partition": cfg.data.partition, "train_per_task": cfg.data.train_per_task,
               "client_examples": ([transport.examples[n] for n in transport.client_names] if transport  # as declared
                                   else [len(c) for c in wb.split.clients]), "aux_examples": len(wb.split.aux),
               "batch_size": cfg.federation.batch_size, "dtype": str(next(wb.slm.parameters()).dtype),
               "llm_dtype": str(next(wb.llm.parameters()).dtype),
               "torch_threads": torch.get_num_threads(), "methods": cfg.run.methods,
               "sampling": {"fraction_fit": cfg.federation.fraction_fit, "min_fit_clients": cfg.federation.min_fit_clients}}
    if cfg.dp.noise_multiplier > 0:
        spent = [r["dp"]["epsilon"] for m in cfg.run.methods for r in run.read_metrics(m) if "dp" in r]
        setting["dp"] = {"noise_multiplier": cfg.dp.noise_multiplier, "clip_norm": cfg.dp.clip_norm,
                         "delta": cfg.dp.delta, "epsilon": max(spent, default=None)}
    results = build_results(run, setting, communication, extra_timing)
    print(write_report(run, results))
    print(f"run directory: {run.path}")
    return results


def cmd_run(args) -> None:
    if args.resume:
        given = [flag for flag, value in (("--config", args.config), ("--set", args.set), ("--limit", args.limit),
                                          ("--out", args.out)) if value]
        if given:
            raise ConfigError(f"{', '.join(given)} cannot be combined with --resume: a resumed run continues with "
                              f"the config it started with ({Path(args.resume) / 'config.json'})")
        resume_experiment(args.resume)
        return
    cfg = load_config(args.config, args.set, args.limit)
    if args.out is not None:
        cfg = cfg.with_field("run.out_dir", args.out, where="--out")
    run_experiment(cfg)


def cmd_derive(args) -> None:
    from fedcollm.models.derive import derive_slm

    if args.layers < 1:
        raise ConfigError(f"--layers: must be >= 1, got {args.layers}")
    cfg = load_config(args.config, args.set)
    derive_slm(args.base, args.layers, cfg.derive, cfg.data.data_dir)


def cmd_eval(args) -> None:
    from fedcollm.data.tasks import load_scored_split
    from fedcollm.evaluate import evaluate_tasks
    from fedcollm.models.derive import resolve_model_dir
    from fedcollm.models.loading import (
        load_model,
        load_tokenizer,
        resolve_device,
        resolve_dtype,
    )

    cfg = load_config(args.config, args.set, args.limit)
    sets = {t: load_scored_split(t, spec, cfg.data) for t, spec in cfg.task_specs().items()}
    device = resolve_device(cfg.model.device)
    model_dir = resolve_model_dir(args.model, cfg.derive, cfg.data.data_dir)
    model = load_model(model_dir, resolve_dtype(cfg.model.dtype, device, model_dir), device)
    if args.adapter:
        model = load_peft_adapter(model, Path(args.adapter))
    tokenizer = load_tokenizer(model_dir)
    res = evaluate_tasks(model, tokenizer, sets, cfg, args.model)
    for task, m in res.items():
        shown = ("acc", "acc_norm") if m["metric"] == "acc" else cfg.task_specs([task])[task].metrics
        print(f"{task:15s} " + "  ".join(f"{k} {m[k]:.4f}" for k in shown) + f"  (n={m['n']})")


def load_peft_adapter(model, folder: Path):
    """`model` with the peft adapter saved in `folder`; a missing, damaged, non-finite or ill-fitting one is refused."""
    from peft import PeftModel

    from fedcollm.errors import RunDirError
    from fedcollm.runs import load_adapter_file

    if not (folder / "adapter_config.json").is_file():
        raise RunDirError(f"{folder}: no adapter_config.json, so this is not a peft adapter folder "
                          f"(e.g. RUN/fedcollm/round_002/slm)")
    load_adapter_file(folder / "adapter_model.safetensors")  # readable and finite before peft touches it
    try:
        return PeftModel.from_pretrained(model, folder)
    except (RuntimeError, ValueError, KeyError, OSError) as err:  # peft/torch: shape mismatch, bad config
        raise RunDirError(f"{folder}: adapter does not fit this model ({str(err).splitlines()[0][:300]})") from err


def cmd_report(args) -> None:
    from fedcollm.report import load_results, write_report
    from fedcollm.runs import RunDir

    run = RunDir(args.run_dir)
    print(write_report(run, load_results(run)))


def cmd_clientapp_worker(args) -> None:
    from fedcollm.engines.flower.worker import serve
    from fedcollm.fileio import read_bytes

    certs = (read_bytes(args.root_certificates, "--root-certificates CA certificate", ConfigError)
             if args.root_certificates else None)
    serve(args.runtime_api_address, certs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedcollm", description="Federated co-tuning of an LLM with clients' SLMs")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command")

    def common(p, limit: bool = True):
        p.add_argument("--config", help="TOML config (default: the embedded demo config)")
        p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                       help="override a config field, e.g. --set federation.rounds=3 (repeatable)")
        if limit:
            p.add_argument("--limit", type=int, help="evaluate on the first N items per task (= --set data.eval_limit=N)")

    p = sub.add_parser("run", help="run the configured methods (default: the embedded FedCoLLM demo)")
    common(p)
    p.add_argument("--out", help="run directory (overrides run.out_dir)")
    p.add_argument("--resume", metavar="DIR", help="continue an interrupted run from its last completed round")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("derive-slm", help="derive a same-vocabulary SLM from a registry LLM (cached)")
    common(p, limit=False)
    p.add_argument("--base", default="smollm2-135m")
    p.add_argument("--layers", type=int, default=10, help="decoder layers to keep")
    p.set_defaults(func=cmd_derive)

    p = sub.add_parser("eval", help="scores of one model (optionally + adapter) on the config's tasks: accuracy, or generation metrics")
    common(p)
    p.add_argument("model", help="registry name, derived:BASE:N, HF dir or .gguf")
    p.add_argument("--adapter", help="peft adapter directory (e.g. RUN/fedcollm/round_002/slm)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("report", help="rebuild results.md and accuracy.png from RUN/results.json")
    p.add_argument("run_dir")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("clientapp-worker", help="serve the Flower ClientApp of a SuperNode started with "
                       "--isolation process, in one long-lived process (see README: Run across machines)")
    p.add_argument("--runtime-api-address", default="127.0.0.1:9094",
                   help="the SuperNode's runtime API (its --port), default 127.0.0.1:9094")
    p.add_argument("--root-certificates", help="CA certificate of the runtime API when it serves TLS")
    p.set_defaults(func=cmd_clientapp_worker)

    p = sub.add_parser("config-doc", help="print the reference of every config knob")
    p.set_defaults(func=lambda a: print(describe()))
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    return parser.parse_args(["run"] + argv) if not args.command else args


def dispatch(argv: list[str] | None = None) -> None:
    """Parse and run one command; bad input raises a FedcollmError (main turns it into one line, exit 2)."""
    args = parse_args(argv)
    args.func(args)


ERROR_LOG = "errors.log"


def error_log(args: argparse.Namespace) -> Path:
    """Where a failed command's traceback goes: RUN/errors.log when it worked on a started run (a directory that
    holds config.json), else errors.log in the cache, so that a refused new run leaves its directory untouched."""
    from fedcollm.models.loading import cache_dir

    run = getattr(args, "resume", None) or getattr(args, "run_dir", None) or getattr(args, "out", None)
    if run is None and args.command == "run":
        try:
            run = load_config(args.config, args.set, args.limit).run.out_dir
        except FedcollmError:
            pass
    return Path(run) / ERROR_LOG if run and (Path(run) / "config.json").is_file() else cache_dir() / ERROR_LOG


def _fail(argv: list[str], args: argparse.Namespace, err: Exception, kind: str, code: int) -> None:
    """One line on stderr, never a traceback; the traceback is appended to `error_log` (named in the line)."""
    line = f"fedcollm: {kind}: {str(err).replace(chr(10), ' ')}"
    try:
        path = error_log(args)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8", errors="backslashreplace") as f:
            f.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} fedcollm {' '.join(argv)}\n"
                    + "".join(traceback.format_exception(err)))
        line += f" (traceback in {path})"
    except Exception as log_err:  # noqa: BLE001 - an unwritable log must not hide the error itself
        line += f" (no traceback log: {type(log_err).__name__}: {log_err})"
    print(line, file=sys.stderr)
    raise SystemExit(code) from None


def main(argv: list[str] | None = None) -> None:
    """The `fedcollm` command: bad input exits 2, a bug 1, each with one line and its traceback in `error_log`."""
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    try:
        args.func(args)
    except FedcollmError as err:
        _fail(argv, args, err, "error", 2)
    except Exception as err:  # noqa: BLE001 - a bug, or bad input no check caught: still one line, not a traceback
        _fail(argv, args, err, f"internal error ({type(err).__name__}; please report it)", 1)


if __name__ == "__main__":
    main()
