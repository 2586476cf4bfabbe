"""``edufl campus ...``: a campus on Flower's deployment engine.

* :func:`start` checks the campus's data folder, the coordinator's address and
  certificate, then runs a Flower SuperNode in the foreground whose ClientApp
  (``clients/app.py``) reads only that folder, started only for an app bundle
  the campus policy approves (the gate of :mod:`clients.approval`);
* :func:`export_oulad` writes one campus's slice of OULAD, to play a
  campus's own export in demos and tests;
* :func:`validate` checks a campus folder (read through its mapping to the
  learner-record contract) before it joins;
* :func:`approve` gives the data steward the SHA-256 of an app bundle they
  reviewed and adds it to the campus policy (code approval, :mod:`clients.approval`);
* :func:`budget` and :func:`audit` show what a campus has released, from the
  privacy ledger and the audit log in its state folder.
"""

from __future__ import annotations

import secrets
import sys
import tempfile
import time
from pathlib import Path

from edufl.federation.bundle import bundle_sha256
from edufl.federation.deploy import (
    CA_CERT,
    campus_key,
    check_campus_name,
    foreground,
    free_port,
    parse_address,
    probe_tls,
    tls_files,
)
from edufl.federation.partition import campus_names, campus_slice
from edufl.federation.policy import CampusPolicy
from edufl.federation.problems import DataError, Problem
from edufl.federation.runconfig import ConfigError
from edufl.federation.schema import load_schema
from edufl.federation.tables import Tables, load_tables
from edufl.federation.writers import write_tables

from .approval import add_approval, gate_command, gate_process
from .node import CampusRefusal

__all__ = [
    "REJOIN_WAIT_S",
    "approve",
    "audit",
    "budget",
    "budget_rows",
    "export_oulad",
    "outcome",
    "start",
    "supernode_command",
    "validate",
]

# What flower-supernode prints when the SuperLink turns it away, and what it means for a campus.
_REFUSALS = {
    "[code: 2004]": "the coordinator refused this campus's key: it is not registered there "
    "(send the campus's .pub file to the coordinator, who registers it)",
    "CERTIFICATE_VERIFY_FAILED": "the coordinator's TLS certificate is not signed by the given CA (wrong --root-cert?)",
}


# Flower marks a SuperNode offline two heartbeats (2 x 30 s) after its last one.
REJOIN_WAIT_S = 75.0


def validate(data: Path, mapping: Path | None = None, schema: Path | None = None) -> Tables:
    """Load and check the campus folder ``data`` through its ``mapping`` to the learner-record
    contract (None: the OULAD layout) against the federation schema file ``schema`` (None: OULAD's); print what
    it holds and the missing values per field.

    Raises
    ------
    MappingError
        When the mapping file cannot be used, or does not fit the schema.
    SchemaError
        When the schema file cannot be used.
    DataError
        Listing every problem found (file, line, column, value, what was expected),
        or when the folder holds no registration; the missingness table is printed first.
    """
    federation = load_schema(schema)
    try:
        tables = load_tables(data, mapping, federation)
    except DataError as err:
        _print_missingness(err.missingness)
        raise
    _print_missingness(tables.missingness)
    learners = tables["learners"]
    if learners.empty:
        raise DataError(
            [Problem(tables.mapping.learners.file, None, None, "no registrations: a campus needs at least one student")]
        )
    courses = ", ".join(campus_names(tables, "module"))
    print(
        f"{Path(data)}: OK, {len(learners)} registrations (courses {courses}) "
        f"for federation schema {federation.name!r} (sha256 {federation.digest}); "
        f"{', '.join(f'{k} {len(v)} rows' for k, v in tables.frames.items())}"
    )
    for note in tables.notes:
        print(f"note: {note}")
    return tables


def _print_missingness(missingness) -> None:
    """Missing values per contract field (only fields with any), as a table."""
    if missingness is None:
        return
    from rich.table import Table

    rows = missingness[missingness["missing"] > 0]
    if rows.empty:
        print("missing values: none")
        return
    table = Table("table", "field", "file", "column", "missing", "of rows", "share", title="missing values per contract field")
    for r in rows.itertuples(index=False):
        table.add_row(r.table, r.field, r.file, r.column, str(r.missing), str(r.rows), f"{r.share:.1%}")
    _show(table)


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
        raise DataError(
            [
                Problem(
                    tables.mapping.learners.file, None, None, f"no campus {campus!r} by {campus_by}; campuses: {', '.join(names)}"
                )
            ]
        )
    own = campus_slice(tables, campus_by, campus, shards)
    write_tables(own, out)
    print(f"campus {campus}: {out} ({len(own['learners'])} registrations)")
    return out


