"""The coordinator's SuperLink setup: an outsider on its one port, calling the Runtime API's task
endpoints as if it were the coordinator's SuperExec but without the SuperExec secret; the SuperExec
`edufl coordinator start` runs beside its SuperLink; its state across a restart; its key files' modes.

In Flower 1.42 a SuperLink serves its Fleet, Control and Runtime APIs on one port. The Runtime API
hands out a run's ServerApp task (``AcquireTask``) with a token, and with that token its holder is
the run's ServerApp: it pulls the run's input and every reply campuses send. Only ``AcquireTask``
is guarded, and only by the SuperExec secret (``--superexec-auth-secret-file``), which the SuperLink
accepts only with ``--isolation process``; every other task endpoint wants the task's token.

The outsider tests start a SuperLink with TLS and campus authentication on 127.0.0.1, submit one
run with ``flwr run`` (no campus is needed: the ServerApp task is queued as soon as the run is), and
let no SuperExec take it, so that the outsider always finds the task waiting.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import psutil
import pytest
from flwr.proto.runtime_pb2 import AcquireTaskRequest, PullTaskInputRequest
from flwr.supercore.auth import load_superexec_auth_secret
from flwr.supercore.constant import TaskType
from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor, SuperExecAuthHttpInterceptor
from flwr.supercore.runtime import RuntimeHttpClient
from processes import Processes, state  # the tests folder is on sys.path

from edufl.federation.bundle import app_folder
from edufl.federation.deploy import PKIError, flwr_env, free_port
from edufl.server.coordinator import CONNECTION, connect, superlink_command
from edufl.server.pki import CA_KEY, SUPEREXEC_SECRET, make_pki, superexec_secret

AUTHENTICATION_FAILED = 1008  # flwr.supercore.error.ApiErrorCode.RUNTIME_AUTHENTICATION_FAILED


def legacy_command(port: int, pki: Path) -> list[str]:
    """`edufl coordinator start`'s SuperLink before issue 13: Flower's default ``--isolation subprocess``."""
    return [
        "flower-superlink",
        *("--host", "127.0.0.1", "--port", str(port), "--isolation", "subprocess"),
        "--disable-runtime-dependency-installation",
        *("--ssl-ca-certfile", str(pki / "ca.crt"), "--ssl-certfile", str(pki / "superlink.crt")),
        *("--ssl-keyfile", str(pki / "superlink.key"), "--enable-supernode-auth"),
    ]


@contextmanager
def superlink(log: Path, command: list[str]) -> Iterator[subprocess.Popen]:
    """Run ``command`` (a SuperLink) in a process group of its own until it serves; killed on leaving."""
    with open(log, "w") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=flwr_env(), start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while "Application startup complete" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        yield proc
    finally:
        for child in psutil.Process(proc.pid).children(recursive=True):
            child.kill()  # Flower's own SuperExec runs in a session of its own
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def submit_run(address: str, ca: Path) -> int:
    """``flwr run`` the edufl app on the SuperLink at ``address``; returns the run id once it is queued."""
    connect(address, ca)
    with app_folder() as app:
        done = subprocess.run(["flwr", "run", str(app), CONNECTION], capture_output=True, text=True, env=flwr_env())
    match = re.search(r"Successfully started run (\d+)", done.stdout)
    assert match, done.stdout + done.stderr
    return int(match.group(1))


def runtime_client(address: str, ca: Path, *, secret: Path | None = None, token: str | None = None) -> RuntimeHttpClient:
    """A Runtime API client as Flower's SuperExec builds one, signing AcquireTask only when given ``secret``."""
    interceptors = [RuntimeVersionHttpInterceptor(component_name="SuperExec")]
    if secret is not None:
        interceptors.append(
            SuperExecAuthHttpInterceptor(
                master_secret=load_superexec_auth_secret(str(secret)), protected_methods={"/flwr.proto.Runtime/AcquireTask"}
            )
        )
    if token is not None:
        interceptors.append(RuntimeTokenHttpInterceptor(token))
    return RuntimeHttpClient.from_server_address(
        address, insecure=False, root_certificates=ca.read_bytes(), interceptors=interceptors
    )


def acquire(client: RuntimeHttpClient):
    return client.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.SERVER_APP]))


@pytest.fixture
def pki(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))
    make_pki(tmp_path / "pki", ["AAA"])
    return tmp_path / "pki"


@pytest.mark.deployment
def test_before_issue_13_an_outsider_claimed_a_runs_server_app_task(pki, tmp_path):
    port = free_port()
    address = f"127.0.0.1:{port}"
    with superlink(tmp_path / "superlink.log", legacy_command(port, pki)) as proc:
        for child in psutil.Process(proc.pid).children(recursive=True):
            if "flower-superexec" in " ".join(child.cmdline()):
                child.kill()  # the SuperLink's own SuperExec, so that the outsider need not win a race against it
        run_id = submit_run(address, pki / "ca.crt")
        outsider = runtime_client(address, pki / "ca.crt")
        claimed = acquire(outsider)
        assert claimed.task.type == TaskType.SERVER_APP and claimed.task.run_id == run_id and claimed.token
        as_server_app = runtime_client(address, pki / "ca.crt", token=claimed.token)
        task_input = as_server_app.PullTaskInput(PullTaskInputRequest())
        assert task_input.run.run_id == run_id and task_input.fab.hash_str == claimed.task.fab_hash
        print(
            f"before: outsider acquired task {claimed.task.task_id} ({claimed.task.type}) of run {run_id}, "
            f"pulled its input: fab {task_input.fab.hash_str[:12]}..., {len(task_input.fab.content)} bytes"
        )


