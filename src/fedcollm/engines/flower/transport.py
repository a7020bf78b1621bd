"""The server side of the Flower engine's wire: ask SuperNodes who they are, send tasks, collect replies."""

from __future__ import annotations

import logging
import time

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid

from fedcollm.comm import Payload
from fedcollm.engines.flower.records import from_record, to_record, wire_bytes
from fedcollm.errors import FederationError, InvalidUpdate

log = logging.getLogger(__name__)
PLAIN_TRAIN = "train.plain"  # plain "train" messages are SecAgg+'s: its client mod intercepts every one of them
POLL_S = 0.2


class PromptGrid:
    """A Grid whose send_and_receive looks for replies every POLL_S seconds instead of Flower's fixed 3 s (with
    a few messages per round, four under SecAgg+, 3 s polls add seconds of idle time to every round), and counts
    the bytes of everything it sends and receives, so that SecAgg+'s four stages are measured on the wire too."""

    def __init__(self, grid: Grid):
        self._grid = grid
        self.bytes_down = self.bytes_up = 0

    def __getattr__(self, name: str):
        return getattr(self._grid, name)

    def send_and_receive(self, messages, *, timeout: float | None = None) -> list[Message]:
        messages = list(messages)
        self.bytes_down += sum(wire_bytes(m.content) for m in messages)
        pending = set(self._grid.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while pending:
            got = list(self._grid.pull_messages(pending))
            replies += got
            pending -= {m.metadata.reply_to_message_id for m in got}
            if not pending or (deadline is not None and time.monotonic() >= deadline):
                break
            time.sleep(POLL_S)
        self.bytes_up += sum(wire_bytes(m.content) for m in replies if m.has_content())
        return replies


class FlowerTransport:
    """Reach the clients (SuperNodes) through a Flower Grid; a client that does not answer in time is a dropout."""

    def __init__(self, grid: Grid, setup: dict, expected: int, minimum: int, timeout: float, setup_timeout: float,
                 context=None, secagg=None, weights_equal: bool = False):
        self.grid, self.timeout, self.context, self.secagg = PromptGrid(grid), timeout, context, secagg
        self.secure = bool(secagg and secagg.enabled)
        self.weights_equal = weights_equal
        self.examples: dict[str, int] = {}
        self.node_of = self._discover(setup, expected, minimum, setup_timeout)
        self.client_names = sorted(self.node_of, key=lambda n: int(n.split("_")[-1]))

    def _exchange(self, messages: list[Message], timeout: float) -> list[tuple[int, Message]]:
        """(destination node, reply) pairs; error replies made up by the SuperLink are matched by message id."""
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        sent_to = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}
        return [(sent_to.get(r.metadata.reply_to_message_id, r.metadata.src_node_id), r) for r in replies]

    def _discover(self, setup: dict, expected: int, minimum: int, timeout: float) -> dict[str, int]:
        """Wait for `expected` SuperNodes, send each the run's setup, learn its client name from its reply."""
        deadline = time.monotonic() + timeout
        nodes = list(self.grid.get_node_ids())
        while len(nodes) < expected and time.monotonic() < deadline:
            time.sleep(1.0)
            nodes = list(self.grid.get_node_ids())
        content = RecordDict({"setup": ConfigRecord(setup)})
        messages = [self.grid.create_message(content, "query", nid, "setup") for nid in nodes]
        node_of: dict[str, int] = {}
        for nid, reply in self._exchange(messages, max(deadline - time.monotonic(), 1.0)):
            if reply.has_error():
                log.warning("SuperNode %d failed its setup: %s", nid, reply.error.reason)
                continue
            name = str(reply.content.config_records["hello"]["client"])
            if name in node_of:
                raise FederationError(f"SuperNodes {node_of[name]} and {nid} both claim to be {name}; give each a "
                                      f"distinct partition-id")
            node_of[name] = nid
            self.examples[name] = int(reply.content.config_records["hello"]["examples"])
        if len(node_of) < minimum:
            raise FederationError(f"only {len(node_of)} of federation.clients = {expected} clients answered the setup "
                                  f"within {timeout:.0f} s (federation.min_fit_clients = {minimum}); answered: "
                                  f"{sorted(node_of) or 'none'}")
        log.info("clients: %s", ", ".join(f"{n} (node {i})" for n, i in sorted(node_of.items())))
        return node_of

    def fit(self, tasks: dict[str, Payload], round_idx: int,
            method: str) -> tuple[dict[str, Payload | InvalidUpdate], int, int]:
        connected = set(self.grid.get_node_ids())
        gone = sorted(name for name in tasks if self.node_of[name] not in connected)
        if gone:
            log.warning("round %d: %s no longer connected (dropped out)", round_idx, ", ".join(gone))
        messages = {name: self.grid.create_message(to_record(task, round=round_idx, method=method),
                                                   PLAIN_TRAIN, self.node_of[name],
                                                   str(round_idx))
                    for name, task in tasks.items() if name not in gone}
        name_of = {nid: name for name, nid in self.node_of.items()}
        replies: dict[str, Payload | InvalidUpdate] = {}
        bytes_up = 0
        for nid, reply in self._exchange(list(messages.values()), self.timeout):
            name = name_of.get(nid, f"node {nid}")
            if reply.has_error():
                if reply.error.code == ErrorCode.NODE_UNAVAILABLE:  # the SuperLink says the node is gone
                    continue  # a dropout, reported below like a reply that never came
                replies[name] = InvalidUpdate(f"client {name}: failed this round ({reply.error.reason})")
                continue
            bytes_up += wire_bytes(reply.content)
            replies[name] = from_record(reply.content, name)
        for name in set(tasks) - set(replies):
            log.warning("round %d: client %s did not answer within %.0f s (dropped out)", round_idx, name,
                        self.timeout)
        return replies, sum(wire_bytes(m.content) for m in messages.values()), bytes_up

    def fit_secure(self, task: Payload, names: list[str], round_idx: int) -> tuple[Payload | None, list[str], dict]:
        """One SecAgg+ round over `names`: the weighted average of their adapters (weights = shard sizes, or
        equal under DP) and the names it covers; the server never holds an individual adapter."""
        from fedcollm.engines.flower.secagg import secure_round

        connected = set(self.grid.get_node_ids())
        chosen = {self.node_of[n] for n in names if self.node_of[n] in connected}
        max_weight = 1.0 if self.weights_equal else float(max(self.examples[n] for n in names))
        self.grid.bytes_down = self.grid.bytes_up = 0
        average, seen = secure_round(self.grid, self.context, task.tensors, chosen, round_idx, self.secagg, max_weight)
        name_of = {nid: name for name, nid in self.node_of.items()}
        contributors = sorted((name_of[nid] for nid in seen.pop("secagg_contributors")),
                              key=self.client_names.index)
        seen |= {"bytes_down": self.grid.bytes_down, "bytes_up": self.grid.bytes_up}  # all four SecAgg+ stages
        count = len(contributors) if self.weights_equal else sum(self.examples[n] for n in contributors)
        return (Payload(average, count) if average is not None else None), contributors, seen
