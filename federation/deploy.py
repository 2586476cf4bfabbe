"""What the coordinator and campus commands share on Flower's deployment engine.

Both sides run one Flower process (``flower-superlink`` or
``flower-supernode``) in the foreground: its output goes to the terminal, a
Ctrl-C or SIGTERM stops it, and its exit status becomes edufl's. Before a
campus connects, :func:`probe_tls` checks the SuperLink's address and
certificate, so that a wrong CA or a TLS/plaintext mismatch is reported in
plain words instead of a retry loop.
"""

from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
from collections import deque
from collections.abc import Callable
from pathlib import Path

from .runconfig import ConfigError

# A deployment runs offline: no telemetry, no update check, no per-run `uv sync`.
FLWR_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
}


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
        return s.getsockname()[1]


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
        return (f"the SuperLink at {host}:{port} presented a certificate that {root_cert} does not vouch for "
                f"({err.verify_message}): wrong CA file, or a certificate without {host} among its names")
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
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=flwr_env(),
                            bufsize=1, errors="replace")

    def echo() -> None:
        for line in proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            tail.append(line.rstrip("\n"))
            if on_line:
                on_line(line)

    def stop(signum, _frame) -> None:
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