SUPERNODE = [sys.executable, "-I", "-m", "edufl.clients.supernode"]
"""Flower's ``flower-supernode`` with shorter polling waits (:mod:`clients.supernode`); ``-I``: the installed
edufl, never a folder of that name in the working directory."""


def supernode_command(
    campus: str,
    data: Path,
    state: Path,
    policy: Path | None,
    superlink: str,
    root_cert: Path | None,
    key: Path | None,
    runtime_port: int,
    gate_secret: Path,
    mapping: Path | None = None,
) -> list[str]:
    """The ``flower-supernode`` command line (:data:`SUPERNODE`) for ``campus`` reading only ``data`` (through ``mapping``;
    None: the OULAD layout), keeping its ledger and audit log in ``state``, under ``policy`` (None:
    the safe defaults); ``root_cert`` None: plaintext.

    The SuperNode starts no app itself (``--isolation process``): only the holder of ``gate_secret``,
    the campus's code-approval gate (:mod:`clients.approval`), may take its tasks, on the Runtime API
    at 127.0.0.1:``runtime_port``.
    """
    tls = ["--insecure"] if root_cert is None else ["--root-certificates", str(root_cert)]
    auth = [] if key is None else ["--auth-supernode-private-key", str(key)]
    node_config = f"data-dir='{Path(data).resolve()}' campus='{campus}' state-dir='{Path(state).resolve()}'"
    if policy is not None:
        node_config += f" policy='{Path(policy).resolve()}'"
    if mapping is not None:
        node_config += f" mapping='{Path(mapping).resolve()}'"
    return [
        *SUPERNODE,
        "--superlink",
        superlink,
        *tls,
        *auth,
        "--node-config",
        node_config,
        "--isolation",
        "process",
        "--port",
        str(runtime_port),
        "--superexec-auth-secret-file",
        str(gate_secret),
    ]


def start(
    *,
    data: Path,
    superlink: str,
    campus: str | None = None,
    state: Path | None = None,
    policy: Path | None = None,
    pki: Path | None = None,
    root_cert: Path | None = None,
    key: Path | None = None,
    insecure: bool = False,
    rejoin_wait: float = REJOIN_WAIT_S,
    mapping: Path | None = None,
    schema: Path | None = None,
) -> None:
    """Check everything a campus needs, then run its SuperNode in the foreground until stopped.

    ``campus`` defaults to the name of the ``data`` folder. ``state`` is the
    folder of the campus's privacy ledger and audit log (default
    ``edufl-state/<campus>`` under the current directory); ``policy`` its
    policy file (None: the safe defaults of
    :class:`federation.policy.CampusPolicy`); ``mapping`` the mapping of its
    export to the learner-record contract (None: the OULAD layout), checked against the federation schema file
    ``schema`` (None: OULAD's; each run's ClientApp checks the data against the run's schema again). With ``pki``, the
    CA certificate and the key come from the folder ``edufl certs`` wrote;
    ``root_cert`` and ``key`` override them. ``insecure``: plaintext, no
    authentication (local experiments only). A refused key is retried for
    ``rejoin_wait`` seconds: after an unclean stop the SuperLink keeps the
    campus online until its heartbeat lapses, and refuses it meanwhile.
    Every app the SuperNode is sent is started, or refused, by the campus's
    code-approval gate (:mod:`clients.approval`), run beside it: only app
    bundles ``policy`` approves run.

    Raises
    ------
    DataError, MappingError
        When the data folder or its mapping fails validation (the SuperNode is never started).
    PolicyError
        When the policy file cannot be used (the SuperNode is never started).
    ConfigError, PKIError
        On a bad address, campus name or missing key/certificate file.
    CampusRefusal
        When the coordinator cannot be trusted or refuses this campus, or the SuperNode or its gate fails.
    """
    campus = check_campus_name(campus or Path(data).resolve().name)
    host, port = parse_address(superlink)
    approved = CampusPolicy.load(policy).apps.approved_fab_hashes
    state = Path(state or Path("edufl-state") / campus).resolve()
    if not insecure:
        root_cert, key = tls_files(pki, {CA_CERT: root_cert, campus_key(campus): key})
    else:
        root_cert = key = None
        print(
            "WARNING: --insecure: this campus sends model updates in plaintext and is not authenticated; local experiments only"
        )
    try:
        validate(data, mapping, schema)
    except DataError as err:
        raise DataError(err.problems, hint=f"campus {campus} does not join with this folder; fix it and start again") from None
    try:
        problem = probe_tls(host, port, root_cert)
    except ConnectionError as err:
        print(f"note: {err}; the SuperNode keeps trying to connect")
        problem = None
    if problem:
        raise CampusRefusal(f"campus {campus} does not connect: {problem}")
    print(
        f"campus {campus}: starting its SuperNode against {superlink} ({'plaintext' if insecure else 'TLS'}); "
        f"privacy ledger and audit log in {state}; policy {Path(policy).resolve() if policy else 'defaults (no --policy)'}; "
        f"{len(approved)} approved app bundle(s)"
    )
    if not approved:
        print(
            f"WARNING: campus {campus}'s policy approves no app bundle (apps.approved_fab_hashes): it refuses every run. "
            "Approve the bundle you reviewed with `edufl campus approve FAB_OR_APP_DIR --policy FILE`",
            flush=True,
        )
    deadline = time.monotonic() + rejoin_wait
    with tempfile.TemporaryDirectory(prefix="edufl-gate-") as private:  # readable by this user only
        secret = Path(private) / "superexec-auth.secret"
        secret.write_bytes(secrets.token_bytes(32))
        while True:
            runtime_port = free_port()
            gate = gate_process(gate_command(campus, state, policy, f"127.0.0.1:{runtime_port}", secret))
            status, tail = foreground(
                supernode_command(campus, data, state, policy, superlink, root_cert, key, runtime_port, secret, mapping),
                on_line=gate.on_line,
            )
            refused = status != 0 and any("[code: 2004]" in line for line in tail)
            if not refused or time.monotonic() >= deadline:
                break
            print(
                f"note: the coordinator refused campus {campus}; if it stopped uncleanly less than "
                f"{REJOIN_WAIT_S:g} s ago it is still marked online there; retrying in 5 s",
                flush=True,
            )
            time.sleep(5.0)
    if gate.failed is not None:
        raise CampusRefusal(
            f"campus {campus}: its code-approval gate stopped with status {gate.failed} (see its output "
            "above); the SuperNode was stopped with it, since no app may start without the gate"
        )
    if status != 0:
        reasons = [why for marker, why in _REFUSALS.items() if any(marker in line for line in tail)]
        raise CampusRefusal(
            f"campus {campus}: the SuperNode stopped with status {status}"
            + (f": {reasons[0]}" if reasons else " (see its output above)")
        )


