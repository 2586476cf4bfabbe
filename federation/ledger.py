"""The campus's privacy ledger: every release, persisted in SQLite before it leaves the campus.

One row per release (a round's model update, or a DP statistic): run, round,
task, and the release's DP parameters as the audit contract declares them
(``DpRelease`` in ``protos/audit.proto``: mechanism, noise multiplier,
sampling rate, steps, ε after the release, δ and accountant). Rows are keyed by the dataset they were computed from (the
SHA-256 of the campus's data files), so the budget follows the data, not the
Flower node id or the machine.

Composition: every mechanism recorded here is a subsampled Gaussian (DP-SGD
steps; a Gaussian statistic is the case q = 1, one step), so the ε of a run,
or of a dataset over all its runs, is the RDP composition of the recorded
(σ, q, steps) entries converted to (ε, δ) (:func:`federation.privacy.epsilon`;
Mironov 2017, Mironov, Talwar and Zhang 2019). This is never larger than
the sum of the per-run ε values, the conservative alternative.

Each write is committed before :meth:`PrivacyLedger.record` returns, so a
release is on disk before its message is handed to Flower.

The ledger also pins each run's privacy settings (:meth:`PrivacyLedger.pin`):
the first request of a run name fixes them for that dataset, and any later
request of the same run name, in a new Flower run or after a campus restart,
must ask for exactly the same.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields, replace
from typing import Any

from google.protobuf.descriptor import FieldDescriptor

from .privacy import History, epsilon
from .proto.audit_pb2 import DpRelease
from .store import SQLiteStore, now

__all__ = ["LEDGER_FILE", "PrivacyLedger", "Release"]

LEDGER_FILE = "ledger.sqlite"


@dataclass(frozen=True)
class Release:
    """One recorded release: what it was computed from and for (``dataset``, ``campus``, ``run_id``,
    ``server_round``, ``task``), its mechanism and parameters ``dp`` (``dp.epsilon`` is the run's ε after
    it, at ``dp.delta``), and when it was recorded (UTC, ISO 8601; set by :meth:`PrivacyLedger.record`)."""

    dataset: str
    campus: str
    run_id: str
    server_round: int
    task: str
    dp: DpRelease
    recorded_at: str = ""


_CONTEXT = [f.name for f in fields(Release) if f.name not in ("dp", "recorded_at")]
_DP = [f.name for f in DpRelease.DESCRIPTOR.fields]  # one column per field of the audit contract's DpRelease
_COLUMNS = [*_CONTEXT, *_DP, "recorded_at"]
_CONTEXT_TYPES = {"str": "TEXT", "int": "INTEGER"}  # by the annotation of a field of Release
_DP_TYPES = {
    FieldDescriptor.CPPTYPE_STRING: "TEXT",
    FieldDescriptor.CPPTYPE_DOUBLE: "REAL",
    FieldDescriptor.CPPTYPE_INT64: "INTEGER",
}
_COLUMN_TYPES = {
    **{f.name: _CONTEXT_TYPES[str(f.type)] for f in fields(Release) if f.name != "dp"},
    **{f.name: _DP_TYPES[f.cpp_type] for f in DpRelease.DESCRIPTOR.fields},
}


def _row(release: Release) -> tuple[Any, ...]:
    """``release`` as the values of :data:`_COLUMNS`, in order."""
    return (*(getattr(release, name) for name in _CONTEXT), *(getattr(release.dp, name) for name in _DP), release.recorded_at)


def _release(row: tuple[Any, ...]) -> Release:
    """The release stored as ``row`` (the values of :data:`_COLUMNS`, in order)."""
    context, dp, recorded_at = row[: len(_CONTEXT)], row[len(_CONTEXT) : -1], row[-1]
    return Release(
        **dict(zip(_CONTEXT, context, strict=True)), dp=DpRelease(**dict(zip(_DP, dp, strict=True))), recorded_at=recorded_at
    )


class PrivacyLedger(SQLiteStore):
    """The SQLite ledger at ``state_dir / ledger.sqlite`` (created on first use; see :class:`~federation.store.SQLiteStore`)."""

    FILE = LEDGER_FILE
    VERSION = 1
    WHAT = "privacy ledger"
    SCHEMA = (
        "CREATE TABLE IF NOT EXISTS releases (id INTEGER PRIMARY KEY, "
        + ", ".join(f"{name} {_COLUMN_TYPES[name]} NOT NULL" for name in _COLUMNS)
        + ")",
        "CREATE TABLE IF NOT EXISTS run_settings (dataset TEXT NOT NULL, run_id TEXT NOT NULL, "
        "settings TEXT NOT NULL, recorded_at TEXT NOT NULL, PRIMARY KEY (dataset, run_id))",
    )

    def record(self, release: Release) -> Release:
        """Append ``release`` (time-stamped now, UTC) and commit it to disk; returns what was stored."""
        stamped = replace(release, recorded_at=now())
        with self._db:
            self._db.execute(
                f"INSERT INTO releases ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})", _row(stamped)
            )
        return stamped

    def pin(
        self, dataset: str, run_id: str, settings: dict[str, int | float | str | bool]
    ) -> dict[str, tuple[Any, int | float | str | bool | None]]:
        """Pin ``settings`` for run ``run_id`` on ``dataset`` if none are pinned yet (committed at once).

        Returns every key whose pinned value differs from the requested one, as
        ``key -> (pinned, requested)`` (a key missing on either side counts as
        different); empty when the request matches what is pinned.
        """
        with self._db:
            self._db.execute(
                "INSERT OR IGNORE INTO run_settings VALUES (?, ?, ?, ?)",
                (dataset, run_id, json.dumps(settings, sort_keys=True), now()),
            )
        (text,) = self._db.execute(
            "SELECT settings FROM run_settings WHERE dataset = ? AND run_id = ?", (dataset, run_id)
        ).fetchone()
        pinned = json.loads(text)
        return {
            k: (pinned.get(k), settings.get(k))
            for k in sorted(set(pinned) | set(settings))
            if pinned.get(k) != settings.get(k) or (k in pinned) != (k in settings)
        }

    def releases(self, dataset: str | None = None, run_id: str | None = None) -> list[Release]:
        """Recorded releases in the order they were made, optionally of one dataset and one run."""
        where, args = [], []
        for column, value in (("dataset", dataset), ("run_id", run_id)):
            if value is not None:
                where.append(f"{column} = ?")
                args.append(value)
        query = f"SELECT {', '.join(_COLUMNS)} FROM releases {'WHERE ' + ' AND '.join(where) if where else ''} ORDER BY id"
        return [_release(row) for row in self._db.execute(query, args)]

    def history(self, dataset: str, run_id: str | None = None) -> History:
        """The accountant history (σ, q, steps) of a dataset's releases, optionally of one run."""
        return [(r.dp.noise_multiplier, r.dp.sample_rate, r.dp.steps) for r in self.releases(dataset, run_id)]

    def spent(self, dataset: str, delta: float, run_id: str | None = None) -> float:
        """ε at ``delta`` spent on ``dataset`` (by one run, or by all runs together)."""
        return epsilon(self.history(dataset, run_id), delta)

    def datasets(self) -> dict[str, str]:
        """Each dataset recorded here, with the campus name it was recorded under."""
        return dict(self._db.execute("SELECT dataset, campus FROM releases GROUP BY dataset ORDER BY MIN(id)"))
