"""Cut the tasks' train splits into the server's auxiliary set D^a and K client shards (seeded), or, with
data.aux_tasks, take D^a from tasks of its own and share every trained task's pool out to the clients."""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace

import numpy as np

from fedcollm.config import DataConfig, TaskConfig
from fedcollm.data.tasks import Example, load_train_split
from fedcollm.errors import ConfigError


@dataclass
class FederatedSplit:
    aux: list[Example]
    clients: list[list[Example]]
    pool: list[Example] = field(default_factory=list)  # the server's unlabelled questions (unlabelled_pool)

    def describe(self) -> str:
        if not self.clients:
            return f"D^a: {len(self.aux)} examples; client shards: on the clients"
        sizes = ", ".join(str(len(c)) for c in self.clients)
        pool = f"; unlabelled pool: {len(self.pool)} questions" if self.pool else ""
        return f"D^a: {len(self.aux)} examples; client shards: [{sizes}]{pool}"


def _shuffled_train(specs: dict[str, TaskConfig], cfg: DataConfig, seed: int,
                    tasks: list[str] | None) -> dict[str, list[Example]]:
    """Each named task's (default: data.tasks) trainable rows, shuffled by one seeded generator, task by task."""
    rng = random.Random(seed)
    shuffled = {}
    for task in cfg.tasks if tasks is None else tasks:
        shuffled[task] = load_train_split(task, specs[task], cfg.data_dir)
        rng.shuffle(shuffled[task])
    return shuffled


def load_train_pool(specs: dict[str, TaskConfig], cfg: DataConfig, seed: int,
                    tasks: list[str] | None = None) -> dict[str, list[Example]]:
    """Each named task's (default: data.tasks) train split, shuffled (seeded) and cut to data.train_per_task."""
    return {task: examples[:cfg.train_per_task] if cfg.train_per_task else examples
            for task, examples in _shuffled_train(specs, cfg, seed, tasks).items()}


def unlabelled_pool(specs: dict[str, TaskConfig], cfg: DataConfig, seed: int) -> list[Example]:
    """The server's unlabelled public pool: per task of data.tasks, up to data.public_pool of the train rows past
    data.train_per_task (rows no client shard, D^a or validation holdout holds), with their answers removed
    (answer = -1). Distillation uses them through soft targets only."""
    pool = [replace(ex, answer=-1) for examples in _shuffled_train(specs, cfg, seed, None).values()
            for ex in examples[cfg.train_per_task:cfg.train_per_task + cfg.public_pool]]
    if not pool:
        raise ConfigError(f"data.public_pool: the tasks hold no train rows past data.train_per_task = "
                          f"{cfg.train_per_task}, so the unlabelled pool would be empty")
    random.Random(seed + 4).shuffle(pool)
    return pool


def public_set(specs: dict[str, TaskConfig], cfg: DataConfig, seed: int) -> list[Example]:
    """D^a declared apart (data.aux_tasks): those tasks' train rows, shuffled with a generator of its own, so
    that the clients' shards do not depend on it and a server builds it without opening a client task's file."""
    aux = [ex for examples in load_train_pool(specs, cfg, seed, cfg.aux_tasks).values() for ex in examples]
    if not aux:
        raise ConfigError(f"data.aux_tasks: {', '.join(cfg.aux_tasks)} hold no train rows, so D^a would be empty")
    random.Random(seed + 3).shuffle(aux)
    return aux


def _even_chunks(items: list, n: int) -> list[list]:
    return [items[i::n] for i in range(n)]


def partition(pool: dict[str, list[Example]], n_clients: int, cfg: DataConfig, seed: int) -> FederatedSplit:
    """D^a cut from `pool` by data.aux_fraction and the client shards of the rest; with data.aux_tasks the
    shards share out all of `pool` and D^a is left empty here (see public_set)."""
    rng = random.Random(seed + 1)
    aux, rest = [], {}
    for task, examples in pool.items():  # every task contributes aux_fraction of its examples to D^a
        n_aux = 0 if cfg.aux_tasks else round(len(examples) * cfg.aux_fraction)
        aux += examples[:n_aux]
        rest[task] = examples[n_aux:]
    rng.shuffle(aux)
    clients: list[list[Example]] = [[] for _ in range(n_clients)]
    if cfg.partition == "iid":
        everything = [ex for examples in rest.values() for ex in examples]
        rng.shuffle(everything)
        clients = _even_chunks(everything, n_clients)
    elif cfg.partition == "dirichlet":
        np_rng = np.random.default_rng(seed + 2)
        for examples in rest.values():
            shares = np_rng.dirichlet([cfg.dirichlet_alpha] * n_clients)
            cuts = (np.cumsum(shares)[:-1] * len(examples)).round().astype(int)
            for k, part in enumerate(np.split(np.arange(len(examples)), cuts)):
                clients[k] += [examples[i] for i in part]
    else:  # "task": each client holds one task (tasks shared out when clients outnumber them)
        tasks = list(rest)
        for t, task in enumerate(tasks):
            owners = [k for k in range(n_clients) if k % len(tasks) == t] or [t % n_clients]
            for k, chunk in zip(owners, _even_chunks(rest[task], len(owners))):
                clients[k] += chunk
    for shard in clients:
        rng.shuffle(shard)
    empty = [k for k, shard in enumerate(clients) if not shard]
    if empty:
        raise ConfigError(f"data.partition: {cfg.partition!r} left client(s) {empty} without examples; "
                          f"use more data, fewer clients or a larger data.dirichlet_alpha")
    if not aux and not cfg.aux_tasks:
        raise ConfigError(f"data.aux_fraction: {cfg.aux_fraction} of {sum(map(len, pool.values()))} train examples "
                          f"leaves the server's D^a empty; use more data or a larger aux_fraction")
    return FederatedSplit(aux=aux, clients=clients)
