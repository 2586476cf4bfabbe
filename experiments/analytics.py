"""``edufl analytics run QUERY.toml``: one DP federated statistic, on Flower's simulation engine or a deployment.

The query file (keys as in ``protos/analytics.proto``; examples in
``experiments/queries/``) is checked first; then the edufl ServerApp, given
the query in its run config, asks every campus (:mod:`server.analytics`) and
writes the results folder.

* Simulation (:func:`run_analytics`): one virtual campus per module or region,
  each reading only its own rows, with its privacy ledger and audit log under
  ``OUT/campuses/<campus>/``. Reusing a results folder reuses the campuses'
  ledgers, so repeated queries spend one budget.
* Deployment (:func:`run_deployed`): the same ServerApp launched with
  ``flwr run`` on a started coordinator, exactly as ``edufl coordinator run``
  launches training (:func:`server.coordinator.launch`); each campus charges
  its own ledger in its state folder.
"""

from __future__ import annotations

import json
from pathlib import Path

from edufl.federation.partition import Campuses, campus_names
from edufl.federation.policy import CampusPolicy
from edufl.federation.proto.analytics_pb2 import StatisticQuery
from edufl.federation.queries import QUERY_KEY, load_query
from edufl.federation.runconfig import RunConfig
from edufl.federation.tables import Tables

from .simulate import formation, print_notes, run_engine

__all__ = ["run_analytics", "run_deployed"]


def _query_config(query_file: Path) -> tuple[StatisticQuery, dict]:
    """The query in ``query_file`` and the run config entry that carries it (protobuf JSON)."""
    from google.protobuf import json_format

    query = load_query(query_file)
    return query, {QUERY_KEY: json_format.MessageToJson(query, indent=None)}


def _headline(query: StatisticQuery, campuses: str) -> None:
    from edufl.server.analytics import describe, unit

    print(
        f"edufl analytics: {describe(query)}, {campuses}, Gaussian mechanism, "
        f"ε ≤ {query.epsilon:g} per campus at δ = {query.delta:g}, privacy unit: {unit(query)}",
        flush=True,
    )


def _results(out: Path) -> dict:
    print((out / "statistics.md").read_text())
    print(f"-> {out} (statistics.csv, statistics.md, statistics.png, summary.json)")
    return json.loads((out / "summary.json").read_text())


def run_analytics(
    query_file: Path,
    data_dir: Path | None,
    campus_by: str,
    policy: Path | None,
    out: Path,
    campuses: Campuses | None = None,
    federation_schema: str = "",
) -> dict:
    """Answer the query in ``query_file`` over the simulated campuses of ``campus_by`` (or the campus folders
    ``campuses``, see :func:`experiments.simulate.load_campuses`), under the federation schema whose text is
    ``federation_schema`` (OULAD's when empty); returns ``out/summary.json``'s dict.

    Raises
    ------
    QueryError
        When the query file is unusable or the query would be refused (names the file and key).
    PolicyError
        When the policy file is unusable.
    DataError
        When the tables fail validation.
    """
    from edufl.server.coordinator import new_run_name

    query, extra = _query_config(query_file)
    CampusPolicy.load(policy)  # a bad policy file is the user's mistake, reported before anything starts
    cfg = RunConfig(campus_by=campus_by, out=str(out.resolve()), run_name=new_run_name(out), federation_schema=federation_schema)

    def headline(cfg: RunConfig, tables: Tables | Campuses, mode: str) -> list[str]:
        print_notes(tables)
        names = campus_names(tables, cfg.campus_by)
        _headline(query, f"{len(names)} campuses {formation(cfg, tables)}")
        return names

    run_engine(cfg, data_dir, campuses, policy, headline=headline, extra_config=extra)
    return _results(out)


def run_deployed(
    query_file: Path,
    *,
    superlink: str,
    pki: Path | None,
    root_cert: Path | None,
    insecure: bool,
    min_campuses: int,
    wait: float,
    round_timeout: float,
    out: Path,
    federation_schema: str = "",
) -> dict:
    """Answer the query in ``query_file`` on the campuses of the coordinator at ``superlink``.

    Waits at most ``wait`` seconds for ``min_campuses`` online campuses, then
    asks every connected one; each answer waits at most ``round_timeout``
    seconds. The ServerApp writes ``out`` (made absolute) on the coordinator's
    machine; refusals name the campus where ``pki`` records its node id.
    Returns ``out/summary.json``'s dict.

    Raises
    ------
    QueryError
        As :func:`run_analytics`.
    ConfigError, PKIError
        On a bad address, option or missing CA certificate.
    RunFailed
        When the coordinator cannot be reached or trusted, too few campuses
        are online, or the run does not complete.
    """
    from edufl.server.coordinator import await_campuses, launch, name_campuses, new_run_name, open_connection

    query, extra = _query_config(query_file)
    out = out.resolve()
    cfg = RunConfig(
        min_campuses=min_campuses,
        round_timeout=round_timeout,
        out=str(out),
        run_name=new_run_name(out),
        federation_schema=federation_schema,
    )
    open_connection(superlink, pki=pki, root_cert=root_cert, insecure=insecure)
    online = await_campuses(min_campuses, wait, pki)
    _headline(query, f"{online} campus(es) online at {superlink}, run {cfg.run_name}")
    launch({**cfg.to_flower(), **extra}, out)
    name_campuses(out / "summary.json", "refusals", pki)
    return _results(out)
