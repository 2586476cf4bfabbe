"""Writing contract tables as an export a campus could hold: OULAD-style CSV, or the contract's own Parquet."""

from __future__ import annotations

import csv
from pathlib import Path

from .contract import TABLES
from .mapping import CONTRACT_PARQUET, Mapping, load_mapping
from .tables import Tables

__all__ = ["write_parquet", "write_tables"]


def write_parquet(tables: Tables, directory: Path) -> Mapping:
    """Write ``tables`` as the contract's own tables, one Parquet file each; returns the mapping that
    reads them (``federation/mappings/contract-parquet.toml``)."""
    directory.mkdir(parents=True, exist_ok=True)
    mapping = load_mapping(CONTRACT_PARQUET)
    for table in TABLES:
        frame = tables[table.name][[c.name for c in table.columns]]
        frame.to_parquet(directory / mapping.table(table.name).file, index=False)
    return mapping


def write_tables(tables: Tables, directory: Path) -> None:
    """Write ``tables`` as an OULAD release would hold them (the OULAD mapping's files and
    columns, quoted CSV, ``?`` for missing), readable with the default mapping."""
    directory.mkdir(parents=True, exist_ok=True)
    oulad = load_mapping()
    for table in TABLES:
        given = oulad.table(table.name)
        frame = tables[table.name][[c.name for c in table.columns]].rename(columns=given.columns)
        frame.to_csv(directory / given.file, index=False, na_rep="?", quoting=csv.QUOTE_ALL)
