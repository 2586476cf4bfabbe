"""Code approval: a deployed campus runs only the app bundles its data steward approved.

A Flower app bundle (FAB) is the zip of code that ``flwr run`` sends to every
campus; Flower names a run's bundle by its SHA-256, the run's ``fab_hash``.
The campus policy lists the hashes its data steward approved
(``[apps] approved_fab_hashes``, :class:`federation.policy.AppApproval`).

The check cannot live in the ClientApp: that is the bundle's own code. It is
made by the **gate**, an edufl process beside the campus's SuperNode. ``edufl
campus start`` runs ``flower-supernode --isolation process``, under which the
SuperNode starts no app process itself: it queues one task per message and
waits for a SuperExec to claim it on its Runtime API. The gate is that
SuperExec: Flower's own loop (``flwr.supercore.superexec.run_superexec``) with
:class:`GatePlugin`, a subclass of Flower's own plugin, as its plugin. Every
task it claims carries the run's ``fab_hash`` (the SuperNode stores bundles
under the SHA-256 of their content and rejects a bundle whose content does not
match); before anything is started,

* a task of an approved bundle is handed to the warm worker of that bundle
  (:class:`WarmWorkers`, :mod:`clients.worker`: one long-lived process per
  bundle that runs task after task, keeping the ClientApp and its campus data
  loaded); when no worker can take it (one that stopped is replaced at the
  next task), it is launched as Flower launches any ClientApp
  (``flwr-clientapp`` with the task's token); no dependency is ever installed;
* any other task (a bundle the policy does not list, a policy file that cannot
  be read, a task that is not a ClientApp) is answered by the gate itself,
  never by the bundle: it takes the task's input through the Runtime API as
  ``flwr-clientapp`` would (:func:`clients.worker.pull_task`), writes a
  refusal (``sent`` false, ``reason`` ``refused: ...``, ``fab_sha256``) to the
  campus audit log, prints it, and replies with an error (code ``REFUSED``)
  that the coordinator records under ``failures`` for this campus. The bundle
  is never installed or imported.

SuperNode and gate share a random secret (``--superexec-auth-secret-file``):
only the gate may claim tasks, so no other local process can start a bundle.
The gate reads the policy file at every task, so an approval added with
``edufl campus approve`` takes effect at the next message, without a restart,
and a hash removed from it stops reaching its worker at the next message. The
gate looks for tasks every 0.1 s (:data:`federation.deploy.SUPEREXEC_POLL`;
Flower's SuperExec default is 1 s).

Simulation (``edufl simulate``) has no bundle and no gate: see :mod:`federation.policy`.
"""

from __future__ import annotations

import argparse
import functools
import os
import re
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

from flwr.common.constant import SubStatus
from flwr.proto.task_pb2 import Task
from flwr.supercore.constant import TaskType
from flwr.supercore.superexec.executor import LaunchResult
from flwr.supercore.superexec.plugin import AutoExecPlugin

from edufl.federation.audit import AuditLog
from edufl.federation.deploy import SUPEREXEC_POLL, Companion, flwr_env, stop_child
from edufl.federation.policy import AppApproval, CampusPolicy, PolicyError
from edufl.federation.proto.audit_pb2 import AuditRecord
from edufl.federation.store import now
from edufl.federation.wire import CONFIG, REFUSED

from .node import run_id
from .worker import pull_task, runtime_client

__all__ = [
    "GATE_FAILED",
    "SUPERNODE_READY",
    "Gate",
    "GatePlugin",
    "WarmWorker",
    "WarmWorkers",
    "add_approval",
    "gate_command",
    "gate_process",
    "main",
    "serve",
]

# What flower-supernode prints once its Runtime API serves and it has joined the federation.
SUPERNODE_READY = "SuperNode ID"
# Exit statuses of a gate that was asked to stop (Flower's graceful exits on SIGINT, SIGQUIT, SIGTERM).
_STOPPED = (0, 1, 2, 3)
GATE_FAILED = 70  # the gate stopped on an error of its own
WORKER = Path(__file__).with_name("worker.py")
KEEPALIVE_S = 10.0
WORKER_ENV = {"OMP_NUM_THREADS": "1"}
"""A worker's environment besides the gate's (values the user set win): one compute thread per worker, as Flower's
simulation engine gives each ClientApp; several campuses' workers, or a worker beside the SuperNode, would
otherwise each start a thread per core and spin against each other."""