@pytest.mark.deployment
def test_an_outsider_without_the_superexec_secret_is_refused(pki, tmp_path):
    port = free_port()
    address = f"127.0.0.1:{port}"
    secret, database = superexec_secret(tmp_path / "state"), tmp_path / "state" / "superlink.db"
    tls = (pki / "ca.crt", pki / "superlink.crt", pki / "superlink.key")
    with superlink(tmp_path / "superlink.log", superlink_command(port, "127.0.0.1", tls, secret, database)):
        run_id = submit_run(address, pki / "ca.crt")
        outsider = runtime_client(address, pki / "ca.crt")
        with pytest.raises(httpx.HTTPStatusError) as refused:
            acquire(outsider)
        assert refused.value.response.status_code == 401
        assert refused.value.response.json()["code"] == AUTHENTICATION_FAILED
        with pytest.raises(httpx.HTTPStatusError) as no_token:
            outsider.PullTaskInput(PullTaskInputRequest())
        assert no_token.value.response.status_code == 401
        print(f"now: outsider refused: {refused.value.response.json()}; without a token: {no_token.value.response.json()}")
        # the task was there all along: the holder of the secret gets it
        claimed = acquire(runtime_client(address, pki / "ca.crt", secret=secret))
        assert claimed.task.type == TaskType.SERVER_APP and claimed.task.run_id == run_id and claimed.token


def flwr_json(*args: str) -> dict:
    done = subprocess.run(["flwr", *args, CONNECTION, "--format", "json"], capture_output=True, text=True, env=flwr_env())
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(done.stdout)


def processes_of(proc: subprocess.Popen) -> list[str]:
    """The program names (flower-superlink, ...) running under ``proc``."""
    names = []
    for child in psutil.Process(proc.pid).children(recursive=True):
        try:
            names.append(" ".join(Path(part).name for part in child.cmdline()[:2]))
        except psutil.NoSuchProcess:
            pass
    return names


@pytest.mark.deployment
def test_coordinator_restart_keeps_registered_campuses_and_runs(pki, tmp_path):
    procs, port = Processes(tmp_path), free_port()
    start = ["coordinator", "start", "--pki", str(pki), "--port", str(port), *state(tmp_path, "coordinator")]
    try:
        first = procs.start("first", *start)
        procs.wait_for("first", "coordinator: ready")
        assert any("flower-superexec" in name for name in processes_of(first))
        assert "campus AAA registered" in procs.output("first")
        nodes = flwr_json("supernode", "ls")["nodes"]
        run_id = submit_run(f"127.0.0.1:{port}", pki / "ca.crt")
        first.send_signal(signal.SIGTERM)  # a stop, as Ctrl-C or a service manager does it
        assert first.wait(timeout=30) == 0, procs.output("first")[-3000:]
        procs.running.pop("first")
        assert oct((tmp_path / "state" / "coordinator" / SUPEREXEC_SECRET).stat().st_mode & 0o777) == "0o600"

        procs.start("second", *start)
        procs.wait_for("second", "coordinator: ready")
        assert "campus AAA was registered before" in procs.output("second")
        assert [n["node-id"] for n in flwr_json("supernode", "ls")["nodes"]] == [n["node-id"] for n in nodes]
        assert [r["run-id"] for r in flwr_json("ls", "--run-id", str(run_id))["runs"]] == [str(run_id)]
    finally:
        procs.kill_all()


@pytest.mark.deployment
def test_a_failing_superexec_stops_the_coordinator(pki, tmp_path):
    procs, port = Processes(tmp_path), free_port()
    try:
        coordinator = procs.start(
            "coordinator", "coordinator", "start", "--pki", str(pki), "--port", str(port), *state(tmp_path, "coordinator")
        )
        procs.wait_for("coordinator", "coordinator: ready")
        for child in psutil.Process(coordinator.pid).children(recursive=True):
            if "flower-superexec" in " ".join(child.cmdline()[:2]):
                child.kill()
        assert coordinator.wait(timeout=30) == 1
        assert "the coordinator's SuperExec stopped with status -9" in procs.output("coordinator")
        assert "the SuperLink was stopped with it, since no run can start without it" in procs.output("coordinator")
    finally:
        procs.kill_all()


def test_key_files_are_private_from_the_start(tmp_path, monkeypatch):
    created = {}  # file name -> the mode it was created with (os.open), before a byte of it was written
    real_open = os.open

    def spy(path, flags, mode=0o777, **kwargs):
        if flags & os.O_CREAT:
            created[Path(path).name] = oct(mode)
        return real_open(path, flags, mode, **kwargs)

    monkeypatch.setattr(os, "open", spy)
    umask = os.umask(0o022)
    try:
        make_pki(tmp_path, ["AAA"])
        superexec_secret(tmp_path / "state")
    finally:
        os.umask(umask)
    private = {CA_KEY: "0o600", "superlink.key": "0o600", "campus-AAA.key": "0o600", SUPEREXEC_SECRET: "0o600"}
    public = {"ca.crt": "0o644", "superlink.crt": "0o644", "campus-AAA.pub": "0o644"}
    assert created == private | public
    files = [*tmp_path.glob("*.*"), *(tmp_path / "state").iterdir()]
    assert {f.name: oct(f.stat().st_mode & 0o777) for f in files} == private | public
    assert oct((tmp_path / "state").stat().st_mode & 0o777) == "0o700"


def test_a_superexec_secret_others_can_read_is_refused(tmp_path):
    superexec_secret(tmp_path).chmod(0o644)
    with pytest.raises(PKIError, match=r"superexec-auth.secret: expected a non-empty file only its owner can read"):
        superexec_secret(tmp_path)
