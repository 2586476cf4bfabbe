"""The campus audit log: one protobuf ``AuditRecord`` (``protos/audit.proto``) per outgoing message.

Records are kept in SQLite (``audit.sqlite`` in the campus's state folder),
one serialized record per row, committed as they are written. The payload
digest is computed the same way on both sides of the wire
(:func:`payload_digest`), so a coordinator's receipt can be checked against a
campus's log.

The generated module ``federation/proto/audit_pb2.py`` is built from
``protos/audit.proto`` by the command in the README ("Protobuf contracts").
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from flwr.app import RecordDict
from google.protobuf import json_format

from .proto.audit_pb2 import ArraySpec, AuditRecord
from .store import SQLiteStore

__all__ = ["AUDIT_FILE", "AuditLog", "array_specs", "as_dict", "payload_digest"]

AUDIT_FILE = "audit.sqlite"


def payload_digest(content: RecordDict) -> tuple[int, str]:
    """(bytes, SHA-256 hex) of a message's content: every array's name, dtype, shape and
    data bytes, and every metric and config entry, records taken in name order."""
    digest = hashlib.sha256()
    size = 0
    for record_name in sorted(content):
        digest.update(record_name.encode())
        if record_name in content.array_records:
            arrays = content.array_records[record_name]
            for name in arrays:
                array = arrays[name]
                digest.update(json.dumps([name, array.dtype, list(array.shape)]).encode())
                digest.update(array.data)
                size += len(array.data)
        else:
            record = content[record_name]
            entries = json.dumps({k: record[k] for k in sorted(record)}, default=str).encode()
            digest.update(entries)
            size += len(entries)
    return size, digest.hexdigest()


def array_specs(content: RecordDict) -> list[ArraySpec]:
    """Name, shape and dtype of every array in ``content``."""
    return [
        ArraySpec(name=name, shape=list(record[name].shape), dtype=record[name].dtype)
        for record in content.array_records.values()
        for name in record
    ]


class AuditLog(SQLiteStore):
    """The audit log at ``state_dir / audit.sqlite`` (created on first use; see :class:`~federation.store.SQLiteStore`)."""

    FILE = AUDIT_FILE
    VERSION = 1
    WHAT = "audit log"
    SCHEMA = ("CREATE TABLE IF NOT EXISTS audit (id INTEGER PRIMARY KEY, run_id TEXT NOT NULL, record BLOB NOT NULL)",)

    def append(self, record: AuditRecord) -> None:
        """Store ``record`` and commit it to disk."""
        with self._db:
            self._db.execute("INSERT INTO audit (run_id, record) VALUES (?, ?)", (record.run_id, record.SerializeToString()))

    def records(self, run_id: str | None = None) -> list[AuditRecord]:
        """Stored records in the order they were written, optionally of one run."""
        query = "SELECT record FROM audit" + (" WHERE run_id = ?" if run_id is not None else "") + " ORDER BY id"
        return [AuditRecord.FromString(blob) for (blob,) in self._db.execute(query, () if run_id is None else (run_id,))]


def as_dict(record: AuditRecord) -> dict[str, Any]:
    """A record as a JSON-ready dict (protobuf's canonical JSON mapping, field names as in the .proto)."""
    return json_format.MessageToDict(record, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
