"""What the coordinator and campus commands share on Flower's deployment engine.

Both sides run one Flower process (``flower-superlink`` or
``flower-supernode``) in the foreground: its output goes to the terminal, a
Ctrl-C or SIGTERM stops it, and its exit status becomes edufl's. Beside it runs
the SuperExec that alone may take its tasks (:class:`Companion`). Before a
campus connects, :func:`probe_tls` checks the SuperLink's address and
certificate, so that a wrong CA or a TLS/plaintext mismatch is reported in
plain words instead of a retry loop.

Both sides also read the PKI folder ``edufl certs`` writes
(:mod:`edufl.server.pki`): :func:`tls_files` finds the files a command needs
there, or where its options (``--root-cert``, ``--cert``, ``--key``) point,
and :data:`PkiOption`, :data:`RootCertOption` and :data:`InsecureOption`
declare those options once for every command that connects.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Annotated

import typer

from .errors import UserError
from .runconfig import ConfigError

__all__ = [
    "CA_CERT",
    "FLWR_ENV",
    "SUPEREXEC_POLL",
    "Companion",
    "SUPERLINK_CERT",
    "SUPERLINK_KEY",
    "InsecureOption",
    "PKIError",
    "PKIFile",
    "PkiOption",
    "RootCertOption",
    "campus_key",
    "check_campus_name",
    "flwr_env",
    "foreground",
    "free_port",
    "parse_address",
    "probe_tls",
    "stop_child",
    "tls_files",
]

# A deployment runs offline: no telemetry, no update check, no per-run `uv sync`.
FLWR_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
}


SUPEREXEC_POLL = {"FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.1"}
"""The environment of edufl's SuperExecs (the campus gate, the coordinator's): look for a new task every 0.1 s
(Flower's default is 1 s; a value the user set wins)."""


def flwr_env() -> dict[str, str]:
    """This process's environment with :data:`FLWR_ENV` set (values the user set win).

    Flower's commands are looked up first next to this Python (its virtual
    environment), whether or not that environment is activated.
    """
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return {**FLWR_ENV, **os.environ, "PATH": path}


def parse_address(address: str, option: str = "--superlink") -> tuple[str, int]:
    """``HOST:PORT`` (``[IPv6]:PORT`` too) -> (host, port).

    Raises
    ------
    ConfigError
        Naming ``option`` when the address has no valid port.
    """
    host, sep, port = address.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{option} {address!r}: expected HOST:PORT, e.g. 127.0.0.1:9200")
    return host, int(port)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def probe_tls(host: str, port: int, root_cert: Path | None, timeout: float = 5.0) -> str | None:
    """Check what a SuperLink at ``host:port`` speaks before connecting to it.

    With ``root_cert``: a TLS handshake that verifies the server's certificate
    against it and ``host``. Without: whether the server answers a TLS
    handshake at all (then a plaintext client would be refused).

    Returns None when a client so configured would get through, else a
    one-line explanation of why not.

    Raises
    ------
    ConnectionError
        When nothing accepts connections at ``host:port`` (yet).
    """
    try:
        raw = socket.create_connection((host, port), timeout=timeout)
    except OSError as err:
        raise ConnectionError(f"nothing answers at {host}:{port} ({err.strerror or err})") from None
    context = ssl.create_default_context(cafile=str(root_cert)) if root_cert else ssl._create_unverified_context()
    try:
        with context.wrap_socket(raw, server_hostname=host):
            pass
    except ssl.SSLCertVerificationError as err:
        return (
            f"the SuperLink at {host}:{port} presented a certificate that {root_cert} does not vouch for "
            f"({err.verify_message}): wrong CA file, or a certificate without {host} among its names"
        )
    except (ssl.SSLError, OSError) as err:
        if root_cert:
            return f"the SuperLink at {host}:{port} does not speak TLS ({err}): was it started with --insecure?"
        return None
    finally:
        raw.close()
    if root_cert is None:
        return f"the SuperLink at {host}:{port} uses TLS: drop --insecure and give its CA certificate (--root-cert or --pki)"
    return None


def _adopt_orphans() -> None:
    """Linux: make this process the "subreaper" of its descendants, so that processes
    Flower detaches (SuperExec, app processes) stay findable as its children."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER


def foreground(command: list[str], on_line: Callable[[str], None] | None = None, keep: int = 200) -> tuple[int, list[str]]:
    """Run ``command`` until it ends, echoing its output; SIGINT/SIGTERM to this process stop it.

    When it ends, every process it left behind (Flower's SuperExec, app
    processes) is killed too. The command shares this process's process group,
    so killing that group stops everything. ``on_line`` sees each output line
    as it is echoed. Returns the exit status and the last ``keep`` lines of output.
    """
    import psutil

    _adopt_orphans()
    tail: deque[str] = deque(maxlen=keep)
    proc = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=flwr_env(), bufsize=1, errors="replace"
    )

    def echo() -> None:
        for line in proc.stdout or ():
            sys.stdout.write(line)
            sys.stdout.flush()
            tail.append(line.rstrip("\n"))
            if on_line:
                on_line(line)

    def stop(signum: int, _frame: FrameType | None) -> None:
        proc.send_signal(signal.SIGTERM)

    previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    reader = threading.Thread(target=echo, daemon=True)
    reader.start()
    try:
        status = proc.wait()
        reader.join(timeout=2.0)  # the last lines; a left-behind process may hold the pipe open
        return status, list(tail)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
        for child in psutil.Process().children(recursive=True):
            try:
                child.kill()
            except psutil.NoSuchProcess:
                pass


def stop_child(program: str) -> bool:
    """Stop this process's running child ``program`` (e.g. ``flower-superlink``, or a module run with
    ``python -m``) with SIGTERM, as Ctrl-C would; False when there is none."""
    import psutil

    for child in psutil.Process().children():
        try:
            if any(Path(part).name == program for part in child.cmdline()[:4]):
                child.terminate()
                return True
        except psutil.NoSuchProcess:
            pass
    return False


class Companion:
    """A process (``command``, ``what`` it is in messages) run beside the one :func:`foreground` runs, in
    ``cwd`` with :func:`flwr_env` plus ``env`` (values the user set win).

    :meth:`on_line` (foreground's ``on_line``) starts it once that process prints
    ``ready``. Should it end with another status than ``stopped`` while that
    process runs, ``stop`` (which says whether there was a process to stop) stops
    that one too, and :attr:`failed` holds its exit status. It is stopped with
    everything else foreground left behind.
    """

    def __init__(
        self,
        command: list[str],
        ready: str,
        stop: Callable[[], bool],
        what: str,
        stopped: tuple[int, ...] = (0, 1, 2, 3),
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ):
        self.command, self.ready, self.stop, self.what, self.stopped = command, ready, stop, what, stopped
        self.env, self.cwd = dict(env or {}), cwd
        self.proc: subprocess.Popen[bytes] | None = None
        self.watcher: threading.Thread | None = None
        self.failed: int | None = None

    def on_line(self, line: str) -> None:
        if self.proc is None and self.ready in line:
            self.proc = subprocess.Popen(self.command, env={**self.env, **flwr_env()}, cwd=self.cwd)
            self.watcher = threading.Thread(target=self._watch, args=(self.proc,), daemon=True)
            self.watcher.start()

    def _watch(self, proc: subprocess.Popen[bytes]) -> None:
        status = proc.wait()
        if status not in self.stopped and self.stop():  # (when the main process has ended, this one is stopped after it)
            self.failed = status
            print(f"edufl: {self.what} stopped with status {status}; the process beside it was stopped too", flush=True)


# --- the PKI folder (written by `edufl certs`) and the options that point past it --------------


class PKIError(UserError):
    """A missing, unreadable or mismatched key or certificate, or an invalid campus or host name (exit status 2)."""


@dataclass(frozen=True)
class PKIFile:
    """One file a command reads from a PKI folder: its ``name`` there, the ``option`` that gives it
    directly instead, and ``what`` it is (for messages)."""

    name: str
    option: str
    what: str


CA_CERT = PKIFile("ca.crt", "--root-cert", "CA certificate")
SUPERLINK_CERT = PKIFile("superlink.crt", "--cert", "SuperLink certificate")
SUPERLINK_KEY = PKIFile("superlink.key", "--key", "SuperLink private key")
CAMPUS_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")

PkiOption = Annotated[
    Path | None, typer.Option("--pki", help="folder written by `edufl certs` (the flags below override its files)")
]
RootCertOption = Annotated[
    Path | None, typer.Option("--root-cert", help="CA certificate (PEM) that signed the SuperLink's certificate")
]
InsecureOption = Annotated[bool, typer.Option("--insecure", help="plaintext, no authentication: local experiments only")]


def campus_key(campus: str) -> PKIFile:
    """Campus ``campus``'s SuperNode authentication private key (OpenSSH format, ``campus-NAME.key``)."""
    return PKIFile(f"campus-{campus}.key", "--key", f"campus {campus}'s private key")


def check_campus_name(name: str) -> str:
    """Return ``name`` if it can name a campus (letters, digits, ``_ . -``; at most 64), else raise PKIError."""
    if not CAMPUS_NAME.fullmatch(name):
        raise PKIError(
            f"campus name {name!r}: use letters, digits, '_', '.' or '-' (at most 64, starting with a letter or digit)"
        )
    return name


def tls_files(pki: Path | None, given: Mapping[PKIFile, Path | None]) -> list[Path]:
    """The resolved path of each file of ``given``, in its order: the path given (by its option), else
    that file in the folder ``pki``.

    Raises
    ------
    PKIError
        When ``pki`` is None and a file was not given, or a file is not there (naming its option).
    """
    found = []
    for file, path in given.items():
        if path is None:
            if pki is None:
                options = [f"{file.option} FILE" for file in given]
                listed = options[0] if len(options) == 1 else f"{', '.join(options[:-1])} and {options[-1]}"
                raise PKIError(f"give --pki DIR, or {listed} (or --insecure for plaintext)")
            path = Path(pki) / file.name
        found.append(_existing(path, file))
    return found


def _existing(path: Path, file: PKIFile) -> Path:
    """``path`` resolved if it is a file, else raise PKIError naming the ``file`` it should be."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise PKIError(f"{file.what} ({file.option}) not found: {path} (make demo files with `edufl certs`, or pass your own)")
    return path.resolve()
