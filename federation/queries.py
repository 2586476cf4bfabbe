"""What a DP statistic query may ask, and its TOML file: the rules both the campus and the coordinator apply.

A query (``protos/analytics.proto``'s ``StatisticQuery``) names a statistic
(count, mean, histogram or quantile), the value it takes, the fields it is
grouped by and the ε and δ each campus spends on it. :class:`Query` is the
strict model of a query: :func:`load_query` validates a query file with it,
and :func:`check` validates, with the same rules, a query that arrives on the
wire, before the campus reads any record.

Records: a campus's registrations (``learners`` rows joined with their
``registrations`` row), or, when the value or a ``group_by`` field belongs to
the ``assessments`` or ``submissions`` tables, its submissions joined with
their assessment and registration. A registration has one registration record
but any number of submissions, so a submission statistic declares
``m = max_rows_per_registration``: each registration contributes at most m
submissions (:func:`rows_per_registration`).

Cells are fixed by the query, never by the data: every combination of the
``group_by`` fields' contract vocabularies (plus ``"missing"`` for a nullable
field such as ``imd_band``) and, for a histogram or a quantile, every bin
(:func:`cells`). A campus sends a cell only when its noisy count reaches
:func:`threshold`.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from .contract import ASSESSMENTS, ASSESSMENTS_MODULE, ENGAGEMENT, LEARNERS, REGISTRATIONS, SUBMISSIONS
from .errors import UserError
from .proto.analytics_pb2 import StatisticQuery
from .schema import FederationSchema
from .tomlfile import load_model

__all__ = [
    "ANSWER",
    "ENGAGEMENT_FIELDS",
    "GROUP_FIELDS",
    "check_schema",
    "group_values",
    "INDICATOR_FIELDS",
    "KEYS",
    "MAX_BINS",
    "MISSING",
    "NUMERIC_FIELDS",
    "QUERY_KEY",
    "STATISTICS",
    "SUBMISSION_FIELDS",
    "CellKey",
    "Query",
    "QueryError",
    "bin_labels",
    "cells",
    "check",
    "edges",
    "indicator",
    "load_query",
    "modules_needed",
    "over_submissions",
    "require_modules",
    "rows_per_registration",
    "threshold",
]

STATISTICS = ("count", "mean", "histogram", "quantile")
MISSING = "missing"
"""The group value of a record whose nullable group_by field is empty."""
MAX_BINS = 1000
"""Most bins a quantile's histogram may have."""
QUERY_KEY = "statistic-query"
"""Key of the serialized StatisticQuery in a query message's config record (and in the ServerApp's run config, as JSON)."""
ANSWER = "answer"
"""Name of the reply record, and of its one key, holding the serialized StatisticAnswer."""

KEYS = frozenset({"course", "presentation", "student_id", "assessment_id"})
"""Identifiers: never a value nor a group."""
_COLUMNS = {c.name: c for t in (LEARNERS, REGISTRATIONS, ASSESSMENTS, SUBMISSIONS) for c in t.columns if c.name not in KEYS}
SUBMISSION_FIELDS = frozenset(c.name for t in (ASSESSMENTS, SUBMISSIONS) for c in t.columns if c.name not in KEYS)
"""Fields of the assessments and submissions tables: a statistic using one is over submissions."""
GROUP_FIELDS = tuple(c.name for c in _COLUMNS.values() if c.kind == "cat")
"""Fields a statistic may be grouped by: the contract's categorical fields (their values: :func:`group_values`)."""
ENGAGEMENT_FIELDS = {
    "total_clicks": "all clicks of the registration in its click log",
    "total_active_days": "days on which the registration has a click",
}
"""Numbers of each registration from module engagement (one value per registration, like a registration field;
0 for a registration without a click). A campus without the module refuses a query on them."""
NUMERIC_FIELDS = tuple(c.name for c in _COLUMNS.values() if c.kind in ("int", "float")) + tuple(ENGAGEMENT_FIELDS)
"""Numeric contract fields a mean, histogram or quantile may take."""
INDICATOR_FIELDS = GROUP_FIELDS
"""Categorical contract fields a ``FIELD=VALUE`` indicator may test (VALUE: one of the federation schema's)."""


def group_values(field: str, schema: FederationSchema) -> tuple[str, ...]:
    """Every group of ``field`` under ``schema``: its vocabulary, and :data:`MISSING` where the field is nullable."""
    return (*schema.vocabulary(field), *((MISSING,) if _COLUMNS[field].nullable else ()))


CellKey = tuple[tuple[str, ...], str]
"""A cell: its group values (one per group_by field) and its bin label ("" for count and mean)."""


class QueryError(UserError):
    """A statistic query that is malformed, or that would reveal too much (refused before any data is read)."""


def indicator(value: str) -> tuple[str, str] | None:
    """(field, level) of an indicator value ``FIELD=VALUE`` over a categorical contract field; None for any other value
    (whether ``level`` is in the federation's vocabulary, :func:`check_schema` says)."""
    field, sep, level = value.partition("=")
    return (field, level) if sep and level and field in INDICATOR_FIELDS else None