_KEY = re.compile(r"^[ \t]*approved_fab_hashes[ \t]*=[ \t]*\[", re.M)
_SECTION = re.compile(r"^[ \t]*\[apps\][ \t]*(#.*)?$", re.M)


def add_approval(policy: Path, fab_hash: str, note: str) -> bool:
    """Add ``fab_hash`` to ``[apps] approved_fab_hashes`` of the policy file ``policy`` (created if
    missing), with ``note`` as a comment; the rest of the file is kept as written. Returns False
    when the hash was approved already.

    Raises
    ------
    PolicyError
        When the file is not a valid policy, or the hash cannot be added without rewriting it
        (then the message says what to add by hand).
    """
    policy = Path(policy)
    before = CampusPolicy.load(policy) if policy.exists() else CampusPolicy()
    if fab_hash in before.apps.approved_fab_hashes:
        return False
    text = policy.read_text(encoding="utf-8") if policy.exists() else ""
    entry = f'    "{fab_hash}",{f"  # {note}" if note else ""}\n'
    if key := _KEY.search(text):  # first in the list: no need to find where a multi-line array ends
        text = f"{text[: key.end()]}\n{entry}{text[key.end() :]}"
    elif section := _SECTION.search(text):
        text = f"{text[: section.end()]}\napproved_fab_hashes = [\n{entry}]{text[section.end() :]}"
    else:
        text += ("\n" if text and not text.endswith("\n") else "") + f"[apps]\napproved_fab_hashes = [\n{entry}]\n"
    expected = before.model_copy(update={"apps": AppApproval(approved_fab_hashes=(fab_hash, *before.apps.approved_fab_hashes))})
    scratch = policy.with_name(f".{policy.name}.approve")
    try:
        scratch.write_text(text, encoding="utf-8")
        if CampusPolicy.load(scratch) == expected:
            os.replace(scratch, policy)
            return True
    except (OSError, PolicyError):
        pass
    scratch.unlink(missing_ok=True)
    raise PolicyError(
        f"{policy}: could not add the hash without rewriting the file; add it by hand under "
        f'[apps]: approved_fab_hashes = ["{fab_hash}", ...]'
    )


