"""Running an experiment, whatever engine reaches the clients: load a config, start or resume a run directory,
run every configured method and write the results. `fedcollm run` and the Flower ServerApp both call it."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from fedcollm.config import Config
from fedcollm.errors import ConfigError


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
    from fedcollm.methods import REGISTRY, headline
    from fedcollm.methods.base import curve_items
    from fedcollm.models.lora import count_parameters
    from fedcollm.report import build_results, write_report

    cfg = wb.cfg
    print(f"data: {wb.split.describe()}; eval items: "
          + ", ".join(f"{t} {len(v)}" for t, v in wb.eval_sets.items()), flush=True)
    for method in cfg.run.methods:
        run_method(wb, method, run, transport)

    adapter, base = count_parameters(wb.slm)
    # a round's bytes as logged by a method whose clients exchange only the shared adapter (else: its size)
    fed_metrics = next((r for m in cfg.run.methods if REGISTRY[m].shares_adapter is True
                        and (r := run.read_metrics(m))), [])
    blob = len(pack(Payload(wb.slm_init, 1)))
    communication = {
        "slm_params": base, "adapter_params": adapter, "adapter_percent": 100.0 * adapter / base,
        "llm_adapter_params": count_parameters(wb.llm)[0], "payload_params": num_params(wb.slm_init),
        "bytes_up_per_round": fed_metrics[-1].get("bytes_up", 0) if fed_metrics else blob * cfg.federation.clients,
        "bytes_down_per_round": fed_metrics[-1].get("bytes_down", 0) if fed_metrics else blob * cfg.federation.clients,
    }
    extra_timing = {}
    if headline() in cfg.run.methods and cfg.distill.steps(len(wb.aux_data)):  # its [distill] passes, timed
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
