"""The server side of the Flower engine's wire: ask SuperNodes who they are, send tasks, collect replies."""

from __future__ import annotations

import logging
import time

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from fedcollm.comm import Payload
from fedcollm.errors import InvalidUpdate, RunDirError
from fedcollm.engines.flower.records import from_record, to_record, wire_bytes

log = logging.getLogger(__name__)


class FlowerTransport:
    """Reach the clients (SuperNodes) through a Flower Grid; a client that does not answer in time is a dropout."""

    def __init__(self, grid: Grid, setup: dict, expected: int, timeout: float):
        self.grid, self.timeout = grid, timeout
        self.node_of = self._discover(setup, expected)
        self.client_names = sorted(self.node_of, key=lambda n: int(n.split("_")[-1]))

    def _discover(self, setup: dict, expected: int) -> dict[str, int]:
        """Wait for `expected` SuperNodes, send each the run's setup, learn its client name from its reply."""
        deadline = time.monotonic() + self.timeout
        nodes = list(self.grid.get_node_ids())
        while len(nodes) < expected and time.monotonic() < deadline:
            time.sleep(1.0)
            nodes = list(self.grid.get_node_ids())
        if len(nodes) < expected:
            raise RunDirError(f"only {len(nodes)} of federation.clients = {expected} SuperNodes connected within "
                              f"{self.timeout:.0f} s")
        content = RecordDict({"setup": ConfigRecord(setup)})
        messages = [self.grid.create_message(content, "query", nid, "setup") for nid in nodes]
        node_of = {}
        for reply in self.grid.send_and_receive(messages, timeout=self.timeout):
            nid = reply.metadata.src_node_id
            if reply.has_error():
                log.warning("SuperNode %d failed its setup: %s", nid, reply.error.reason)
                continue
            name = str(reply.content.config_records["hello"]["client"])
            if name in node_of:
                raise RunDirError(f"SuperNodes {node_of[name]} and {nid} both claim to be {name}; give each a "
                                  f"distinct partition-id")
            node_of[name] = nid
        log.info("clients: %s", ", ".join(f"{n} (node {i})" for n, i in sorted(node_of.items())))
        return node_of

    def fit(self, tasks: dict[str, Payload], round_idx: int) -> tuple[dict[str, Payload | InvalidUpdate], int, int]:
        messages = {name: self.grid.create_message(to_record(task, round=round_idx), "train", self.node_of[name],
                                                   str(round_idx))
                    for name, task in tasks.items()}
        name_of = {nid: name for name, nid in self.node_of.items()}
        replies: dict[str, Payload | InvalidUpdate] = {}
        bytes_up = 0
        for reply in self.grid.send_and_receive(list(messages.values()), timeout=self.timeout):
            name = name_of.get(reply.metadata.src_node_id, f"node {reply.metadata.src_node_id}")
            if reply.has_error():
                replies[name] = InvalidUpdate(f"client {name}: failed this round ({reply.error.reason})")
                continue
            bytes_up += wire_bytes(reply.content)
            replies[name] = from_record(reply.content, name)
        for name in set(tasks) - set(replies):
            log.warning("round %d: client %s did not answer within %.0f s (dropped out)", round_idx, name,
                        self.timeout)
        return replies, sum(wire_bytes(m.content) for m in messages.values()), bytes_up