@dataclass(frozen=True)
class Gate:
    """What the gate of campus ``campus`` checks (``policy``: its policy file, None: the safe
    defaults, which approve no bundle) and where it logs (``state_dir``: the campus audit log)."""

    campus: str
    state_dir: Path
    policy: Path | None

    def refusal(self, task: Task) -> str | None:
        """Why ``task`` may not start, naming the policy key; None when it is a ClientApp of an approved bundle."""
        if task.type != TaskType.CLIENT_APP:
            return f"a campus runs ClientApps only, not {task.type}"
        try:
            return CampusPolicy.load(self.policy).apps.refusal(task.fab_hash)
        except PolicyError as err:
            return f"the campus policy cannot be used ({err})"

    def record(self, task: Task, why: str, message=None, context=None) -> AuditRecord:
        """The audit record of refusing ``task`` (with the run name, round and type of its ``message`` where known)."""
        config = message.content.config_records.get(CONFIG, {}) if message is not None else {}
        return AuditRecord(
            recorded_at=now(),
            campus=self.campus,
            sent=False,
            reason=f"refused: {self.reply(why)}",
            fab_sha256=task.fab_hash,
            run_id=run_id(config, context) if context is not None else str(task.run_id),
            server_round=int(config.get("server-round", 0)),
            message_type=message.metadata.message_type if message is not None else "",
        )

    def reply(self, why: str) -> str:
        """The refusal as the coordinator reads it."""
        return f"campus {self.campus} refuses to start this app: {why}"

    def refuse(self, runtime_api_address: str, token: str, task: Task, why: str) -> LaunchResult:
        """Answer ``task`` with a refusal, in place of its app: take its input with ``token``, log and print
        the refusal, reply with an error (code ``REFUSED``) and close the task as failed."""
        from flwr.app import Error, Message
        from flwr.supernode.runtime.run_clientapp import push_message, push_task_output

        client = runtime_client(runtime_api_address, token)
        message = context = None
        try:
            try:
                message, context, _, _ = pull_task(client)  # the bundle itself is not even looked at
            finally:
                self._log(task, why, message, context)
            push_message(client, Message(Error(code=REFUSED, reason=self.reply(why)), reply_to=message), context)
            push_task_output(client, context, SubStatus.FAILED, self.reply(why))
        except Exception as err:  # the task's token lapses and Flower answers "ClientApp stopped responding"
            return LaunchResult.failed(f"edufl code-approval gate could not answer task {task.task_id}: {err}")
        finally:
            client.close()
        return LaunchResult.accepted()  # taken and answered: nothing for Flower's launch-failure handling to do

    def _log(self, task: Task, why: str, message, context) -> None:
        """Write the refusal of ``task`` to the audit log and print it on the campus console."""
        record = self.record(task, why, message, context)
        with closing(AuditLog(self.state_dir)) as log:
            log.append(record)
        policy = Path(self.policy).resolve() if self.policy else "the safe defaults, no --policy"
        print(
            f"campus {self.campus}: REFUSED {record.message_type or task.type} of run {record.run_id}"
            f"{f' round {record.server_round}' if record.server_round else ''}: {why} (policy {policy}); "
            "no app was started",
            flush=True,
        )


class WarmWorker:
    """One worker process (:mod:`clients.worker`) for the Runtime API at ``runtime_api_address``, and the tasks
    handed to it that it has not finished. Should it stop, ``on_lost`` gets the tasks (token, task) it had not
    started; one it had started and not finished is closed as failed with its token (its reply, if any, was
    lost with the worker).

    A task's token lapses unless a heartbeat arrives within 30 s of its claim (``HEARTBEAT_DEFAULT_INTERVAL``
    in ``flwr/common/constant.py``); the worker sends them once it starts a task, and until then this object
    sends one every :data:`KEEPALIVE_S` seconds for each task waiting in the worker's queue."""

    def __init__(
        self,
        runtime_api_address: str,
        on_lost: Callable[[WarmWorker, list[tuple[str, Task]]], None],
        program: Path = WORKER,
    ):
        status_read, status_write = os.pipe()
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-I",  # neither the working folder nor clients/ on sys.path, no PYTHON* variables
                str(program),
                "--runtime-api-address",
                runtime_api_address,
                "--status-fd",
                str(status_write),
                "--parent-pid",
                str(os.getpid()),
            ],
            stdin=subprocess.PIPE,
            text=True,
            pass_fds=(status_write,),
            cwd=tempfile.gettempdir(),
            env={**WORKER_ENV, **flwr_env()},
        )
        os.close(status_write)
        self.address, self.on_lost = runtime_api_address, on_lost
        self.ready = threading.Event()
        self._lock = threading.Lock()
        self._pending: dict[str, Task] = {}
        self._started: set[str] = set()
        self._stopped = False
        self.follower = threading.Thread(target=self._follow, args=(status_read,), daemon=True)
        self.follower.start()
        threading.Thread(target=self._keep_alive, daemon=True).start()

    def take(self, token: str, task: Task) -> bool:
        """Hand ``task`` (and its ``token``) to the worker; False when it has stopped and cannot take it."""
        with self._lock:
            if self._stopped:
                return False
            self._pending[token] = task
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.write(f"{token} {task.fab_hash}\n")
            self.proc.stdin.flush()
        except OSError:
            with self._lock:  # not taken, unless the worker's end already passed it on as lost
                return self._pending.pop(token, None) is None
        return True

    def _keep_alive(self) -> None:
        from flwr.proto.runtime_pb2 import SendTaskHeartbeatRequest

        while not self._stopped:
            with self._lock:
                waiting = [token for token in self._pending if token not in self._started]
            for token in waiting:
                client = runtime_client(self.address, token, tries=1)
                try:
                    client.SendTaskHeartbeat(SendTaskHeartbeatRequest())
                except Exception:  # noqa: BLE001  the worker took it meanwhile, or the task ended
                    pass
                finally:
                    client.close()
            self.follower.join(KEEPALIVE_S)

    def _follow(self, status_read: int) -> None:
        with os.fdopen(status_read) as status:
            for line in status:
                word, _, token = line.strip().partition(" ")
                with self._lock:
                    if word == "ready":
                        self.ready.set()
                    elif word == "start":
                        self._started.add(token)
                    elif word == "done":
                        self._pending.pop(token, None)
                        self._started.discard(token)
        self.proc.wait()
        with self._lock:
            self._stopped = True
            lost = [(token, task) for token, task in self._pending.items() if token not in self._started]
            cut = [token for token in self._pending if token in self._started]
            self._pending.clear()
        self.on_lost(self, lost)
        for token in cut:
            _close_failed(self.address, token, "the warm worker stopped during the task")


