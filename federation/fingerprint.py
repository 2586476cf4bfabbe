"""Content hashes of a campus's export: the dataset identity its privacy ledger keys releases by."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .mapping import Mapping, load_mapping

__all__ = ["dataset_id", "file_hashes"]


def file_hashes(directory: Path, mapping: Mapping | None = None, core_only: bool = False) -> dict[str, str]:
    """SHA-256 (hex) of each file of the export ``mapping`` reads (OULAD's when None), by file name, for
    run manifests; with ``core_only``, of the contract core's files only. Raises OSError when a file
    cannot be read."""
    mapping = mapping or load_mapping()
    files = dict.fromkeys(
        part.file for t in mapping.tables() if not core_only or t.module == "core" for part in mapping.parts(t.name)
    )
    return {name: hashlib.sha256((directory / name).read_bytes()).hexdigest() for name in files}


def dataset_id(directory: Path, mapping: Mapping | None = None) -> str:
    """The identity a campus's privacy ledger keys its releases by: SHA-256 (hex) over the :func:`file_hashes`
    of the contract core (presentations, learners, registrations: who the records are about), the same for
    DP-SGD updates and DP statistics, so that both spend one budget. Adding or changing an optional module's
    files (assessments, engagement) keeps the identity, and so the budget already spent on those learners."""
    return hashlib.sha256(json.dumps(file_hashes(directory, mapping, core_only=True), sort_keys=True).encode()).hexdigest()
