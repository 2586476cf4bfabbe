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

__all__ = ["CAMPUS_COLUMNS", "Campuses", "campus_names", "campus_of", "campus_slice", "campus_slices"]

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
    """Only ``campus``'s rows of every table: what that campus would hold itself."""
    learners = tables["learners"]
    return _own_rows(tables, learners[campus_of(learners, campus_by, shards) == campus])


def campus_slices(tables: Tables | Campuses, campus_by: str, shards: int = 0) -> dict[str, Tables]:
    """Every campus's :func:`campus_slice`, by campus name in sorted order (each row's campus computed once,
    and the click log split in one pass); :data:`Campuses` as they are, in sorted order."""
    if not isinstance(tables, Tables):
        return {name: tables[name] for name in sorted(tables)}
    learners = tables["learners"]
    campus = campus_of(learners, campus_by, shards)
    names = sorted(campus.unique())
    events = _events_by_campus(tables, campus, names) if "events" in tables else {}
    return {name: _own_rows(tables, learners[campus == name], events.get(name)) for name in names}


def _events_by_campus(tables: Tables, campus: pd.Series, names: list[str]) -> dict[str, pd.DataFrame]:
    """Each campus's share of the click log; ``campus`` holds the campus of each ``learners`` row."""
    f = tables.frames
    owners = learner_rows(f["events"], f["learners"], f["presentations"])
    code = np.append(pd.Index(names).get_indexer(pd.Index(campus.to_numpy())), -1)[owners]  # -1: no learner's event
    order = np.argsort(code, kind="stable")
    bounds = np.searchsorted(code[order], np.arange(len(names) + 1))
    return {name: f["events"].take(order[bounds[i] : bounds[i + 1]]) for i, name in enumerate(names)}


def _own_rows(tables: Tables, learners: pd.DataFrame, events: pd.DataFrame | None = None) -> Tables:
    """``learners``'s share of every table (``events``: their click log, when already split off)."""
    f = tables.frames
    mp = ["course", "presentation"]
    student = [*mp, "student_id"]
    presentations = f["presentations"].merge(learners[mp].drop_duplicates(), on=mp)
    frames = {
        "presentations": presentations,
        "learners": learners,
        "registrations": f["registrations"].merge(learners[student], on=student),
    }
    if "assessments" in f:
        assessments = f["assessments"].merge(presentations[mp], on=mp)
        subs = f["submissions"].merge(assessments[["assessment_id", *mp]], on="assessment_id")
        frames["assessments"] = assessments
        frames["submissions"] = subs.merge(learners[student], on=student)[[*f["submissions"].columns]]
    if "events" in f:
        frames["resources"] = f["resources"].merge(presentations[mp], on=mp)
        if events is None:
            events = f["events"][learner_rows(f["events"], learners, f["presentations"]) >= 0]
        frames["events"] = events
    return Tables({k: v.reset_index(drop=True) for k, v in frames.items()}, tables.source, tables.mapping)