def _close_failed(address: str, token: str, details: str) -> None:
    """End the task of ``token`` as failed, if its token is still valid (else the task has ended already)."""
    from flwr.supernode.runtime.run_clientapp import push_task_output

    client = runtime_client(address, token, tries=1)
    try:
        push_task_output(client, None, SubStatus.FAILED, details)  # logs, never raises, when the token has lapsed
    finally:
        client.close()


class WarmWorkers:
    """A :class:`WarmWorker` (running ``program``) per approved bundle hash, started at its first task or by
    :meth:`worker`; the tasks of a worker that stopped are started cold with ``cold_start`` (token, task), and
    the next task of its bundle starts a new worker."""

    def __init__(self, runtime_api_address: str, cold_start: Callable[[str, Task], LaunchResult], program: Path = WORKER):
        self.address, self.cold_start, self.program = runtime_api_address, cold_start, program
        self._workers: dict[str, WarmWorker] = {}
        self._lock = threading.Lock()

    def worker(self, fab_hash: str) -> WarmWorker:
        """The running worker of bundle ``fab_hash``, started if there is none."""
        with self._lock:
            if fab_hash not in self._workers:
                self._workers[fab_hash] = WarmWorker(self.address, functools.partial(self._lost, fab_hash), self.program)
            return self._workers[fab_hash]

    def launch(self, token: str, task: Task) -> LaunchResult:
        """Run ``task`` on its bundle's worker, else start it cold."""
        if self.worker(task.fab_hash).take(token, task):
            return LaunchResult.accepted()
        return self.cold_start(token, task)

    def _lost(self, fab_hash: str, worker: WarmWorker, tasks: list[tuple[str, Task]]) -> None:
        with self._lock:
            if self._workers.get(fab_hash) is worker:
                del self._workers[fab_hash]
        if worker.proc.returncode not in (0, None) or tasks:
            print(f"edufl: the warm worker of app bundle {fab_hash} stopped (status {worker.proc.returncode})", flush=True)
        for token, task in tasks:
            self.cold_start(token, task)


