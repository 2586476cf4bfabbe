"""DP federated statistics: counts, means and histograms over a campus's registrations, per group.

Records and privacy unit: a campus's ``learners`` rows (one per registration); the privacy unit
is one registration row, as for DP-SGD training (:data:`federation.privacy.PRIVACY_UNIT`).

Cells are fixed by the query, never by the data: every combination of the
``group_by`` fields' contract vocabularies (plus ``"missing"`` for a nullable
field such as ``imd_band``) and, for a histogram, every bin.

Sensitivity (adding or removing one registration): the row falls in exactly
one cell, whose count changes by 1 and, for a mean, whose sum changes by the
row's clipped value, at most ``B = max(|low|, |high|)``. Counts and sums / B
are released together, a vector of L2 sensitivity ``Δ = √2``; counts alone
(count, histogram) have ``Δ = 1``.

Mechanism: the Gaussian mechanism (Dwork and Roth, "The Algorithmic
Foundations of Differential Privacy", 2014, Appendix A): independent normal
noise of standard deviation ``z·Δ`` on each count and ``z·Δ·B`` on each sum.
Its Rényi DP is ``α / (2 z²)`` at every order α (Mironov, "Rényi Differential
Privacy", CSF 2017, Proposition 7), which is the sampled Gaussian mechanism of
DP-SGD at sampling rate q = 1 for one step. So a statistic is calibrated with
:func:`federation.privacy.calibrate_noise` and recorded in the campus's
privacy ledger as ``(z, q = 1, 1 step)``, composing with training on the same
dataset. Noise comes from NumPy's generator seeded from OS entropy: a
recorded seed would let anyone remove it.

Small cells: a campus does not send a cell whose noisy count is below ``k``
(its policy's ``release.min_cohort_size``, :data:`MIN_CELL_COUNT` without a
policy). Deciding on the noisy count is post-processing and costs no ε.
"""

from __future__ import annotations

import itertools
import math
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .contract import CATEGORICAL_FEATURES, LEARNERS, NUMERIC_FEATURES
from .policy import CampusPolicy
from .privacy import DPSettings, History, calibrate_noise, epsilon
from .proto.analytics_pb2 import Cell, StatisticAnswer, StatisticQuery
from .runconfig import ConfigError

STATISTICS = ("count", "mean", "histogram")
MISSING = "missing"
MIN_CELL_COUNT = 10
"""k of a campus without a policy: cells with a noisy count below it are not sent."""
Z_95 = 1.959964
"""Two-sided 95 % quantile of the standard normal distribution."""
QUERY_KEY = "statistic-query"
"""Key of the serialized StatisticQuery in a query message's config record (and in the ServerApp's run config, as JSON)."""
ANSWER = "answer"
"""Name of the reply record, and of its one key, holding the serialized StatisticAnswer."""

_COLUMNS = {c.name: c for c in LEARNERS.columns}
GROUP_FIELDS = {name: (*vocab, *((MISSING,) if _COLUMNS[name].nullable else ())) for name, vocab in CATEGORICAL_FEATURES.items()}
"""Fields a statistic may be grouped by, with every group value (fixed vocabularies)."""
NUMERIC_FIELDS = tuple(c.name for c in LEARNERS.columns if c.name in NUMERIC_FEATURES)
"""Numeric learner fields of the contract a mean or histogram may take."""
INDICATOR_FIELDS = {c.name: c.vocab for c in LEARNERS.columns if c.kind == "cat"}
"""Categorical learner fields a ``FIELD=VALUE`` indicator may test."""


class QueryError(ConfigError):
    """A statistic query that is malformed, or that would reveal too much (refused before any data is read)."""


CellKey = tuple[tuple[str, ...], str]
"""A cell: its group values (one per group_by field) and its histogram bin label ("" otherwise)."""


def bin_labels(query: StatisticQuery) -> list[str]:
    """Histogram bin labels, ``[a, b)`` and the last one closed ``[a, b]``; empty for count and mean."""
    edges = list(query.bin_edges) if query.statistic == "histogram" else []
    return [f"[{a:g}, {b:g}{']' if i == len(edges) - 2 else ')'}" for i, (a, b) in enumerate(itertools.pairwise(edges))]


