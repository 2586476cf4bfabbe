"""The campus's privacy ledger: every release, persisted in SQLite before it leaves the campus.

One row per release (a round's model update, or a DP statistic): run, round,
task, mechanism, noise multiplier, sampling rate, steps, ε after the release,
δ and accountant. Rows are keyed by the dataset they were computed from (the
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
import sqlite3
from dataclasses import astuple, dataclass, fields
from datetime import datetime, timezone
from pathlib import Path

from .privacy import ACCOUNTANT, History, epsilon

LEDGER_FILE = "ledger.sqlite"


@dataclass(frozen=True)
class Release:
    """One recorded release. ``epsilon`` is the run's ε after it, at ``delta``."""

    dataset: str
    campus: str
    run_id: str
    server_round: int
    task: str
    mechanism: str
    noise_multiplier: float
    sample_rate: float
    steps: int
    epsilon: float
    delta: float
    accountant: str = ACCOUNTANT
    recorded_at: str = ""


_COLUMNS = [f.name for f in fields(Release)]
_SQL_TYPES = {"int": "INTEGER", "float": "REAL", "str": "TEXT"}


class PrivacyLedger:
    """The SQLite ledger at ``state_dir / ledger.sqlite`` (created on first use)."""

    def __init__(self, state_dir: str | Path):
        self.path = Path(state_dir) / LEDGER_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path)
        columns = ", ".join(f"{f.name} {_SQL_TYPES[f.type]} NOT NULL" for f in fields(Release))
        with self._db:
            self._db.execute(f"CREATE TABLE IF NOT EXISTS releases (id INTEGER PRIMARY KEY, {columns})")
            self._db.execute("CREATE TABLE IF NOT EXISTS run_settings (dataset TEXT NOT NULL, run_id TEXT NOT NULL, "
                             "settings TEXT NOT NULL, recorded_at TEXT NOT NULL, PRIMARY KEY (dataset, run_id))")

    def close(self) -> None:
        self._db.close()

    def record(self, release: Release) -> Release:
        """Append ``release`` (time-stamped now, UTC) and commit it to disk; returns what was stored."""
        stamped = Release(*astuple(release)[:-1], recorded_at=datetime.now(timezone.utc).isoformat(timespec="seconds"))
        with self._db:
            self._db.execute(f"INSERT INTO releases ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})",
                             astuple(stamped))
        return stamped

    def pin(self, dataset: str, run_id: str, settings: dict[str, int | float | str | bool]) -> dict[str, tuple]:
        """Pin ``settings`` for run ``run_id`` on ``dataset`` if none are pinned yet (committed at once).

        Returns every key whose pinned value differs from the requested one, as
        ``key -> (pinned, requested)`` (a key missing on either side counts as
        different); empty when the request matches what is pinned.
        """
        with self._db:
            self._db.execute("INSERT OR IGNORE INTO run_settings VALUES (?, ?, ?, ?)",
                             (dataset, run_id, json.dumps(settings, sort_keys=True),
                              datetime.now(timezone.utc).isoformat(timespec="seconds")))
        (text,) = self._db.execute("SELECT settings FROM run_settings WHERE dataset = ? AND run_id = ?",
                                   (dataset, run_id)).fetchone()
        pinned = json.loads(text)
        return {k: (pinned.get(k), settings.get(k)) for k in sorted(set(pinned) | set(settings))
                if pinned.get(k) != settings.get(k) or (k in pinned) != (k in settings)}

    def releases(self, dataset: str | None = None, run_id: str | None = None) -> list[Release]:
        """Recorded releases in the order they were made, optionally of one dataset and one run."""
        where, args = [], []
        for column, value in (("dataset", dataset), ("run_id", run_id)):
            if value is not None:
                where.append(f"{column} = ?")
                args.append(value)
        query = f"SELECT {', '.join(_COLUMNS)} FROM releases {'WHERE ' + ' AND '.join(where) if where else ''} ORDER BY id"
        return [Release(*row) for row in self._db.execute(query, args)]

    def history(self, dataset: str, run_id: str | None = None) -> History:
        """The accountant history (σ, q, steps) of a dataset's releases, optionally of one run."""
        return [(r.noise_multiplier, r.sample_rate, r.steps) for r in self.releases(dataset, run_id)]

    def spent(self, dataset: str, delta: float, run_id: str | None = None) -> float:
        """ε at ``delta`` spent on ``dataset`` (by one run, or by all runs together)."""
        return epsilon(self.history(dataset, run_id), delta)

    def datasets(self) -> dict[str, str]:
        """Each dataset recorded here, with the campus name it was recorded under."""
        return dict(self._db.execute("SELECT dataset, campus FROM releases GROUP BY dataset ORDER BY MIN(id)"))
