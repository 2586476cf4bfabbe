"""``edufl coordinator ...``: the coordinator on Flower's deployment engine.

* :func:`start` runs a Flower SuperLink in the foreground: TLS and SuperNode
  authentication on, no per-run dependency installation; once it listens,
  every campus public key in the PKI folder is registered
  (``flwr supernode register``), so only those campuses can connect.
  The SuperLink starts no ServerApp itself (``--isolation process``): it
  queues one task per run on its Runtime API (the same port) and gives it
  only to a SuperExec holding the secret in the coordinator's state folder
  (:func:`edufl.server.pki.superexec_secret`); :func:`start` runs that
  SuperExec (Flower's ``flower-superexec``) beside it and stops it with it.
  Without the secret, anyone reaching the port could take a run's ServerApp
  task and read every reply campuses send (tests/test_runtime_api.py). The
  SuperLink keeps registered campuses and runs in a database file in the
  state folder, so they survive a restart.
* :func:`run` launches the ServerApp (``server/app.py``) on a SuperLink with
  ``flwr run`` (:func:`open_connection`, :func:`launch`; ``edufl analytics run
  --superlink`` launches its statistics runs the same way), streams its round
  lines and checks how the run ended; every
  run gets a unique run name, which campuses key their privacy ledger by, and
  a paused or interrupted run is continued from its last checkpoint
  (``resume``) under the same name.

Both write a ``flwr`` connection named :data:`CONNECTION` into the Flower
configuration (``$FLWR_HOME/config.toml``), so ``flwr ls edufl``,
``flwr log RUN_ID edufl`` and ``flwr stop RUN_ID edufl`` work against the
coordinator.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from functools import partial
from pathlib import Path

import tomli_w

from edufl.federation.bundle import app_folder, bundle_sha256
from edufl.federation.deploy import (
    CA_CERT,
    SUPEREXEC_POLL,
    SUPERLINK_CERT,
    SUPERLINK_KEY,
    Companion,
    flwr_env,
    foreground,
    parse_address,
    probe_tls,
    stop_child,
    tls_files,
)
from edufl.federation.errors import CampusesFailed, CampusesRefused, EduflError
from edufl.federation.runconfig import ConfigError, RunConfig

from .pki import registered_campuses, superexec_secret

__all__ = [
    "CONNECTION",
    "DATABASE",
    "NODES_FILE",
    "RunFailed",
    "await_campuses",
    "connect",
    "launch",
    "name_campuses",
    "new_run_name",
    "open_connection",
    "raise_for_failures",
    "register",
    "resumed_config",
    "run",
    "start",
    "superexec_command",
    "superlink_command",
]

CONNECTION = "edufl"
NODES_FILE = "registered-nodes.json"  # campus name -> Flower node id, written by `coordinator start`
DATABASE = "superlink.db"  # the SuperLink's state (registered campuses, runs), in the coordinator's state folder
LISTENING = "Application startup complete"  # what flower-superlink prints once it serves
INSECURE_WARNING = (
    "WARNING: --insecure: the coordinator runs WITHOUT TLS and WITHOUT campus authentication; "
    "model updates travel in plaintext and anyone who reaches the port can join. Local experiments only."
)
# Flower's own log lines, which `flwr run --stream` prints twice; edufl shows the rest.
_FLOWER_LOG = re.compile(r"^(\x1b\[\d+m)?(INFO|DEBUG)\b|^\d\d/\d\d/\d{4} \d\d:\d\d:\d\d:(INFO|DEBUG):|^Successfully installed")


class RunFailed(EduflError):
    """A federation run could not start, or ended without completing (exit status 1)."""


def _flwr(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["flwr", *args], capture_output=True, text=True, env=flwr_env())
    if check and proc.returncode != 0:
        raise RunFailed(f"`flwr {' '.join(args)}` failed: {_flwr_error(proc)}")
    return proc


def _flwr_error(proc: subprocess.CompletedProcess) -> str:
    text = re.sub(r"[│╭╮╰╯─]", " ", proc.stdout + proc.stderr)
    return " ".join(text.split()) or f"exit status {proc.returncode}"


def connect(address: str, root_cert: Path | None) -> None:
    """Point the ``flwr`` connection :data:`CONNECTION` at ``address`` (``root_cert`` None: plaintext)."""
    from flwr.cli.flower_config import init_flwr_config, write_superlink_connection
    from flwr.cli.typing import SuperLinkConnection

    init_flwr_config()
    write_superlink_connection(
        SuperLinkConnection(
            name=CONNECTION,
            address=address,
            insecure=True if root_cert is None else None,
            root_certificates=None if root_cert is None else str(root_cert),
        )
    )


def superlink_command(port: int, host: str, tls: tuple[Path, Path, Path] | None, secret: Path, database: Path) -> list[str]:
    """``flower-superlink`` on ``host:port`` (Fleet, Control and Runtime APIs on that one port).

    ``tls`` is (CA certificate, server certificate, server key); with it SuperNode
    authentication is on. None: plaintext and no authentication. The SuperLink
    starts no ServerApp itself: a run's task goes only to a SuperExec signing its
    requests with the secret in the file ``secret`` (:func:`superexec_command`).
    ``database``: the SQLite file of its state.
    """
    command = [
        "flower-superlink",
        "--host",
        host,
        "--port",
        str(port),
        "--isolation",
        "process",
        "--superexec-auth-secret-file",
        str(secret),
        "--database",
        str(database),
        "--disable-runtime-dependency-installation",
    ]
    if tls is None:
        return [*command, "--insecure"]
    ca, cert, key = tls
    return [
        *command,
        "--ssl-ca-certfile",
        str(ca),
        "--ssl-certfile",
        str(cert),
        "--ssl-keyfile",
        str(key),
        "--enable-supernode-auth",
    ]


def superexec_command(address: str, root_cert: Path | None, secret: Path) -> list[str]:
    """Flower's ``flower-superexec`` taking the ServerApp tasks of the SuperLink at ``address`` with the
    secret in ``secret``, over TLS verified with ``root_cert`` (None: plaintext); it stops when this process does."""
    tls = ["--insecure"] if root_cert is None else ["--root-certificates", str(root_cert)]
    return [
        "flower-superexec",
        "--runtime-api-address",
        address,
        *tls,
        "--superexec-auth-secret-file",
        str(secret),
        "--parent-pid",
        str(os.getpid()),
    ]


def register(pki: Path) -> dict[str, str]:
    """Register every campus public key in ``pki`` on the SuperLink of :data:`CONNECTION`.

    A key registered before is kept. Returns campus -> node id for the keys
    registered now, also saved as ``pki/registered-nodes.json``.

    Raises
    ------
    RunFailed
        When the SuperLink refuses a key for another reason than being registered already.
    """
    nodes_file = Path(pki) / NODES_FILE
    nodes = json.loads(nodes_file.read_text()) if nodes_file.is_file() else {}
    for campus, public_key in registered_campuses(pki).items():
        proc = _flwr("supernode", "register", str(public_key), CONNECTION, "--name", campus, "--format", "json", check=False)
        reply = json.loads(proc.stdout[proc.stdout.index("{") :]) if "{" in proc.stdout else {}
        if proc.returncode == 0 and reply.get("success"):
            nodes[campus] = str(reply["node-id"])
            print(f"coordinator: campus {campus} registered (node {nodes[campus]})", flush=True)
        elif "already in use" in reply.get("error-message", "") + proc.stderr:  # in the SuperLink's database already
            print(f"coordinator: campus {campus} was registered before", flush=True)
        else:
            raise RunFailed(f"registering campus {campus} ({public_key}) failed: {_flwr_error(proc)}")
    nodes_file.write_text(json.dumps(nodes, indent=2) + "\n")
    return nodes


def start(
    *,
    port: int,
    host: str = "127.0.0.1",
    state: Path | None = None,
    pki: Path | None = None,
    root_cert: Path | None = None,
    cert: Path | None = None,
    key: Path | None = None,
    insecure: bool = False,
) -> None:
    """Run the coordinator's SuperLink and its SuperExec in the foreground until stopped (Ctrl-C, SIGTERM).

    ``state`` is the coordinator's state folder (default ``edufl-state/coordinator``
    under the current directory, created with mode 0700): the SuperLink's
    database (:data:`DATABASE`) and the SuperExec secret, created if missing.
    Starting again with the same folder keeps the registered campuses and runs.

    Raises
    ------
    PKIError
        On a missing certificate or key file, or a SuperExec secret others can read.
    RunFailed
        When the SuperLink or its SuperExec stops with an error, or a campus key cannot be registered.
    """
    tls = None if insecure else tuple(tls_files(pki, {CA_CERT: root_cert, SUPERLINK_CERT: cert, SUPERLINK_KEY: key}))
    state = Path(state or Path("edufl-state") / "coordinator").resolve()
    secret = superexec_secret(state)
    if insecure:
        print(INSECURE_WARNING, file=sys.stderr, flush=True)
    local = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    connect(f"{local}:{port}", None if tls is None else tls[0])
    superexec = Companion(
        superexec_command(f"{local}:{port}", None if tls is None else tls[0], secret),
        LISTENING,
        partial(stop_child, "flower-superlink"),
        "the coordinator's SuperExec",
        env=SUPEREXEC_POLL,
    )
    failures: list[Exception] = []

    def when_listening(line: str) -> None:
        superexec.on_line(line)
        if LISTENING not in line:
            return
        if insecure or pki is None:
            print("coordinator: ready (register campus keys with `flwr supernode register KEY.pub edufl`)", flush=True)
            return

        def register_all():
            try:
                nodes = register(Path(pki))
                print(
                    f"coordinator: ready on {host}:{port} with TLS and campus authentication; "
                    f"{len(nodes)} campus key(s) registered; state in {state}",
                    flush=True,
                )
            except RunFailed as err:
                failures.append(err)
                print(f"edufl: {err}", file=sys.stderr, flush=True)

        threading.Thread(target=register_all, daemon=True).start()

    status, _ = foreground(superlink_command(port, host, tls, secret, state / DATABASE), on_line=when_listening)
    if superexec.failed is not None:
        raise RunFailed(
            f"the coordinator's SuperExec stopped with status {superexec.failed} (see its output above); "
            "the SuperLink was stopped with it, since no run can start without it"
        )
    if status not in (0, -15) or failures:
        raise RunFailed(f"the SuperLink stopped with status {status}" if not failures else str(failures[0]))


def _online_nodes() -> dict[str, str]:
    listing = json.loads(_flwr("supernode", "ls", CONNECTION, "--format", "json").stdout)
    return {str(n["node-id"]): n["status"] for n in listing["nodes"]}


def _registered_nodes(pki: Path | None) -> dict[str, str]:
    """Campus -> node id as recorded by `coordinator start` in ``pki`` (empty if not there)."""
    path = Path(pki) / NODES_FILE if pki else None
    return json.loads(path.read_text()) if path and path.is_file() else {}


def _missing(pki: Path | None, nodes: dict[str, str]) -> str:
    names = _registered_nodes(pki)
    offline = [
        f"{campus} ({nodes.get(node, 'not registered')})" for campus, node in sorted(names.items()) if nodes.get(node) != "online"
    ]
    unnamed = [f"node {n} ({s})" for n, s in nodes.items() if s != "online" and n not in names.values()]
    return ", ".join(offline + unnamed) or "every registered campus is online: register more campuses or lower --min-campuses"


def await_campuses(needed: int, timeout: float, pki: Path | None) -> int:
    """Wait at most ``timeout`` s until ``needed`` SuperNodes are online; returns how many are.

    Raises
    ------
    RunFailed
        Naming the campuses not online (by name where ``pki`` holds the registration record).
    """
    deadline = time.monotonic() + timeout
    while True:
        nodes = _online_nodes()
        online = sum(status == "online" for status in nodes.values())
        if online >= needed:
            return online
        if time.monotonic() >= deadline:
            raise RunFailed(
                f"only {online} campus(es) online after {timeout:g} s, {needed} needed (--min-campuses); "
                f"not online: {_missing(pki, nodes)}"
            )
        time.sleep(1.0)


def resumed_config(run_dir: Path) -> RunConfig:
    """The run config of the run whose results folder is ``run_dir``, from its checkpoint (``out``: ``run_dir``).

    Raises
    ------
    ConfigError
        Naming ``--resume`` when ``run_dir`` holds no checkpoint, or the run finished all its rounds.
    """
    import torch

    from edufl.server.checkpoint import CHECKPOINT

    path = Path(run_dir).resolve() / CHECKPOINT
    if not path.is_file():
        raise ConfigError(
            f"--resume {run_dir}: no {CHECKPOINT} there (a run started by `edufl coordinator run` "
            "writes one after each finished round; with none finished, start the run again)"
        )
    saved = torch.load(path, weights_only=True)
    cfg = RunConfig.from_flower({**saved["config"], "out": str(path.parent)})
    if saved["round"] >= cfg.num_rounds:
        raise ConfigError(f"--resume {run_dir}: run {cfg.run_name} finished all its {cfg.num_rounds} rounds")
    print(f"resuming run {cfg.run_name} after round {saved['round']}/{cfg.num_rounds}", flush=True)
    return cfg


def open_connection(superlink: str, *, pki: Path | None = None, root_cert: Path | None = None, insecure: bool = False) -> None:
    """Check that the coordinator at ``superlink`` answers and is vouched for by the CA (``root_cert``, else
    ``pki/ca.crt``; none with ``insecure``), then point the ``flwr`` connection :data:`CONNECTION` at it.

    Raises
    ------
    ConfigError, PKIError
        On a bad address or a missing CA certificate.
    RunFailed
        When the SuperLink cannot be reached or trusted.
    """
    host, port = parse_address(superlink)
    root_cert = None if insecure else tls_files(pki, {CA_CERT: root_cert})[0]
    try:
        problem = probe_tls(host, port, root_cert)
    except ConnectionError as err:
        raise RunFailed(f"no coordinator at {superlink}: {err}") from None
    if problem:
        raise RunFailed(problem)
    connect(superlink, root_cert)


def new_run_name(out: Path) -> str:
    """A unique run name, ``<out folder name>-<8 hex digits>``: what campuses key their privacy ledger by."""
    return f"{Path(out).name}-{uuid.uuid4().hex[:8]}"


def launch(run_config: dict, out: Path) -> str:
    """``flwr run`` the edufl app on :data:`CONNECTION` with ``run_config`` (dashed keys of
    ``[tool.flwr.app.config]``), echoing the ServerApp's lines; returns Flower's run id once the run completed.
    First prints the SHA-256 of the app bundle it submits: what campus policies approve (``[apps]``).

    Raises
    ------
    RunFailed
        When the run does not start or ends in another state than completed (naming it, and how to
        resume when ``out`` holds a checkpoint).
    """
    with app_folder() as app_dir, tempfile.NamedTemporaryFile("wb", suffix=".toml") as overrides:
        fab_hash, app = bundle_sha256(app_dir)  # built from the same folder, the same way, as `flwr run` builds it
        print(
            f"app bundle {app}, sha256 {fab_hash}: a campus starts it only if its policy lists this hash "
            "(apps.approved_fab_hashes)",
            flush=True,
        )
        tomli_w.dump(run_config, overrides)
        overrides.flush()
        run_id = _launch(app_dir, overrides.name)
    listing = json.loads(_flwr("ls", CONNECTION, "--run-id", run_id, "--format", "json").stdout)["runs"][0]
    if listing["fab-hash"] != fab_hash:
        print(
            f"note: run {run_id} ran app bundle {listing['fab-hash']}, not {fab_hash} (the app's files changed "
            "while it was submitted)",
            flush=True,
        )
    if listing["status"] != "finished:completed":
        details = listing.get("status-details", "")
        raise RunFailed(
            f"run {run_id} ended as {listing['status']}"
            + (f" ({details})" if details and details != "N/A" else "")
            + f"; see `flwr log {run_id} {CONNECTION} --show`"
            + ("; continue it from its last finished round with --resume" if (out / "checkpoint.pt").is_file() else "")
        )
    return run_id


def run(
    cfg: RunConfig | None,
    *,
    superlink: str,
    pki: Path | None = None,
    root_cert: Path | None = None,
    insecure: bool = False,
    wait: float = 60.0,
    resume: Path | None = None,
) -> dict:
    """Run ``cfg`` on the SuperLink at ``superlink`` and return the summary written to ``cfg.out``.

    ``cfg.out`` is made absolute here: the ServerApp writes the results folder
    on the coordinator's machine, at that path. A new run is named
    :func:`new_run_name` (``run-name``, recorded in the summary). With
    ``resume`` (a results folder), ``cfg`` is ignored: the run
    of that folder's checkpoint continues after its last finished round,
    with the same settings and run name. Waits at most ``wait`` seconds for
    ``cfg.min_campuses`` campuses to be online before launching.

    Raises
    ------
    ConfigError, PKIError
        On a bad address, a missing CA certificate, or nothing to resume.
    RunFailed
        When the SuperLink cannot be reached or trusted, too few campuses are
        online, or the run does not complete (also when it was paused).
    """
    if resume is not None:
        cfg = resumed_config(resume)
    open_connection(superlink, pki=pki, root_cert=root_cert, insecure=insecure)
    online = await_campuses(cfg.min_campuses, wait, pki)
    out = Path(cfg.out).resolve()
    name = cfg.run_name if resume is not None else new_run_name(out)
    cfg = RunConfig.from_flower({**cfg.to_flower(), "out": str(out), "run-name": name})
    print(
        f"edufl coordinator run: {online} campus(es) online at {superlink}; run {name}, task {cfg.task}, "
        f"{cfg.num_rounds} round(s), min {cfg.min_campuses} campuses, round timeout {cfg.round_timeout:g} s -> {out}",
        flush=True,
    )
    launch(cfg.to_flower(), out)
    summary_file = out / "summary.json"
    if not summary_file.is_file() or json.loads(summary_file.read_text())["config"].get("run-name") != name:
        raise RunFailed(
            f"run {name} was paused before its last round; continue it with "
            f"`edufl coordinator run --superlink {superlink} ... --resume {out}`"
        )
    return name_campuses(summary_file, "failures", pki)


def raise_for_failures(summary: dict) -> None:
    """Check how the campuses took part in the run of ``summary`` (its ``failures``, each with ``reason`` and ``refused``).

    Raises
    ------
    CampusesRefused
        Listing every refusal (its reason names the campus and the policy key), and any failure beside them.
    CampusesFailed
        When no campus refused, listing every failure (a campus's error, or a reply that never came).
    """
    refusals = sorted({f["reason"] for f in summary["failures"] if f["refused"]})
    failures = sorted({f["reason"] for f in summary["failures"] if not f["refused"]})
    if refusals:
        raise CampusesRefused("campuses refused the run:\n  " + "\n  ".join(refusals + failures))
    if failures:
        raise CampusesFailed("campuses failed during the run:\n  " + "\n  ".join(failures))


def name_campuses(summary_file: Path, key: str, pki: Path | None) -> dict:
    """Put campus names (as registered in ``pki``) next to the node ids in the ``reason`` of each entry of
    ``summary[key]`` (the ServerApp knows only node ids); returns the summary, also rewritten in place."""
    summary = json.loads(summary_file.read_text())
    for campus, node in _registered_nodes(pki).items():
        for entry in summary[key]:
            entry["reason"] = entry["reason"].replace(f"node {node}:", f"campus {campus} (node {node}):")
    summary_file.write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _launch(app_dir: Path, run_config: str) -> str:
    """``flwr run`` the app folder ``app_dir`` with ``run_config``, echoing the ServerApp's own lines; returns the run id."""
    command = ["flwr", "run", str(app_dir), CONNECTION, "--run-config", run_config, "--stream"]
    proc = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=flwr_env(), bufsize=1, errors="replace"
    )
    run_id, lines = None, []
    try:
        for line in proc.stdout:
            lines.append(line)
            if match := re.search(r"Successfully started run (\d+)", line):
                run_id = match.group(1)
                print(f"run {run_id} started (follow with `flwr log {run_id} {CONNECTION}`)", flush=True)
            elif run_id and line.strip() and not _FLOWER_LOG.search(line):
                sys.stdout.write(line)
                sys.stdout.flush()
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait()
    if run_id is None:
        raise RunFailed(f"`flwr run` did not start a run: {' '.join(''.join(lines).split())[-2000:]}")
    return run_id
