"""Module ``engagement`` of the learner-record contract: reading, checking and featurising a click log.

A campus's click log (OULAD's ``studentVle``: one row per student, online
resource and day, with the day's clicks) has millions of rows: 10,655,280 in
OULAD. It is read column by column with pyarrow (Parquet, or CSV with the
mapping's delimiter, encoding and missing-value markers), only the mapped
columns, and checked with whole-column operations: every value present, whole
numbers, clicks > 0, days from :data:`~federation.contract.PRE_START_DAYS`
before the start to the presentation's last day, resources known for the
event's presentation, students registered on it. Problems are reported like the
other tables' (:class:`~federation.problems.Problem`: file, line or row,
column, value, what was expected).

Features at day D (:func:`engagement_features`) use only events dated before D
and are scaled with fixed constants (:func:`engagement_feature_bounds`), never fitted
on anyone's data, so every campus produces the same columns.
"""

from __future__ import annotations

import csv
import io
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from .contract import EVENTS, PRE_START_DAYS
from .mapping import Mapping
from .problems import DataError, Problem

__all__ = [
    "ENGAGEMENT_FEATURES",
    "KIND_CLICKS_HIGH",
    "MAX_LISTED",
    "RECENT_WEEKS",
    "benchmark",
    "check_events",
    "engagement_feature_bounds",
    "engagement_features",
    "engagement_totals",
    "learner_rows",
    "presentation_index",
    "read_events",
]

RECENT_WEEKS = 4
"""Weeks before day D whose clicks are features of their own (week 1: days D-7 to D-1)."""
MAX_LISTED = 1000
"""Rows listed one by one for each kind of problem in the click log; further rows with it are counted in one more problem."""

ENGAGEMENT_FEATURES: dict[str, tuple[float, bool]] = {
    **{f"clicks_week_{k}": (2_000.0, True) for k in range(1, RECENT_WEEKS + 1)},
    "clicks_before": (20_000.0, True),
    "active_days": (365.0, False),
    "days_since_last_activity": (365.0, False),
    "no_activity_yet": (1.0, False),
    "engagement_absent": (1.0, False),
}
"""Engagement features at day D but those per activity type (:func:`engagement_feature_bounds`): name -> (high,
log). A value is clipped to [0, high] and divided by high, after ``log1p`` of both where ``log`` is True (click
counts are heavy-tailed). Clicks per week (``clicks_week_k``: days D-7k to D-7k+6), all clicks before D, days with
a click, days from the last click to D (365 when none; ``no_activity_yet`` then 1); ``engagement_absent`` is 1
(and every other one 0) on a campus whose mapping does not provide module engagement."""
KIND_CLICKS_HIGH = 10_000.0
"""The bound (log-scaled) of the clicks on the resources of one activity type."""


def engagement_feature_bounds(activity_types: tuple[str, ...]) -> dict[str, tuple[float, bool]]:
    """Every engagement feature at day D, in order, as :data:`ENGAGEMENT_FEATURES`, with ``clicks_<type>`` for each
    of the federation schema's ``activity_types`` (clicks on resources of that type) before ``engagement_absent``."""
    static = dict(ENGAGEMENT_FEATURES)
    absent = static.pop("engagement_absent")
    return {**static, **{f"clicks_{kind}": (KIND_CLICKS_HIGH, True) for kind in activity_types}, "engagement_absent": absent}


_KEY_SHIFT = 32  # registration key: presentation index << 32 | student_id (student ids are < 2**32)
_NUMBERS = ("student_id", "site_id", "day", "clicks")


def presentation_index(course: pd.Series, presentation: pd.Series, presentations: pd.DataFrame) -> np.ndarray:
    """Row of each (course, presentation) pair in ``presentations`` (int64, -1 when absent), computed on the
    pairs' categories, so millions of rows cost one table look-up each."""
    c, p = pd.Categorical(course), pd.Categorical(presentation)
    lookup = np.full((len(c.categories) + 1, len(p.categories) + 1), -1, np.int64)  # last row/column: missing
    ci = pd.Index(c.categories).get_indexer(presentations["course"])
    pi = pd.Index(p.categories).get_indexer(presentations["presentation"])
    known = (ci >= 0) & (pi >= 0)
    lookup[ci[known], pi[known]] = np.flatnonzero(known)
    found: np.ndarray = lookup[c.codes, p.codes]
    return found


