"""DP federated statistics: counts, means, histograms and quantiles over a campus's records, per group.

Records and privacy unit: a campus's registrations (``learners`` rows joined
with their ``registrations`` row), or, when the value or a ``group_by`` field
belongs to the ``assessments`` or ``submissions`` tables, its submissions
joined with their assessment and registration. The privacy unit is one
registration with everything recorded about it, as for DP-SGD training
(:data:`federation.privacy.PRIVACY_UNIT`). A registration has one
registration record but any number of submissions, so a submission statistic
declares ``m = max_rows_per_registration``: each registration contributes at
most its first m submissions (by submission day, then assessment id; the
order depends on that registration's rows only), the rest are not counted.
Rows whose value is missing (a score not given) are left out before that.

Cells are fixed by the query, never by the data: every combination of the
``group_by`` fields' contract vocabularies (plus ``"missing"`` for a nullable
field such as ``imd_band``) and, for a histogram or a quantile, every bin.

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

Quantiles: each campus releases a DP histogram of the value over ``bins``
equal-width bins of [low, high] (values clipped to the bounds), exactly as a
histogram; the coordinator sums the campuses' noisy counts and reads each
quantile off the pooled histogram by linear interpolation within the bin
where the cumulative count reaches ``p·N`` (:func:`interpolate_quantiles`).
This is the noisy-histogram quantile estimator (the histogram release of
Dwork and Roth 2014, Section 3.3, then post-processing); it needs one
release per campus and composes across campuses by summing counts. Its error
has two parts: resolution, at most one bin width (the data's quantile lies in
the bin the exact histogram's does), and noise, which the coordinator
measures with a parametric bootstrap (Ferrando, Wang and Sheldon, "Parametric
Bootstrap for Differentially Private Confidence Intervals", AISTATS 2022):
taking what each campus sent as its true counts, it redraws each campus's
release (noise at the stated std, then the suppression rule) and takes the
95th percentile of the redrawn estimates' distance to the estimate
(:data:`BOOTSTRAP_DRAWS` draws: a simulation-based interval, not a proven
bound; mass a campus suppressed is taken as absent).

Small cells: a campus does not send a cell whose noisy count is below ``k·m``
records (``k`` its policy's ``release.min_cohort_size``, :data:`MIN_CELL_COUNT`
without a policy): k registrations' worth of records, so that one
registration's m submissions never make a cell alone, and, as the noise
scales with m too, an empty cell is released as rarely as in a registration
statistic. Deciding on the noisy count is post-processing and costs no ε.
No error bound covers suppressed cells or clipping.
"""

from __future__ import annotations

import itertools
import math
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .contract import ASSESSMENTS, LEARNERS, REGISTRATIONS, SUBMISSIONS
from .policy import CampusPolicy
from .privacy import DPSettings, History, calibrate_noise, epsilon
from .proto.analytics_pb2 import Cell, StatisticAnswer, StatisticQuery
from .randomness import SECRET, Randomness, add_gaussian
from .runconfig import ConfigError

STATISTICS = ("count", "mean", "histogram", "quantile")
MISSING = "missing"
MIN_CELL_COUNT = 10
"""k of a campus without a policy: cells with a noisy count below k·m (:func:`threshold`) are not sent."""
MAX_BINS = 1000
"""Most bins a quantile's histogram may have."""
BOOTSTRAP_DRAWS = 2000
"""Parametric-bootstrap redraws of the campuses' releases behind a quantile's error bound."""
Z_95 = 1.959964
"""Two-sided 95 % quantile of the standard normal distribution."""
QUERY_KEY = "statistic-query"
"""Key of the serialized StatisticQuery in a query message's config record (and in the ServerApp's run config, as JSON)."""
ANSWER = "answer"
"""Name of the reply record, and of its one key, holding the serialized StatisticAnswer."""
RHO_SLACK = 1e-12
"""Relative float rounding allowed between the ρ OpenDP states for a release and the ledger's ``1 / (2 z²)``."""

