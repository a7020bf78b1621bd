"""The server side of the Flower engine's wire: ask SuperNodes who they are, send tasks, collect replies."""

from __future__ import annotations

import logging
import time

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid

from fedcollm.aggregate import capped_weights
from fedcollm.comm import Payload
from fedcollm.config import FederationConfig
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
        self.arrived: dict[str, float] = {}  # message id -> when its reply (or the SuperLink's error) came

    def __getattr__(self, name: str):
        return getattr(self._grid, name)

    def send_and_receive(self, messages, *, timeout: float | None = None) -> list[Message]:
        messages = list(messages)
        self.bytes_down += sum(wire_bytes(m.content) for m in messages)
        self.arrived = {}
        pending = set(self._grid.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while pending:
            got = list(self._grid.pull_messages(pending))
            replies += got
            self.arrived |= {m.metadata.reply_to_message_id: time.monotonic() for m in got}
            pending -= {m.metadata.reply_to_message_id for m in got}
            if not pending or (deadline is not None and time.monotonic() >= deadline):
                break
            time.sleep(POLL_S)
        self.bytes_up += sum(wire_bytes(m.content) for m in replies if m.has_content())
        return replies


class FlowerTransport:
    """Reach the clients (SuperNodes) through a Flower Grid; a client that does not answer in time is a dropout."""

    def __init__(self, grid: Grid, setup: dict, expected: int, minimum: int, timeout: float, setup_timeout: float,
                 context=None, secagg=None, weights_equal: bool = False, federation: FederationConfig | None = None):
        self.grid, self.timeout, self.context, self.secagg = PromptGrid(grid), timeout, context, secagg
        self.secure = bool(secagg and secagg.enabled)
        self.weights_equal = weights_equal
        self.federation = federation or FederationConfig()  # SecAgg+ weights: max_examples, max_share
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
        log.info("clients: %s", ", ".join(f"{n} (SuperNode {i})" for n, i in sorted(node_of.items())))
        return node_of

    def fit(self, tasks: dict[str, Payload], round_idx: int,
            method: str) -> tuple[dict[str, Payload | InvalidUpdate], int, int]:
        """Every reply is decoded inside its own check, so a malformed one is that client's InvalidUpdate; a client
        without an update (gone, failed, silent) is missing from the replies and logged once, as a dropout."""
        started = time.monotonic()
        connected = set(self.grid.get_node_ids())
        lost = {name: "its SuperNode was no longer connected when the round began"
                for name in tasks if self.node_of[name] not in connected}
        messages = {name: self.grid.create_message(to_record(task, round=round_idx, method=method),
                                                   PLAIN_TRAIN, self.node_of[name],
                                                   str(round_idx))
                    for name, task in tasks.items() if name not in lost}
        name_of = {nid: name for name, nid in self.node_of.items()}
        replies: dict[str, Payload | InvalidUpdate] = {}
        bytes_up = 0
        for nid, reply in self._exchange(list(messages.values()), self.timeout):
            name = name_of.get(nid)
            if name not in messages:
                log.warning("round %d: ignored a reply from SuperNode %d, which was sent no task", round_idx, nid)
                continue
            try:
                if reply.has_error():
                    after = self.grid.arrived.get(reply.metadata.reply_to_message_id, time.monotonic()) - started
                    lost[name] = (f"its SuperNode stopped answering Flower's heartbeat (noticed {after:.0f} s into "
                                  f"the round)" if reply.error.code == ErrorCode.NODE_UNAVAILABLE else
                                  f"its ClientApp failed after {after:.0f} s ({reply.error.reason})")
                    continue
                bytes_up += wire_bytes(reply.content)
                replies[name] = from_record(reply.content, self.label(name))
            except InvalidUpdate as err:
                replies[name] = err
            except Exception as err:  # noqa: BLE001 - a peer's bytes: any failure to read them is that peer's fault
                replies[name] = InvalidUpdate(f"client {self.label(name)}: reply does not decode "
                                              f"({type(err).__name__}: {err})")
        for name in set(messages) - set(replies) - set(lost):
            lost[name] = f"no reply within the round's timeout of {self.timeout:.0f} s"
        for name in sorted(lost, key=self.client_names.index):
            log.warning("round %d: %s dropped out: %s", round_idx, self.label(name), lost[name])
        return replies, sum(wire_bytes(m.content) for m in messages.values()), bytes_up

    def label(self, name: str) -> str:
        """A client as every log line names it: its name and the SuperNode id Flower's own lines use."""
        return f"{name} (SuperNode {self.node_of[name]})"

    def fit_secure(self, task: Payload, names: list[str], round_idx: int) -> tuple[Payload | None, list[str], dict]:
        """One SecAgg+ round over `names`: sent + the weighted mean of their changes (weights: the declared example
        counts, capped as the in-process engine caps them, or equal under DP) and the names it covers; the server
        never holds an individual update. `seen` adds the round's clipped entries and quantization error bound."""
        from fedcollm.engines.flower.secagg import secure_round

        connected = set(self.grid.get_node_ids())
        chosen = [n for n in names if self.node_of[n] in connected]
        fed = self.federation
        counts = [min(self.examples[n], fed.max_examples) for n in chosen]  # as declared at setup, capped
        shares = [1.0] * len(chosen) if self.weights_equal else capped_weights(counts, fed.max_share)
        self.grid.bytes_down = self.grid.bytes_up = 0
        average, seen = secure_round(self.grid, self.context, task.tensors,
                                     {self.node_of[n]: w for n, w in zip(chosen, shares)}, round_idx, self.secagg)
        name_of = {nid: name for name, nid in self.node_of.items()}
        contributors = sorted((name_of[nid] for nid in seen.pop("secagg_contributors")),
                              key=self.client_names.index)
        seen |= {"bytes_down": self.grid.bytes_down, "bytes_up": self.grid.bytes_up}  # all four SecAgg+ stages
        count = len(contributors) if self.weights_equal else sum(min(self.examples[n], fed.max_examples)
                                                                 for n in contributors)
        return (Payload(average, count) if average is not None else None), contributors, seen
