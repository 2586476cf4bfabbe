"""A campus's DP release of a statistic: its records, its cells, and one noisy answer.

The query and its rules are in :mod:`federation.queries`; combining the
campuses' answers is the coordinator's (:mod:`server.combine`).

Records and privacy unit: a campus's registrations (``learners`` rows joined
with their ``registrations`` row, and for a value of
:data:`~federation.queries.ENGAGEMENT_FIELDS` its click-log totals), or, when the value or a ``group_by`` field
belongs to the ``assessments`` or ``submissions`` tables, its submissions
joined with their assessment and registration. The privacy unit is one
registration with everything recorded about it, as for DP-SGD training
(:data:`federation.privacy.PRIVACY_UNIT`). A registration has one
registration record but any number of submissions, so a submission statistic
declares ``m = max_rows_per_registration``: each registration contributes at
most its first m submissions (by submission day, then assessment id; the
order depends on that registration's rows only), the rest are not counted.
Rows whose value is missing (a score not given) are left out before that.

The cells are the query's (:func:`federation.queries.cells`), fixed before any record is read.

Sensitivity (adding or removing one registration): its at most ``m`` records
(m = 1 for registration statistics) fall in at most m cells, changing their
counts by m in all (L2 norm at most m) and, for a mean, their sums of clipped
values by at most ``m·B``, ``B = max(|low|, |high|)``. Counts and sums / B
are released together, a vector of L2 sensitivity ``Δ = √2·m``; counts alone
(count, histogram, quantile) have ``Δ = m``.

Mechanism: the Gaussian mechanism (Dwork and Roth, "The Algorithmic
Foundations of Differential Privacy", 2014, Appendix A) on the whole released
vector at once, in one call of :func:`federation.randomness.add_gaussian`:
the cells' counts, and for a mean the cells' sums / B after them, each with
noise of standard deviation ``z·Δ``; the noisy sums / B are then multiplied by
B (post-processing), so each sum carries noise of std ``z·Δ·B``
(:func:`noise` states both stds). A campus's noise is secret
(:data:`federation.randomness.SECRET`): OpenDP's ``make_gaussian`` over a
vector of float64 with L2 distance (OpenDP 0.16). OpenDP rounds each value
to the nearest multiple of ``2^k``, at its default ``k = -1074`` (the spacing
of float64 subnormals, so every float is already such a multiple and nothing
moves), adds to each an independent sample of the discrete Gaussian over the
multiples of ``2^k`` with scale ``z·Δ`` (Canonne, Kamath and Steinke, "The
Discrete Gaussian for Differential Privacy", NeurIPS 2020; on so fine a grid
its std is ``z·Δ`` to far below float precision), drawn exactly, in rational
arithmetic from its own CSPRNG's bits, and converts each noisy value back
to float64. So there is no floating-point sampler whose gaps could give the data
away (Mironov, CCS 2012), and no seed which, recorded, would let anyone
remove the noise.

Accounting: OpenDP's privacy map gives the release zero-concentrated DP
``ρ = Δ² / (2 (z·Δ)²) = 1 / (2 z²)`` (Bun and Steinke, TCC 2016), i.e. Rényi
DP ``α·ρ = α / (2 z²)`` at every order α (Mironov, "Rényi Differential
Privacy", CSF 2017, Proposition 7), which is the sampled Gaussian mechanism of
DP-SGD at sampling rate q = 1 for one step. So a statistic is calibrated with
:func:`federation.privacy.calibrate_noise` and recorded in the campus's
privacy ledger as ``(z, q = 1, 1 step)``, composing with training on the same
dataset. :func:`answer` fails closed: should the ρ that the release's privacy
map states at Δ exceed that ``1 / (2 z²)`` (beyond float rounding,
:data:`RHO_SLACK`), it raises :class:`QueryError` and returns nothing. Reproducible noise
(``Randomness(seed=...)``, tests and research only) is NumPy normals from the
seed and is not private against anyone who knows the seed.

Small cells: a campus does not send a cell whose noisy count is below ``k·m``
records (``k`` its policy's ``release.min_cohort_size``): k registrations'
worth of records, so that one registration's m submissions never make a cell
alone, and, as the noise scales with m too, an empty cell is released as rarely as in a registration
statistic. Deciding on the noisy count is post-processing and costs no ε.
No error bound covers suppressed cells or clipping.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd

from .contract import ASSESSMENTS, LEARNERS, REGISTRATIONS, SUBMISSIONS, TABLES, Table
from .engagement import engagement_totals
from .privacy import DPSettings, calibrate_noise, epsilon
from .proto.analytics_pb2 import Cell, StatisticAnswer, StatisticQuery
from .queries import (
    ENGAGEMENT_FIELDS,
    KEYS,
    MISSING,
    NUMERIC_FIELDS,
    CellKey,
    QueryError,
    bin_labels,
    cells,
    check,
    edges,
    indicator,
    over_submissions,
    require_modules,
    rows_per_registration,
    threshold,
)
from .randomness import SECRET, Randomness, add_gaussian
from .schema import FederationSchema

__all__ = [
    "RHO_SLACK",
    "Noise",
    "answer",
    "answer_problems",
    "exact_cells",
    "noise",
    "noise_multiplier",
    "records",
    "release_epsilon",
    "sensitivity",
    "sum_bound",
]

RHO_SLACK = 1e-12
"""Relative float rounding allowed between the ρ OpenDP states for a release and the ledger's ``1 / (2 z²)``."""