_KEYS = {"course", "presentation", "student_id", "assessment_id"}  # identifiers: never a value or a group
_REGISTRATION_TABLES = (LEARNERS, REGISTRATIONS)
_SUBMISSION_TABLES = (ASSESSMENTS, SUBMISSIONS)
_COLUMNS = {c.name: c for t in (*_REGISTRATION_TABLES, *_SUBMISSION_TABLES) for c in t.columns if c.name not in _KEYS}
SUBMISSION_FIELDS = frozenset(c.name for t in _SUBMISSION_TABLES for c in t.columns if c.name not in _KEYS)
"""Fields of the assessments and submissions tables: a statistic using one is over submissions."""
GROUP_FIELDS = {c.name: (*c.vocab, *((MISSING,) if c.nullable else ())) for c in _COLUMNS.values() if c.kind == "cat"}
"""Fields a statistic may be grouped by (the contract's categorical fields), with every group value (fixed vocabularies)."""
NUMERIC_FIELDS = tuple(c.name for c in _COLUMNS.values() if c.kind in ("int", "float"))
"""Numeric contract fields a mean, histogram or quantile may take."""
INDICATOR_FIELDS = {c.name: c.vocab for c in _COLUMNS.values() if c.kind == "cat"}
"""Categorical contract fields a ``FIELD=VALUE`` indicator may test."""


class QueryError(ConfigError):
    """A statistic query that is malformed, or that would reveal too much (refused before any data is read)."""


CellKey = tuple[tuple[str, ...], str]
"""A cell: its group values (one per group_by field) and its bin label ("" for count and mean)."""


def edges(query: StatisticQuery) -> np.ndarray:
    """Bin edges: a histogram's ``bin_edges``, a quantile's ``bins + 1`` equally spaced points of [low, high]; empty otherwise."""
    if query.statistic == "histogram":
        return np.asarray(query.bin_edges, dtype=float)
    if query.statistic == "quantile":
        return np.linspace(query.low, query.high, query.bins + 1)
    return np.empty(0)


def bin_labels(query: StatisticQuery) -> list[str]:
    """Bin labels, ``[a, b)`` and the last one closed ``[a, b]``; empty for count and mean."""
    e = edges(query)
    return [f"[{a:g}, {b:g}{']' if i == len(e) - 2 else ')'}" for i, (a, b) in enumerate(itertools.pairwise(e))]


def cells(query: StatisticQuery) -> list[CellKey]:
    """Every cell the query declares, in a fixed order (data-independent)."""
    groups = itertools.product(*(GROUP_FIELDS[f] for f in query.group_by))
    return [(g, b) for g in groups for b in (bin_labels(query) or [""])]


def over_submissions(query: StatisticQuery) -> bool:
    """Whether the query's records are submissions (its value or a group_by field is an assessment or submission field)."""
    return bool({query.value.partition("=")[0], *query.group_by} & SUBMISSION_FIELDS)


def rows_per_registration(query: StatisticQuery) -> int:
    """m: the most records one registration contributes (1 for a registration statistic)."""
    return max(1, query.max_rows_per_registration)


