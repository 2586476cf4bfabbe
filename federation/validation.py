"""Validating one contract table's values: types, vocabularies, ranges, dates and duplicate keys.

Every problem in a file is collected before anything is reported (lazy
validation), each with the export's file, line, column, value and what was
expected. Nothing is silently dropped: exact duplicate rows are merged and
noted; conflicting duplicates are problems.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from .contract import Column, Table
from .mapping import Bins, Mapping, TableMapping
from .problems import Problem
from .reading import LINE, START, Headers, read_export_file

__all__ = ["deduplicate", "read_table"]


def _check_column(
    frame: pd.DataFrame,
    col: Column,
    file: str,
    source: str,
    missing_markers: frozenset[str],
    codes: dict[str, str],
    bins: Bins | None = None,
    reported: pd.Series | None = None,
) -> tuple[pd.Series, list[Problem], int]:
    """The typed column, its problems (rows in ``reported`` already have one) and its count of missing values.
    ``bins`` turn numbers into labels before ``codes`` recode them."""
    raw = frame[col.name].str.strip()
    missing = raw.isin(missing_markers) | raw.isna()
    problems: list[Problem] = []
    n_missing = int(missing.sum())
    fresh = ~reported if reported is not None else pd.Series(True, index=frame.index)

    def report(mask: pd.Series, message: str) -> None:
        mask = mask & fresh
        for line, value in zip(frame.loc[mask, LINE], raw[mask], strict=True):
            problems.append(Problem(file, int(line), source, message.format(value=value)))

    if not col.nullable:
        report(missing, "value is missing; expected a value")
    if bins is not None:
        number = pd.to_numeric(raw.where(~missing), errors="coerce")
        report(
            ~missing & number.isna(), f"{{value!r}} is not a number (binned by edges {', '.join(f'{e:g}' for e in bins.edges)})"
        )
        labels = np.asarray(bins.labels, dtype=object)[np.searchsorted(bins.edges, number.fillna(0).to_numpy(), side="right")]
        raw = raw.where(missing | number.isna(), pd.Series(labels, index=raw.index))
    if codes:
        raw = raw.replace(codes)
    if col.kind in ("str",):
        return raw.where(~missing, None), problems, n_missing
    if col.kind == "cat":
        if col.vocab:
            expected = "one of " + ", ".join(col.vocab) + (f" (or a code: {', '.join(codes)})" if codes else "")
        else:
            expected = f"none (the federation schema gives {col.name} no value: leave it out of the mapping)"
        report(~missing & ~raw.isin(col.vocab), "unexpected value {value!r}; expected " + expected)
        return raw.where(~missing, None), problems, n_missing
    number = pd.to_numeric(raw.where(~missing), errors="coerce")
    bad = ~missing & number.isna()
    what = "a whole number" if col.kind == "int" else "a number"
    report(bad, f"{{value!r}} is not {what}")
    ok = number.notna()
    if col.kind == "int":
        report(ok & (number % 1 != 0), "{value!r} is not a whole number (days and counts are integers)")
    if col.positive:
        report(ok & (number <= 0), "{value} is out of range; expected a value > 0")
    if col.low is not None or col.high is not None:
        low = -np.inf if col.low is None else col.low
        high = np.inf if col.high is None else col.high
        report(ok & ((number < low) | (number > high)), f"{{value}} is out of range; expected {low:g} to {high:g}")
    return (number.astype("Int64") if col.kind == "int" and not problems else number), problems, n_missing


def _dates(
    frame: pd.DataFrame, name: str, missing: pd.Series, file: str, column: str, fmt: str
) -> tuple[pd.Series, list[Problem]]:
    """The calendar dates in ``frame[name]`` (format ``fmt``; NaT where ``missing`` or unreadable), and a
    problem naming the export's ``file`` and ``column`` for each unreadable one."""
    raw = frame[name].str.strip()
    dates = pd.to_datetime(raw.where(~missing), format=fmt, errors="coerce")
    bad = ~missing & dates.isna()
    return dates, [
        Problem(file, int(line), column, f"{value!r} is not a date in format {fmt!r}")
        for line, value in zip(frame.loc[bad, LINE], raw[bad], strict=True)
    ]


def _to_days(
    frame: pd.DataFrame, name: str, starts: pd.Series, missing_markers: frozenset[str], mapping: Mapping, given: TableMapping
) -> tuple[list[Problem], pd.Series]:
    """Turn the calendar dates in ``frame[name]`` into days since each row's presentation start (in place).
    ``starts`` holds each row's start date (NaT where unknown). Returns the problems and the rows they concern."""
    raw = frame[name].str.strip()
    missing = raw.isin(missing_markers)
    dates, problems = _dates(frame, name, missing, given.file, given.columns[name], mapping.date_format)
    unknown = ~missing & dates.notna() & starts.isna().to_numpy()
    for line in frame.loc[unknown, LINE]:
        problems.append(
            Problem(
                given.file,
                int(line),
                given.columns[name],
                "no start date known for this row's presentation; expected one in the presentations file",
            )
        )
    days = (dates - pd.to_datetime(starts.to_numpy())).dt.days
    frame[name] = np.where(missing, raw, days.astype("Int64").astype(str))
    return problems, ~missing & (dates.isna() | unknown)


