"""`fedcollm run | derive-slm | eval | report | export | config-doc`."""

from __future__ import annotations

import argparse
import logging
import sys
import time
import traceback
from pathlib import Path

from fedcollm.config import describe
from fedcollm.errors import ConfigError, FedcollmError
from fedcollm.experiment import load_config, resume_experiment, run_experiment

log = logging.getLogger("fedcollm")


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
    from fedcollm.evaluate import eval_length, evaluate_tasks
    from fedcollm.models.derive import resolve_model_dir
    from fedcollm.models.loading import (
        load_model,
        load_tokenizer,
        resolve_device,
        resolve_dtype,
    )
    from fedcollm.models.lora import load_peft_adapter

    cfg = load_config(args.config, args.set, args.limit)
    sets = {t: load_scored_split(t, spec, cfg.data) for t, spec in cfg.task_specs().items()}
    device = resolve_device(cfg.model.device)
    model_dir = resolve_model_dir(args.model, cfg.derive, cfg.data.data_dir)
    model = load_model(model_dir, resolve_dtype(cfg.model.dtype, device, model_dir), device, cfg.model.quantize)
    if args.adapter:
        model = load_peft_adapter(model, Path(args.adapter))
    tokenizer = load_tokenizer(model_dir)
    res = evaluate_tasks(model, tokenizer, sets, cfg, args.model)
    print(f"evaluation length {eval_length(cfg, model, tokenizer)} tokens (run.eval_max_length); truncated = items "
          f"scored on text cut to it")
    for task, m in res.items():
        shown = ("acc", "acc_norm") if m["metric"] == "acc" else cfg.task_specs([task])[task].metrics
        print(f"{task:15s} " + "  ".join(f"{k} {m[k]:.4f}" for k in shown) + f"  (n={m['n']}, "
              f"truncated={m['truncated']})")


def cmd_report(args) -> None:
    from fedcollm.report import load_results, write_report
    from fedcollm.runs import RunDir

    run = RunDir(args.run_dir)
    print(write_report(run, load_results(run)))


def cmd_export(args) -> None:
    from fedcollm.export.run import export_run

    out = export_run(args.run_dir, args.method, args.model, args.client, args.round, args.formats, args.gguf_types,
                     args.out)
    print(f"exported to {out} (README.md there says how to load each file)")


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

    p = sub.add_parser("export", help="one adapter of a finished run as a peft adapter with its base, a merged "
                       "Hugging Face model and GGUF files (see README: Take the model home)")
    p.add_argument("run_dir")
    p.add_argument("--method", help="default: the run's co-tuning method (fedcollm or fedmkt) when it has one")
    p.add_argument("--model", choices=("slm", "llm"), default="slm")
    p.add_argument("--client", type=int, metavar="K", help="client K's own SLM (methods that keep one per client)")
    p.add_argument("--round", type=int, metavar="R", help="default: the last completed round")
    p.add_argument("--formats", default="adapter,merged,gguf", help="comma-separated: adapter, merged, gguf")
    p.add_argument("--gguf-types", default="f16,q8_0", help="comma-separated: f16, q8_0, q4_0")
    p.add_argument("--out", help="default: RUN/export/<method>-<model>[-client<K>]-r<round>")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("clientapp-worker", help="serve the Flower ClientApp of a SuperNode started with "
                       "--isolation process, in one long-lived process (see README: Run across machines)")
    p.add_argument("--runtime-api-address", default="127.0.0.1:9094",
                   help="the SuperNode's runtime API (its --port), default 127.0.0.1:9094")
    p.add_argument("--root-certificates", help="CA certificate of the runtime API when it serves TLS")
    p.set_defaults(func=cmd_clientapp_worker)

    p = sub.add_parser("config-doc", help="print the reference of every config knob")
    p.set_defaults(func=lambda a: print(describe(), end=""))  # = docs/configuration.md
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    if not args.command:  # bare `fedcollm`: list the commands (the demo is `fedcollm run`), as argparse's exit 2
        parser.print_help(sys.stderr)
        parser.exit(2, "\nfedcollm: error: name a command; `fedcollm run` runs the embedded demo\n")
    return args


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
