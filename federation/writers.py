"""Writing contract tables as an export a campus could hold: OULAD-style CSV, or the contract's own Parquet."""

from __future__ import annotations

import csv
from pathlib import Path

from .contract import TABLES
from .mapping import Mapping, load_mapping, parquet_layout
from .tables import Tables

__all__ = ["write_parquet", "write_tables"]


def write_parquet(tables: Tables, directory: Path) -> Mapping:
    """Write ``tables`` as the contract's own tables, one Parquet file each (table ``attributes`` with a column for
    each attribute of ``tables.schema`` it holds); returns the mapping that reads them
    (:func:`federation.mapping.parquet_layout`)."""
    directory.mkdir(parents=True, exist_ok=True)
    mapping = parquet_layout(directory, [t.name for t in TABLES if t.name in tables])
    for table in (tables.schema.table(t) for t in TABLES if t.name in tables):
        frame = tables[table.name][[c.name for c in table.columns if c.name in tables[table.name]]]
        frame.to_parquet(directory / mapping.table(table.name).file, index=False)
    return parquet_layout(directory)


def write_tables(tables: Tables, directory: Path) -> None:
    """Write ``tables`` as an OULAD release would hold them (the OULAD mapping's files and
    columns, quoted CSV, ``?`` for missing), readable with the default mapping."""
    directory.mkdir(parents=True, exist_ok=True)
    oulad = load_mapping()
    for table in (t for t in TABLES if t.name in tables):
        given = oulad.table(table.name)
        frame = tables[table.name][[c.name for c in table.columns]].rename(columns=given.columns)
        if given.file.endswith(".parquet"):  # the click log, as `edufl data download` stores it
            frame.to_parquet(directory / given.file, index=False)
        else:
            frame.to_csv(directory / given.file, index=False, na_rep="?", quoting=csv.QUOTE_ALL)
