"""Real edufl processes on 127.0.0.1 for the deployment tests: a coordinator and its campuses
(:mod:`edufl.experiments.localdeploy`, which `edufl bench --deployment` uses too), and the `edufl`
command as a user runs it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from edufl.experiments.localdeploy import EDUFL, Processes, local_federation, state
from edufl.experiments.localdeploy import edufl as run_edufl
from edufl.experiments.localdeploy import start_campus as deployed_campus
from edufl.federation.ledger import PrivacyLedger
from edufl.federation.partition import campus_slice
from edufl.federation.writers import write_tables

__all__ = ["EDUFL", "Processes", "state"]  # re-exported for the tests

CAMPUSES = ("AAA", "BBB", "CCC")
POLICY = "[privacy]\ntotal_epsilon_budget = 20.0\n[release]\nmin_cohort_size = 20\n"  # every campus's policy file
REPO = Path(__file__).resolve().parents[1]
CLIENTAPP_STARTED = "is approved; starting its ClientApp"  # what a campus's gate prints for each message it runs


@contextmanager
def federation(root: Path, tables, policies: dict[str, str], unstarted: tuple[str, ...] = ()) -> Iterator[tuple[str, Processes]]:
    """A coordinator (TLS, campus authentication) and one started campus per ``policies`` key, reading its own
    module's export under the policy file of that name in ``root``; ``unstarted`` campuses are only registered.
    Yields (SuperLink address, processes); every process is killed on leaving."""
    for campus in policies:
        write_tables(campus_slice(tables, "module", campus), root / f"campus-{campus}")
    campuses = {campus: (root / f"campus-{campus}", root / policy) for campus, policy in policies.items()}
    with local_federation(root, campuses, unstarted, cwd=REPO) as (superlink, procs):
        yield superlink, procs


def approved_policy(path: Path, text: str = POLICY) -> Path:
    """Write the policy ``text`` to ``path``, approving this app's bundle (`edufl campus approve`)."""
    path.write_text(text)
    approved = edufl("campus", "approve", "--policy", str(path))
    assert approved.returncode == 0, approved.stderr
    return path


def start_campus(
    procs: Processes, root: Path, superlink: str, campus: str, timeout: float = 60, policy: str = "policy.toml", wait: bool = True
) -> None:
    """`edufl campus start` for ``campus`` on its export ``root/campus-NAME`` under the policy file ``root/policy``."""
    deployed_campus(procs, root, superlink, campus, root / f"campus-{campus}", root / policy, timeout, wait)


def released_rounds(root: Path, campus: str, run_name: str) -> list[int]:
    """The rounds ``campus``'s privacy ledger holds a release of for run ``run_name``."""
    ledger = PrivacyLedger(root / "state" / campus)
    try:
        return [r.server_round for r in ledger.releases(run_id=run_name)]
    finally:
        ledger.close()


def edufl(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """`edufl ARGS`, run from the checkout, output captured."""
    return run_edufl(*args, timeout=timeout, cwd=REPO)


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
