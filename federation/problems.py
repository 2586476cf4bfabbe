"""Problem reports about a campus's export: each problem located in its file, and the error that lists them.

A problem names the export's file, the line (the header is line 1; a Parquet
file's first row is row 1), the export's column and what was expected, so a
data steward can fix the file without reading code.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from .errors import UserError

__all__ = ["MAX_REPORTED", "DataError", "Problem"]

MAX_REPORTED = 25
"""How many problems a :class:`DataError` message spells out; the rest are counted."""


@dataclass(frozen=True)
class Problem:
    """One data problem: ``line`` is 1-based in ``file`` (None for the whole file); ``column`` is the export's."""

    file: str
    line: int | None
    column: str | None
    message: str

    def __str__(self) -> str:
        where = self.file
        if self.line is not None:
            where += f", {'row' if self.file.endswith('.parquet') else 'line'} {self.line}"
        if self.column is not None:
            where += f", column '{self.column}'"
        return f"{where}: {self.message}"


class DataError(UserError):
    """Data that cannot be used (exit status 2). ``problems`` lists every problem found and, once every
    file could be parsed, ``missingness`` counts the missing values per contract field (one row per field:
    table, field, file, column, rows, missing, share)."""

    def __init__(self, problems: list[Problem], hint: str = "", missingness: pd.DataFrame | None = None):
        self.problems = problems
        self.missingness = missingness
        shown = [f"  - {p}" for p in problems[:MAX_REPORTED]]
        if len(problems) > MAX_REPORTED:
            shown.append(f"  ... and {len(problems) - MAX_REPORTED} more problems")
        text = f"{len(problems)} data problem(s):\n" + "\n".join(shown)
        super().__init__(text + (f"\n{hint}" if hint else ""))
