"""The Flower ServerApp: holds the LLM, D^a and the run directory, drives the same method objects and round loop
as the in-process engine, and reaches the clients only through Flower messages.

It holds no client's rows: D^a is the train splits of data.aux_tasks (required here), the evaluation sets come
from the tasks' eval splits, and each client's example count is what its setup reply declares. Methods that
train on the pooled client data on the server (Centralized) are refused.

Run config keys (pyproject `[tool.flwr.app.config]` or `flwr run --run-config`):
  config   path of a fedcollm TOML config on the server ("" = the embedded demo config)
  set      fedcollm overrides, separated by ";" (e.g. "federation.rounds=3;data.eval_limit=50")
  out-dir  run directory on the server (required)
  resume   true to continue the run in out-dir after its last completed round
  timeout  seconds to wait for each round's replies (a client that has not answered by then is a dropout)
  setup-timeout  seconds to wait for the SuperNodes to connect and load their SLM and shard
"""

from __future__ import annotations

import logging

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedcollm.engines.flower.transport import FlowerTransport
from fedcollm.experiment import load_config, resume_experiment, run_experiment

log = logging.getLogger(__name__)
app = ServerApp()


def _log_to_console() -> None:
    """`flwr-serverapp` sets up only Flower's logger; without a handler of fedcollm's own, its round, client and
    dropout lines would never reach `flwr log` (only warnings, bare, through Python's last-resort handler)."""
    ours = logging.getLogger("fedcollm")
    if not ours.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        ours.addHandler(handler)
        ours.setLevel(logging.INFO)
        ours.propagate = False  # Flower's handlers sit on the root's path too: no line twice


@app.main()
def main(grid: Grid, context: Context) -> None:
    _log_to_console()
    rc = context.run_config
    timeout, setup_timeout = float(rc.get("timeout", 600)), float(rc.get("setup-timeout", 900))
    if rc.get("resume", False):
        cfg = None
        out = str(rc["out-dir"])
    else:
        overrides = [item for item in str(rc.get("set", "")).split(";") if item.strip()]
        cfg = load_config(str(rc.get("config", "")) or None, overrides).with_field("run.out_dir", str(rc["out-dir"]),
                                                                                   where="run config out-dir")

    def connect(wb) -> FlowerTransport:
        setup = {"config": wb.cfg.to_json()}
        fed = wb.cfg.federation
        return FlowerTransport(grid, setup, fed.clients, fed.min_fit_clients, timeout, setup_timeout, context,
                               wb.cfg.secagg, weights_equal=wb.cfg.dp.noise_multiplier > 0, federation=fed)

    if cfg is None:
        log.info("resuming the run in %s (run %d) after its last completed round", out, context.run_id)
        resume_experiment(out, connect)
    else:
        run_experiment(cfg, connect)
