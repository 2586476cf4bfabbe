"""A simulation attached to a real two-node Ray cluster on this machine (``--ray-address``).

The cluster is two ``ray start`` processes with one CPU each and a temporary directory each: a head and a
second node joining it. Campus files reach the workers through Ray's object store (the store actor of
:class:`experiments.simulate.Engine`), never through the driver's campus folder; the results must equal
those of the same run on a local Ray (reproducible noise).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd
import psutil
import pytest
import torch

from edufl.clients.node import SIM_ENV, copies_prefix
from edufl.federation.partition import campus_slice
from edufl.federation.runconfig import RunConfig

pytestmark = pytest.mark.simulation

RAY = Path(sys.executable).with_name("ray")
STOP_WAIT_S = 15


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _ray_start(args: list[str], tmpdir: Path) -> None:
    env = {**os.environ, "TMPDIR": str(tmpdir), "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop(SIM_ENV, None)  # the cluster's workers must not see any local campus folder
    done = subprocess.run([str(RAY), "start", *args], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]


def _stop(markers: list[str]) -> None:
    """Stop this cluster's processes (those whose command line names its temporary directory or GCS port), by id."""
    mine = []
    for p in psutil.process_iter(["cmdline"]):
        line = " ".join(p.info["cmdline"] or [])
        if any(m in line for m in markers) and p.pid != os.getpid():
            mine.append(p)
    for p in mine:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(mine, timeout=STOP_WAIT_S)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


@pytest.fixture
def cluster():
    """A head and a second node, one CPU each, each with its own temporary directory; stopped afterwards."""
    root = Path(tempfile.mkdtemp(prefix="edufl-ray-"))  # short: Ray's socket paths live under it
    session, tmp_a, tmp_b = root / "s", root / "a", root / "b"
    for folder in (session, tmp_a, tmp_b):
        folder.mkdir()
    gcs, *ports = _free_ports(14)
    common = ["--num-cpus", "1", "--node-ip-address", "127.0.0.1", "--disable-usage-stats"]

    def node_ports(p: list[int]) -> list[str]:
        return [
            "--node-manager-port", str(p[0]), "--object-manager-port", str(p[1]),
            "--dashboard-agent-listen-port", str(p[2]), "--dashboard-agent-grpc-port", str(p[3]),
            "--runtime-env-agent-port", str(p[4]), "--metrics-export-port", str(p[5]),
        ]  # fmt: skip

    try:
        _ray_start(
            ["--head", "--port", str(gcs), "--include-dashboard", "false", "--temp-dir", str(session),
             "--ray-client-server-port", str(ports[12]), *node_ports(ports[:6]), *common],
            tmp_a,
        )  # fmt: skip
        _ray_start(["--address", f"127.0.0.1:{gcs}", *node_ports(ports[6:12]), *common], tmp_b)
        yield f"127.0.0.1:{gcs}", (tmp_a, tmp_b)
    finally:
        _stop([str(session), f":{gcs}"])
        shutil.rmtree(root, ignore_errors=True)


def _same_results(a: Path, b: Path) -> None:
    rounds_a, rounds_b = (pd.read_csv(p / "rounds.csv").drop(columns="elapsed_s") for p in (a, b))
    pd.testing.assert_frame_equal(rounds_a, rounds_b)
    model_a, model_b = (torch.load(p / "model.pt", weights_only=True) for p in (a, b))
    assert model_a.keys() == model_b.keys()
    for key in model_a:
        assert torch.equal(model_a[key], model_b[key]), key


def test_a_run_on_a_two_node_cluster_uses_both_nodes_and_equals_the_local_run(cluster, tables, data_dir, tmp_path):
    import ray

    from edufl.experiments.simulate import engine, simulate

    address, node_tmpdirs = cluster
    small = campus_slice(tables, "module", "AAA")  # 748 registrations, as 6 shard campuses: a quick run
    settings = {"campus-by": "shard", "shards": 6, "num-rounds": 2, "model": "logistic", "reproducible-noise": True}
    with engine(address) as attached:
        simulate(RunConfig.from_flower({**settings, "out": str(tmp_path / "cluster")}), data_dir, tables=small)
        fetched = attached.fetched()
        nodes = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    print(f"campuses fetched, by node: {fetched}")
    assert len(nodes) == 2 and set(fetched) == nodes, fetched  # campuses ran on both nodes
    summary = json.loads((tmp_path / "cluster" / "summary.json").read_text())
    assert {c for campuses in fetched.values() for c in campuses} == set(summary["config"]["campuses"])
    for tmpdir in node_tmpdirs:  # the workers' copies of campus rows are gone
        assert not list(tmpdir.glob(f"{copies_prefix('*')}*")), list(tmpdir.iterdir())

    simulate(RunConfig.from_flower({**settings, "out": str(tmp_path / "local")}), data_dir, tables=small)
    _same_results(tmp_path / "cluster", tmp_path / "local")


def test_an_address_where_no_cluster_answers_is_a_user_error(data_dir, tmp_path, capsys):
    from edufl.experiments.cli import main

    [port] = _free_ports(1)
    run = ["simulate", "--data", str(data_dir), "--out", str(tmp_path / "x"), "--ray-address", f"127.0.0.1:{port}"]
    assert main(run) == 2
    assert f"--ray-address 127.0.0.1:{port}: no Ray cluster answers there" in capsys.readouterr().err