class GatePlugin(AutoExecPlugin):
    """Flower's SuperExec plugin, running a task only when ``gate`` finds no reason to refuse it: on its
    bundle's warm worker (:class:`WarmWorkers`), or else as Flower would. With ``prestart``, the worker of
    the policy's most recent approval starts at once, so that its libraries load before the first task."""

    def __init__(self, *args, gate: Gate, prestart: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.gate = gate
        self.workers = WarmWorkers(self.runtime_api_address, super().launch_task)
        if prestart and gate.policy is not None:
            try:
                approved = CampusPolicy.load(gate.policy).apps.approved_fab_hashes
            except PolicyError:
                approved = ()
            if approved:
                self.workers.worker(approved[0])

    def launch_task(self, token: str, task: Task) -> LaunchResult:
        why = self.gate.refusal(task)
        if why is not None:
            return self.gate.refuse(self.runtime_api_address, token, task, why)
        print(
            f"campus {self.gate.campus}: app bundle {task.fab_hash} is approved; starting its ClientApp for run {task.run_id}",
            flush=True,
        )
        return self.workers.launch(token, task)


def serve(gate: Gate, runtime_api_address: str, secret_file: Path | None, parent_pid: int | None) -> None:
    """Run Flower's SuperExec loop against the SuperNode's Runtime API with :class:`GatePlugin` as its plugin."""
    from flwr.supercore.auth import load_superexec_auth_secret
    from flwr.supercore.superexec import run_superexec as superexec

    superexec.AutoExecPlugin = functools.partial(GatePlugin, gate=gate, prestart=True)  # the class run_superexec builds
    superexec.run_superexec(
        runtime_api_address=runtime_api_address,
        insecure=True,
        superexec_auth_secret=load_superexec_auth_secret(secret_file and str(secret_file)),
        parent_pid=parent_pid,
        runtime_dependency_install=False,
    )


def gate_command(campus: str, state: Path, policy: Path | None, runtime_api_address: str, secret_file: Path) -> list[str]:
    """The command line of campus ``campus``'s gate (this module) beside the SuperNode whose Runtime API is at
    ``runtime_api_address``; it stops when this process does."""
    return [
        sys.executable,
        "-m",
        __name__,
        "--campus",
        campus,
        "--state",
        str(Path(state).resolve()),
        *(["--policy", str(Path(policy).resolve())] if policy else []),
        "--runtime-api-address",
        runtime_api_address,
        "--superexec-auth-secret-file",
        str(secret_file),
        "--parent-pid",
        str(os.getpid()),
    ]


def gate_process(command: list[str]) -> Companion:
    """The gate (``command``, from :func:`gate_command`) beside a SuperNode run by :func:`federation.deploy.foreground`:
    started once the SuperNode serves; should it fail while the SuperNode runs, the SuperNode is stopped too,
    since without its gate it would wait forever for an app to answer."""
    return Companion(
        command,
        SUPERNODE_READY,
        functools.partial(stop_child, "edufl.clients.supernode"),
        "the code-approval gate",
        stopped=_STOPPED,
        env=SUPEREXEC_POLL,
        # Run from the folder holding this edufl's packages: `python -m` looks there first, never in the
        # working folder (which might hold an unreviewed edufl source tree).
        cwd=Path(__file__).resolve().parents[1],
    )


def main(argv: list[str] | None = None) -> int:
    """``python -m edufl.clients.approval``: the gate process (started by ``edufl campus start``)."""
    p = argparse.ArgumentParser(
        prog="python -m edufl.clients.approval", description="edufl's code-approval gate (a Flower SuperExec)"
    )
    p.add_argument("--campus", required=True)
    p.add_argument("--state", required=True, help="the campus's state folder (its audit log)")
    p.add_argument("--policy", help="the campus policy file (default: the safe defaults, which approve no app bundle)")
    p.add_argument("--runtime-api-address", required=True, help="the SuperNode's Runtime API, HOST:PORT")
    p.add_argument("--superexec-auth-secret-file", help="the secret the SuperNode was started with")
    p.add_argument("--parent-pid", type=int, help="stop when this process stops")
    args = p.parse_args(argv)
    policy = Path(args.policy).resolve() if args.policy else "the safe defaults (no --policy)"
    print(
        f"campus {args.campus}: code-approval gate on: a ClientApp starts only for an app bundle listed in "
        f"apps.approved_fab_hashes of {policy}",
        flush=True,
    )
    try:
        serve(
            Gate(args.campus, Path(args.state), args.policy and Path(args.policy)),
            args.runtime_api_address,
            args.superexec_auth_secret_file and Path(args.superexec_auth_secret_file),
            args.parent_pid,
        )
    except Exception as err:  # noqa: BLE001  an exit status edufl campus start tells from a requested stop
        print(f"edufl: code-approval gate of campus {args.campus}: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
        return GATE_FAILED
    return 0


if __name__ == "__main__":
    sys.exit(main())