@dataclass(frozen=True)
class Noise:
    """Noise of one campus's release: multiplier z and the std of each count and each sum (records; value units)."""

    multiplier: float
    count_std: float
    sum_std: float


def sensitivity(query: StatisticQuery) -> float:
    """Δ, the L2 sensitivity of the vector a campus releases: ``m`` for counts alone, ``√2·m`` for a mean's
    counts and sums / B together (see the module docstring)."""
    m = rows_per_registration(query)
    return math.sqrt(2.0) * m if query.statistic == "mean" else float(m)


def sum_bound(query: StatisticQuery) -> float:
    """B = ``max(|low|, |high|)``: the most one clipped value adds to a mean's sum (the sums are released over B)."""
    return max(abs(query.low), abs(query.high))


def noise(query: StatisticQuery, z: float) -> Noise:
    """Noise std for multiplier ``z``: ``z·Δ`` per count, ``z·Δ·B`` per sum, with ``Δ`` = :func:`sensitivity`
    (``m`` for counts alone, ``√2·m`` for a mean's counts and sums / B) and ``B`` = :func:`sum_bound`."""
    delta_l2 = sensitivity(query)
    if query.statistic != "mean":
        return Noise(z, z * delta_l2, 0.0)
    return Noise(z, z * delta_l2, z * delta_l2 * sum_bound(query))


def noise_multiplier(query: StatisticQuery) -> float:
    """The smallest z (to within 0.01 in ε, :func:`~federation.privacy.calibrate_noise`) whose Gaussian mechanism spends at most
    ``query.epsilon`` at ``query.delta``: a sampled Gaussian mechanism with q = 1, one step."""
    return calibrate_noise(DPSettings(query.epsilon, query.delta, 1.0), 1, 1, 1)


def release_epsilon(z: float, delta: float) -> float:
    """ε at ``delta`` of one Gaussian release with multiplier ``z`` (RDP accountant, as in the ledger)."""
    return epsilon([(z, 1.0, 1)], delta)