def cells(query: StatisticQuery) -> list[CellKey]:
    """Every cell the query declares, in a fixed order (data-independent)."""
    groups = itertools.product(*(GROUP_FIELDS[f] for f in query.group_by))
    return [(g, b) for g in groups for b in (bin_labels(query) or [""])]


def problems(query: StatisticQuery) -> list[str]:
    """Every reason to refuse ``query`` (empty when it may be answered), each naming the query key.

    Refused: an unknown statistic; a group_by field that is not a categorical
    contract field (``student_id`` or any field outside the contract); a value
    that is not a numeric contract field of the learners table nor an indicator over a
    categorical one; a mean without finite clipping bounds ``low < high`` (an
    unbounded sum); an indicator mean with bounds other than [0, 1]; a histogram
    without at least two finite, increasing edges; ε not finite and > 0; δ not in (0, 1).
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
    elif query.statistic == "histogram" and query.value not in NUMERIC_FIELDS:
        found.append(f"value {query.value!r}: a histogram needs a numeric contract field ({', '.join(NUMERIC_FIELDS)})")
    elif query.statistic == "mean" and query.value not in NUMERIC_FIELDS and not indicator:
        found.append(f"value {query.value!r} is not a numeric contract field of the learners table ({', '.join(NUMERIC_FIELDS)}) "
                     f"nor an indicator FIELD=VALUE over {', '.join(INDICATOR_FIELDS)}")
    if query.statistic == "mean":
        low, high = query.low, query.high
        if not (math.isfinite(low) and math.isfinite(high) and low < high):
            found.append(f"low = {low:g}, high = {high:g}: a mean needs finite clipping bounds low < high (an unbounded sum is refused)")
        elif indicator and (low, high) != (0.0, 1.0):
            found.append(f"low = {low:g}, high = {high:g}: an indicator's bounds are low = 0, high = 1")
    if query.statistic == "histogram":
        edges = np.asarray(query.bin_edges, dtype=float)
        if len(edges) < 2 or not np.all(np.isfinite(edges)) or not np.all(np.diff(edges) > 0):
            found.append(f"bin_edges {list(query.bin_edges)}: a histogram needs at least two finite, increasing edges")
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


def noise(query: StatisticQuery, z: float) -> Noise:
    """Noise std for multiplier ``z``: ``z·Δ`` per count, ``z·Δ·B`` per sum (see the module docstring)."""
    if query.statistic != "mean":
        return Noise(z, z, 0.0)
    delta_l2 = math.sqrt(2.0)
    return Noise(z, z * delta_l2, z * delta_l2 * max(abs(query.low), abs(query.high)))


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


def exact_cells(query: StatisticQuery, info: pd.DataFrame) -> dict[CellKey, tuple[int, float]]:
    """(count, sum of clipped values) of every declared cell over the registrations ``info``, without noise.

    ``info`` is a validated learners frame. Sums are 0 except for a mean.
    Raises QueryError on an invalid query.
    """
    check(query)
    frame = pd.DataFrame({f: info[f].astype(object).where(info[f].notna(), MISSING) for f in query.group_by}, index=info.index)
    if query.statistic == "histogram":
        edges = np.asarray(query.bin_edges, dtype=float)
        x = np.clip(info[query.value].astype(float).to_numpy(), edges[0], edges[-1])
        index = np.clip(np.searchsorted(edges, x, side="right") - 1, 0, len(edges) - 2)
        frame["_bin"] = np.asarray(bin_labels(query), dtype=object)[index]
    else:
        frame["_bin"] = ""
    if query.statistic == "mean":
        indicator = _indicator(query.value)
        raw = (info[indicator[0]] == indicator[1]).fillna(False).astype(float) if indicator else info[query.value].astype(float)
        frame["_value"] = raw.clip(query.low, query.high)
    else:
        frame["_value"] = 0.0
    keys = [*query.group_by, "_bin"]
    grouped = frame.groupby(keys, sort=False)["_value"].agg(["size", "sum"])
    found = {(tuple(k[:-1]), k[-1]): (int(n), float(s)) for k, (n, s) in zip(
        (k if isinstance(k, tuple) else (k,) for k in grouped.index), grouped.itertuples(index=False))}
    return {key: found.get(key, (0, 0.0)) for key in cells(query)}


def answer(query: StatisticQuery, info: pd.DataFrame, campus: str, z: float, k: int) -> StatisticAnswer:
    """The campus's noised answer over its registrations ``info`` with multiplier ``z``; cells whose
    noisy count is below ``k`` are left out and counted in ``suppressed_cells``."""
    rng = np.random.default_rng()  # seeded from OS entropy
    scale = noise(query, z)
    exact = exact_cells(query, info)
    counts = np.array([n for n, _ in exact.values()], dtype=float) + rng.normal(0.0, scale.count_std, len(exact))
    sums = np.array([s for _, s in exact.values()]) + rng.normal(0.0, scale.sum_std, len(exact))
    released = [Cell(group=group, bin=label, noisy_count=float(c), noisy_sum=float(s) if query.statistic == "mean" else None)
                for (group, label), c, s in zip(exact, counts, sums) if c >= k]
    return StatisticAnswer(campus=campus, query_name=query.name, cells=released, noise_multiplier=z,
                           count_std=scale.count_std, sum_std=scale.sum_std, epsilon=release_epsilon(z, query.delta),
                           delta=query.delta, suppressed_cells=len(exact) - len(released), min_cell_count=k)


def answer_problems(query: StatisticQuery, answer_: StatisticAnswer, k: int) -> list[str]:
    """Everything in a campus's answer that ``query`` does not declare (the release guard's check for a query reply).

    Every cell must be a declared cell, at most once, with a finite noisy count
    of at least ``k`` and a noisy sum exactly when the statistic is a mean; the
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
        if not (math.isfinite(cell.noisy_count) and cell.noisy_count >= k):
            found.append(f"cell {key} has noisy count {cell.noisy_count:g}, below release.min_cohort_size {k}")
        if cell.HasField("noisy_sum") != (query.statistic == "mean") or not math.isfinite(cell.noisy_sum):
            found.append(f"cell {key}: a noisy sum belongs to a mean only, and must be finite")
    if answer_.query_name != query.name:
        found.append(f"answer to query {answer_.query_name!r}; asked {query.name!r}")
    if len(answer_.cells) + answer_.suppressed_cells != len(declared):
        found.append(f"{len(answer_.cells)} cells sent and {answer_.suppressed_cells} suppressed; the query declares {len(declared)}")
    return found


