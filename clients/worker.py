"""A warm ClientApp worker: one long-lived process that runs the tasks of one approved app bundle.

Flower's SuperExec starts a fresh ``flwr-clientapp`` process for every message
(``supercore/superexec/executor/subprocess_executor.py``), which imports torch,
Opacus and Flower again and reads the campus's tables again each time. The
code-approval gate (:mod:`clients.approval`) instead hands each task of an
approved bundle to a worker (:class:`clients.approval.WarmWorkers`), which does
for every task what ``flwr-clientapp`` does for its one
(``flwr/supernode/runtime/run_clientapp.py``: heartbeat, pull the task's input,
run the ClientApp, push its reply and the task's status) and then waits for the
next, so the ClientApp's module state (its campus data cache) lives on.

What the worker runs:

* before its first task it imports third-party libraries only
  (:data:`PRELOAD`); no edufl module. It is started as ``python -I`` on this
  file (not ``-m``), so no edufl package is imported to run it and neither the
  working folder nor this file's folder is on ``sys.path``;
* its first task binds it to that task's bundle: the FAB's SHA-256 must be the
  hash the gate approved (given on each task line), the bundle is installed
  into Flower's app folder and its ClientApp loaded from there, as
  ``flwr-clientapp`` loads it. Every edufl module then in ``sys.modules`` must
  come from the installed bundle, else the worker stops before any task runs;
  the same check runs after every task, before its reply is pushed;
* a task of any other bundle is failed without running anything.

A task that finds an edufl module from outside the bundle, or a bundle other
than the worker's, gets an error reply and the worker then exits (the gate
starts a new one for the next task).

Protocol with the gate: one task per line on standard input (``TOKEN
FAB_HASH``); on the status file descriptor the worker writes ``ready`` once
the libraries are loaded, then ``start TOKEN`` and ``done TOKEN`` around each
task. When the SuperNode answers a heartbeat with "no longer running" (the run
was stopped), only that task is stopped (:class:`TaskStopped` is raised in it);
the worker takes the next. It exits when standard input closes or the gate's
process is gone.
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import importlib
import os
import sys
import threading
import time
from pathlib import Path

__all__ = ["OBJECT_RETRY_S", "PRELOAD", "BundleMismatch", "TaskStopped", "Worker", "main", "pull_task", "runtime_client"]

PRELOAD = (
    "numpy",
    "scipy",
    "pandas",
    "pyarrow.parquet",
    "torch",
    "opacus",
    "opendp.prelude",
    "randomgen",
    "pydantic",
    "cryptography",
    "rich",
    "flwr.clientapp",
    "flwr.supernode.runtime.run_clientapp",
)
"""The third-party modules a worker imports before its first task: what edufl's ClientApp needs."""

READY = "ready"


class TaskStopped(BaseException):
    """Raised in a running task when the SuperNode says it is no longer running (a BaseException, so that
    the ClientApp's own error handling does not take it for a fault of its own)."""


class BundleMismatch(RuntimeError):
    """A task of a bundle other than the one this worker runs, or an edufl module from outside the bundle."""


def _stray_modules(project: Path) -> list[str]:
    """edufl modules in ``sys.modules`` whose file is not inside ``project`` (the installed bundle)."""
    return sorted(
        name
        for name, module in list(sys.modules.items())
        if name.split(".")[0] == "edufl"
        and getattr(module, "__file__", None)
        and not Path(module.__file__).resolve().is_relative_to(project)
    )


