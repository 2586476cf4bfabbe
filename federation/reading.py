"""Reading one export file of a campus into strings under the learner-record contract's column names.

Text files are decoded with the mapping's encoding and split with its
delimiter; Parquet files are read typed and turned to text, so both are checked
alike afterwards (:mod:`federation.validation`). Nothing is typed here.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import pandas as pd

from .contract import Table
from .mapping import Mapping, TableMapping
from .problems import DataError, Problem

__all__ = ["LINE", "START", "Headers", "read_export_file"]

LINE = "_line"
"""The column holding each row's line number in its export file."""
START = "_start"
"""Presentations only: the column holding the start date, when the export gives days as dates."""
Headers = dict[str, tuple[list[str], set[str]]]
"""By export file name: the file's header names and those a mapping reads (the rest are listed as unused)."""


def _decode(path: Path, raw: bytes, encoding: str) -> str:
    if raw[:2] in (b"\xff\xfe", b"\xfe\xff") and not encoding.lower().startswith("utf-16"):
        raise DataError(
            [
                Problem(
                    path.name,
                    None,
                    None,
                    f"file is UTF-16 encoded; expected {encoding} (save it as {encoding}, or set encoding in the mapping)",
                )
            ]
        )
    try:
        return raw.decode("utf-8-sig" if encoding.lower().replace("_", "-") in ("utf-8", "utf8") else encoding)
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise DataError(
            [
                Problem(
                    path.name,
                    line,
                    None,
                    f"byte 0x{raw[err.start]:02x} is not {encoding}; expected a {encoding} encoded file "
                    "(re-export it, or set encoding in the mapping)",
                )
            ]
        ) from None


def _rows(path: Path, delimiter: str, encoding: str, wanted: list[str]) -> tuple[list[str], list[list[str]], list[int]]:
    """Header, rows of strings and their line numbers of a delimited text file; checks delimiter and field counts."""
    text = _decode(path, path.read_bytes(), encoding)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    header = [h.strip() for h in next(reader, [])]
    if len(header) == 1 and len(wanted) > 1 and wanted[0] in header[0]:
        try:
            found = repr(csv.Sniffer().sniff(text.partition("\n")[0], delimiters=",;\t|: ").delimiter)
        except csv.Error:
            found = "another character"
        raise DataError(
            [
                Problem(
                    path.name, 1, None, f"columns are separated by {found}; expected {delimiter!r} (set delimiter in the mapping)"
                )
            ]
        )
    rows, lines, problems = [], [], []
    width = len(header)
    line = reader.line_num
    for row in reader:
        start, line = line + 1, reader.line_num
        if not row:
            continue
        if len(row) != width:
            problems.append(
                Problem(path.name, start, None, f"row has {len(row)} fields; expected {width} (truncated or malformed row)")
            )
            continue
        rows.append(row)
        lines.append(start)
    if problems:
        raise DataError(problems)
    return header, rows, lines


def _words(name: str) -> str:
    """A column name with its whitespace normalised: no leading or trailing space, single spaces inside."""
    return " ".join(name.split())


def _what(table: str, name: str) -> str:
    return f"a row filter of {table}" if name == "keep" else f"mapped to contract field {table}.{name}"


def read_export_file(
    directory: Path, mapping: Mapping, table: Table, given: TableMapping, headers: Headers
) -> tuple[pd.DataFrame, int]:
    """The export file of ``table``'s part ``given`` (CSV-like text or Parquet) as strings under contract
    column names, and the number of rows its row filter (``given.keep``) left out.

    The frame has one column per contract field of ``table`` (None in every row for a nullable field the
    mapping leaves out; the value as text for one of ``given.constants``), the column
    :data:`LINE` (each row's line in the file) and, for presentations read with
    a ``start_date`` in the mapping, the column :data:`START` (the start date as text).
    Only rows whose ``keep`` columns hold one of the values listed are kept. The file's header and the
    columns read are added to ``headers``.

    A mapped column is found whatever whitespace its header name carries
    (``" Student ID "`` and ``"Student  ID"`` are ``"Student ID"``).

    Raises
    ------
    DataError
        On a wrong encoding or delimiter, a row with the wrong number of fields,
        or a mapped or filtered column the file lacks.
    """
    path = directory / given.file
    extra = {START: mapping.start_date} if table.name == "presentations" and mapping.start_date else {}
    source = {**{c.name: given.columns[c.name] for c in table.columns if c.name in given.columns}, **extra}
    filters = given.kept()
    lines: list[int] | np.ndarray
    if path.suffix == ".parquet":
        data = pd.read_parquet(path)
        header, lines = [str(c) for c in data.columns], np.arange(1, len(data) + 1)
    else:
        header, rows, lines = _rows(
            path, given.delimiter or mapping.delimiter, given.encoding or mapping.encoding, list(source.values())
        )
    found = {_words(h): h for h in header}  # header names matched after normalising whitespace
    absent = [(name, col) for name, col in source.items() if _words(col) not in found]
    absent += [("keep", col) for col in filters if _words(col) not in found]
    if absent:
        raise DataError(
            [
                Problem(
                    path.name,
                    1,
                    col,
                    f"column is missing ({_what(table.name, name)}); the file has columns {', '.join(header)}",
                )
                for name, col in absent
            ]
        )
    source = {name: found[_words(col)] for name, col in source.items()}
    wanted = [*dict.fromkeys([*source.values(), *(found[_words(c)] for c in filters)])]
    seen = headers.setdefault(given.file, (header, set()))
    seen[1].update(wanted)
    if path.suffix == ".parquet":  # typed columns, as text (missing as ""), checked like a text file's
        text = pd.DataFrame({col: data[col].astype(object).where(data[col].notna(), "").astype(str) for col in wanted})
    else:
        text = pd.DataFrame(rows, columns=header, dtype=str)[wanted]
    keep = np.ones(len(text), dtype=bool)
    for col, values in filters.items():
        keep &= text[found[_words(col)]].str.strip().isin(values).to_numpy()
    frame = pd.DataFrame({name: text[col].to_numpy()[keep] for name, col in source.items()}, index=pd.RangeIndex(keep.sum()))
    for field in table.columns:
        if field.name in given.constants:
            frame[field.name] = str(given.constants[field.name])
        elif field.name not in frame:
            frame[field.name] = None  # a nullable field the export does not have: missing in every row
    frame[LINE] = np.asarray(lines, dtype=np.int64)[keep]
    return frame, int((~keep).sum())