@dataclass(frozen=True)
class Estimate:
    """The federation's estimate of one cell from the campuses that released it.

    ``estimate`` is the count (count, histogram) or the mean ``Σ sums / Σ counts``;
    ``std`` the standard deviation of its noise: ``sqrt(Σ count_std²)`` for a
    count, and for a mean the delta method,
    ``sqrt(Σ sum_std² + mean² · Σ count_std²) / Σ counts``. Clipping and
    suppressed cells are not part of it.
    """

    group: tuple[str, ...]
    bin: str
    estimate: float
    std: float
    count: float
    campuses: int

    @property
    def bound95(self) -> float:
        """Half-width of the 95 % interval of the noise, ``1.96 · std``."""
        return Z_95 * self.std


def combine(query: StatisticQuery, answers: Sequence[StatisticAnswer]) -> list[Estimate]:
    """Sum the released cells over campuses; one :class:`Estimate` per cell released by at least one campus."""
    out = []
    for key in cells(query):
        parts = [(a, c) for a in answers for c in a.cells if (tuple(c.group), c.bin) == key]
        if not parts:
            continue
        count = sum(c.noisy_count for _, c in parts)
        count_var = sum(a.count_std ** 2 for a, _ in parts)
        if query.statistic == "mean":
            mean = sum(c.noisy_sum for _, c in parts) / count
            std = math.sqrt(sum(a.sum_std ** 2 for a, _ in parts) + mean ** 2 * count_var) / count
            out.append(Estimate(key[0], key[1], mean, std, count, len(parts)))
        else:
            out.append(Estimate(key[0], key[1], count, math.sqrt(count_var), count, len(parts)))
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
                           bin_edges=raw.bin_edges, group_by=raw.group_by, epsilon=raw.epsilon, delta=raw.delta)
    found = problems(query)
    if found:
        raise QueryError(f"{path}: " + "; ".join(found))
    return query
