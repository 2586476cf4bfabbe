"""Real edufl processes on 127.0.0.1 for the deployment tests: a coordinator and its campuses,
each started in a process group of its own with its output in a log file, and the `edufl`
command as a user runs it.
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

import pytest

from edufl.federation.deploy import flwr_env, free_port
from edufl.federation.ledger import PrivacyLedger
from edufl.federation.partition import campus_slice
from edufl.federation.writers import write_tables
from edufl.server.pki import make_pki

CAMPUSES = ("AAA", "BBB", "CCC")
POLICY = "[privacy]\ntotal_epsilon_budget = 20.0\n[release]\nmin_cohort_size = 20\n"  # every campus's policy file
EDUFL = [sys.executable, "-m", "edufl.experiments.cli"]
REPO = Path(__file__).resolve().parents[1]
CLIENTAPP_STARTED = "is approved; starting its ClientApp"  # what a campus's gate prints for each message it runs


class Processes:
    """Background processes of one test module, each with its output in a log file."""

    def __init__(self, logs: Path):
        self.logs, self.running = logs, {}

    def start(self, name: str, *args: str, prefix: tuple[str, ...] = ()) -> subprocess.Popen:
        """Start `edufl ARGS` as ``name``; ``prefix`` (e.g. `ip netns exec NS`) runs it as another host would."""
        log = open(self.logs / f"{name}.log", "w")
        proc = subprocess.Popen(
            [*prefix, *EDUFL, *args], stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=flwr_env(), start_new_session=True
        )
        self.running[name] = proc
        return proc

    def output(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")

    def wait_for(self, name: str, text: str, timeout: float = 60.0, times: int = 1) -> None:
        """Wait until ``name`` has printed ``text`` ``times`` times in all (its log is polled every 0.5 s)."""
        deadline = time.monotonic() + timeout
        while self.output(name).count(text) < times:
            if self.running[name].poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"{name} never printed {text!r}:\n{self.output(name)[-3000:]}")
            time.sleep(0.5)

    def kill(self, name: str) -> None:
        proc = self.running.pop(name)
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the wrapper, its SuperLink/SuperNode and their children
        except ProcessLookupError:
            pass
        proc.wait()

    def kill_all(self) -> None:
        for name in list(self.running):
            self.kill(name)


@contextmanager
def federation(root: Path, tables, policies: dict[str, str], unstarted: tuple[str, ...] = ()) -> Iterator[tuple[str, Processes]]:
    """A coordinator (TLS, campus authentication) and one started campus per ``policies`` key, reading its own
    module's export under the policy file of that name in ``root``; ``unstarted`` campuses are only registered.
    Yields (SuperLink address, processes); every process is killed on leaving."""
    saved_home = os.environ.get("FLWR_HOME")
    os.environ["FLWR_HOME"] = str(root / "flwr-home")  # this federation's own Flower configuration
    make_pki(root / "pki", [*policies, *unstarted])
    for campus in policies:
        write_tables(campus_slice(tables, "module", campus), root / f"campus-{campus}")
    procs = Processes(root)
    port = free_port()
    superlink = f"127.0.0.1:{port}"
    try:
        procs.start(
            "coordinator", "coordinator", "start", "--pki", str(root / "pki"), "--port", str(port), *state(root, "coordinator")
        )
        procs.wait_for("coordinator", "coordinator: ready")
        for campus, policy in policies.items():
            start_campus(procs, root, superlink, campus, policy=policy, wait=False)
        for campus in policies:
            procs.wait_for(campus, "SuperNode ID")
        yield superlink, procs
    finally:
        procs.kill_all()
        if saved_home is None:
            os.environ.pop("FLWR_HOME")
        else:
            os.environ["FLWR_HOME"] = saved_home


def approved_policy(path: Path, text: str = POLICY) -> Path:
    """Write the policy ``text`` to ``path``, approving this app's bundle (`edufl campus approve`)."""
    path.write_text(text)
    approved = edufl("campus", "approve", "--policy", str(path))
    assert approved.returncode == 0, approved.stderr
    return path


def start_campus(
    procs: Processes, root: Path, superlink: str, campus: str, timeout: float = 60, policy: str = "policy.toml", wait: bool = True
) -> None:
    procs.start(
        campus,
        "campus",
        "start",
        "--campus",
        campus,
        "--data",
        str(root / f"campus-{campus}"),
        "--superlink",
        superlink,
        "--pki",
        str(root / "pki"),
        *state(root, campus),
        "--policy",
        str(root / policy),
    )
    if wait:
        procs.wait_for(campus, "SuperNode ID", timeout)


def state(root: Path, campus: str) -> list[str]:
    """The --state option giving ``campus`` (or the ``coordinator``) its state folder under ``root`` (never the
    working or home folder)."""
    return ["--state", str(root / "state" / campus)]


def released_rounds(root: Path, campus: str, run_name: str) -> list[int]:
    """The rounds ``campus``'s privacy ledger holds a release of for run ``run_name``."""
    ledger = PrivacyLedger(root / "state" / campus)
    try:
        return [r.server_round for r in ledger.releases(run_id=run_name)]
    finally:
        ledger.close()


def edufl(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*EDUFL, *args], capture_output=True, text=True, cwd=REPO, env=flwr_env(), timeout=timeout)


def coordinator_run(root: Path, superlink: str, out: str, *extra: str) -> subprocess.CompletedProcess:
    return edufl(
        "coordinator",
        "run",
        "--superlink",
        superlink,
        "--pki",
        str(root / "pki"),
        "--rounds",
        "2",
        "--model",
        "logistic",
        "--out",
        str(root / out),
        *extra,
    )


def simulate(data_dir: Path, out: Path, *args: str) -> subprocess.CompletedProcess:
    """`edufl simulate --out OUT ARGS` on the tables in ``data_dir``, as a user runs it; fails the test unless it exits 0."""
    env = {**os.environ, "EDUFL_DATA": str(data_dir)}
    done = subprocess.run(
        [sys.executable, "-m", "edufl.experiments.cli", "simulate", "--out", str(out), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done
