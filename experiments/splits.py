"""Every virtual campus's train/test examples, formed as a simulated run forms them."""

from __future__ import annotations

from edufl.federation.partition import Campuses, campus_slices
from edufl.federation.runconfig import RunConfig
from edufl.federation.tables import Tables
from edufl.federation.tasks import TaskData, early_warning, split

__all__ = ["campus_splits"]


def campus_splits(tables: Tables | Campuses, cfg: RunConfig) -> dict[str, tuple[TaskData, TaskData]]:
    """Every campus's (train, test) examples, by campus name in sorted order, as a run with ``cfg`` forms
    them: campuses by ``cfg.campus_by`` (and ``shards``) or the campus folders of ``tables``, then
    ``cfg``'s task, cutoff day, split (temporal: by ``cfg.schema``'s ``temporal_split``), test fraction and seed.
    Raises ValueError for an unknown task or split, SchemaError (a ValueError) when a presentation matches both
    of the schema's temporal patterns."""
    return {
        name: split(early_warning(own, cfg.cutoff_day, cfg.task), cfg.split, cfg.test_fraction, cfg.seed, cfg.schema)
        for name, own in campus_slices(tables, cfg.campus_by, cfg.shards).items()
    }