def approve(bundle: Path | None, policy: Path | None = None) -> str:
    """Print the SHA-256 of the app bundle ``bundle`` (a ``.fab`` file, or an app folder built as ``flwr build``
    builds it; None: the bundle this installed edufl submits) and, with ``policy``, add it to that policy file's
    approved bundles. Returns the hash.

    Raises
    ------
    ConfigError
        When ``bundle`` is not an app bundle or app folder.
    PolicyError
        When the policy file is not valid, or cannot take the hash without being rewritten.
    """
    from edufl.federation.store import now

    fab_hash, name = bundle_sha256(bundle)
    print(f"{bundle or 'this edufl'}: app bundle {name}, sha256 {fab_hash}")
    if policy is not None:
        added = add_approval(policy, fab_hash, f"{name}, approved {now()[:10]}")
        print(
            f"{policy}: "
            + (
                "added to apps.approved_fab_hashes; campuses under this policy start this bundle's "
                "ClientApp from their next message on"
                if added
                else "already in apps.approved_fab_hashes"
            )
        )
    return fab_hash


def _state_file(state: Path, name: str, what: str) -> Path:
    """``state / name``, which must exist (it is never created here).

    Raises
    ------
    ConfigError
        Naming ``--state`` when the folder or the file is missing.
    """
    path = Path(state) / name
    if not Path(state).is_dir():
        raise ConfigError(f"--state {state}: no such folder (a campus's state folder, as printed by `edufl campus start`)")
    if not path.is_file():
        raise ConfigError(f"--state {state}: no {what} here ({name}); this campus has not answered a run with this state folder")
    return path


def _show(renderable) -> None:
    """Print a rich table or text; piped or captured output is 200 columns wide, so that no cell is cut short."""
    from rich.console import Console

    console = Console(soft_wrap=True)
    if not console.is_terminal:
        console.width = 200
    console.print(renderable)


