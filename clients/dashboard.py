"""``edufl campus dashboard``: a local, read-only web page of what a campus released and refused.

It reads the campus's state folder (``ledger.sqlite``, ``audit.sqlite``) and
its policy file, and nothing else: never the data folder, so no page can show
a data row. It writes nothing and creates neither store (a missing one shows as
empty). Pages (Starlette with Jinja2 templates, :mod:`federation.web`):

* ``/``: ε spent per dataset against ``privacy.total_epsilon_budget`` (the rows of
  ``edufl campus budget``, from the same function, :func:`clients.campus.budget_rows`),
  a chart of each dataset's cumulative ε after each release (RDP composition at
  the policy's δ, :func:`federation.privacy.epsilon`, so the last point is the
  budget figure) with the budget line, ε per run, the policy in force, and the
  approved app bundles with the note ``edufl campus approve`` wrote beside each
  (its date of approval);
* ``/messages``: every audit record (``?run=``, ``?outcome=`` filter), each
  refusal and block with its reason and the policy key it names. A failure's
  reason is an exception's text, which may quote a record: only the
  exception's type is shown (the whole record: ``edufl campus audit --format json``).
"""

from __future__ import annotations

import re
from datetime import datetime
from pathlib import Path

from edufl.federation.audit import AUDIT_FILE, AuditLog
from edufl.federation.ledger import LEDGER_FILE, PrivacyLedger
from edufl.federation.policy import CampusPolicy
from edufl.federation.proto.audit_pb2 import AuditRecord
from edufl.federation.runconfig import ConfigError

from .campus import budget_rows, outcome

__all__ = ["OUTCOMES", "POLICY_KEYS", "app", "approvals", "dashboard", "messages", "overview", "policy_key"]

OUTCOMES = ("sent", "blocked", "refused", "failed")
"""What can become of an outgoing message (:func:`clients.campus.outcome`)."""

POLICY_KEYS = {
    "privacy.max_epsilon_per_run": "a run may spend at most this ε on the campus's data",
    "privacy.total_epsilon_budget": "all runs together may spend at most this ε on the campus's data",
    "privacy.delta": "no run may ask for a larger δ",
    "privacy.min_noise_multiplier": "the DP noise is never below this",
    "training.max_rounds": "a run may have at most this many rounds",
    "training.max_local_epochs": "a round may train at most this many local epochs",
    "training.allowed_tasks": "only these prediction tasks may be trained",
    "release.min_cohort_size": "no metric or statistic on fewer records than this",
    "apps.approved_fab_hashes": "only app bundles the data steward approved may run",
    "reproducible-noise": "no policy allows DP noise the coordinator could predict",
}
"""Every key a refusal or block may name (each key of a policy file, and ``reproducible-noise``), in words."""

_KEY = re.compile("|".join(re.escape(k) for k in sorted(POLICY_KEYS, key=len, reverse=True)))
_APPROVED = re.compile(r'"([0-9a-fA-F]{64})"\s*,?\s*#\s*(.*?)\s*$', re.M)  # a hash and the note add_approval wrote
_TEMPLATES = Path(__file__).resolve().parent / "templates"


def policy_key(reason: str) -> str | None:
    """The first policy key (of :data:`POLICY_KEYS`) that ``reason`` names, None when it names none."""
    found = _KEY.search(reason)
    return found.group(0) if found else None


def approvals(policy_file: Path | None, policy: CampusPolicy) -> list[dict]:
    """Each approved app bundle of ``policy`` (read from ``policy_file``), as ``sha256`` and ``note``: the
    comment beside it, which ``edufl campus approve`` writes as "NAME VERSION, approved YYYY-MM-DD"
    (empty for a hash added by hand without one)."""
    text = Path(policy_file).read_text(encoding="utf-8") if policy_file else ""
    notes = {h.lower(): note for h, note in _APPROVED.findall(text)}
    return [dict(sha256=h, note=notes.get(h, "")) for h in policy.apps.approved_fab_hashes]


def _records(state: Path) -> list[AuditRecord]:
    """Every record of the audit log in ``state`` (none when it has no log; the file is never created here)."""
    if not (Path(state) / AUDIT_FILE).is_file():
        return []
    with AuditLog(state) as log:
        return log.records()


def _ms(recorded_at: str) -> int:
    """An ISO 8601 time as milliseconds since 1970 (the chart's x axis)."""
    return int(datetime.fromisoformat(recorded_at).timestamp() * 1000)