def problems(query: StatisticQuery) -> list[str]:
    """Every reason to refuse ``query`` (empty when it may be answered), each naming the query key.

    Refused: an unknown statistic; a group_by field that is not a categorical
    contract field (``student_id`` or any field outside the contract); a value
    that is not a numeric contract field nor, for a mean, an indicator over a
    categorical one; a mean or quantile without finite bounds ``low < high``
    (an unbounded sum or range); an indicator mean with bounds other than
    [0, 1]; a histogram without at least two finite, increasing edges; a
    quantile without ``bins`` in [2, :data:`MAX_BINS`] or without probabilities
    in (0, 1); a submission statistic without ``max_rows_per_registration``
    ≥ 1 (an unbounded contribution per registration), or a registration
    statistic with one above 1; keys the statistic does not use;
    ε not finite and > 0; δ not in (0, 1).
    """
    found = []
    if query.statistic not in STATISTICS:
        found.append(f"statistic {query.statistic!r} is not one of {', '.join(STATISTICS)}")
    for f in query.group_by:
        if f not in GROUP_FIELDS:
            found.append(f"group_by field {f!r} is not a categorical field of the data contract "
                         f"(allowed: {', '.join(GROUP_FIELDS)})")
    if len(set(query.group_by)) != len(query.group_by):
        found.append(f"group_by {list(query.group_by)} names a field twice")
    indicator = _indicator(query.value)
    if query.statistic == "count" and query.value:
        found.append(f"value {query.value!r}: a count takes no value field")
    elif query.statistic in ("histogram", "quantile") and query.value not in NUMERIC_FIELDS:
        found.append(f"value {query.value!r}: a {query.statistic} needs a numeric contract field ({', '.join(NUMERIC_FIELDS)})")
    elif query.statistic == "mean" and query.value not in NUMERIC_FIELDS and not indicator:
        found.append(f"value {query.value!r} is not a numeric contract field ({', '.join(NUMERIC_FIELDS)}) "
                     f"nor an indicator FIELD=VALUE over {', '.join(INDICATOR_FIELDS)}")
    if query.statistic in ("mean", "quantile"):
        low, high = query.low, query.high
        if not (math.isfinite(low) and math.isfinite(high) and low < high):
            found.append(f"low = {low:g}, high = {high:g}: a {query.statistic} needs finite clipping bounds low < high "
                         f"(an unbounded {'sum' if query.statistic == 'mean' else 'range'} is refused)")
        elif indicator and (low, high) != (0.0, 1.0):
            found.append(f"low = {low:g}, high = {high:g}: an indicator's bounds are low = 0, high = 1")
    if query.statistic == "histogram":
        e = edges(query)
        if len(e) < 2 or not np.all(np.isfinite(e)) or not np.all(np.diff(e) > 0):
            found.append(f"bin_edges {list(query.bin_edges)}: a histogram needs at least two finite, increasing edges")
    if query.statistic == "quantile":
        if not 2 <= query.bins <= MAX_BINS:
            found.append(f"bins = {query.bins}: a quantile needs 2 to {MAX_BINS} bins of [low, high]")
        ps = list(query.quantiles)
        if not ps or not all(0 < p < 1 for p in ps) or len(set(ps)) != len(ps):
            found.append(f"quantiles {ps}: a quantile needs distinct probabilities in (0, 1), e.g. [0.25, 0.5, 0.75]")
    given = {"bin_edges": len(query.bin_edges), "bins": query.bins, "quantiles": len(query.quantiles)}
    uses = {"histogram": {"bin_edges"}, "quantile": {"bins", "quantiles"}}.get(query.statistic, set())
    found += [f"{key}: a {query.statistic} takes no {key}" for key, n in given.items() if n and key not in uses]
    m = query.max_rows_per_registration
    if over_submissions(query) and m < 1:
        found.append("max_rows_per_registration: a statistic over submissions needs a bound m >= 1 on the rows one "
                     "registration contributes (an unbounded contribution is refused)")
    elif not over_submissions(query) and m not in (0, 1):
        found.append(f"max_rows_per_registration = {m}: a registration statistic counts one row per registration")
    if not (math.isfinite(query.epsilon) and query.epsilon > 0):
        found.append(f"epsilon = {query.epsilon:g}; expected a finite number > 0")
    if not (0 < query.delta < 1):
        found.append(f"delta = {query.delta:g}; expected a number in (0, 1)")
    return found


def check(query: StatisticQuery) -> None:
    """Raise :class:`QueryError` listing every :func:`problems` of ``query``."""
    found = problems(query)
    if found:
        raise QueryError("; ".join(found))