def budget_rows(state: Path, policy: Path | None = None) -> list[dict]:
    """Per dataset in the campus's privacy ledger, what it has released and the ε spent (what :func:`budget` shows).

    Each row: ``campus``, ``dataset`` (SHA-256 of the data files), ``runs``,
    ``releases``, ``epsilon`` (RDP composition over all runs' releases, at the
    policy's δ) and, with ``policy``, ``remaining`` (its total budget minus
    ``epsilon``, never below 0). Without ``policy`` δ is the safe default's.

    Raises
    ------
    ConfigError
        When ``state`` holds no privacy ledger.
    PolicyError
        When the policy file cannot be used.
    """
    from contextlib import closing

    from edufl.federation.ledger import LEDGER_FILE, PrivacyLedger

    limits = CampusPolicy.load(policy).privacy
    _state_file(state, LEDGER_FILE, "privacy ledger")
    with closing(PrivacyLedger(state)) as ledger:
        rows = []
        for dataset, campus in ledger.datasets().items():
            releases = ledger.releases(dataset)
            row = dict(
                campus=campus,
                dataset=dataset,
                runs=len({r.run_id for r in releases}),
                releases=len(releases),
                epsilon=ledger.spent(dataset, limits.delta),
            )
            if policy is not None:
                row["remaining"] = max(limits.total_epsilon_budget - row["epsilon"], 0.0)
            rows.append(row)
    return rows


def budget(state: Path, policy: Path | None = None) -> list[dict]:
    """Print :func:`budget_rows` as a table and return them (raises as it does)."""
    from rich.table import Table

    rows = budget_rows(state, policy)
    limits = CampusPolicy.load(policy).privacy
    table = Table(title=f"privacy budget spent, {state} (ε at δ = {limits.delta:g}, over all runs)")
    for column in (
        "campus",
        "dataset",
        "runs",
        "releases",
        "ε spent",
        *([f"ε remaining of {limits.total_epsilon_budget:g}"] if policy is not None else []),
    ):
        table.add_column(column, justify="left" if column in ("campus", "dataset") else "right")
    for row in rows:
        table.add_row(
            row["campus"],
            row["dataset"][:12],
            str(row["runs"]),
            str(row["releases"]),
            f"{row['epsilon']:.3f}",
            *([f"{row['remaining']:.3f}"] if policy is not None else []),
        )
    _show(table if rows else f"{state}: the privacy ledger holds no release yet (ε spent 0)")
    return rows


def outcome(record) -> str:
    """What became of the message an audit record describes: ``sent``, ``refused``, ``failed`` or ``blocked``."""
    if record.sent:
        return "sent"
    return record.reason.split(":")[0] if record.reason.startswith(("refused:", "failed:")) else "blocked"


def audit(state: Path, run: str | None = None, fmt: str = "table") -> list[dict]:
    """Print the campus's audit log (of one run with ``run``), as a table or one JSON object per line; return the records.

    Each record as :func:`federation.audit.as_dict` gives it. Table columns:
    time (UTC), run, round, message type, outcome (sent, blocked, refused or
    failed), arrays sent, payload bytes, first 12 hex digits of the payload's
    SHA-256, and the run's ε after a model update.

    Raises
    ------
    ConfigError
        When ``state`` holds no audit log, or it has no record of ``run``.
    """
    import json
    from contextlib import closing

    from edufl.federation.audit import AUDIT_FILE, AuditLog, as_dict

    _state_file(state, AUDIT_FILE, "audit log")
    with closing(AuditLog(state)) as log:
        records = log.records(run)
        if run is not None and not records:
            runs = sorted({r.run_id for r in log.records()})
            raise ConfigError(f"--run {run}: no audit record of this run in {state}; runs recorded: {', '.join(runs) or 'none'}")
    if fmt == "json":
        for record in records:
            print(json.dumps(as_dict(record)))
        return [as_dict(r) for r in records]
    from rich.table import Table

    table = Table(title=f"audit log, {state}" + (f", run {run}" if run else ""))
    for column in ("time", "run", "round", "type", "outcome", "arrays", "bytes", "sha256", "ε"):
        table.add_column(column, justify="right" if column in ("round", "arrays", "bytes", "ε") else "left")
    for r in records:
        table.add_row(
            r.recorded_at,
            r.run_id,
            str(r.server_round),
            r.message_type,
            outcome(r),
            str(len(r.arrays)),
            str(r.payload_bytes),
            r.payload_sha256[:12],
            f"{r.dp.epsilon:.3f}" if r.HasField("dp") else "",
        )
    _show(table if records else f"{state}: the audit log holds no record yet")
    return [as_dict(r) for r in records]
