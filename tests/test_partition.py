"""A simulation's campuses: each campus's examples computed once over the pooled tables, and left for its workers."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from edufl.clients import app as client_app
from edufl.clients.app import load_campus, share_examples
from edufl.clients.node import CampusSetup, simulation_folders
from edufl.federation.mapping import CONTRACT_PARQUET, parquet_layout
from edufl.federation.partition import campus_examples, campus_slices
from edufl.federation.policy import RESEARCH_POLICY
from edufl.federation.runconfig import RunConfig
from edufl.federation.tables import Tables, load_tables
from edufl.federation.tasks import TaskData, early_warning
from edufl.federation.writers import write_parquet


def assert_same(mine: TaskData, theirs: TaskData) -> None:
    np.testing.assert_array_equal(mine.x, theirs.x)
    np.testing.assert_array_equal(mine.y, theirs.y)
    pd.testing.assert_frame_equal(mine.rows, theirs.rows)


@pytest.mark.parametrize(
    ("campus_by", "shards", "task", "cutoff"), [("module", 0, "at_risk", 60), ("shard", 40, "final_result", 30)]
)
def test_pooled_examples_equal_each_campus_computing_its_own(tables, campus_by, shards, task, cutoff):
    pooled = campus_examples(tables, campus_by, shards, cutoff, task)
    slices = campus_slices(tables, campus_by, shards)
    assert list(pooled) == list(slices) and len(pooled) == (7 if campus_by == "module" else 40)
    assert sum(len(d) for d in pooled.values()) == len(early_warning(tables, cutoff, task))
    for name in list(slices)[:: 1 if campus_by == "module" else 8]:
        assert_same(pooled[name], early_warning(slices[name], cutoff, task))


def test_a_campus_reading_its_folder_gets_what_the_simulation_left_it(tables, tmp_path, monkeypatch):
    cfg = RunConfig(task="withdrawal", cutoff_day=60)
    slices = campus_slices(tables, "module", 0)
    data, cache = simulation_folders(tmp_path, "0-module", "BBB")
    write_parquet(slices["BBB"], data)
    setup = CampusSetup("BBB", data, tmp_path / "state", RESEARCH_POLICY, CONTRACT_PARQUET, cache)
    built = load_campus(CampusSetup("BBB", data, tmp_path / "state", RESEARCH_POLICY, CONTRACT_PARQUET), cfg)
    client_app._CAMPUS_CACHE.clear()

    pooled = campus_examples(tables, "module", 0, cfg.cutoff_day, cfg.task)
    assert share_examples("BBB", data, cache, cfg, lambda: pooled["BBB"])
    assert not share_examples("BBB", data, cache, cfg, lambda: pytest.fail("built twice"))

    def no_reading(*args, **kwargs):
        raise AssertionError("a worker read the campus folder")

    monkeypatch.setattr(client_app, "load_tables", no_reading)
    shared = load_campus(setup, cfg)
    assert (shared.name, shared.dataset) == (built.name, built.dataset)
    assert_same(shared.train, built.train)
    assert_same(shared.test, built.test)

    (data / "learners.parquet").touch()  # a changed file: the campus reads its folder again
    client_app._CAMPUS_CACHE.clear()
    with pytest.raises(AssertionError, match="read the campus folder"):
        load_campus(setup, cfg)


def test_nothing_is_left_for_a_campus_that_lacks_the_tasks_module(aaa, tmp_path):
    core = Tables({k: aaa[k] for k in ("presentations", "learners", "registrations")}, aaa.source)
    data, cache = simulation_folders(tmp_path, "0-module", "AAA")
    write_parquet(core, data)
    assert parquet_layout(data).modules == frozenset()
    cfg = RunConfig(task="term1_dropout")
    assert not share_examples("AAA", data, cache, cfg, lambda: pytest.fail("built for a campus that refuses"))
    assert not cache.exists()
    assert campus_examples({"AAA": load_tables(data, parquet_layout(data))}, "module", 0, 60, "term1_dropout") == {}
