"""Content hashes of a campus's export: the dataset identity its privacy ledger keys releases by."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .mapping import Mapping, load_mapping

__all__ = ["dataset_id", "file_hashes"]


def file_hashes(directory: Path, mapping: Mapping | None = None) -> dict[str, str]:
    """SHA-256 (hex) of each file of the export ``mapping`` reads (OULAD's when None), by file name,
    for run manifests. Raises OSError when a file cannot be read."""
    files = (mapping or load_mapping()).files()
    return {name: hashlib.sha256((directory / name).read_bytes()).hexdigest() for name in files}


def dataset_id(directory: Path, mapping: Mapping | None = None) -> str:
    """The identity a campus's privacy ledger keys its releases by: SHA-256 (hex) over :func:`file_hashes`
    (the same for DP-SGD updates and DP statistics, so that both spend one budget)."""
    return hashlib.sha256(json.dumps(file_hashes(directory, mapping), sort_keys=True).encode()).hexdigest()