def _keys(frame: pd.DataFrame, presentations: pd.DataFrame) -> np.ndarray:
    """Each row's registration key (int64; -1 where its presentation is unknown)."""
    where = presentation_index(frame["course"], frame["presentation"], presentations)
    keys = (where << _KEY_SHIFT) | frame["student_id"].to_numpy(np.int64)
    return np.where(where >= 0, keys, -1)


def _lookup(keys: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Position of each of ``keys`` in ``table`` (int64 without repeats; -1 when absent), by hashing."""
    return np.asarray(pd.Index(table).get_indexer(keys), np.int64)


def _header(path: Path, delimiter: str, encoding: str) -> list[str]:
    with path.open(encoding="utf-8-sig" if encoding.lower().replace("_", "-") in ("utf-8", "utf8") else encoding) as f:
        return next(csv.reader(io.StringIO(f.readline()), delimiter=delimiter), [])


def read_events(directory: Path, mapping: Mapping) -> tuple[pd.DataFrame, list[Problem], list[dict[str, str | int | float]]]:
    """The click log of ``mapping``'s ``events`` table, under contract names, with the problems of its own values
    and one missingness row per field (as :func:`federation.validation.read_table`).

    Columns: ``course``, ``presentation`` (categorical), ``student_id``, ``site_id``, ``day``, ``clicks``
    (int64 ids, int32 day and clicks; rows with a problem are kept, with -1 where a value is missing or not a
    whole number). The
    problems' lines are the file's (a CSV's header is line 1; a Parquet file's first row is row 1).

    Raises
    ------
    DataError
        When the file cannot be parsed or lacks a mapped column.
    """
    given = mapping.table("events")
    path = directory / given.file
    source = {c.name: given.columns[c.name] for c in EVENTS.columns}
    missing = list(given.missing if given.missing is not None else mapping.missing)
    if path.suffix == ".parquet":
        header = pq.read_schema(path).names
    else:
        delimiter, encoding = given.delimiter or mapping.delimiter, given.encoding or mapping.encoding
        header = _header(path, delimiter, encoding)
    raw = {" ".join(h.split()): h for h in header}  # header names matched after normalising whitespace
    absent = [(name, col) for name, col in source.items() if " ".join(col.split()) not in raw]
    if absent:
        raise DataError(
            [
                Problem(
                    given.file,
                    1,
                    col,
                    f"column is missing (mapped to contract field events.{name}); the file has columns {', '.join(header)}",
                )
                for name, col in absent
            ]
        )
    columns = [raw[" ".join(col.split())] for col in source.values()]
    if path.suffix == ".parquet":
        data = pq.read_table(path, columns=columns, read_dictionary=columns[:2])
        first_line = 1
    else:
        data = _read_csv(path, columns, [raw[" ".join(source[n].split())] for n in _NUMBERS], delimiter, encoding, missing)
        first_line = 2
    # Column by column, each Arrow column freed once converted: the click log is held about once, not twice.
    arrow = {name: data.column(col) for name, col in zip(source, columns, strict=True)}
    del data
    frame = pd.DataFrame({name: arrow.pop(name).to_pandas() for name in source})
    for name in ("course", "presentation"):
        frame[name] = frame[name].astype("category")
    problems: list[Problem] = []
    missingness: list[dict[str, str | int | float]] = []

    def report(mask: np.ndarray, column: str, message: str, values: pd.Series | np.ndarray | None = None) -> None:
        """A problem for each row in ``mask`` (``message`` with ``{value}`` from ``values``), up to MAX_LISTED."""
        rows = np.flatnonzero(mask)
        shown = rows[:MAX_LISTED]
        if values is None:
            listed = [None] * len(shown)
        else:
            listed = (values.iloc[shown] if isinstance(values, pd.Series) else values[shown]).tolist()
        problems.extend(
            Problem(given.file, int(r) + first_line, column, message.format(value=v)) for r, v in zip(shown, listed, strict=True)
        )
        if len(rows) > MAX_LISTED:
            problems.append(
                Problem(given.file, None, column, f"{len(rows) - MAX_LISTED} more rows with this problem", len(rows) - MAX_LISTED)
            )

    for col in EVENTS.columns:
        values = frame[col.name]
        null = values.isna().to_numpy()
        report(null, source[col.name], "value is missing; expected a value")
        if col.name in _NUMBERS:
            # Whole numbers as read (no copy, no mask) when the file typed them so; else parsed, bad values reported.
            whole = pd.api.types.is_integer_dtype(values.dtype) and not null.any()
            number = values.to_numpy() if whole else pd.to_numeric(values, errors="coerce").to_numpy(np.float64)
            usable = None if whole else ~null & ~(bad := np.isnan(number) | (number % 1 != 0))
            if usable is not None:
                report(~null & bad, source[col.name], "{value!r} is not a whole number", values)
            if col.positive or col.low is not None:
                low = 1 if col.positive else col.low
                out = number < low
                if col.high is not None:
                    out |= number > col.high
                if usable is not None:
                    out &= usable
                expected = f"expected {low:.0f} to {np.inf if col.high is None else col.high:.0f}"
                report(out, source[col.name], "{value:.0f} is out of range; " + expected, number)
            kept = number if usable is None or usable.all() else np.where(usable, number, -1)
            frame[col.name] = kept.astype(np.int64 if col.name.endswith("_id") else np.int32, copy=False)
        missingness.append(
            {
                "table": "events",
                "field": col.name,
                "file": given.file,
                "column": source[col.name],
                "rows": len(frame),
                "missing": int(null.sum()),
                "share": round(float(null.mean()), 4) if len(frame) else 0.0,
            }
        )
    frame.attrs["first_line"] = first_line
    return frame, problems, missingness


def _read_csv(path: Path, columns: list[str], numbers: list[str], delimiter: str, encoding: str, missing: list[str]) -> pa.Table:
    """The mapped columns of a delimited file, read block by block (the text is never held whole), numbers
    typed where every value is one (else all as text, so that every bad value is reported, not only the first)."""

    def read(types: dict[str, pa.DataType]) -> pa.Table:
        reader = pacsv.open_csv(
            path,
            read_options=pacsv.ReadOptions(encoding=encoding, block_size=1 << 24),
            parse_options=pacsv.ParseOptions(delimiter=delimiter),
            convert_options=pacsv.ConvertOptions(
                include_columns=columns,
                column_types=types,
                null_values=missing,
                strings_can_be_null=True,
                auto_dict_encode=True,
                auto_dict_max_cardinality=1_000_000,
            ),
        )
        return pa.Table.from_batches(list(reader), schema=reader.schema)

    try:
        return read(dict.fromkeys(numbers, pa.int64()))
    except pa.ArrowInvalid as err:
        if "conversion error" not in str(err).lower():
            raise DataError([Problem(path.name, None, None, f"cannot be read as {delimiter!r}-separated text: {err}")]) from None
    return read(dict.fromkeys(numbers, pa.string()))


def check_events(events: pd.DataFrame, f: dict[str, pd.DataFrame], file: str, source: dict[str, str]) -> list[Problem]:
    """Problems of the click log's references, given the validated tables ``f``: an event of a student not
    registered on its presentation (learners), of a resource not known for that presentation (resources), or
    dated outside the presentation (more than :data:`PRE_START_DAYS` before the start, or after its last day).
    ``source`` names the export's column of each contract field."""
    first_line = int(events.attrs.get("first_line", 1))
    problems: list[Problem] = []

    def report(mask: np.ndarray, column: str, message: str) -> None:
        rows = np.flatnonzero(mask)
        problems.extend(Problem(file, int(r) + first_line, column, message) for r in rows[:MAX_LISTED])
        if len(rows) > MAX_LISTED:
            problems.append(
                Problem(file, None, column, f"{len(rows) - MAX_LISTED} more rows with this problem", len(rows) - MAX_LISTED)
            )

    presentations = f["presentations"]
    where = presentation_index(events["course"], events["presentation"], presentations)
    keys = np.where(where >= 0, (where << _KEY_SHIFT) | events["student_id"].to_numpy(np.int64), -1)
    registered = _lookup(keys, _keys(f["learners"], presentations)) >= 0
    report(
        ~registered,
        source["student_id"],
        "student not registered on this course presentation (in learners); expected a learner's event",
    )
    resources = f["resources"]
    site = _lookup(events["site_id"].to_numpy(np.int64), resources["site_id"].to_numpy(np.int64))
    home = presentation_index(resources["course"], resources["presentation"], presentations)
    known = (site >= 0) & (home[site.clip(0)] == where)
    report(
        registered & ~known,
        source["site_id"],
        "resource not listed for this course presentation (in resources); expected a known site",
    )
    day = events["day"].to_numpy(np.int64)
    length = presentations["length_days"].to_numpy(float, na_value=np.inf)[where.clip(0)]  # no length known: no bound
    late = (where >= 0) & (day > length)
    report(late, source["day"], "day is after the presentation's last day; expected at most its length in days")
    return problems


def learner_rows(events: pd.DataFrame, learners: pd.DataFrame, presentations: pd.DataFrame) -> np.ndarray:
    """The position in ``learners`` of each event's registration (int64, -1 for another learner's)."""
    return _lookup(_keys(events, presentations), _keys(learners, presentations))


def engagement_totals(frames: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Per ``learners`` row (same order): ``course``, ``presentation``, ``student_id``, ``total_clicks`` (all its
    clicks) and ``total_active_days`` (days with a click); 0 for a registration without events. The numbers
    :data:`federation.queries.ENGAGEMENT_FIELDS` a DP statistic may release."""
    learners = frames["learners"]
    events = frames["events"]
    row = learner_rows(events, learners, frames["presentations"])
    mine = row >= 0
    row, day = row[mine], events["day"].to_numpy(np.int64)[mine]
    days = np.unique(row * 4096 + (day + PRE_START_DAYS))  # one entry per (registration, day); days < 4096 apart
    out = learners[["course", "presentation", "student_id"]].reset_index(drop=True)
    out["total_clicks"] = np.bincount(row, events["clicks"].to_numpy(np.float64)[mine], minlength=len(learners))
    out["total_active_days"] = np.bincount(days // 4096, minlength=len(learners)).astype(np.float64)
    return out


def _scale(values: np.ndarray, high: float, log: bool) -> np.ndarray:
    v = values.clip(0, high)
    return (np.log1p(v) / np.log1p(high)) if log else v / high


def engagement_features(
    frames: dict[str, pd.DataFrame], population: pd.DataFrame, cutoff_day: int, activity_types: tuple[str, ...]
) -> np.ndarray:
    """The :func:`engagement_feature_bounds` features (for the schema's ``activity_types``) of each registration in
    ``population`` (rows with ``course``, ``presentation``, ``student_id``) at day ``cutoff_day`` (D), from the events
    dated before D.

    Returns float32 of shape (len(population), number of features), values in [0, 1]. Without tables
    ``events`` in ``frames`` (no module engagement), every feature is 0 but ``engagement_absent`` (1).
    """
    bounds = engagement_feature_bounds(activity_types)
    n, names = len(population), list(bounds)
    out = np.zeros((n, len(names)), np.float64)
    if "events" not in frames:
        out[:, names.index("engagement_absent")] = 1.0
        return out.astype(np.float32)
    events, presentations = frames["events"], frames["presentations"]
    day = events["day"].to_numpy(np.int64)
    row = np.where(day < cutoff_day, _lookup(_keys(events, presentations), _keys(population, presentations)), -1)
    mine = row >= 0
    row, day = row[mine], day[mine]
    clicks = events["clicks"].to_numpy(np.float64)[mine]
    raw: dict[str, np.ndarray] = {}
    week = (cutoff_day - 1 - day) // 7
    for k in range(1, RECENT_WEEKS + 1):
        raw[f"clicks_week_{k}"] = np.bincount(row[week == k - 1], clicks[week == k - 1], minlength=n)
    raw["clicks_before"] = np.bincount(row, clicks, minlength=n)
    first = min(int(day.min(initial=cutoff_day)), cutoff_day - 1)
    width = cutoff_day - first  # days first .. D-1
    seen = np.zeros((n, width), bool)  # seen[r, d]: registration r clicked on day first + d
    seen[row, day - first] = True
    raw["active_days"] = seen.sum(axis=1).astype(np.float64)
    none = ~seen.any(axis=1)
    last = first + width - 1 - np.argmax(seen[:, ::-1], axis=1)
    raw["no_activity_yet"] = np.asarray(none, np.float64)
    raw["days_since_last_activity"] = np.where(none, 365.0, cutoff_day - last).astype(np.float64)
    resources = frames["resources"]
    kind = pd.Categorical(resources["activity_type"], categories=activity_types).codes.astype(np.int64)
    site = _lookup(events["site_id"].to_numpy(np.int64)[mine], resources["site_id"].to_numpy(np.int64))
    kinds = len(activity_types)
    per_kind = np.bincount(row * kinds + kind[site], clicks, minlength=n * kinds)
    for i, name in enumerate(activity_types):
        raw[f"clicks_{name}"] = per_kind.reshape(n, kinds)[:, i]
    for j, (name, (high, log)) in enumerate(bounds.items()):
        if name in raw:
            out[:, j] = _scale(raw[name], high, log)
    return out.astype(np.float32)


def _peak_mib() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (2**20 if sys.platform == "darwin" else 2**10)


def benchmark(data_dir: str | os.PathLike[str], source: str = "parquet", cutoff_day: int = 60) -> dict[str, float]:
    """Time loading and validating the OULAD release in ``data_dir`` with its click log (``source``:
    ``parquet``, the file shipped; ``csv``: the same rows written first, untimed, as the official
    ``studentVle.csv`` into a temporary folder), then building the at_risk features at ``cutoff_day`` of
    each module campus. Returns seconds (``load_s``, ``features_s``, ``total_s``), the event rows and
    the process's peak resident memory (``peak_mib``, since it started: run it in a fresh process).

    Raises
    ------
    ValueError
        For a ``source`` other than ``parquet`` or ``csv``.
    """
    from .mapping import load_mapping
    from .partition import campus_slices
    from .tables import load_tables
    from .tasks import early_warning

    if source not in ("parquet", "csv"):
        raise ValueError(f"unknown source {source!r}; expected parquet or csv")
    data_dir = Path(data_dir)
    mapping = load_mapping()
    with tempfile.TemporaryDirectory() as tmp:
        if source == "csv":
            folder = Path(tmp)
            for name in mapping.files():
                if not name.endswith(".parquet"):
                    (folder / name).symlink_to((data_dir / name).resolve())
            parquet = pq.ParquetFile(data_dir / mapping.table("events").file)
            with pacsv.CSVWriter(folder / "studentVle.csv", parquet.schema_arrow) as out:  # batch by batch: little memory
                for batch in parquet.iter_batches():
                    out.write_batch(batch)
            events = mapping.table("events").model_copy(update={"file": "studentVle.csv"})
            mapping, data_dir = mapping.model_copy(update={"events": events}), folder
        start = time.perf_counter()
        tables = load_tables(data_dir, mapping)
        loaded = time.perf_counter()
        for campus in campus_slices(tables, "module").values():
            early_warning(campus, cutoff_day, "at_risk")
        done = time.perf_counter()
    return {
        "load_s": round(loaded - start, 2),
        "features_s": round(done - loaded, 2),
        "total_s": round(done - start, 2),
        "event_rows": float(len(tables["events"])),
        "peak_mib": round(_peak_mib(), 1),
    }


if __name__ == "__main__":  # python -m edufl.federation.engagement DATA_DIR [parquet|csv]
    print(benchmark(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "parquet"))
