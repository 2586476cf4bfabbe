"""Shared fixtures: the real OULAD tables, read from $EDUFL_DATA (CI: ../shared/data/oulad)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from edufl.federation.partition import campus_slice
from edufl.federation.tables import Tables, load_tables
from edufl.federation.writers import write_tables

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")


@pytest.fixture(scope="session")
def data_dir() -> Path:
    path = Path(os.environ.get("EDUFL_DATA", Path(__file__).parents[2] / "shared" / "data" / "oulad")).resolve()
    if not (path / "studentInfo.csv").is_file():
        pytest.fail(f"OULAD tables not found in {path}: set EDUFL_DATA to the folder holding them")
    return path


@pytest.fixture(scope="session")
def tables(data_dir: Path) -> Tables:
    return load_tables(data_dir)


@pytest.fixture(scope="session")
def aaa(tables: Tables) -> Tables:
    """The smallest module campus (748 registrations)."""
    return campus_slice(tables, "module", "AAA")


@pytest.fixture
def aaa_dir(aaa: Tables, tmp_path: Path) -> Path:
    """A fresh folder holding campus AAA's rows in the OULAD file format, safe to corrupt."""
    write_tables(aaa, tmp_path / "AAA")
    return tmp_path / "AAA"


@pytest.fixture
def task_identity():
    """Messages built outside a Flower runtime need a task identity, as in run_simulation."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
