"""The official OULAD release on a researcher's machine: where it is, and downloading it.

Research only: a deployed campus reads its own export, never this release.
"""

from __future__ import annotations

import csv
import io
import os
import shutil
import tempfile
import urllib.request
import zipfile
from pathlib import Path

from edufl.federation.mapping import load_mapping
from edufl.federation.problems import DataError, Problem
from edufl.federation.tables import DATA_ENV, HOW_TO_GET_DATA, OULAD_URL

__all__ = ["OULAD_RELEASE_ROWS", "cache_dir", "download", "resolve_data_dir"]

OULAD_RELEASE_ROWS = {
    "courses.csv": 22,
    "assessments.csv": 206,
    "studentInfo.csv": 32593,
    "studentRegistration.csv": 32593,
    "studentAssessment.csv": 173912,
}
"""Rows in each file of the official release that the OULAD mapping reads."""


def cache_dir() -> Path:
    """The user cache folder for the downloaded release (``$XDG_CACHE_HOME/edufl/oulad``)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "edufl" / "oulad"


def resolve_data_dir(data: str | os.PathLike | None = None) -> Path:
    """Where to read OULAD from: ``data``, else ``$EDUFL_DATA``, else :func:`cache_dir`.

    Raises
    ------
    DataError
        When the chosen folder does not hold the OULAD ``studentInfo.csv``; says how to get the data.
    """
    if data:
        path, origin = Path(data).expanduser(), "--data"
    elif os.environ.get(DATA_ENV):
        path, origin = Path(os.environ[DATA_ENV]).expanduser(), f"${DATA_ENV}"
    else:
        path, origin = cache_dir(), "the user cache folder (no --data, no $EDUFL_DATA)"
    if not (path / load_mapping().learners.file).is_file():
        raise DataError([Problem(str(path), None, None, f"no OULAD tables found here (from {origin})")], hint=HOW_TO_GET_DATA)
    return path


def download(url: str = OULAD_URL, dest: Path | None = None) -> Path:
    """Fetch the official OULAD release zip, unpack the files edufl reads and check their row counts.

    Raises
    ------
    DataError
        If the download fails, a file is missing from the archive or its row
        count differs from the official release.
    """
    dest = dest or cache_dir()
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        archive = Path(tmp) / "oulad.zip"
        try:
            with urllib.request.urlopen(url, timeout=120) as response, archive.open("wb") as out:
                shutil.copyfileobj(response, out)
        except OSError as err:
            raise DataError([Problem(url, None, None, f"download failed: {err}")], hint=HOW_TO_GET_DATA) from None
        with zipfile.ZipFile(archive) as zf:
            members = {Path(n).name: n for n in zf.namelist()}
            problems = []
            for name, expected in OULAD_RELEASE_ROWS.items():
                if name not in members:
                    problems.append(Problem(url, None, None, f"{name} is not in the archive"))
                    continue
                with zf.open(members[name]) as src, (Path(tmp) / name).open("wb") as out:
                    shutil.copyfileobj(src, out)
                rows = sum(1 for _ in csv.reader(io.StringIO((Path(tmp) / name).read_text("utf-8-sig"), newline=""))) - 1
                if rows != expected:
                    problems.append(Problem(name, None, None, f"has {rows} rows; the official release has {expected}"))
            if problems:
                raise DataError(problems)
        for name in OULAD_RELEASE_ROWS:
            shutil.move(Path(tmp) / name, dest / name)
    return dest