def _indicator(value: str) -> tuple[str, str] | None:
    field, sep, level = value.partition("=")
    return (field, level) if sep and level in INDICATOR_FIELDS.get(field, ()) else None


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
    """The smallest z (Opacus's search, tolerance 0.01 in ε) whose Gaussian mechanism spends at most
    ``query.epsilon`` at ``query.delta``: a sampled Gaussian mechanism with q = 1, one step."""
    return calibrate_noise(DPSettings(query.epsilon, query.delta, 1.0), 1, 1, 1)


def release_epsilon(z: float, delta: float) -> float:
    """ε at ``delta`` of one Gaussian release with multiplier ``z`` (RDP accountant, as in the ledger)."""
    return epsilon([(z, 1.0, 1)], delta)


def plan_release(query: StatisticQuery, policy: CampusPolicy | None, run_history: History,
                 dataset_history: History) -> tuple[float, float]:
    """(z, the run's ε after the release) for a campus under ``policy``, given its ledger's histories.

    Raises
    ------
    QueryError
        When the query is invalid (:func:`problems`), or under a policy when ε
        exceeds ``privacy.max_epsilon_per_run`` (the run's ε, composed with its
        earlier releases), δ exceeds ``privacy.delta``, or the dataset's ε over
        all runs would exceed ``privacy.total_epsilon_budget``; the message
        names the policy key.
    """
    check(query)
    z = noise_multiplier(query)
    planned = (policy.noise_multiplier(z) if policy else z, 1.0, 1)
    run_eps = epsilon([*run_history, planned], query.delta)
    if policy:
        limits = policy.privacy
        if query.delta > limits.delta:
            raise QueryError(f"privacy.delta: delta {query.delta:g} > {limits.delta:g}")
        if run_eps > limits.max_epsilon_per_run:
            raise QueryError(f"privacy.max_epsilon_per_run: the run's ε would reach {run_eps:.3f} > {limits.max_epsilon_per_run:g}")
        if why := policy.over_budget(dataset_history, planned):
            raise QueryError(why)
    return planned[0], run_eps


