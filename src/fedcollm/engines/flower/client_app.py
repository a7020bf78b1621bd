"""The Flower ClientApp: one client's SLM (model.client_slms[K] where set, else model.slm) with its own tokenizer,
and its private shard; it never receives the LLM, the LLM's tokenizer or D^a.

Each SuperNode says which client it is with `--node-config "partition-id=K num-partitions=N"`. By default
the client cuts shard K from the train data exactly as the in-process engine does (same seed, same split).
With `data-config=/path/mine.toml` in its node config, the client instead trains on the train splits of the
tasks that file's `[data]` and `[tasks.NAME]` tables declare, read from its own disk (its own task, too).
"""

from __future__ import annotations

import json
import logging

import numpy as np
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common import (
    Code,
    FitRes,
    Status,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.compat.common import recorddict_compat as compat

from fedcollm.aggregate import bound_update
from fedcollm.comm import Payload
from fedcollm.config import Config
from fedcollm.data.batching import SFTData
from fedcollm.data.partition import load_train_pool, partition
from fedcollm.engines.flower.records import from_record, to_record
from fedcollm.engines.flower.secagg import from_arrays, to_arrays
from fedcollm.errors import ConfigError
from fedcollm.methods import METHOD_CLASSES, Method
from fedcollm.methods.base import ClientResources
from fedcollm.models.lora import adapter_state
from fedcollm.privacy import clip_change

log = logging.getLogger(__name__)
app = ClientApp()
_SETUP = "fedcollm"

_cache: dict[tuple[int, str], ClientResources] = {}


def _with_own_data(cfg: Config, path: str) -> Config:
    """The server's config with this client's own [data] / [tasks.NAME] tables from `path` laid over it."""
    own = Config.from_toml(path).to_dict()
    base = cfg.to_dict()
    base["data"] = own["data"]
    base["tasks"] = base["tasks"] | own["tasks"]
    return Config.from_dict(base, where=path)


def _client_side(context: Context) -> ClientResources:
    """Build (once per run and process) this client's SLM and shard (and the public set, where a configured
    method needs it) from the setup the server sent.

    Under Flower's default isolation every message is a new process and this runs each time; under
    `fedcollm clientapp-worker` the process lives on and later messages of the run find the cache."""
    setup = str(context.state.config_records[_SETUP]["config"])
    key = (context.run_id, setup)
    if key in _cache:
        return _cache[key]
    from fedcollm.models.derive import resolve_model_dir
    from fedcollm.models.loading import (
        load_model,
        load_tokenizer,
        resolve_device,
        resolve_dtype,
    )
    from fedcollm.models.lora import add_lora

    cfg = Config.from_dict(json.loads(setup), where="server setup")
    node = context.node_config
    if "partition-id" not in node:
        raise ConfigError("node config: partition-id is required (flower-supernode --node-config 'partition-id=K')")
    index = int(node["partition-id"])
    if not 0 <= index < cfg.federation.clients:
        raise ConfigError(f"node config: partition-id {index} is not in [0, federation.clients = "
                          f"{cfg.federation.clients})")
    own = str(node.get("data-config", ""))
    needs_public = any(METHOD_CLASSES[m].needs_public for m in cfg.run.methods)
    shared = None
    if needs_public or not own:  # the shared split, cut as the in-process engine cuts it
        shared = partition(load_train_pool(cfg.task_specs(cfg.data.tasks), cfg.data, cfg.run.seed),
                           cfg.federation.clients, cfg.data, cfg.run.seed)
    if own:  # all of its own rows
        cfg = _with_own_data(cfg, own)
        pool = load_train_pool(cfg.task_specs(cfg.data.tasks), cfg.data, cfg.run.seed)
        shard = [ex for examples in pool.values() for ex in examples]
    else:  # shard `index` of the shared split
        shard = shared.clients[index]
    device = resolve_device(cfg.model.device)
    slm_dir = resolve_model_dir(cfg.client_models()[index], cfg.derive, cfg.data.data_dir)
    slm = add_lora(load_model(slm_dir, resolve_dtype(cfg.model.dtype, device, slm_dir), device), cfg.model.lora,
                   cfg.run.seed + 1)
    tokenizer = load_tokenizer(slm_dir)
    max_len = cfg.model.max_length
    public = SFTData(shared.aux, tokenizer, max_len) if needs_public else None
    side = ClientResources(cfg, index, slm, tokenizer, SFTData(shard, tokenizer, max_len), public)
    _cache.clear()  # a long-lived worker (clientapp-worker) keeps one run's SLM, not one per run it ever served
    _cache[key] = side
    return side


@app.query()
def setup(msg: Message, context: Context) -> Message:
    """Keep the run's config (in the SuperNode's per-run state), load the SLM and shard, say who this client is."""
    context.state.config_records[_SETUP] = ConfigRecord({"config": msg.content.config_records["setup"]["config"]})
    side = _client_side(context)
    hello = ConfigRecord({"client": side.name, "examples": len(side.data)})
    return Message(RecordDict({"hello": hello}), reply_to=msg)


@app.train("plain")
def train(msg: Message, context: Context) -> Message:
    """Run the client hook of the method the server names in `meta` on the task; reply with what it returns
    (the server checks it). A message without a method name is plain SFT from the sent adapter."""
    side = _client_side(context)
    meta = msg.content.config_records["meta"]
    method = str(meta.get("method", Method.name))
    if method not in METHOD_CLASSES:
        raise ConfigError(f"server asked for unknown method {method!r}; known: {', '.join(METHOD_CLASSES)}")
    reply = METHOD_CLASSES[method].client_fit(side, from_record(msg.content, "server"), int(meta["round"]))
    return Message(to_record(reply), reply_to=msg)


@app.train(mods=[secaggplus_mod])
def train_secure(msg: Message, context: Context) -> Message:
    """The SecAgg+ path: the same training, in Flower's legacy FitIns/FitRes layout that secaggplus_mod masks.

    The server cannot inspect this update, so what it would enforce is enforced here before masking: the
    robustness policy (clip, never reject: the client does not withhold itself) and, under DP, the clip to C
    with an example count of 1 (equal weights).
    """
    side = _client_side(context)
    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    like = adapter_state(side.slm)
    sent = from_arrays(parameters_to_ndarrays(fitins.parameters), like)
    update = Method.client_fit(side, Payload(sent), int(fitins.config["round"]))
    theta, n = update.tensors, update.num_examples
    fed, dp = side.cfg.federation, side.cfg.dp
    theta, n = bound_update(theta, sent, n, side.name, fed.max_examples, fed.max_update_ratio, "clip")
    if dp.noise_multiplier > 0:
        theta, n = clip_change(theta, sent, dp.clip_norm), 1
    arrays = [a.astype(np.float64) for a in to_arrays(theta)]  # float64: no float32 floor on the quantization
    fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(arrays), n, {})
    return Message(compat.fitres_to_recorddict(fitres, keep_input=True), reply_to=msg)
