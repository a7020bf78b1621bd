"""A long-lived ClientApp runner for a SuperNode started with `--isolation process`.

Flower 1.42 runs every message in a fresh `flwr-clientapp` process: each one imports torch, transformers and peft
and loads the SLM and its shard again (about 10 s of CPU per client per message, and a SecAgg+ round is four
messages). This worker takes the place of the SuperExec + `flwr-clientapp` pair the SuperNode would otherwise
spawn: it acquires ClientApp tasks from the SuperNode's runtime API and runs each in this one process, so the
ClientApp's per-run cache (SLM, shard) lives across rounds. It runs Flower's own task steps (pull the input,
call the app, push the reply and the context) minus the process exit. Written by hand because Flower has no
long-lived ClientApp runner; it uses runtime-API helpers of the pinned flwr==1.42.0, private to Flower and
imported here alone (tests/test_structure.py names any that an upgrade moved; see docs/flower-1.42-notes.md).

It serves only the fedcollm ClientApp: it is the client's code, installed on the client's machine, exactly like
the app a SuperNode would load from the FAB.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import time

from flwr.app import Context, Error, Message
from flwr.common.constant import ErrorCode, SubStatus
from flwr.common.serde import context_from_proto
from flwr.proto.node_pb2 import Node  # pylint: disable=E0611
from flwr.proto.runtime_pb2 import (  # pylint: disable=E0611
    AcquireTaskRequest,
    PullAppMessagesRequest,
    PullTaskInputRequest,
)
from flwr.supercore.constant import TaskType
from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
from flwr.supercore.inflatable.inflatable_protobuf_utils import (
    make_confirm_message_received_fn_protobuf,
    make_pull_object_fn_protobuf,
)
from flwr.supercore.inflatable.inflatable_utils import pull_and_inflate_object_from_tree
from flwr.supercore.interceptors import (
    RuntimeTokenHttpInterceptor,
    RuntimeVersionHttpInterceptor,
)
from flwr.supercore.retry import make_simple_http_retry_invoker
from flwr.supercore.run import RunNotRunningException
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supercore.task_identity import TaskIdentity
from flwr.supernode.runtime.run_clientapp import push_message, push_task_output

log = logging.getLogger(__name__)


def _runtime_client(address: str, root_certificates: bytes | None, component: str,
                    token: str | None = None) -> RuntimeHttpClient:
    interceptors = [RuntimeVersionHttpInterceptor(component_name=component)]
    if token is not None:
        interceptors.append(RuntimeTokenHttpInterceptor(token))
    return RuntimeHttpClient.from_server_address(
        server_address=address, insecure=root_certificates is None, root_certificates=root_certificates,
        interceptors=interceptors, retry_invoker=make_simple_http_retry_invoker())


@contextlib.contextmanager
def run_may_end():
    """While a task runs, SIGINT means its run ended: abort the task, keep the worker.

    Flower's runtime client ends a task by signalling its own process: the heartbeat raises SIGINT when the
    SuperNode says the run is over, and the retry invoker sends SIGINT on a revoked token. That is right for a
    one-task `flwr-clientapp` process and would kill this worker, leaving its SuperNode without a ClientApp for
    every later run (the next run then waits for replies forever). Ctrl-C while idle still ends the worker."""
    def abort(signum, frame):
        raise RunNotRunningException

    previous = signal.signal(signal.SIGINT, abort)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


MESSAGE_PULL_TIMEOUT_S = 120.0


def pull_task_input(client: RuntimeHttpClient, timeout: float = MESSAGE_PULL_TIMEOUT_S) -> tuple[Message, Context]:
    """flwr's `run_clientapp.pull_task_input` (the message and context of the claimed task), with the message's
    objects awaited for `timeout` seconds rather than flwr's 7200.

    A SuperNode creates the task and stores the message before it pulls the message's objects from the SuperLink;
    if the run ends in between, it logs "not in RUNNING status. Ignoring message", never pulls them, and keeps the
    task pending. A ClientApp that claims it then waits two hours for objects that never come, and the tasks of
    every later run queue behind it (the resumed run of the deployment test waited for its setup this way)."""
    res = client.PullTaskInput(PullTaskInputRequest())
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = res.task_id, res.run.run_id, res.context.node_id
    context = context_from_proto(res.context)
    messages = client.PullMessages(PullAppMessagesRequest())
    if not messages.messages_list:
        raise RuntimeError("no message for this task from the SuperNode's runtime API")
    tree = messages.message_object_trees[0]
    node = Node(node_id=context.node_id)
    message = pull_and_inflate_object_from_tree(
        tree, make_pull_object_fn_protobuf(client.PullObject, node, context.run_id),
        make_confirm_message_received_fn_protobuf(client.ConfirmMessageReceived, node, context.run_id),
        return_type=Message, max_time=timeout)
    message.metadata.__dict__["_message_id"] = tree.object_id  # the deflated message does not carry its id
    return message, context


def run_task(address: str, token: str, root_certificates: bytes | None = None) -> None:
    """One ClientApp task: pull the message and context, run the app, push the reply and the new context.

    A SuperNode hands out one message and then waits for a reply before it pulls the next (flwr 1.42
    `start_client_internal._push_messages`), so a pulled message always gets one: the app's, or an error reply
    when the app raised or its run ended mid-task. The task is finished only once its reply is in; where no reply
    could be pushed, the task is left to its token's expiry, on which the SuperNode writes the error reply itself
    (its recovery for a ClientApp process that died). Finishing it instead would leave the SuperNode waiting for
    that reply forever, and every later run of the federation with it. A task whose message could not be pulled
    is finished at once: the SuperNode awaits no reply for a message it never received (see pull_task_input)."""
    from fedcollm.engines.flower.client_app import app

    client = _runtime_client(address, root_certificates, "flwr-clientapp", token)
    heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
    heartbeat.start()
    message = context = reply = ended = None
    status, details = SubStatus.FAILED, "ClientApp task failed"
    try:
        try:
            message, context = pull_task_input(client)
            reply = app(message=message, context=context)
            status, details = SubStatus.COMPLETED, ""
        except BaseException as err:  # the run's end (RunNotRunningException) too: the SuperNode still needs a reply
            details = f"{type(err)}:<'{err}'>"
            if isinstance(err, Exception):  # as flwr-clientapp does: the server gets an error reply, we go on
                log.exception("ClientApp raised")
            else:
                ended = err
            if message is not None:
                reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=details), reply_to=message)
        if message is None or _pushed(client, reply, context):  # no message: the SuperNode awaits no reply
            push_task_output(client=client, context=context, sub_status=status, details=details)
    finally:
        heartbeat.stop()
        client.close()
    if ended is not None:
        raise ended


def _pushed(client: RuntimeHttpClient, reply: Message, context) -> bool:
    try:
        push_message(client, reply, context)
        return True
    except (Exception, RunNotRunningException):  # noqa: BLE001 - a revoked token: the SuperNode replies on expiry
        log.warning("the reply could not be pushed; the SuperNode answers for this task when its token expires",
                    exc_info=True)
        return False


def serve(address: str, root_certificates: bytes | None = None, poll_interval: float = 1.0) -> None:
    """Acquire and run ClientApp tasks from the SuperNode at `address` until killed.

    Polls every second, as Flower's own SuperExec does: at 0.2 s, four idle workers and their SuperNodes took
    about 11 % of a core (measured), which slowed the server's distillation when they share its machine."""
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per poll otherwise
    acquirer = _runtime_client(address, root_certificates, "SuperExec")
    log.info("fedcollm ClientApp worker serving SuperNode runtime API %s", address)
    request = AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP.value], agentapp_fab_hashes=[])
    while True:
        try:
            res = acquirer.AcquireTask(request)
            if res.HasField("task") and res.token:
                with run_may_end():
                    run_task(address, res.token, root_certificates)
                continue
        except RunNotRunningException:  # a BaseException in flwr
            log.warning("the run of this ClientApp task ended before the task did; waiting for the next task")
        except Exception:  # noqa: BLE001 - a restarting SuperNode must not end the worker
            log.exception("ClientApp task could not be completed; waiting for the next one")
        time.sleep(poll_interval)
