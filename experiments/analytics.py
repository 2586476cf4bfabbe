"""``edufl analytics run QUERY.toml``: one DP federated statistic on Flower's simulation engine.

The query file (keys as in ``protos/analytics.proto``; examples in
``experiments/queries/``) is checked first, then the ServerApp
:mod:`server.analytics` asks every virtual campus (one per module or region,
each reading only its own rows, with its privacy ledger and audit log under
``OUT/campuses/<campus>/``) and writes the results folder. Reusing a results
folder reuses the campuses' ledgers, so repeated queries spend one budget.
"""

from __future__ import annotations

import json
import secrets
from pathlib import Path

from federation.data import Tables
from federation.policy import CampusPolicy
from federation.privacy import PRIVACY_UNIT_SHORT
from federation.runconfig import RunConfig
from federation.statistics import QUERY_KEY, load_query

from .simulate import run_engine


def run_analytics(query_file: Path, data_dir: Path, campus_by: str, policy: Path | None, out: Path) -> dict:
    """Answer the query in ``query_file`` over the campuses of ``campus_by``; returns ``out/summary.json``'s dict.

    Raises
    ------
    QueryError
        When the query file is unusable or the query would be refused (names the file and key).
    PolicyError
        When the policy file is unusable.
    DataError
        When the tables fail validation.
    """
    from google.protobuf import json_format

    query = load_query(query_file)
    CampusPolicy.load(policy)  # a bad policy file is the user's mistake, reported before anything starts
    cfg = RunConfig(campus_by=campus_by, out=str(out.resolve()), run_name=f"{out.name}-{secrets.token_hex(4)}")

    def headline(cfg: RunConfig, tables: Tables, mode: str) -> list[str]:
        from federation.data import campus_names
        from server.analytics import describe

        for note in tables.notes:
            print(f"note: {note}")
        names = campus_names(tables, cfg.campus_by)
        print(f"edufl analytics: {describe(query)}, {len(names)} campuses by {cfg.campus_by}, Gaussian mechanism, "
              f"ε ≤ {query.epsilon:g} per campus at δ = {query.delta:g}, privacy unit: {PRIVACY_UNIT_SHORT}")
        return names

    run_engine(cfg, data_dir, None, policy, server_app="server.analytics:analytics_app", headline=headline,
               extra_config={QUERY_KEY: json_format.MessageToJson(query)})
    print((out / "statistics.md").read_text())
    print(f"-> {out} (statistics.csv, statistics.md, statistics.png, summary.json)")
    return json.loads((out / "summary.json").read_text())