class Worker:
    """The worker's state: the Runtime API address, and once bound, its bundle's hash, folder and ClientApp."""

    def __init__(self, runtime_api_address: str):
        self.address = runtime_api_address
        self.fab_hash: str | None = None
        self.project: Path | None = None
        self.app = None
        self.broken = False  # a BundleMismatch was found: this process must not run another task

    def load(self, fab, run) -> None:
        """Install the bundle ``fab`` of ``run`` and load its ClientApp (the first task only)."""
        from flwr.cli.install import install_from_fab
        from flwr.clientapp.utils import get_load_client_app_fn
        from flwr.common.config import get_project_dir

        install_from_fab(fab.content, skip_prompt=True)
        self.project = get_project_dir(run.fab_id, run.fab_version, fab.hash_str).resolve()
        self.app = get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)(
            run.fab_id, run.fab_version, fab.hash_str
        )
        self.check_modules()

    def check_modules(self) -> None:
        assert self.project is not None
        if stray := _stray_modules(self.project):
            raise BundleMismatch(f"edufl modules loaded from outside the approved bundle: {', '.join(stray)}")

    def run_task(self, token: str, fab_hash: str) -> None:
        """Run one task as ``flwr-clientapp --token TOKEN`` would, then return (never exits on the task's account)."""
        from flwr.app import Error, Message
        from flwr.common.constant import ErrorCode, SubStatus
        from flwr.supercore.heartbeat import HeartbeatSender
        from flwr.supernode.runtime.run_clientapp import push_message, push_task_output

        client = runtime_client(self.address, token)
        stopped = _TaskStop()
        heartbeat = HeartbeatSender(stopped.heartbeat_fn(client))
        message = context = reply = None
        status, details = SubStatus.FAILED, "ClientApp task failed"
        try:
            stopped.arm()
            heartbeat.start()
            message, context, run, fab = pull_task(client)
            expected = self.fab_hash or fab_hash
            if expected != fab_hash or fab.hash_str != expected or hashlib.sha256(fab.content).hexdigest() != expected:
                raise BundleMismatch(f"a task of bundle {fab.hash_str}; this worker runs {expected} only")
            if self.app is None:
                self.fab_hash = fab_hash
                self.load(fab, run)
            answer = self.app(message=message, context=context)
            self.check_modules()  # before anything of the task leaves
            reply, status, details = answer, SubStatus.COMPLETED, ""
        except TaskStopped:
            reply, details = None, "task stopped: the SuperNode reported it is no longer running"
        except Exception as err:  # noqa: BLE001  as flwr-clientapp: an error reply (its reason names no data)
            self.broken = isinstance(err, BundleMismatch)
            print(f"edufl warm worker: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
            details = f"the ClientApp raised {type(err).__name__}"
            if message is not None:
                reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=details), reply_to=message)
        finally:
            stopped.disarm()
            if heartbeat.is_running:
                heartbeat.stop()
            try:
                if reply is not None and context is not None:
                    push_message(client, reply, context)
                push_task_output(client, context, status, details)
            finally:
                client.close()


class _TaskStop:
    """Stops the running task (:class:`TaskStopped` raised in the main thread) when a heartbeat is refused."""

    def __init__(self) -> None:
        self._lock, self._armed = threading.Lock(), False
        self._main = threading.main_thread().ident

    def arm(self) -> None:
        with self._lock:
            self._armed = True

    def disarm(self) -> None:
        with self._lock:
            self._armed = False

    def heartbeat_fn(self, client):
        import httpx
        from flwr.proto.runtime_pb2 import SendTaskHeartbeatRequest

        def fn() -> bool:  # Flower's make_task_heartbeat_fn_http, stopping the task instead of the process
            try:
                res = client.SendTaskHeartbeat(SendTaskHeartbeatRequest())
            except httpx.TransportError:
                return False
            except httpx.HTTPStatusError as err:
                if err.response.status_code in (503, 504):
                    return False
                raise
            if not res.success:
                with self._lock:
                    if self._armed:
                        self._armed = False
                        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(self._main), ctypes.py_object(TaskStopped))
            return True

        return fn


OBJECT_RETRY_S = 0.05
"""First wait before asking again for a part of a task's message the SuperNode has not stored yet (then twice that;
``flwr-clientapp`` waits 1 s, then 2, 4, ... up to 10: ``PULL_INITIAL_BACKOFF``, ``PULL_BACKOFF_CAP`` in
``supercore/constant.py``). The SuperNode is on this host: asking again is cheap."""


