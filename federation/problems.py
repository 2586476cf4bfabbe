"""Problem reports about a campus's export: each problem located in its file, and the error that lists them.

A problem names the export's file, the line (the header is line 1; a Parquet
file's first row is row 1), the export's column and what was expected, so a
data steward can fix the file without reading code.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from .errors import UserError

__all__ = ["MAX_REPORTED", "DataError", "Problem", "summary"]

MAX_REPORTED = 25
"""How many problems a :class:`DataError` message spells out; the rest are counted."""


@dataclass(frozen=True)
class Problem:
    """One data problem: ``line`` is 1-based in ``file`` (None for the whole file); ``column`` is the export's;
    ``rows`` is how many rows it stands for (more than 1 for one that counts rows not listed one by one)."""

    file: str
    line: int | None
    column: str | None
    message: str
    rows: int = 1

    def __str__(self) -> str:
        where = self.file
        if self.line is not None:
            where += f", {'row' if self.file.endswith('.parquet') else 'line'} {self.line}"
        if self.column is not None:
            where += f", column '{self.column}'"
        return f"{where}: {self.message}"


class DataError(UserError):
    """Data that cannot be used (exit status 2). The message counts the problems by file and column
    (:func:`summary`; when there is more than one), then spells out the first :data:`MAX_REPORTED`.
    ``problems`` lists every problem found and, once every
    file could be parsed, ``missingness`` counts the missing values per contract field (one row per field:
    table, field, file, column, rows, missing, share)."""

    def __init__(self, problems: list[Problem], hint: str = "", missingness: pd.DataFrame | None = None):
        self.problems = problems
        self.hint = hint
        self.missingness = missingness
        text = f"{sum(p.rows for p in problems)} data problem(s):\n"
        if len(problems) > 1:
            text += "by file and column:\n" + "\n".join(f"  {line}" for line in summary(problems)) + "\nfirst problems:\n"
        shown = [f"  - {p}" for p in problems[:MAX_REPORTED]]
        if len(problems) > MAX_REPORTED:
            shown.append(f"  ... and {len(problems) - MAX_REPORTED} more problems")
        super().__init__(text + "\n".join(shown) + (f"\n{hint}" if hint else ""))

    def __reduce__(self) -> tuple[type[DataError], tuple[list[Problem], str, pd.DataFrame | None]]:
        # Pickled (as from the simulation's table-reading process) with what it was made of, not its message.
        return type(self), (self.problems, self.hint, self.missingness)


def summary(problems: list[Problem], first: int = 3) -> list[str]:
    """One line per (file, column) with problems, in order of first appearance: how many, and the ``first``
    lines (rows) they are on, e.g. ``studentInfo.csv, column 'gender': 748 problems (lines 2, 3, 4, ...)``."""
    groups: dict[tuple[str, str | None], list[Problem]] = {}
    for p in problems:
        groups.setdefault((p.file, p.column), []).append(p)
    lines = []
    for (file, column), found in groups.items():
        count = sum(p.rows for p in found)
        numbers = [str(p.line) for p in found if p.line is not None][:first]
        kind = "rows" if file.endswith(".parquet") else "lines"
        at = f" ({kind} {', '.join(numbers)}{', ...' if count > len(numbers) else ''})" if numbers else ""
        name = f"{file}, column '{column}'" if column is not None else file
        lines.append(f"{name}: {count} problem{'s' if count != 1 else ''}{at}")
    return lines