def records(query: StatisticQuery, tables: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """The records ``query`` counts, one row each, with its group_by fields and its value field (if any).

    ``tables`` are a campus's validated contract tables (:class:`federation.data.Tables`).
    Registration statistics: one row per ``learners`` row (with its
    ``registrations`` fields). Submission statistics: one row per submission
    with its assessment's and registration's fields, at most ``m`` per
    registration (its first by submission day and assessment id). Rows whose
    numeric value is missing are left out first. Raises QueryError on an invalid query.
    """
    check(query)
    field = query.value.partition("=")[0]
    wanted = {*query.group_by, *([field] if field else [])}
    key = list(LEARNERS.key)

    def part(table, on: list[str]) -> pd.DataFrame:
        return tables[table.name][[*on, *(c.name for c in table.columns if c.name in wanted and c.name not in _KEYS)]]

    rows = part(LEARNERS, key).merge(part(REGISTRATIONS, key), on=key, how="left")
    if over_submissions(query):
        subs = tables["submissions"][["assessment_id", "student_id", "submission_day", *(
            c.name for c in SUBMISSIONS.columns if c.name in wanted - {"submission_day"})]]
        subs = subs.merge(part(ASSESSMENTS, ["assessment_id", "course", "presentation"]), on="assessment_id")
        rows = subs.merge(rows, on=key)
    if field in NUMERIC_FIELDS:
        rows = rows[rows[field].notna()]
    if over_submissions(query):
        rows = rows.sort_values([*key, "submission_day", "assessment_id"], kind="stable")
        rows = rows[rows.groupby(key, sort=False).cumcount() < rows_per_registration(query)]
    return rows.reset_index(drop=True)


def exact_cells(query: StatisticQuery, tables: Mapping[str, pd.DataFrame]) -> dict[CellKey, tuple[int, float]]:
    """(count, sum of clipped values) of every declared cell over a campus's :func:`records`, without noise.

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
        indicator = _indicator(query.value)
        raw = (rows[indicator[0]] == indicator[1]).fillna(False).astype(float) if indicator else rows[query.value].astype(float)
        frame["_value"] = raw.clip(query.low, query.high)
    else:
        frame["_value"] = 0.0
    keys = [*query.group_by, "_bin"]
    grouped = frame.groupby(keys, sort=False)["_value"].agg(["size", "sum"])
    found = {(tuple(k[:-1]), k[-1]): (int(n), float(s)) for k, (n, s) in zip(
        (k if isinstance(k, tuple) else (k,) for k in grouped.index), grouped.itertuples(index=False))}
    return {key: found.get(key, (0, 0.0)) for key in cells(query)}


def threshold(query: StatisticQuery, k: int) -> int:
    """The least noisy count of a released cell: ``k·m`` records (``m`` = :func:`rows_per_registration`)."""
    return k * rows_per_registration(query)


def answer(query: StatisticQuery, tables: Mapping[str, pd.DataFrame], campus: str, z: float, k: int, *,
           randomness: Randomness = SECRET) -> StatisticAnswer:
    """The campus's noised answer over its contract ``tables`` with multiplier ``z``; cells whose
    noisy count is below :func:`threshold` are left out and counted in ``suppressed_cells``.

    The noise is one :func:`federation.randomness.add_gaussian` release of the
    cells' counts (and, for a mean, their sums / B), at L2 sensitivity
    :func:`sensitivity` and the std of :func:`noise`, from ``randomness``
    (secret unless a test or research run passes a seeded one).

    Raises
    ------
    QueryError
        When the query is invalid (:func:`problems`), or when the ρ the noise
        library states for the release exceeds ``1 / (2 z²)``, what the ledger
        accounts for it (then nothing is returned).
    """
    scale = noise(query, z)
    exact = exact_cells(query, tables)
    mean = query.statistic == "mean"
    bound = sum_bound(query) if mean else 1.0
    vector = [float(n) for n, _ in exact.values()] + ([s / bound for _, s in exact.values()] if mean else [])
    noisy, rho = add_gaussian(np.array(vector), sensitivity(query), scale.count_std, randomness)
    accounted = 1.0 / (2.0 * z**2)
    if not rho <= accounted * (1.0 + RHO_SLACK):  # also refuses a NaN
        raise QueryError(f"the noise's privacy loss rho = {rho!r} exceeds the ledger's 1 / (2 z²) = {accounted!r} "
                         f"for z = {z!r}: nothing released")
    noisy_counts = noisy[:len(exact)]
    noisy_sums = noisy[len(exact):] * bound if mean else np.zeros(len(exact))  # post-processing: back to value units
    released = [Cell(group=group, bin=label, noisy_count=float(c), noisy_sum=float(s) if mean else None)
                for (group, label), c, s in zip(exact, noisy_counts, noisy_sums) if c >= threshold(query, k)]
    return StatisticAnswer(campus=campus, query_name=query.name, cells=released, noise_multiplier=z,
                           count_std=scale.count_std, sum_std=scale.sum_std, epsilon=release_epsilon(z, query.delta),
                           delta=query.delta, suppressed_cells=len(exact) - len(released), min_cell_count=k)


def answer_problems(query: StatisticQuery, answer_: StatisticAnswer, k: int) -> list[str]:
    """Everything in a campus's answer that ``query`` does not declare (the release guard's check for a query reply).

    Every cell must be a declared cell, at most once, with a finite noisy count
    of at least :func:`threshold` and a noisy sum exactly when the statistic is a mean; the
    answer must be for this query and count its suppressed cells.
    """
    declared = set(cells(query))
    found, seen = [], set()
    for cell in answer_.cells:
        key = (tuple(cell.group), cell.bin)
        if key not in declared:
            found.append(f"cell {key} is not a cell of query {query.name!r}")
        elif key in seen:
            found.append(f"cell {key} is sent twice")
        seen.add(key)
        if not (math.isfinite(cell.noisy_count) and cell.noisy_count >= threshold(query, k)):
            found.append(f"cell {key} has noisy count {cell.noisy_count:g}, below release.min_cohort_size {k}"
                         + (f" × max_rows_per_registration {query.max_rows_per_registration}" if over_submissions(query) else ""))
        if cell.HasField("noisy_sum") != (query.statistic == "mean") or not math.isfinite(cell.noisy_sum):
            found.append(f"cell {key}: a noisy sum belongs to a mean only, and must be finite")
    if answer_.query_name != query.name:
        found.append(f"answer to query {answer_.query_name!r}; asked {query.name!r}")
    if len(answer_.cells) + answer_.suppressed_cells != len(declared):
        found.append(f"{len(answer_.cells)} cells sent and {answer_.suppressed_cells} suppressed; the query declares {len(declared)}")
    return found


@dataclass(frozen=True)
class Estimate:
    """The federation's estimate of one cell (or, for a quantile, of one group's quantile ``p``).

    ``estimate`` is the count (count, histogram), the mean ``Σ sums / Σ counts``
    or the quantile (value units); ``count`` the summed noisy count of the cell
    (of the group, for a quantile); ``campuses`` how many released it (any of
    the group's bins, for a quantile). ``std`` is the standard deviation of the
    estimate's noise: ``sqrt(Σ count_std²)`` for a count, for a mean the delta
    method, ``sqrt(Σ sum_std² + mean² · Σ count_std²) / Σ counts``, for a
    quantile that of its bootstrap draws. ``bound95`` is the half-width of
    its 95 % error interval: ``1.96 · std`` for counts and means; for a
    quantile one bin width (resolution) plus the 95th percentile of the
    bootstrap draws' distance to the estimate. Neither covers clipping or
    suppressed cells.
    """

    group: tuple[str, ...]
    bin: str
    estimate: float
    std: float
    bound95: float
    count: float
    campuses: int
    p: float | None = None


def interpolate_quantiles(counts: np.ndarray, edges_: np.ndarray, ps: Sequence[float]) -> np.ndarray:
    """Quantiles ``ps`` of histograms ``counts`` (shape ``(..., bins)``; negative counts taken as 0) with bin
    ``edges_`` (``bins + 1``, equal widths), by linear interpolation within the bin where the cumulative
    count reaches ``p·N``. Returns shape ``(..., len(ps))`` in value units; NaN where a histogram is empty."""
    c = np.clip(counts, 0.0, None)
    cum = np.cumsum(c, axis=-1)
    target = cum[..., -1:] * np.asarray(ps, dtype=float)  # (..., P)
    j = np.minimum((cum[..., None, :] < target[..., :, None]).sum(axis=-1), c.shape[-1] - 1)  # the bin reaching p·N
    inside = np.take_along_axis(c, j, axis=-1)
    before = np.take_along_axis(cum, j, axis=-1) - inside
    with np.errstate(invalid="ignore", divide="ignore"):
        fraction = np.clip((target - before) / inside, 0.0, 1.0)
    out = edges_[j] + fraction * (edges_[1] - edges_[0])
    return np.where(target > 0, out, np.nan)


def combine(query: StatisticQuery, answers: Sequence[StatisticAnswer]) -> list[Estimate]:
    """Sum the released cells over campuses; one :class:`Estimate` per cell released by at least one campus
    (for a quantile: one per group with a released bin and requested probability, in order)."""
    released = [{(tuple(c.group), c.bin): c for c in a.cells} for a in answers]
    if query.statistic == "quantile":
        return _quantile_estimates(query, answers, released)
    out = []
    for key in cells(query):
        parts = [(a, got[key]) for a, got in zip(answers, released) if key in got]
        if not parts:
            continue
        count = sum(c.noisy_count for _, c in parts)
        count_var = sum(a.count_std ** 2 for a, _ in parts)
        if query.statistic == "mean":
            mean = sum(c.noisy_sum for _, c in parts) / count
            std = math.sqrt(sum(a.sum_std ** 2 for a, _ in parts) + mean ** 2 * count_var) / count
            out.append(Estimate(key[0], key[1], mean, std, Z_95 * std, count, len(parts)))
        else:
            out.append(Estimate(key[0], key[1], count, math.sqrt(count_var), Z_95 * math.sqrt(count_var), count, len(parts)))
    return out


def _quantile_estimates(query: StatisticQuery, answers: Sequence[StatisticAnswer], released: list[dict]) -> list[Estimate]:
    e, labels, ps = edges(query), bin_labels(query), list(query.quantiles)
    rng = np.random.default_rng(0)  # the bootstrap simulates the stated noise; it needs no secrecy
    out = []
    for group in itertools.product(*(GROUP_FIELDS[f] for f in query.group_by)):
        keys = [(group, label) for label in labels]
        per_campus = np.array([[got[k].noisy_count if k in got else 0.0 for k in keys] for got in released]).reshape(-1, len(keys))
        counts = per_campus.sum(axis=0)
        if counts.sum() <= 0:
            continue
        # Each campus's release, redrawn around what it sent: noise at its stated std, then its suppression rule.
        draws = np.zeros((BOOTSTRAP_DRAWS, len(keys)))
        for a, sent in zip(answers, per_campus):
            redrawn = sent + rng.normal(0.0, a.count_std, size=draws.shape)
            draws += np.where(redrawn >= threshold(query, a.min_cell_count), redrawn, 0.0)
        estimate = interpolate_quantiles(counts, e, ps)
        drawn = interpolate_quantiles(draws, e, ps)
        spread = np.nanquantile(np.abs(drawn - estimate), 0.95, axis=0)
        campuses = int((per_campus > 0).any(axis=1).sum())
        out += [Estimate(group, f"q{p:g}", float(q), float(np.nanstd(d)), float(e[1] - e[0] + w), float(counts.sum()), campuses, p)
                for p, q, d, w in zip(ps, estimate, drawn.T, spread)]
    return out


class _QueryFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = ""
    statistic: str
    value: str = ""
    low: float | None = None
    high: float | None = None
    bin_edges: list[float] = Field(default_factory=list)
    group_by: list[str] = Field(default_factory=list)
    quantiles: list[float] = Field(default_factory=list)
    bins: int = 0
    max_rows_per_registration: int = 0
    epsilon: float
    delta: float = 1e-5


def load_query(path: str | Path) -> StatisticQuery:
    """The query in the TOML file ``path`` (keys as in ``protos/analytics.proto``; ``name`` defaults to the
    file name, ``delta`` to 1e-5, an indicator's ``low``/``high`` to 0/1).

    Raises
    ------
    QueryError
        When the file is missing or not TOML, a key is unknown or of the wrong
        type, or the query would be refused (:func:`problems`); the message
        names the file and each offending key.
    """
    path = Path(path)
    try:
        raw = _QueryFile.model_validate(tomllib.loads(path.read_text(encoding="utf-8")))
    except FileNotFoundError:
        raise QueryError(f"{path}: query file not found") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise QueryError(f"{path}: not a TOML file ({err})") from None
    except ValidationError as err:
        raise QueryError(f"{path}: " + "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors())) from None
    bounds = (0.0, 1.0) if _indicator(raw.value) else (0.0, 0.0)
    query = StatisticQuery(name=raw.name or path.stem, statistic=raw.statistic, value=raw.value,
                           low=bounds[0] if raw.low is None else raw.low, high=bounds[1] if raw.high is None else raw.high,
                           bin_edges=raw.bin_edges, group_by=raw.group_by, quantiles=raw.quantiles, bins=raw.bins,
                           max_rows_per_registration=raw.max_rows_per_registration, epsilon=raw.epsilon, delta=raw.delta)
    found = problems(query)
    if found:
        raise QueryError(f"{path}: " + "; ".join(found))
    return query
