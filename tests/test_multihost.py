"""The coordinator and two campuses as separate hosts: Linux network namespaces with their own
addresses, joined by a bridge, made by this test (as root).

Namespace ``net`` holds only a bridge; ``coord`` (10.213.0.1), ``AAA`` (10.213.0.2) and ``GGG``
(10.213.0.3) each have loopback and one veth link to it, and no route anywhere else: every
address used is inside them, the test's own network namespace gets no interface, and nothing
else on the network can be reached. Each host has its own folder and Flower configuration and
only its own files: the coordinator the PKI folder `edufl certs --host 10.213.0.1` wrote, each
campus the CA certificate, its own key, its export, policy and state. The namespaces (and with
them every link) are deleted at teardown, after every process in them was killed, even when a
test fails.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from processes import EDUFL, REPO, Processes, approved_policy

from edufl.federation.audit import AuditLog
from edufl.federation.deploy import flwr_env
from edufl.federation.partition import campus_slice
from edufl.federation.writers import write_tables
from edufl.server.pki import make_pki

pytestmark = pytest.mark.deployment

SUBNET = "10.213.0"
HOSTS = {"coord": f"{SUBNET}.1", "AAA": f"{SUBNET}.2", "GGG": f"{SUBNET}.3"}  # the two smallest modules
CAMPUSES = ("AAA", "GGG")
PORT = 9200
SUPERLINK = f"{HOSTS['coord']}:{PORT}"


def ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    assert done.returncode == 0, f"ip {' '.join(args)}: {done.stderr}"


class Network:
    """The namespaces of one test module, named after this process so that parallel runs do not meet."""

    def __init__(self) -> None:
        self.prefix = f"edufl{os.getpid()}"
        self.made: list[str] = []

    def ns(self, host: str) -> str:
        return f"{self.prefix}-{host}"

    def add(self, host: str) -> None:
        done = subprocess.run(["ip", "netns", "add", self.ns(host)], capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"network namespaces cannot be made here (`ip netns add` failed: {done.stderr.strip()}); needs root")
        self.made.append(self.ns(host))
        ip("-n", self.ns(host), "link", "set", "lo", "up")

    def build(self) -> None:
        if shutil.which("ip") is None:
            pytest.skip("network namespaces cannot be made here: no `ip` command (iproute2)")
        self.add("net")
        ip("-n", self.ns("net"), "link", "add", "br0", "type", "bridge")
        ip("-n", self.ns("net"), "link", "set", "br0", "up")
        for n, (host, address) in enumerate(HOSTS.items()):
            self.add(host)
            # both ends made inside the namespaces: the test's own namespace never holds either
            ip("-n", self.ns(host), "link", "add", "eth0", "type", "veth", "peer", "name", f"port{n}", "netns", self.ns("net"))
            ip("-n", self.ns(host), "addr", "add", f"{address}/24", "dev", "eth0")
            ip("-n", self.ns(host), "link", "set", "eth0", "up")
            ip("-n", self.ns("net"), "link", "set", f"port{n}", "master", "br0", "up")

    def on(self, host: str, root) -> tuple[str, ...]:
        """The command prefix running a command on ``host``: in its namespace, with its own Flower configuration."""
        return ("ip", "netns", "exec", self.ns(host), "env", f"FLWR_HOME={root / host / 'flwr-home'}")

    def remove(self) -> None:
        for ns in reversed(self.made):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def run_on(prefix: tuple[str, ...], *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*prefix, *EDUFL, *args], capture_output=True, text=True, cwd=REPO, env=flwr_env(), timeout=timeout)


def campus_start(procs: Processes, net: Network, root, campus: str, name: str, key, *extra: str):
    home = root / campus
    return procs.start(
        name,
        "campus",
        "start",
        *("--campus", campus, "--data", str(home / "data"), "--superlink", SUPERLINK),
        *("--root-cert", str(home / "ca.crt"), "--key", str(key)),
        *("--state", str(home / "state"), "--policy", str(home / "policy.toml"), *extra),
        prefix=net.on(campus, root),
    )


@pytest.fixture(scope="module")
def hosts(tmp_path_factory, tables):
    root = tmp_path_factory.mktemp("multihost")
    net, procs = Network(), Processes(root)
    try:
        net.build()
        pki = root / "coord" / "pki"
        made = run_on((), "certs", "--out", str(pki), "--campuses", ",".join(CAMPUSES), "--host", HOSTS["coord"])
        assert made.returncode == 0, made.stderr
        for campus in CAMPUSES:  # what the coordinator hands each campus: the CA certificate and its own key
            home = root / campus
            home.mkdir()
            shutil.copy(pki / "ca.crt", home / "ca.crt")
            shutil.copy(pki / f"campus-{campus}.key", home / f"campus-{campus}.key")
            write_tables(campus_slice(tables, "module", campus), home / "data")
            approved_policy(home / "policy.toml")
        state = ["--state", str(root / "coord" / "state")]
        procs.start(
            "coordinator",
            *("coordinator", "start", "--host", HOSTS["coord"], "--port", str(PORT), "--pki", str(pki), *state),
            prefix=net.on("coord", root),
        )
        procs.wait_for("coordinator", "coordinator: ready", timeout=120)
        for campus in CAMPUSES:
            campus_start(procs, net, root, campus, campus, root / campus / f"campus-{campus}.key")
        for campus in CAMPUSES:
            procs.wait_for(campus, "SuperNode ID", timeout=120)
        yield root, net, procs
    finally:
        procs.kill_all()
        net.remove()


def test_two_rounds_across_hosts_with_receipts_equal_to_the_campus_audit_logs(hosts):
    root, net, _ = hosts
    out = root / "coord" / "run"
    result = run_on(
        net.on("coord", root),
        *("coordinator", "run", "--superlink", SUPERLINK, "--pki", str(root / "coord" / "pki")),
        *("--rounds", "2", "--model", "logistic", "--min-campuses", "2", "--out", str(out)),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"2 campus(es) online at {SUPERLINK}" in result.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert [r["round"] for r in summary["rounds"]] == [1, 2]
    assert [c["campus"] for c in summary["campuses"]] == list(CAMPUSES)
    assert summary["failures"] == []
    name = summary["config"]["run-name"]
    logged = set()
    for campus in CAMPUSES:
        log = AuditLog(root / campus / "state")
        logged |= {(r.server_round, r.message_type, campus, r.payload_sha256) for r in log.records(name) if r.sent}
        log.close()
    assert logged == {(r["round"], r["phase"], r["campus"], r["payload_sha256"]) for r in summary["receipts"]}
    # Per campus: a train reply in each of the 2 rounds, then the final model's evaluation.
    first = sorted((r, phase) for r, phase, campus, _ in logged if campus == CAMPUSES[0])
    assert first == [(1, "train"), (2, "evaluate"), (2, "train")]
    assert len(logged) == 3 * len(CAMPUSES)


def test_plaintext_from_a_campus_host_is_refused(hosts):
    root, net, _ = hosts
    home = root / "AAA"
    result = run_on(
        net.on("AAA", root),
        *("campus", "start", "--campus", "AAA", "--data", str(home / "data"), "--superlink", SUPERLINK, "--insecure"),
        *("--state", str(home / "state-plaintext")),
        timeout=60,
    )
    assert result.returncode == 1
    assert f"the SuperLink at {SUPERLINK} uses TLS: drop --insecure" in result.stderr
    # and a plaintext request itself gets no HTTP answer: the port speaks TLS only
    ask = (
        "import socket\n"
        f"s = socket.create_connection(({HOSTS['coord']!r}, {PORT}), timeout=10)\n"
        "s.sendall(b'GET /health HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n')\n"
        "try:\n    reply = s.recv(100)\nexcept ConnectionResetError:\n    reply = b''\n"
        "print('answered' if reply.startswith(b'HTTP/') else 'no HTTP answer')\n"
    )
    done = subprocess.run([*net.on("AAA", root), sys.executable, "-c", ask], capture_output=True, text=True, timeout=30)
    assert done.stdout.strip() == "no HTTP answer", done.stdout + done.stderr


def test_an_unregistered_key_from_a_campus_host_is_refused(hosts):
    root, net, procs = hosts
    make_pki(root / "AAA" / "other-pki", ["AAA"])  # a key the coordinator never registered
    campus_start(procs, net, root, "AAA", "AAA-unregistered", root / "AAA" / "other-pki" / "campus-AAA.key", "--rejoin-wait", "0")
    assert procs.running["AAA-unregistered"].wait(timeout=120) == 1
    assert "the coordinator refused this campus's key: it is not registered there" in procs.output("AAA-unregistered")
    assert "No SuperNode found with the given public key" in procs.output("coordinator")


def test_the_campus_hosts_reach_nothing_outside_the_test_network(hosts):
    _, net, _ = hosts
    for campus in CAMPUSES:
        routes = subprocess.run(["ip", "-n", net.ns(campus), "route"], capture_output=True, text=True).stdout
        assert routes.split() == f"{SUBNET}.0/24 dev eth0 proto kernel scope link src {HOSTS[campus]}".split()