def overview(state: Path, policy_file: Path | None) -> dict:
    """What ``/`` shows: ``budget`` (:func:`clients.campus.budget_rows`), ``chart`` (one series of
    (time in ms, cumulative ε) per dataset, and the budget line), ``runs`` (per run and dataset: releases,
    first and last release time, ε at the policy's δ, and the run's audit records per outcome),
    ``policy`` (section -> key -> value), ``approvals`` (:func:`approvals`), ``delta`` and ``total``."""
    from edufl.federation.privacy import epsilon  # Opacus: loaded at the first page, not by the command line

    policy = CampusPolicy.load(policy_file)
    limits = policy.privacy
    budget, series, runs = [], [], {}
    if (Path(state) / LEDGER_FILE).is_file():
        budget = budget_rows(state, policy_file)
        with PrivacyLedger(state) as ledger:
            for dataset, campus in ledger.datasets().items():
                releases, history = ledger.releases(dataset), ledger.history(dataset)
                points = [[_ms(r.recorded_at), epsilon(history[: i + 1], limits.delta)] for i, r in enumerate(releases)]
                series.append(dict(label=f"{campus} dataset {dataset[:12]}", points=points))
                for run_id in dict.fromkeys(r.run_id for r in releases):
                    mine = [r for r in releases if r.run_id == run_id]
                    runs[run_id, dataset] = dict(
                        run=run_id,
                        dataset=dataset[:12],
                        releases=len(mine),
                        first=mine[0].recorded_at,
                        last=mine[-1].recorded_at,
                        epsilon=ledger.spent(dataset, limits.delta, run_id),
                    )
    records = _records(state)
    for run_id in dict.fromkeys(r.run_id for r in records):
        if not any(key[0] == run_id for key in runs):
            runs[run_id, ""] = dict(run=run_id, dataset="", releases=0, first="", last="", epsilon=None)
    for (run_id, _), run in runs.items():
        run.update({name: sum(1 for r in records if r.run_id == run_id and outcome(r) == name) for name in OUTCOMES})
    times = [p[0] for s in series for p in s["points"]]
    if times and policy_file is not None:
        budget_line = dict(label=f"total budget {limits.total_epsilon_budget:g} (policy)", dashed=True)
        series.append(
            dict(budget_line, points=[[min(times), limits.total_epsilon_budget], [max(times), limits.total_epsilon_budget]])
        )
    return dict(
        budget=budget,
        chart=dict(time=True, xTitle="release time (UTC)", yTitle=f"ε over all runs (δ = {limits.delta:g})", series=series),
        runs=list(runs.values()),
        policy=policy.model_dump(),
        approvals=approvals(policy_file, policy),
        delta=limits.delta,
        total=limits.total_epsilon_budget if policy_file is not None else None,
    )


def _row(record: AuditRecord) -> dict:
    """One audit record as ``/messages`` shows it; a failure's reason reduced to its exception type."""
    result = outcome(record)
    reason = record.reason
    if result == "failed":
        reason = f"failed: {reason.split(':')[1].strip()} (details: edufl campus audit --format json)"
    key = policy_key(reason) if result in ("refused", "blocked") else None
    return dict(
        time=record.recorded_at,
        run=record.run_id,
        round=record.server_round,
        type=record.message_type,
        outcome=result,
        sha256=record.payload_sha256,
        bytes=record.payload_bytes,
        epsilon=record.dp.epsilon if record.HasField("dp") else None,
        reason=reason,
        key=key,
        meaning=POLICY_KEYS.get(key or "", ""),
        fab=record.fab_sha256,
    )


def messages(state: Path, run: str | None = None, result: str | None = None) -> dict:
    """What ``/messages`` shows: ``messages`` (audit records of run ``run`` with outcome ``result``, each
    as a row: time, run, round, type, outcome, sha256, bytes, ε, reason, policy key and its meaning),
    ``total`` (every record), ``runs`` (every run in the log) and the filters."""
    records = _records(state)
    rows = [_row(r) for r in records if (not run or r.run_id == run) and (not result or outcome(r) == result)]
    return dict(messages=rows, total=len(records), runs=sorted({r.run_id for r in records}), run=run or "", result=result or "")


def app(state: Path, policy_file: Path | None):
    """The dashboard of the campus whose state folder is ``state`` under ``policy_file`` (a Starlette app)."""
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    from edufl.federation.web import templates, web_app

    pages = templates(_TEMPLATES)
    where = dict(state=str(Path(state).resolve()), policy_file=str(Path(policy_file).resolve()) if policy_file else "")

    def home(request: Request) -> Response:
        return pages.TemplateResponse(request, "campus.html", {**where, **overview(state, policy_file)})

    def outgoing(request: Request) -> Response:
        result = request.query_params.get("outcome") or None
        if result is not None and result not in OUTCOMES:
            return Response(f"outcome {result!r}: expected one of {', '.join(OUTCOMES)}", status_code=400)
        shown = messages(state, request.query_params.get("run") or None, result)
        return pages.TemplateResponse(request, "messages.html", {**where, **shown, "outcomes": OUTCOMES})

    return web_app([Route("/", home), Route("/messages", outgoing)])


def dashboard(state: Path, policy_file: Path | None, host: str, port: int, allow_remote: bool) -> None:
    """Serve the campus dashboard of ``state`` (under ``policy_file``; None: the safe defaults) on ``host``:``port``.

    Raises
    ------
    ConfigError
        Naming ``--state`` when the folder does not exist.
    PolicyError
        When the policy file cannot be used.
    BindError
        When the address may not or cannot be used (:func:`federation.web.listen`).
    """
    from edufl.federation.web import serve

    if not Path(state).is_dir():
        raise ConfigError(f"--state {state}: no such folder (a campus's state folder, as printed by `edufl campus start`)")
    CampusPolicy.load(policy_file)
    serve(app(state, policy_file), f"campus dashboard of {state}", host, port, allow_remote)