def _start_dates(frame: pd.DataFrame, table: Table, f: dict[str, pd.DataFrame]) -> pd.Series:
    """Start date of each row's presentation (through the row's assessment for submissions)."""
    starts = f["presentations"][["course", "presentation", START]]
    if table.name == "submissions":
        where = f["assessments"][["assessment_id", "course", "presentation"]].astype({"assessment_id": str})
        keys = frame[["assessment_id"]].assign(assessment_id=lambda d: d["assessment_id"].str.strip()).merge(where, how="left")
    else:
        keys = frame[["course", "presentation"]]
    return keys.merge(starts, how="left", on=["course", "presentation"])[START]


def _source(given: TableMapping, name: str) -> str:
    """How a problem or a missingness row names where contract field ``name`` comes from."""
    if name in given.constants:
        return f"(constant {given.constants[name]!r})"
    return given.columns.get(name, "(not in the export)")


def read_table(
    directory: Path,
    mapping: Mapping,
    table: Table,
    f: dict[str, pd.DataFrame],
    given: TableMapping,
    headers: Headers,
    notes: list[str],
) -> tuple[pd.DataFrame, list[Problem], list[dict[str, str | int | float]]]:
    """The export's ``table`` (its part ``given``) typed as the contract declares, every problem of its
    values, and one missingness row per contract field (table, field, file, column, rows, missing, share).

    ``f`` holds the tables read before it (presentations and assessments), needed to
    turn calendar dates into days since a presentation's start. Integer columns are
    ``Int64`` when the table has no problem. Problems of values are returned, not raised.
    The rows a row filter left out are counted in ``notes``; ``headers`` collects the columns read
    (:func:`~federation.reading.read_export_file`).

    Raises
    ------
    DataError
        When the file itself cannot be read (see :func:`~federation.reading.read_export_file`).
    """
    frame, left_out = read_export_file(directory, mapping, table, given, headers)
    if left_out:
        notes.append(f"{given.file}: {left_out} row(s) left out of {table.name} by its row filter (keep)")
    missing_markers = frozenset(given.missing if given.missing is not None else mapping.missing)
    problems: list[Problem] = []
    if table.name == "presentations" and mapping.start_date:  # every presentation needs its start date
        frame[START], problems = _dates(
            frame, START, pd.Series(False, index=frame.index), given.file, mapping.start_date, mapping.date_format
        )
    reported = {}
    for name in given.dates:
        found, reported[name] = _to_days(frame, name, _start_dates(frame, table, f), missing_markers, mapping, given)
        problems += found
    missingness: list[dict[str, str | int | float]] = []
    for col in table.columns:
        frame[col.name], found, n_missing = _check_column(
            frame,
            col,
            given.file,
            _source(given, col.name),
            missing_markers,
            given.codes.get(col.name, {}),
            given.bins.get(col.name),
            reported.get(col.name),
        )
        problems += found
        missingness.append(
            {
                "table": table.name,
                "field": col.name,
                "file": given.file,
                "column": _source(given, col.name),
                "rows": len(frame),
                "missing": n_missing,
                "share": round(n_missing / len(frame), 4) if len(frame) else 0.0,
            }
        )
    return frame, problems, missingness


def deduplicate(frame: pd.DataFrame, table: Table, file: str, notes: list[str]) -> tuple[pd.DataFrame, list[Problem]]:
    """``frame`` without its exact duplicate rows (each merge noted in ``notes``), and a problem for each
    row that repeats an earlier row's key (``table.key``) with other values."""
    values = [c.name for c in table.columns]
    exact = frame.duplicated(values)
    if exact.any():
        notes.append(
            f"{file}: {int(exact.sum())} exact duplicate row(s) merged "
            f"(lines {', '.join(map(str, frame.loc[exact, LINE].head(5)))}...)"
        )
        frame = frame[~exact]
    clash = frame.duplicated(list(table.key), keep=False)
    problems = []
    if clash.any():
        for key, group in frame[clash].groupby(list(table.key), sort=False):
            first = int(group[LINE].iloc[0])
            for line in group[LINE].iloc[1:]:
                problems.append(
                    Problem(
                        file,
                        int(line),
                        None,
                        f"conflicting duplicate of line {first} for {'/'.join(table.key)} = {key}; expected one record per key",
                    )
                )
    return frame, problems