class Query(BaseModel):
    """A statistic query, validated: every key typed strictly (a string is never a number, a decimal never a
    count), no unknown key, and every rule of :meth:`_refusals`. Keys and meanings as in ``protos/analytics.proto``."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    name: str = ""
    statistic: Literal[STATISTICS]  # type: ignore[valid-type]
    value: str = ""
    low: float = 0.0
    high: float = 0.0
    bin_edges: list[float] = Field(default_factory=list)
    group_by: list[str] = Field(default_factory=list)
    quantiles: list[float] = Field(default_factory=list)
    bins: int = Field(0, ge=0)
    max_rows_per_registration: int = Field(0, ge=0)
    epsilon: float = Field(gt=0, allow_inf_nan=False)
    delta: float = Field(1e-5, gt=0, lt=1)

    @model_validator(mode="before")
    @classmethod
    def _indicator_bounds(cls, data: object) -> object:
        # An indicator is 0 or 1: its bounds go without saying.
        if isinstance(data, dict) and isinstance(data.get("value"), str) and indicator(data["value"]):
            return {"low": 0.0, "high": 1.0, **data}
        return data

    @model_validator(mode="after")
    def _refused(self) -> Query:
        found = self._refusals()
        if found:
            raise ValidationError.from_exception_data(
                type(self).__name__,
                [
                    InitErrorDetails(
                        type=PydanticCustomError("query_refused", reason), loc=(key,), input=getattr(self, key, None)
                    )
                    for key, reason in found
                ],
            )
        return self

    def _refusals(self) -> list[tuple[str, str]]:
        """(key, reason) for every reason to refuse the query.

        Refused: a group_by field that is not a categorical contract field
        (``student_id`` or any field outside the contract), or named twice; a
        value that is not a numeric contract field nor, for a mean, an indicator
        over a categorical one; a mean or quantile without finite bounds
        ``low < high`` (an unbounded sum or range); an indicator mean with bounds
        other than [0, 1]; a histogram without at least two finite, increasing
        edges; a quantile without ``bins`` in [2, :data:`MAX_BINS`] or without
        distinct probabilities in (0, 1); a submission statistic without
        ``max_rows_per_registration`` ≥ 1 (an unbounded contribution per
        registration), or a registration statistic with one above 1; keys the
        statistic does not use.
        """
        stat, found = self.statistic, []
        found += [
            ("group_by", f"field {f!r} is not a categorical field of the data contract (allowed: {', '.join(GROUP_FIELDS)})")
            for f in self.group_by
            if f not in GROUP_FIELDS
        ]
        if len(set(self.group_by)) != len(self.group_by):
            found.append(("group_by", f"{self.group_by} names a field twice"))
        if stat == "count" and self.value:
            found.append(("value", "a count takes no value field"))
        elif stat in ("histogram", "quantile") and self.value not in NUMERIC_FIELDS:
            found.append(("value", f"{self.value!r}: a {stat} needs a numeric contract field ({', '.join(NUMERIC_FIELDS)})"))
        elif stat == "mean" and self.value not in NUMERIC_FIELDS and not indicator(self.value):
            found.append(
                (
                    "value",
                    f"{self.value!r} is not a numeric contract field ({', '.join(NUMERIC_FIELDS)}) "
                    f"nor an indicator FIELD=VALUE over {', '.join(INDICATOR_FIELDS)}",
                )
            )
        if stat in ("mean", "quantile"):
            if not (math.isfinite(self.low) and math.isfinite(self.high) and self.low < self.high):
                found.append(
                    (
                        "high",
                        f"a {stat} needs finite clipping bounds low < high, not low = {self.low:g}, "
                        f"high = {self.high:g} (an unbounded {'sum' if stat == 'mean' else 'range'} is refused)",
                    )
                )
            elif indicator(self.value) and (self.low, self.high) != (0.0, 1.0):
                found.append(("high", f"low = {self.low:g}, high = {self.high:g}: an indicator's bounds are low = 0, high = 1"))
        if stat == "histogram":
            e = edges(self)
            if len(e) < 2 or not np.all(np.isfinite(e)) or not np.all(np.diff(e) > 0):
                found.append(("bin_edges", f"{self.bin_edges}: a histogram needs at least two finite, increasing edges"))
        if stat == "quantile":
            if not 2 <= self.bins <= MAX_BINS:
                found.append(("bins", f"{self.bins}: a quantile needs 2 to {MAX_BINS} bins of [low, high]"))
            ps = self.quantiles
            if not ps or not all(0 < p < 1 for p in ps) or len(set(ps)) != len(ps):
                found.append(("quantiles", f"{ps}: a quantile needs distinct probabilities in (0, 1), e.g. [0.25, 0.5, 0.75]"))
        uses = {"histogram": {"bin_edges"}, "quantile": {"bins", "quantiles"}}.get(stat, set())
        found += [
            (key, f"a {stat} takes no {key}")
            for key in ("bin_edges", "bins", "quantiles")
            if getattr(self, key) and key not in uses
        ]
        m = self.max_rows_per_registration
        if over_submissions(self) and m < 1:
            found.append(
                (
                    "max_rows_per_registration",
                    "a statistic over submissions needs a bound m >= 1 on the rows one "
                    "registration contributes (an unbounded contribution is refused)",
                )
            )
        elif not over_submissions(self) and m > 1:
            found.append(("max_rows_per_registration", f"{m}: a registration statistic counts one row per registration"))
        return found

    @classmethod
    def of(cls, query: StatisticQuery) -> Query:
        """The model of a query that arrived on the wire. Raises ValidationError when it breaks a rule."""
        return cls(
            name=query.name,
            statistic=query.statistic,
            value=query.value,
            low=query.low,
            high=query.high,
            bin_edges=list(query.bin_edges),
            group_by=list(query.group_by),
            quantiles=list(query.quantiles),
            bins=query.bins,
            max_rows_per_registration=query.max_rows_per_registration,
            epsilon=query.epsilon,
            delta=query.delta,
        )

    def proto(self) -> StatisticQuery:
        """The query as the StatisticQuery message the campuses receive."""
        return StatisticQuery(**self.model_dump())


def check(query: StatisticQuery) -> None:
    """Refuse ``query`` unless it keeps every rule of :class:`Query`.

    Raises
    ------
    QueryError
        Naming each offending key and why (``key: reason; ...``).
    """
    try:
        Query.of(query)
    except ValidationError as err:
        raise QueryError("; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())) from None


def load_query(path: str | Path) -> StatisticQuery:
    """The query in the TOML file ``path`` (keys as in ``protos/analytics.proto``; ``name`` defaults to the
    file name, ``delta`` to 1e-5, an indicator's ``low``/``high`` to 0/1).

    Raises
    ------
    QueryError
        When the file is missing or not TOML, a key is unknown or of the wrong
        type, or the query breaks a rule of :class:`Query`; the message names
        the file and each offending key.
    """
    query = load_model(Query, path, QueryError, "query file")
    return query.model_copy(update={"name": query.name or Path(path).stem}).proto()


def edges(query: StatisticQuery | Query) -> np.ndarray:
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


def cells(query: StatisticQuery, schema: FederationSchema) -> list[CellKey]:
    """Every cell the query declares under the federation ``schema``, in a fixed order (data-independent)."""
    groups = itertools.product(*(group_values(f, schema) for f in query.group_by))
    return [(g, b) for g in groups for b in (bin_labels(query) or [""])]


def over_submissions(query: StatisticQuery | Query) -> bool:
    """Whether the query's records are submissions (its value or a group_by field is an assessment or submission field)."""
    return bool({query.value.partition("=")[0], *query.group_by} & SUBMISSION_FIELDS)


def modules_needed(query: StatisticQuery | Query) -> frozenset[str]:
    """The optional contract modules whose tables the query's records need: ``assessments`` for a
    statistic over submissions, ``engagement`` for a value of :data:`ENGAGEMENT_FIELDS`."""
    needed = {ASSESSMENTS_MODULE} if over_submissions(query) else set()
    if query.value.partition("=")[0] in ENGAGEMENT_FIELDS:
        needed.add(ENGAGEMENT)
    return frozenset(needed)


def check_schema(query: StatisticQuery | Query, schema: FederationSchema) -> None:
    """Refuse ``query`` when its indicator tests a value outside the federation ``schema``'s vocabulary.

    Raises
    ------
    QueryError
        Naming the value and the vocabulary."""
    tested = indicator(query.value)
    if tested and tested[1] not in schema.vocabulary(tested[0]):
        vocab = ", ".join(schema.vocabulary(tested[0])) or "none"
        raise QueryError(
            f"value {query.value!r}: {tested[1]!r} is not in federation schema {schema.name!r}'s vocabulary ({vocab})"
        )


def require_modules(query: StatisticQuery | Query, provided: frozenset[str] | set[str]) -> None:
    """Refuse ``query`` when the campus's data (``provided``: its mapping's modules) lack a module it needs.

    Raises
    ------
    QueryError
        Naming the modules missing and what the query uses them for (no data value).
    """
    absent = sorted(modules_needed(query) - set(provided))
    if absent:
        raise QueryError(
            f"this campus's data have no module {', '.join(absent)} (its mapping provides "
            f"{', '.join(sorted(provided)) or 'the core tables only'}); query {query.name!r} needs it"
        )


def rows_per_registration(query: StatisticQuery) -> int:
    """m: the most records one registration contributes (1 for a registration statistic)."""
    return max(1, query.max_rows_per_registration)


def threshold(query: StatisticQuery, k: int) -> int:
    """The least noisy count of a released cell: ``k·m`` records (``m`` = :func:`rows_per_registration`), so
    that one registration's m submissions never make a cell alone (``k``: the campus's
    ``release.min_cohort_size``)."""
    return k * rows_per_registration(query)
