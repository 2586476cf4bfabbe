"""The official OULAD release on a researcher's machine: where it is, and downloading it.

Research only: a deployed campus reads its own export, never this release.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import shutil
import tempfile
import urllib.request
import zipfile
from pathlib import Path

import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from rich.progress import DownloadColumn, Progress, TransferSpeedColumn

from edufl.federation.mapping import load_mapping
from edufl.federation.problems import DataError, Problem
from edufl.federation.tables import DATA_ENV, HOW_TO_GET_DATA, OULAD_URL

__all__ = ["CLICK_LOG", "OULAD_RELEASE_ROWS", "OULAD_RELEASE_SHA256", "cache_dir", "download", "resolve_data_dir"]

OULAD_RELEASE_ROWS = {
    "courses.csv": 22,
    "assessments.csv": 206,
    "studentInfo.csv": 32593,
    "studentRegistration.csv": 32593,
    "studentAssessment.csv": 173912,
    "vle.csv": 6364,
    "studentVle.csv": 10655280,
}
"""Rows in each file of the official release that the OULAD mapping reads (the click log ``studentVle.csv``
is stored as ``studentVle.parquet``, the file the mapping names)."""
OULAD_RELEASE_SHA256 = {
    "courses.csv": "8d2767c4a43a04d48f2e52b6aae3d4c596d57030e6b87d759aee0d20c5ffc96a",
    "assessments.csv": "35265916ee6bc69f0a2c68fcb1cd634d28429e288d1e5d1a02aeb91839bfb1b5",
    "studentInfo.csv": "e6057e39d96bf4cb5eaad5da09da29ab473ae6c978be8df9bb2425aadf364773",
    "studentRegistration.csv": "eeccfb086dcaba018a7cbbee81fccda4bfaaebacd101286bbe6f0a568e9d01e4",
    "studentAssessment.csv": "05ac3ae53007f25ad1b1dacf355967220cb10bf9876a42f23d20197cf4a1d64b",
    "vle.csv": "6a8c8b79887ef7d142613a3df7e8404854789ad3497b65f461c1367466343be4",
}
"""SHA-256 of each CSV file of the official release, as unpacked from its archive (computed from
the release's files). The click log ``studentVle.csv`` has no entry: the copy these were computed
from holds it converted to Parquet, so its official hash is not known here; its row count is checked."""
CLICK_LOG = ("studentVle.csv", "studentVle.parquet")
"""The click log as the release ships it, and as it is stored (Parquet: 21 MB instead of 453 MB, read in about a second)."""


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
    """Fetch the official OULAD release zip (with a progress bar), unpack the files edufl reads, check
    their row counts (:data:`OULAD_RELEASE_ROWS`) and SHA-256 (:data:`OULAD_RELEASE_SHA256`), and only
    then install them as ``dest`` (default :func:`cache_dir`), replacing that folder whole by a rename:
    on any failure nothing is installed and a previous ``dest`` stays as it was.

    The click log ``studentVle.csv`` is stored as ``studentVle.parquet`` (an archive holding
    ``studentVle.parquet`` instead is accepted as it is).

    Raises
    ------
    DataError
        If the download fails, the archive is not a zip file, a file is missing from it, or a
        file's row count or SHA-256 differs from the official release's.
    """
    dest = (dest or cache_dir()).absolute()
    dest.parent.mkdir(parents=True, exist_ok=True)
    # Staged next to dest (the same file system), so that installing it is a rename.
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=f".{dest.name}-download-") as tmp:
        archive = Path(tmp) / "oulad.zip"
        try:
            with urllib.request.urlopen(url, timeout=120) as response, archive.open("wb") as out:
                _copy_with_progress(response, out, response.headers.get("Content-Length"))
        except OSError as err:
            raise DataError([Problem(url, None, None, f"download failed: {err}")], hint=HOW_TO_GET_DATA) from None
        try:
            problems = _unpack(archive, Path(tmp), url)
        except (zipfile.BadZipFile, EOFError) as err:
            raise DataError([Problem(url, None, None, f"the download is not a readable zip archive ({err})")]) from None
        if problems:
            raise DataError(problems)
        if (Path(tmp) / CLICK_LOG[0]).exists():
            _to_parquet(Path(tmp) / CLICK_LOG[0], Path(tmp) / CLICK_LOG[1])
        staged = Path(tmp) / "oulad"
        staged.mkdir()
        for name in load_mapping().files():
            shutil.move(Path(tmp) / name, staged / name)
        if dest.exists():
            dest.rename(Path(tmp) / "previous")  # removed with the temporary folder once the new one is in place
        staged.rename(dest)
    return dest


def _unpack(archive: Path, folder: Path, url: str) -> list[Problem]:
    # Unpack the release's files from archive into folder; the problems with their row counts and SHA-256.
    with zipfile.ZipFile(archive) as zf:
        members = {Path(n).name: n for n in zf.namelist()}
        problems = []
        for name, expected in OULAD_RELEASE_ROWS.items():
            if name == CLICK_LOG[0] and name not in members and CLICK_LOG[1] in members:
                name = CLICK_LOG[1]
            if name not in members:
                problems.append(Problem(url, None, None, f"{name} is not in the archive"))
                continue
            with zf.open(members[name]) as src, (folder / name).open("wb") as out:
                shutil.copyfileobj(src, out)
            rows = _rows(folder / name)
            if rows != expected:
                problems.append(Problem(name, None, None, f"has {rows} rows; the official release has {expected}"))
            elif name in OULAD_RELEASE_SHA256 and (digest := _sha256(folder / name)) != OULAD_RELEASE_SHA256[name]:
                problems.append(
                    Problem(name, None, None, f"has SHA-256 {digest}; the official release's is {OULAD_RELEASE_SHA256[name]}")
                )
    return problems


def _copy_with_progress(source, out, length: str | None) -> None:
    # Copy the response into out with a progress bar on the terminal (bytes, speed, time left where the size is known).
    with Progress(*Progress.get_default_columns(), DownloadColumn(), TransferSpeedColumn(), transient=True) as progress:
        task = progress.add_task("downloading OULAD", total=int(length) if length and length.isdigit() else None)
        while chunk := source.read(1 << 20):
            out.write(chunk)
            progress.advance(task, len(chunk))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _rows(path: Path) -> int:
    if path.suffix == ".parquet":
        return int(pq.ParquetFile(path).metadata.num_rows)
    if path.name == CLICK_LOG[0]:
        return int(pacsv.read_csv(path, convert_options=pacsv.ConvertOptions(include_columns=["id_site"])).num_rows)
    return sum(1 for _ in csv.reader(io.StringIO(path.read_text("utf-8-sig"), newline=""))) - 1


def _to_parquet(source: Path, target: Path) -> None:
    """The CSV ``source`` as a zstd-compressed Parquet file, converted block by block (little memory)."""
    reader = pacsv.open_csv(source, read_options=pacsv.ReadOptions(block_size=1 << 24))
    with pq.ParquetWriter(target, reader.schema, compression="zstd") as out:
        for batch in reader:
            out.write_batch(batch)