def pull_task(client):
    """The task's message, context, run and bundle (FAB), pulled through the Runtime API as ``flwr-clientapp``
    pulls them (``pull_task_input`` in ``flwr/supernode/runtime/run_clientapp.py``), except that a part of the
    message the SuperNode is still fetching from the SuperLink is asked for again after :data:`OBJECT_RETRY_S`.

    A warm worker asks as soon as the task exists; the SuperNode creates the task before it has the message's
    content, so with Flower's 1 s first wait most tasks would start a second or more late.
    """
    from flwr.app import Message
    from flwr.common.serde import context_from_proto, fab_from_proto, run_from_proto
    from flwr.proto.node_pb2 import Node
    from flwr.proto.runtime_pb2 import PullAppMessagesRequest, PullTaskInputRequest
    from flwr.supercore.inflatable.inflatable_protobuf_utils import (
        make_confirm_message_received_fn_protobuf,
        make_pull_object_fn_protobuf,
    )
    from flwr.supercore.inflatable.inflatable_utils import pull_and_inflate_object_from_tree
    from flwr.supercore.task_identity import TaskIdentity

    task = client.PullTaskInput(PullTaskInputRequest())
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = task.task_id, task.run.run_id, task.context.node_id
    context, run, fab = context_from_proto(task.context), run_from_proto(task.run), fab_from_proto(task.fab)
    listed = client.PullMessages(PullAppMessagesRequest())
    if not listed.messages_list:
        raise RuntimeError("the Runtime API holds no message for this task")
    tree, node = listed.message_object_trees[0], Node(node_id=context.node_id)
    message = pull_and_inflate_object_from_tree(
        tree,
        make_pull_object_fn_protobuf(client.PullObject, node, context.run_id),
        make_confirm_message_received_fn_protobuf(client.ConfirmMessageReceived, node, context.run_id),
        return_type=Message,
        initial_backoff=OBJECT_RETRY_S,
        backoff_cap=2 * OBJECT_RETRY_S,
    )
    message.metadata.__dict__["_message_id"] = tree.object_id  # a deflated message does not carry its own id
    return message, context, run, fab


def runtime_client(address: str, token: str, tries: int | None = None):
    """A Runtime API client acting for the task of ``token``, as ``flwr-clientapp`` builds one (plaintext on
    loopback), retrying each call ``tries`` times at most (None: Flower's default)."""
    from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient

    retry = make_simple_http_retry_invoker()
    if tries is not None:
        retry.max_tries = tries
    return RuntimeHttpClient.from_server_address(
        server_address=address,
        insecure=True,
        root_certificates=None,
        retry_invoker=retry,
        interceptors=[RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"), RuntimeTokenHttpInterceptor(token)],
    )


def _exit_with(parent_pid: int) -> None:
    """Exit this process as soon as process ``parent_pid`` is gone."""

    def watch() -> None:
        while True:
            try:
                os.kill(parent_pid, 0)
            except ProcessLookupError:
                os._exit(1)
            time.sleep(0.5)

    threading.Thread(target=watch, daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="edufl's warm ClientApp worker (started by the code-approval gate)")
    p.add_argument("--runtime-api-address", required=True)
    p.add_argument("--status-fd", type=int, required=True)
    p.add_argument("--parent-pid", type=int, required=True)
    args = p.parse_args(argv)
    _exit_with(args.parent_pid)
    for name in PRELOAD:
        importlib.import_module(name)
    worker = Worker(args.runtime_api_address)
    with os.fdopen(args.status_fd, "w", buffering=1) as status:
        status.write(f"{READY}\n")
        for line in sys.stdin:
            token, fab_hash = line.split()
            status.write(f"start {token}\n")
            try:
                worker.run_task(token, fab_hash)
            except TaskStopped:  # a refused heartbeat arriving just as the task ended
                pass
            status.write(f"done {token}\n")
            if worker.broken:
                return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
