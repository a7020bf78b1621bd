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
import secrets
from dataclasses import replace

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

from fedcollm.comm import Payload
from fedcollm.config import Config, read_toml
from fedcollm.data.batching import SFTData
from fedcollm.data.partition import load_train_pool, partition, public_set
from fedcollm.data.tasks import Example
from fedcollm.engines.flower.records import CONFIG, from_record, to_record
from fedcollm.engines.flower.secagg import (
    CLIPPED,
    clipped_entries,
    from_arrays,
    to_arrays,
)
from fedcollm.errors import ConfigError
from fedcollm.methods import REGISTRY, method_class
from fedcollm.methods.base import ClientResources, Method
from fedcollm.models.lora import adapter_state
from fedcollm.privacy import add_noise, client_noise_std, clip_change, expected_clients

log = logging.getLogger(__name__)
app = ClientApp()
_SETUP = "fedcollm"

_cache: dict[tuple[int, str], ClientResources] = {}


def _with_own_data(cfg: Config, path: str) -> Config:
    """The server's config with this client's own [data] / [tasks.NAME] tables from `path` laid over it. The file
    must name its tasks (else the defaults would replace the server's unseen) and hold no other table (the
    server's config decides everything else, so it would be ignored)."""
    tables = read_toml(path)
    others = sorted(set(tables) - {"data", "tasks"})
    if others:
        raise ConfigError(f"{path}: a data-config holds only [data] and [tasks.NAME] tables, but it has [{others[0]}], "
                          f"which the server's config decides; remove it")
    own = Config.from_dict(tables, where=path).to_dict()
    if "tasks" not in tables.get("data", {}):
        raise ConfigError(f"{path}: a data-config must name the tasks this client trains on ([data] tasks = [...]); "
                          f"without it the client would train on the default tasks, not the server's")
    base = cfg.to_dict()
    base["data"] = own["data"]
    base["tasks"] = base["tasks"] | own["tasks"]
    return Config.from_dict(base, where=path)


def _client_rows(cfg: Config, index: int, own: str,
                 needs_public: bool) -> tuple[Config, list[Example], list[Example] | None]:
    """This client's config, training rows and (where a method needs it) D^a.

    With `own` (a data-config path): every train row of the tasks that file declares, from its own disk; else
    shard `index` cut from the data.tasks pool exactly as the in-process engine cuts it. D^a is the train rows
    of data.aux_tasks, read from the client's data folder, or where that is empty the pooled split's cut."""
    data, seed = cfg.data, cfg.run.seed
    split = None
    if not own or (needs_public and not data.aux_tasks):  # the shared split, cut as the in-process engine cuts it
        split = partition(load_train_pool(cfg.task_specs(data.tasks), data, seed), cfg.federation.clients, data, seed)
    if own:  # all of its own rows
        cfg = _with_own_data(cfg, own)
        pool = load_train_pool(cfg.task_specs(cfg.data.tasks), cfg.data, seed)
        shard = [ex for examples in pool.values() for ex in examples]
    else:
        shard = split.clients[index]
    if not needs_public:
        return cfg, shard, None
    if data.aux_tasks:
        return cfg, shard, public_set(cfg.task_specs(data.aux_tasks), replace(data, data_dir=cfg.data.data_dir), seed)
    return cfg, shard, split.aux


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
    index = node["partition-id"]
    if type(index) is not int:
        raise ConfigError(f"node config: partition-id must be a whole number (--node-config 'partition-id=K'), "
                          f"got {type(index).__name__} {index!r}")
    if not 0 <= index < cfg.federation.clients:
        raise ConfigError(f"node config: partition-id {index} is not in [0, federation.clients = "
                          f"{cfg.federation.clients})")
    needs_public = any(method_class(m).needs_public for m in cfg.run.methods)
    cfg, shard, public_rows = _client_rows(cfg, index, str(node.get("data-config", "")), needs_public)
    device = resolve_device(cfg.model.device)
    slm_dir = resolve_model_dir(cfg.client_models()[index], cfg.derive, cfg.data.data_dir)
    slm = add_lora(load_model(slm_dir, resolve_dtype(cfg.model.dtype, device, slm_dir), device, cfg.model.quantize),
                   cfg.model.lora, cfg.run.seed + 1)
    tokenizer = load_tokenizer(slm_dir)
    max_len = cfg.model.max_length
    public = SFTData(public_rows, tokenizer, max_len) if needs_public else None
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
    meta = msg.content.config_records[CONFIG]
    method = str(meta.get("method", Method.name))
    if method not in REGISTRY:
        raise ConfigError(f"server asked for unknown method {method!r}; known: {', '.join(REGISTRY)}")
    reply = method_class(method).client_fit(side, from_record(msg.content, "server"), int(meta["round"]))
    return Message(to_record(reply), reply_to=msg)


@app.train(mods=[secaggplus_mod])
def train_secure(msg: Message, context: Context) -> Message:
    """The SecAgg+ path: the same training, in Flower's legacy FitIns/FitRes layout that secaggplus_mod masks; what
    is masked is the change from the adapter sent (the server adds the mean change back).

    The server cannot inspect this update, so what it would enforce is enforced here before masking: the
    robustness policy (clip, never reject: the client does not withhold itself) and, under DP, the clip to C and
    equal weights. The weight it reports is the weight element the server assigned from the declared counts (at
    most secagg.quantization_range, so the summed elements cannot wrap). Under dp.mode = distributed the client
    then adds its share of the noise, drawn from OS entropy: the run seed is known to the server. How many entries
    Flower's clip to +-secagg.clipping_range changes is sent in the clear as a count, or only logged here under DP
    (a per-client count is not noised).
    """
    side = _client_side(context)
    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    like = adapter_state(side.slm)
    sent = from_arrays(parameters_to_ndarrays(fitins.parameters), like)
    update = Method.client_fit(side, Payload(sent), int(fitins.config["round"]))
    sent = {k: v.double() for k, v in sent.items()}  # float64 throughout: no float32 floor on the quantization
    theta = {k: v.double() for k, v in update.tensors.items()}
    fed, dp, levels = side.cfg.federation, side.cfg.dp, side.cfg.secagg.quantization_range
    if fed.max_update_norm > 0:  # the median rule needs the round's other updates, which nobody here sees
        theta = clip_change(theta, sent, fed.max_update_norm)
    element = min(int(fitins.config["weight"]), levels)
    if dp.noise_multiplier > 0:
        theta, element = clip_change(theta, sent, dp.clip_norm), levels
    change = {k: theta[k] - sent[k] for k in sent}
    if dp.noise_multiplier > 0 and dp.mode == "distributed":
        sampled = expected_clients(dp, fed.clients, fed.fraction_fit, fed.min_fit_clients)
        change = add_noise(change, client_noise_std(dp, fed.clients, sampled), secrets.randbits(64))
    arrays = to_arrays(change)
    clipped = clipped_entries(arrays, element, side.cfg.secagg)
    if clipped:
        log.warning("client %s: %d entries of the upload clipped to +-secagg.clipping_range = %g", side.name,
                    clipped, side.cfg.secagg.clipping_range)
    metrics = {} if dp.noise_multiplier > 0 else {CLIPPED: clipped}
    fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(arrays), element, metrics)
    return Message(compat.fitres_to_recorddict(fitres, keep_input=True), reply_to=msg)
