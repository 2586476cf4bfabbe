"""The coordinator side of DP federated statistics: the ServerApp's run that asks every campus one query.

The edufl ServerApp (``server/app.py``) runs :func:`answer_query` when its run
config holds a ``statistic-query``, on either engine: it sends the query
(:mod:`federation.queries`) to every connected campus as a ``query``
message, sums the cells the campuses released
(:func:`server.combine.combine`) and writes the results folder:

* ``statistics.csv``: one row per released cell (per group and probability,
  for a quantile): the group fields, ``bin`` (histograms) or ``p`` (quantiles),
  ``estimate``, its noise ``std`` and 95 % error bound ``bound95`` (1.96 · std;
  a quantile's adds the bin width, see :class:`server.combine.Estimate`),
  the summed ``noisy_count`` and the number of ``campuses`` that released the cell;
* ``statistics.md``: the same table, with each campus's ε, δ, noise multiplier,
  noise std and suppressed cells;
* ``statistics.png``: the estimates as bars with their 95 % bounds;
* ``summary.json``: the query, the run name, each campus's release and the
  cells it suppressed, the refusals, the payload digests received and the estimates.

Run config keys: ``statistic-query`` (the StatisticQuery as protobuf JSON),
``federation-schema`` (the federation schema's JSON text; empty: OULAD's), ``out`` (results folder), ``run-name``,
``min-campuses`` and ``round-timeout``
(seconds to wait for campuses and for their answers).
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pandas as pd
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid
from google.protobuf import json_format

from edufl.federation.contract import CONTRACT_VERSION, version_text
from edufl.federation.privacy import ACCOUNTANT, PRIVACY_UNIT_SHORT
from edufl.federation.proto.analytics_pb2 import StatisticAnswer, StatisticQuery
from edufl.federation.queries import ANSWER, QUERY_KEY, cells, over_submissions
from edufl.federation.schema import FederationSchema, schema_from_text
from edufl.federation.wire import CONFIG

from .combine import Estimate, combine
from .replies import await_connected_nodes, collect

__all__ = ["answer_query", "describe", "markdown", "run_query", "unit"]


def answer_query(grid: Grid, context: Context) -> None:
    """The ServerApp's statistics run (see the module docstring for the run config keys)."""
    rc = context.run_config
    query = json_format.Parse(str(rc[QUERY_KEY]), StatisticQuery())
    run_query(
        grid,
        query,
        str(rc.get("run-name") or context.run_id),
        Path(str(rc["out"])),
        int(rc["min-campuses"]),
        float(rc["round-timeout"]),
        schema_from_text(str(rc.get("federation-schema", ""))),
    )


