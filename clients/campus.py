"""``edufl campus ...``: a campus on Flower's deployment engine.

* :func:`start` checks the campus's data folder, the coordinator's address and
  certificate, then runs a Flower SuperNode in the foreground whose ClientApp
  (``clients/app.py``) reads only that folder;
* :func:`export_oulad` writes one campus's slice of OULAD, to play a
  campus's own export in demos and tests;
* :func:`validate` checks a campus folder before it joins.
"""

from __future__ import annotations

import time
from pathlib import Path

from federation.data import DataError, Problem, Tables, campus_names, campus_slice, load_tables, write_tables
from federation.deploy import free_port, foreground, parse_address, probe_tls
from federation.pki import PKIError, check_campus_name, campus_key, require

# What flower-supernode prints when the SuperLink turns it away, and what it means for a campus.
_REFUSALS = {
    "[code: 2004]": "the coordinator refused this campus's key: it is not registered there "
                    "(send the campus's .pub file to the coordinator, who registers it)",
    "CERTIFICATE_VERIFY_FAILED": "the coordinator's TLS certificate is not signed by the given CA (wrong --root-cert?)",
}


# Flower marks a SuperNode offline two heartbeats (2 x 30 s) after its last one.
REJOIN_WAIT_S = 75.0


class CampusRefused(RuntimeError):
    """The SuperLink turned this campus away, or its SuperNode stopped with an error."""


def validate(data: Path) -> Tables:
    """Load and check the campus folder ``data``; print what it holds.

    Raises
    ------
    DataError
        Listing every problem found (file, line, column), or when the folder holds no registration.
    """
    tables = load_tables(data)
    if tables["studentInfo"].empty:
        raise DataError([Problem("studentInfo.csv", None, None, "no registrations: a campus needs at least one student")])
    modules = ", ".join(campus_names(tables, "module"))
    print(f"{Path(data)}: OK, {len(tables['studentInfo'])} registrations (modules {modules}); "
          f"{', '.join(f'{k} {len(v)} rows' for k, v in tables.frames.items())}")
    for note in tables.notes:
        print(f"note: {note}")
    return tables


def export_oulad(campus: str, out: Path, source: Path, campus_by: str = "module", shards: int = 0) -> Path:
    """Write campus ``campus``'s rows of the OULAD tables in ``source`` to the new folder ``out``.

    Campuses are formed by ``campus_by`` as in ``edufl simulate``. Returns ``out``.

    Raises
    ------
    DataError
        When ``source`` fails validation, ``campus`` holds no rows, or ``out`` exists and is not empty.
    """
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise DataError([Problem(str(out), None, None, "already exists and is not empty: choose a new --out folder")])
    tables = load_tables(source)
    names = campus_names(tables, campus_by, shards)
    if campus not in names:
        raise DataError([Problem("studentInfo.csv", None, None,
                                 f"no campus {campus!r} by {campus_by}; campuses: {', '.join(names)}")])
    own = campus_slice(tables, campus_by, campus, shards)
    write_tables(own, out)
    print(f"campus {campus}: {out} ({len(own['studentInfo'])} registrations)")
    return out


def supernode_command(campus: str, data: Path, superlink: str, root_cert: Path | None, key: Path | None,
                      runtime_port: int) -> list[str]:
    """The ``flower-supernode`` command line for ``campus`` reading only ``data`` (``root_cert`` None: plaintext)."""
    tls = ["--insecure"] if root_cert is None else ["--root-certificates", str(root_cert)]
    auth = [] if key is None else ["--auth-supernode-private-key", str(key)]
    return [
        "flower-supernode", "--superlink", superlink, *tls, *auth,
        "--node-config", f"data-dir='{Path(data).resolve()}' campus='{campus}'",
        "--isolation", "subprocess", "--port", str(runtime_port),
    ]


def start(*, data: Path, superlink: str, campus: str | None = None, pki: Path | None = None,
          root_cert: Path | None = None, key: Path | None = None, insecure: bool = False,
          rejoin_wait: float = REJOIN_WAIT_S) -> None:
    """Check everything a campus needs, then run its SuperNode in the foreground until stopped.

    ``campus`` defaults to the name of the ``data`` folder. With ``pki``, the
    CA certificate and the key come from the folder ``edufl certs`` wrote;
    ``root_cert`` and ``key`` override them. ``insecure``: plaintext, no
    authentication (local experiments only). A refused key is retried for
    ``rejoin_wait`` seconds: after an unclean stop the SuperLink keeps the
    campus online until its heartbeat lapses, and refuses it meanwhile.

    Raises
    ------
    DataError
        When the data folder fails validation (the SuperNode is never started).
    ConfigError, PKIError
        On a bad address, campus name or missing key/certificate file.
    CampusRefused
        When the coordinator cannot be trusted or refuses this campus, or the SuperNode fails.
    """
    campus = check_campus_name(campus or Path(data).resolve().name)
    host, port = parse_address(superlink)
    if not insecure:
        if pki is None and (root_cert is None or key is None):
            raise PKIError("give --pki DIR, or both --root-cert FILE and --key FILE (or --insecure for plaintext)")
        root_cert = require(root_cert or Path(pki) / "ca.crt", "CA certificate (--root-cert)")
        key = require(key or campus_key(pki, campus), f"campus {campus}'s private key (--key)")
    else:
        root_cert = key = None
        print("WARNING: --insecure: this campus sends model updates in plaintext and is not authenticated; "
              "local experiments only")
    try:
        validate(data)
    except DataError as err:
        raise DataError(err.problems, hint=f"campus {campus} does not join with this folder; fix it and start again") from None
    try:
        problem = probe_tls(host, port, root_cert)
    except ConnectionError as err:
        print(f"note: {err}; the SuperNode keeps trying to connect")
        problem = None
    if problem:
        raise CampusRefused(f"campus {campus} does not connect: {problem}")
    print(f"campus {campus}: starting its SuperNode against {superlink} ({'plaintext' if insecure else 'TLS'})")
    deadline = time.monotonic() + rejoin_wait
    while True:
        status, tail = foreground(supernode_command(campus, data, superlink, root_cert, key, free_port()))
        refused = status != 0 and any("[code: 2004]" in line for line in tail)
        if not refused or time.monotonic() >= deadline:
            break
        print(f"note: the coordinator refused campus {campus}; if it stopped uncleanly less than "
              f"{REJOIN_WAIT_S:g} s ago it is still marked online there; retrying in 5 s", flush=True)
        time.sleep(5.0)
    if status != 0:
        reasons = [why for marker, why in _REFUSALS.items() if any(marker in line for line in tail)]
        raise CampusRefused(f"campus {campus}: the SuperNode stopped with status {status}"
                            + (f": {reasons[0]}" if reasons else " (see its output above)"))
