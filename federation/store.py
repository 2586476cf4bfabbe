"""A campus's SQLite store in its state folder: the base of the privacy ledger and the audit log.

A store opens its file with a busy timeout (a campus's ClientApp processes may
write at once), creates its tables on first use and records its schema version
in SQLite's ``user_version``. A file of another version is refused, never read
or rewritten: its rows may mean something else.
"""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import ClassVar, Self

from .errors import UserError

__all__ = ["BUSY_TIMEOUT_S", "SQLiteStore", "StoreError", "now"]

BUSY_TIMEOUT_S = 30.0
"""How long (seconds) a write waits for another process's lock before SQLite gives up."""


def now() -> str:
    """The current UTC time, ISO 8601, to the second: how stores time-stamp their rows."""
    return datetime.now(UTC).isoformat(timespec="seconds")


class StoreError(UserError):
    """A store file this edufl cannot use: another schema version, or not a SQLite database (exit status 2)."""


class SQLiteStore:
    """The SQLite file ``state_dir / FILE`` with the tables ``SCHEMA`` at version ``VERSION``.

    Subclasses set the three class attributes. A store is a context manager
    (``with PrivacyLedger(state) as ledger:``) and closes on :meth:`close`.
    A file without a version (made before stores recorded one) holds the
    version-1 tables and is adopted as version 1.

    Raises
    ------
    StoreError
        When the file records another schema version, or is not a SQLite database.
    """

    FILE: ClassVar[str]
    SCHEMA: ClassVar[tuple[str, ...]]  # CREATE TABLE IF NOT EXISTS statements
    VERSION: ClassVar[int]
    WHAT: ClassVar[str]  # the store's name in messages, e.g. "privacy ledger"

    def __init__(self, state_dir: str | Path):
        self.path = Path(state_dir) / self.FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S)
        try:
            self._open_schema()
        except BaseException:
            self._db.close()
            raise

    def _open_schema(self) -> None:
        try:
            (version,) = self._db.execute("PRAGMA user_version").fetchone()
        except sqlite3.DatabaseError as err:
            raise StoreError(f"{self.path}: not a {self.WHAT} ({err})") from None
        if version not in (0, self.VERSION):
            raise StoreError(
                f"{self.path}: {self.WHAT} schema version {version}; this edufl reads version "
                f"{self.VERSION} (use the edufl release that wrote it)"
            )
        if version == 0:
            with self._db:
                for statement in self.SCHEMA:
                    self._db.execute(statement)
                self._db.execute(f"PRAGMA user_version = {int(self.VERSION)}")

    def close(self) -> None:
        """Close the database; the store cannot be used afterwards."""
        self._db.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None) -> None:
        self.close()