def records(query: StatisticQuery, tables: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """The records ``query`` counts, one row each, with its group_by fields and its value field (if any).

    ``tables`` are a campus's validated contract tables (:class:`federation.tables.Tables`).
    Registration statistics: one row per ``learners`` row (with its
    ``registrations`` fields). Submission statistics: one row per submission
    with its assessment's and registration's fields, at most ``m`` per
    registration (its first by submission day and assessment id). Rows whose
    numeric value is missing are left out first. Raises QueryError on an invalid query, or one needing a
    module ``tables`` lack (:func:`federation.queries.require_modules`).
    """
    check(query)
    require_modules(query, {t.module for t in TABLES if t.name in tables} - {"core"})
    field = query.value.partition("=")[0]
    wanted = {*query.group_by, *([field] if field else [])}
    key = list(LEARNERS.key)

    def part(table: Table, on: list[str]) -> pd.DataFrame:
        return tables[table.name][[*on, *(c.name for c in table.columns if c.name in wanted and c.name not in KEYS)]]

    rows = part(LEARNERS, key).merge(part(REGISTRATIONS, key), on=key, how="left")
    if over_submissions(query):
        subs = tables["submissions"][
            [
                "assessment_id",
                "student_id",
                "submission_day",
                *(c.name for c in SUBMISSIONS.columns if c.name in wanted - {"submission_day"}),
            ]
        ]
        subs = subs.merge(part(ASSESSMENTS, ["assessment_id", "course", "presentation"]), on="assessment_id")
        rows = subs.merge(rows, on=key)
    if field in ENGAGEMENT_FIELDS:
        rows = rows.merge(engagement_totals(dict(tables))[[*key, field]], on=key, how="left")
    if field in NUMERIC_FIELDS:
        rows = rows[rows[field].notna()]
    if over_submissions(query):
        rows = rows.sort_values([*key, "submission_day", "assessment_id"], kind="stable")
        rows = rows[rows.groupby(key, sort=False).cumcount() < rows_per_registration(query)]
    return rows.reset_index(drop=True)


def exact_cells(
    query: StatisticQuery, tables: Mapping[str, pd.DataFrame], schema: FederationSchema
) -> dict[CellKey, tuple[int, float]]:
    """(count, sum of clipped values) of every cell ``query`` declares under ``schema`` over a campus's
    :func:`records`, without noise.

    Sums are 0 except for a mean. Raises QueryError on an invalid query.
    """
    rows = records(query, tables)
    frame = pd.DataFrame({f: rows[f].astype(object).where(rows[f].notna(), MISSING) for f in query.group_by}, index=rows.index)
    e = edges(query)
    if len(e):
        x = np.clip(rows[query.value].astype(float).to_numpy(), e[0], e[-1])
        index = np.clip(np.searchsorted(e, x, side="right") - 1, 0, len(e) - 2)
        frame["_bin"] = np.asarray(bin_labels(query), dtype=object)[index]
    else:
        frame["_bin"] = ""
    if query.statistic == "mean":
        tested = indicator(query.value)
        raw = (rows[tested[0]] == tested[1]).fillna(False).astype(float) if tested else rows[query.value].astype(float)
        frame["_value"] = raw.clip(query.low, query.high)
    else:
        frame["_value"] = 0.0
    keys = [*query.group_by, "_bin"]
    grouped = frame.groupby(keys, sort=False)["_value"].agg(["size", "sum"])
    found = {
        (tuple(k[:-1]), k[-1]): (int(n), float(s))
        for k, (n, s) in zip(
            (k if isinstance(k, tuple) else (k,) for k in grouped.index), grouped.itertuples(index=False), strict=True
        )
    }
    return {key: found.get(key, (0, 0.0)) for key in cells(query, schema)}


def answer(
    query: StatisticQuery,
    tables: Mapping[str, pd.DataFrame],
    campus: str,
    z: float,
    k: int,
    *,
    schema: FederationSchema,
    randomness: Randomness = SECRET,
) -> StatisticAnswer:
    """The campus's noised answer over its contract ``tables`` with multiplier ``z``, over the cells ``query``
    declares under the federation ``schema``; cells whose
    noisy count is below :func:`federation.queries.threshold` are left out and counted in ``suppressed_cells``.

    The noise is one :func:`federation.randomness.add_gaussian` release of the
    cells' counts (and, for a mean, their sums / B), at L2 sensitivity
    :func:`sensitivity` and the std of :func:`noise`, from ``randomness``
    (secret unless a test or research run passes a seeded one).

    Raises
    ------
    QueryError
        When the query is invalid (:func:`federation.queries.check`), or when the ρ the noise
        library states for the release exceeds ``1 / (2 z²)``, what the ledger
        accounts for it (then nothing is returned).
    """
    scale = noise(query, z)
    exact = exact_cells(query, tables, schema)
    mean = query.statistic == "mean"
    bound = sum_bound(query) if mean else 1.0
    vector = [float(n) for n, _ in exact.values()] + ([s / bound for _, s in exact.values()] if mean else [])
    noisy, rho = add_gaussian(np.array(vector), sensitivity(query), scale.count_std, randomness)
    accounted = 1.0 / (2.0 * z**2)
    if not rho <= accounted * (1.0 + RHO_SLACK):  # also refuses a NaN
        raise QueryError(
            f"the noise's privacy loss rho = {rho!r} exceeds the ledger's 1 / (2 z²) = {accounted!r} "
            f"for z = {z!r}: nothing released"
        )
    noisy_counts = noisy[: len(exact)]
    noisy_sums = noisy[len(exact) :] * bound if mean else np.zeros(len(exact))  # post-processing: back to value units
    released = [
        Cell(group=group, bin=label, noisy_count=float(c), noisy_sum=float(s) if mean else None)
        for (group, label), c, s in zip(exact, noisy_counts, noisy_sums, strict=True)
        if c >= threshold(query, k)
    ]
    return StatisticAnswer(
        campus=campus,
        query_name=query.name,
        cells=released,
        noise_multiplier=z,
        count_std=scale.count_std,
        sum_std=scale.sum_std,
        epsilon=release_epsilon(z, query.delta),
        delta=query.delta,
        suppressed_cells=len(exact) - len(released),
        min_cell_count=k,
    )


def answer_problems(query: StatisticQuery, answer_: StatisticAnswer, k: int, schema: FederationSchema) -> list[str]:
    """Everything in a campus's answer that ``query`` does not declare (the release guard's check for a query reply).

    Every cell must be a declared cell, at most once, with a finite noisy count
    of at least :func:`federation.queries.threshold` and a noisy sum exactly when the statistic is a mean; the
    answer must be for this query and count its suppressed cells.
    """
    declared = set(cells(query, schema))
    found, seen = [], set()
    for cell in answer_.cells:
        key = (tuple(cell.group), cell.bin)
        if key not in declared:
            found.append(f"cell {key} is not a cell of query {query.name!r}")
        elif key in seen:
            found.append(f"cell {key} is sent twice")
        seen.add(key)
        if not (math.isfinite(cell.noisy_count) and cell.noisy_count >= threshold(query, k)):
            found.append(
                f"cell {key} has noisy count {cell.noisy_count:g}, below release.min_cohort_size {k}"
                + (f" × max_rows_per_registration {query.max_rows_per_registration}" if over_submissions(query) else "")
            )
        if cell.HasField("noisy_sum") != (query.statistic == "mean") or not math.isfinite(cell.noisy_sum):
            found.append(f"cell {key}: a noisy sum belongs to a mean only, and must be finite")
    if answer_.query_name != query.name:
        found.append(f"answer to query {answer_.query_name!r}; asked {query.name!r}")
    if len(answer_.cells) + answer_.suppressed_cells != len(declared):
        found.append(
            f"{len(answer_.cells)} cells sent and {answer_.suppressed_cells} suppressed; the query declares {len(declared)}"
        )
    return found
