"""A real deployment on this machine: a coordinator and campuses as separate ``edufl`` processes on 127.0.0.1.

Used by ``edufl bench --deployment N`` and by the deployment tests. Every
process is the ``edufl`` command a user runs (``coordinator start``, ``campus
start``), started in a process group of its own with its output in a log file,
under TLS and campus authentication from ``edufl certs``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from edufl.federation.deploy import flwr_env, free_port

__all__ = ["EDUFL", "Processes", "ProcessFailed", "edufl", "local_federation", "start_campus", "state"]

EDUFL = [sys.executable, "-m", "edufl.experiments.cli"]
POLL_S = 0.2  # how often a log is read while waiting for a line


class ProcessFailed(RuntimeError):
    """A process ended, or did not print what was awaited in time; the message ends with its last output."""


class Processes:
    """Background ``edufl`` processes, each with its output in ``logs/NAME.log``."""

    def __init__(self, logs: Path, cwd: Path | None = None):
        self.logs, self.cwd, self.running = Path(logs), cwd, {}

    def start(self, name: str, *args: str, prefix: tuple[str, ...] = ()) -> subprocess.Popen:
        """Start `edufl ARGS` as ``name``; ``prefix`` (e.g. `ip netns exec NS`) runs it as another host would."""
        with open(self.logs / f"{name}.log", "w") as log:
            proc = subprocess.Popen(
                [*prefix, *EDUFL, *args],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.cwd,
                env=flwr_env(),
                start_new_session=True,
            )
        self.running[name] = proc
        return proc

    def output(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")

    def wait_for(self, name: str, text: str, timeout: float = 60.0, times: int = 1) -> None:
        """Return once ``name`` has printed ``text`` ``times`` times in all.

        Raises
        ------
        ProcessFailed
            When ``name`` ends first, or ``timeout`` seconds pass.
        """
        deadline = time.monotonic() + timeout
        while self.output(name).count(text) < times:
            if self.running[name].poll() is not None or time.monotonic() > deadline:
                raise ProcessFailed(f"{name} never printed {text!r}:\n{self.output(name)[-3000:]}")
            time.sleep(POLL_S)

    def kill(self, name: str) -> None:
        """Kill ``name``'s whole process group (its SuperLink or SuperNode and their children included)."""
        proc = self.running.pop(name)
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()

    def kill_all(self) -> None:
        for name in list(self.running):
            self.kill(name)


def state(root: Path, name: str) -> list[str]:
    """The --state option giving campus ``name`` (or the ``coordinator``) its state folder under ``root``."""
    return ["--state", str(Path(root) / "state" / name)]


def edufl(*args: str, timeout: float = 300, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run `edufl ARGS` to its end, output captured."""
    return subprocess.run([*EDUFL, *args], capture_output=True, text=True, cwd=cwd, env=flwr_env(), timeout=timeout)


def start_campus(
    procs: Processes, root: Path, superlink: str, campus: str, data: Path, policy: Path, timeout: float = 60, wait: bool = True
) -> None:
    """`edufl campus start` for ``campus`` on its export ``data`` under ``policy``, with its key from ``root/pki``;
    with ``wait``, returns once its SuperNode has joined."""
    procs.start(
        campus,
        "campus",
        "start",
        "--campus",
        campus,
        "--data",
        str(data),
        "--superlink",
        superlink,
        "--pki",
        str(Path(root) / "pki"),
        *state(root, campus),
        "--policy",
        str(policy),
    )
    if wait:
        procs.wait_for(campus, "SuperNode ID", timeout)


@contextmanager
def local_federation(
    root: Path, campuses: dict[str, tuple[Path, Path]], unstarted: tuple[str, ...] = (), cwd: Path | None = None
) -> Iterator[tuple[str, Processes]]:
    """A coordinator (TLS, campus authentication) on a free port of 127.0.0.1 and one campus per ``campuses``
    entry (name -> (export folder, policy file)), all under ``root``; ``unstarted`` campuses only get keys and
    are registered. Uses its own Flower configuration (``root/flwr-home``). Yields (SuperLink address,
    processes) once every campus has joined; every process is killed on leaving.

    Raises
    ------
    ProcessFailed
        When the coordinator or a campus does not come up.
    """
    from edufl.server.pki import make_pki

    root = Path(root)
    saved_home = os.environ.get("FLWR_HOME")
    os.environ["FLWR_HOME"] = str(root / "flwr-home")
    make_pki(root / "pki", [*campuses, *unstarted])
    procs = Processes(root, cwd)
    port = free_port()
    superlink = f"127.0.0.1:{port}"
    try:
        procs.start(
            "coordinator", "coordinator", "start", "--pki", str(root / "pki"), "--port", str(port), *state(root, "coordinator")
        )
        procs.wait_for("coordinator", "coordinator: ready")
        for campus, (data, policy) in campuses.items():
            start_campus(procs, root, superlink, campus, data, policy, wait=False)
        for campus in campuses:
            procs.wait_for(campus, "SuperNode ID")
        yield superlink, procs
    finally:
        procs.kill_all()
        if saved_home is None:
            os.environ.pop("FLWR_HOME")
        else:
            os.environ["FLWR_HOME"] = saved_home
