"""Partitioning one set of contract tables into campuses, each holding only its own rows.

Campuses are formed by course (``module``), by region, or by a hash of the
student (``shard``). Simulations and tests play campuses this way, and
``edufl campus export-oulad`` writes one campus's slice as its own export.
A federation of campus folders, each read with its own mapping
(:data:`Campuses`, ``edufl simulate --campus``), is already partitioned.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping

import numpy as np
import pandas as pd

from .engagement import learner_rows
from .tables import Tables
from .tasks import TaskData, early_warning, missing_modules

__all__ = ["CAMPUS_COLUMNS", "Campuses", "campus_examples", "campus_names", "campus_of", "campus_slice", "campus_slices"]

Campuses = Mapping[str, Tables]
"""One campus's tables by campus name: campus folders read each with its own mapping (``edufl simulate
--campus``). Where a function takes ``Tables | Campuses``, such a federation is its own partition and
``campus_by`` does not apply."""

CAMPUS_COLUMNS = {"module": "course", "region": "region"}
"""The learners column each way of forming campuses (but ``shard``) groups by."""


def campus_of(learners: pd.DataFrame, campus_by: str, shards: int = 0) -> pd.Series:
    """The campus of each learners row.

    ``module``: its ``course`` (7 campuses in OULAD); ``region``: its
    ``region`` (13); ``shard``: ``S000`` ... one of ``shards`` campuses chosen by a
    hash (CRC-32) of ``student_id``, so all of a student's rows share a campus
    (used to study how a federation scales with many small campuses).

    Raises
    ------
    ValueError
        For ``shard`` with ``shards`` < 1.
    """
    if campus_by == "shard":
        if shards < 1:
            raise ValueError(f"campus-by shard needs shards >= 1, got {shards}")
        codes = [zlib.crc32(str(s).encode()) % shards for s in learners["student_id"]]
        return pd.Series([f"S{c:03d}" for c in codes], index=learners.index)
    return learners[CAMPUS_COLUMNS[campus_by]]


def campus_names(tables: Tables | Campuses, campus_by: str, shards: int = 0) -> list[str]:
    """Sorted names of the campuses that hold at least one registration."""
    if not isinstance(tables, Tables):
        return sorted(tables)
    return sorted(campus_of(tables["learners"], campus_by, shards).unique())


def campus_slice(tables: Tables, campus_by: str, campus: str, shards: int = 0) -> Tables:
    """Only ``campus``'s rows of every table: what that campus would hold itself (:func:`campus_slices`).

    Raises
    ------
    KeyError
        When no learners row is ``campus``'s.
    """
    return campus_slices(tables, campus_by, shards)[campus]


def campus_slices(tables: Tables | Campuses, campus_by: str, shards: int = 0) -> dict[str, Tables]:
    """Every campus's :func:`campus_slice`, by campus name in sorted order; :data:`Campuses` as they are, in sorted
    order. Each row's campus is found once for every table, and each table split in one pass."""
    if not isinstance(tables, Tables):
        return {name: tables[name] for name in sorted(tables)}
    f = tables.frames
    learners = f["learners"]
    campus = campus_of(learners, campus_by, shards)
    names = sorted(campus.unique())
    code = pd.Index(names).get_indexer(pd.Index(campus.to_numpy()))  # each learners row's campus, as its index in names
    mp = ["course", "presentation"]
    student = [*mp, "student_id"]
    owner = learners[student].assign(_campus=code)
    held = owner[[*mp, "_campus"]].drop_duplicates()  # the presentations each campus has learners in
    split = {"learners": _split(learners, code, len(names))}
    for name in ("presentations", "assessments", "resources"):  # one copy of a presentation's rows for each campus in it
        if name in f:
            rows = f[name].merge(held, on=mp)
            split[name] = [part.drop(columns="_campus") for part in _split(rows, rows["_campus"].to_numpy(), len(names))]
    for name in ("registrations", "terms", "attributes"):  # a registration's rows
        if name in f:
            split[name] = _split(f[name], _owners(f[name], owner, student), len(names))
    if "submissions" in f:
        subs = f["submissions"][["assessment_id"]].merge(f["assessments"][["assessment_id", *mp]], on="assessment_id", how="left")
        subs["student_id"] = f["submissions"]["student_id"].to_numpy()
        split["submissions"] = _split(f["submissions"], _owners(subs, owner, student), len(names))
    if "events" in f:
        owners = learner_rows(f["events"], learners, f["presentations"])
        split["events"] = _split(f["events"], np.append(code, -1)[owners], len(names))  # -1: no learner's event
    return {
        name: Tables(
            {k: parts[i].reset_index(drop=True) for k, parts in split.items()}, tables.source, tables.mapping, tables.schema
        )
        for i, name in enumerate(names)
    }


def _owners(frame: pd.DataFrame, owner: pd.DataFrame, key: list[str]) -> np.ndarray:
    """The campus code (``owner``'s ``_campus``; -1: none) of each ``frame`` row, by its learner ``key``."""
    return frame[key].merge(owner, on=key, how="left")["_campus"].fillna(-1).to_numpy(int)


def _split(frame: pd.DataFrame, code: np.ndarray, n: int) -> list[pd.DataFrame]:
    """``frame``'s rows with each campus code 0 .. n - 1, in their order (code -1: in no campus)."""
    order = np.argsort(code, kind="stable")
    bounds = np.searchsorted(code[order], np.arange(n + 1))
    return [frame.take(order[bounds[i] : bounds[i + 1]]) for i in range(n)]


def campus_examples(tables: Tables | Campuses, campus_by: str, shards: int, cutoff_day: int, task: str) -> dict[str, TaskData]:
    """Each campus's :func:`~federation.tasks.early_warning` examples, by campus name in sorted order: what each
    campus of :func:`campus_slices` computes from its own slice, with its rows in the same order.

    For one set of tables they are computed once over all rows and split by campus: every feature is
    a registration's own or its presentation's, and a campus's slice holds all of both
    (``tests/test_partition.py`` checks the equality). :data:`Campuses` compute their own; a campus
    whose tables lack a module ``task`` needs is left out (it refuses such a run).

    Raises
    ------
    ValueError
        For one set of tables lacking a module ``task`` needs (as :func:`~federation.tasks.early_warning`).
    """
    if not isinstance(tables, Tables):
        return {
            name: early_warning(tables[name], cutoff_day, task)
            for name in sorted(tables)
            if not missing_modules(task, tables[name].modules, tables[name].schema)
        }
    data = early_warning(tables, cutoff_day, task)
    key = ["course", "presentation", "student_id"]
    learners = tables["learners"]
    owners = learners[key].assign(_campus=campus_of(learners, campus_by, shards).to_numpy())
    campus = data.rows[key].merge(owners, on=key, how="left")["_campus"].to_numpy()
    return {name: data.take(np.flatnonzero(campus == name)) for name in sorted(owners["_campus"].unique())}