def run_query(
    grid: Grid, query: StatisticQuery, run_name: str, out: Path, min_campuses: int, timeout: float, schema: FederationSchema
) -> dict:
    """Ask every connected campus ``query`` under the federation ``schema``, combine the answers and write the
    results folder ``out``.

    Returns the summary dict written to ``summary.json``.

    Raises
    ------
    CampusesMissing
        When fewer than ``min_campuses`` campuses are connected after ``timeout`` seconds.
    """
    await_connected_nodes(grid, min_campuses, timeout, 1)
    config = ConfigRecord(
        {
            "run-name": run_name,
            "server-round": 1,
            QUERY_KEY: query.SerializeToString(),
            "contract-version": version_text(CONTRACT_VERSION),
            "federation-schema": schema.text(),
        }
    )
    nodes = sorted(grid.get_node_ids())
    replies = grid.send_and_receive(
        [Message(RecordDict({CONFIG: config}), dst_node_id=node, message_type="query") for node in nodes], timeout=timeout
    )
    answered, failed = collect(nodes, replies)
    answers = [StatisticAnswer.FromString(a.content[ANSWER][ANSWER]) for a in answered]
    refusals = [{"node": f.node, "code": f.code, "reason": f.reason} for f in failed]
    receipts = [{"campus": a.campus, "payload_bytes": a.payload_bytes, "payload_sha256": a.payload_sha256} for a in answered]
    estimates = combine(query, answers, schema)
    summary = {
        "query": json_format.MessageToDict(query, preserving_proto_field_name=True, always_print_fields_with_no_presence=True),
        "run_name": run_name,
        "privacy": {"mechanism": "gaussian", "accountant": ACCOUNTANT, "unit": unit(query)},
        "federation_schema": {"name": schema.name, "sha256": schema.digest},
        "campuses": [_campus(query, a, schema) for a in answers],
        "refusals": sorted(refusals, key=lambda r: r["node"]),
        "receipts": receipts,
        "estimates": [_row(query, e) for e in estimates],
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    pd.DataFrame(summary["estimates"]).to_csv(out / "statistics.csv", index=False)
    (out / "statistics.md").write_text(markdown(query, summary))
    _plot(out / "statistics.png", query, estimates)
    return summary


def describe(query: StatisticQuery) -> str:
    """One line: the statistic, its value field and bounds, the records and the grouping."""
    records = (
        f"submissions (at most {query.max_rows_per_registration} per registration)"
        if over_submissions(query)
        else "registrations"
    )
    what = {
        "count": f"count of {records}",
        "mean": f"share of {query.value}"
        if "=" in query.value
        else f"mean of {query.value} clipped to [{query.low:g}, {query.high:g}]",
        "histogram": f"histogram of {query.value}",
        "quantile": f"quantiles {', '.join(f'{p:g}' for p in query.quantiles)} of {query.value} "
        f"in [{query.low:g}, {query.high:g}] ({query.bins} bins)",
    }[query.statistic]
    return (
        f"{query.name}: {what}"
        + (f" over {records}" if query.statistic != "count" else "")
        + (f" by {', '.join(query.group_by)}" if query.group_by else "")
    )


def unit(query: StatisticQuery) -> str:
    """The privacy unit of the query's ε, with the per-registration bound of a submission statistic."""
    bound = f", at most {query.max_rows_per_registration} submissions counted each" if over_submissions(query) else ""
    return PRIVACY_UNIT_SHORT + bound


def _campus(query: StatisticQuery, a: StatisticAnswer, schema: FederationSchema) -> dict:
    released = {(tuple(c.group), c.bin) for c in a.cells}
    return {
        "campus": a.campus,
        "epsilon": a.epsilon,
        "delta": a.delta,
        "noise_multiplier": a.noise_multiplier,
        "count_std": a.count_std,
        "sum_std": a.sum_std,
        "min_cell_count": a.min_cell_count,
        "cells_released": len(a.cells),
        "cells_suppressed": a.suppressed_cells,
        "suppressed": [_label(g, b) for g, b in cells(query, schema) if (g, b) not in released],
    }


def _label(group: tuple[str, ...], bin_: str) -> str:
    return " / ".join([*group, *([bin_] if bin_ else [])]) or "all"


def _row(query: StatisticQuery, e: Estimate) -> dict:
    row = dict(zip(query.group_by, e.group, strict=True))
    if query.statistic == "histogram":
        row["bin"] = e.bin
    elif query.statistic == "quantile":
        row["p"] = e.p
    return {**row, "estimate": e.estimate, "std": e.std, "bound95": e.bound95, "noisy_count": e.count, "campuses": e.campuses}


def markdown(query: StatisticQuery, summary: dict) -> str:
    """The results as Markdown: the query, each campus's release parameters, then the estimates."""
    lines = [
        f"# {describe(query)}",
        "",
        f"Gaussian mechanism on each campus, privacy unit {unit(query)}, ε accounted with Rényi DP; "
        + (
            "± is one bin width plus the 95th percentile of the noise's effect (parametric bootstrap)"
            if query.statistic == "quantile"
            else "± is the 95 % bound of the noise (1.96 std)"
        )
        + ", not of clipping or suppressed cells.",
        "",
        "| campus | ε | δ | noise multiplier | count noise std | sum noise std | k | suppressed cells |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {c['campus']} | {c['epsilon']:.3f} | {c['delta']:g} | {c['noise_multiplier']:.3f} | {c['count_std']:.2f} "
        f"| {c['sum_std']:.2f} | {c['min_cell_count']} | {c['cells_suppressed']} |"
        for c in summary["campuses"]
    ]
    if over_submissions(query):
        lines.append(f"\nA cell is sent when its noisy count reaches k × {query.max_rows_per_registration} submissions.")
    lines += [f"\nrefused: {r['reason']}" for r in summary["refusals"]]
    keys = [*query.group_by, *({"histogram": ["bin"], "quantile": ["p"]}.get(query.statistic, []))]
    counted = query.statistic in ("mean", "quantile")  # the estimate is not itself the count
    digits = {"mean": 4, "quantile": 2}.get(query.statistic, 1)
    lines += [
        "",
        f"| {' | '.join(keys) or 'group'} | {query.statistic} | ± 95 % | std |{' noisy count |' * counted} campuses |",
        "|" + "---|" * (max(len(keys), 1) + 4 + counted),
    ]
    for r in summary["estimates"]:
        cells_ = [str(r[k]) for k in keys] or ["all"]
        count = f" {r['noisy_count']:.1f} |" if counted else ""
        lines.append(
            f"| {' | '.join(cells_)} | {r['estimate']:.{digits}f} | {r['bound95']:.{digits}f} | {r['std']:.{digits}f} "
            f"|{count} {r['campuses']} |"
        )
    return "\n".join(lines) + "\n"


def _plot(path: Path, query: StatisticQuery, estimates: list[Estimate]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * len(estimates) + 2), 4.5))
    x = range(len(estimates))
    ax.bar(x, [e.estimate for e in estimates], yerr=[e.bound95 for e in estimates], capsize=3, color="tab:blue")
    ax.set_xticks(list(x), [_label(e.group, e.bin) for e in estimates], rotation=60, ha="right", fontsize=8)
    ax.set_ylabel(f"{query.statistic} (error bars: 95 % error bound)")
    ax.set_title(
        f"{textwrap.fill(describe(query), 110)}\nGaussian mechanism, ε ≤ {query.epsilon:g} per campus at δ = {query.delta:g}",
        fontsize=9,
    )
    if not estimates:
        ax.text(0.5, 0.5, "no cell released", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
