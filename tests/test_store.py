"""The campus's SQLite stores: schema versions, closing, and ledger rows holding the audit contract's DpRelease."""

from __future__ import annotations

import math
import sqlite3
from pathlib import Path

import pytest

from edufl.federation.audit import AUDIT_FILE, AuditLog
from edufl.federation.errors import UserError
from edufl.federation.ledger import LEDGER_FILE, PrivacyLedger, Release
from edufl.federation.proto.audit_pb2 import AuditRecord, DpRelease
from edufl.federation.store import StoreError

NO_DP = DpRelease(
    mechanism="none", noise_multiplier=0.0, sample_rate=0.125, steps=8, epsilon=math.inf, delta=1e-5, accountant="rdp"
)


def _version(path: Path) -> int:
    with sqlite3.connect(path) as db:
        return db.execute("PRAGMA user_version").fetchone()[0]


def test_a_new_store_records_its_schema_version_and_closes_as_a_context_manager(tmp_path):
    with PrivacyLedger(tmp_path) as ledger, AuditLog(tmp_path) as log:
        assert ledger.releases() == [] and log.records() == []
    assert _version(tmp_path / LEDGER_FILE) == PrivacyLedger.VERSION == 1
    assert _version(tmp_path / AUDIT_FILE) == AuditLog.VERSION == 1
    with pytest.raises(sqlite3.ProgrammingError, match="closed"):
        ledger.releases()
    with pytest.raises(sqlite3.ProgrammingError, match="closed"):
        log.records()


@pytest.mark.parametrize("store, file", [(PrivacyLedger, LEDGER_FILE), (AuditLog, AUDIT_FILE)])
def test_a_store_of_another_schema_version_is_refused_and_left_as_it_is(tmp_path, store, file):
    with sqlite3.connect(tmp_path / file) as db:
        db.execute("PRAGMA user_version = 7")
    with pytest.raises(StoreError, match=f"{file}: .* schema version 7; this edufl reads version 1") as err:
        store(tmp_path)
    assert isinstance(err.value, UserError) and err.value.exit_code == 2
    with sqlite3.connect(tmp_path / file) as db:  # nothing created in it
        assert db.execute("SELECT name FROM sqlite_master").fetchall() == []
    assert _version(tmp_path / file) == 7


def test_a_file_that_is_not_a_database_is_refused(tmp_path):
    (tmp_path / LEDGER_FILE).write_bytes(b"not a database, 32 bytes or more of text")
    with pytest.raises(StoreError, match="not a privacy ledger"):
        PrivacyLedger(tmp_path)


def test_an_unversioned_store_is_adopted_with_its_rows(tmp_path):
    record = AuditRecord(campus="AAA", run_id="r1", message_type="train", sent=True)
    with sqlite3.connect(tmp_path / AUDIT_FILE) as db:  # as edufl wrote it before stores recorded a version
        db.execute("CREATE TABLE audit (id INTEGER PRIMARY KEY, run_id TEXT NOT NULL, record BLOB NOT NULL)")
        db.execute("INSERT INTO audit (run_id, record) VALUES (?, ?)", ("r1", record.SerializeToString()))
    with AuditLog(tmp_path) as log:
        assert log.records("r1") == [record]
    assert _version(tmp_path / AUDIT_FILE) == 1


def test_ledger_columns_are_the_dp_release_fields_and_rows_come_back_as_recorded(tmp_path):
    with PrivacyLedger(tmp_path) as ledger:
        stored = ledger.record(Release("data-sha", "AAA", "r1", 2, "withdrawal", NO_DP))
        [again] = ledger.releases("data-sha", "r1")
    assert again == stored and again.dp == NO_DP and math.isinf(again.dp.epsilon) and stored.recorded_at
    with sqlite3.connect(tmp_path / LEDGER_FILE) as db:
        columns = {row[1]: row[2] for row in db.execute("PRAGMA table_info(releases)")}
    assert {f.name for f in DpRelease.DESCRIPTOR.fields} <= set(columns)
    assert columns == {
        "id": "INTEGER",
        "dataset": "TEXT",
        "campus": "TEXT",
        "run_id": "TEXT",
        "server_round": "INTEGER",
        "task": "TEXT",
        "mechanism": "TEXT",
        "noise_multiplier": "REAL",
        "sample_rate": "REAL",
        "steps": "INTEGER",
        "epsilon": "REAL",
        "delta": "REAL",
        "accountant": "TEXT",
        "recorded_at": "TEXT",
    }
