"""Reading, validating, locating and splitting the OULAD tables.

Every problem in a file is collected before anything is reported (lazy
validation), and reported with the file, the line (the header is line 1), the
column and what was expected. Nothing is silently dropped: exact duplicate rows
are merged and counted in :attr:`Tables.notes`; conflicting duplicates are errors.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import shutil
import tempfile
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from .contract import MISSING_MARKERS, STUDENT_INFO, TABLES, Column, Table

DATA_ENV = "EDUFL_DATA"
OULAD_URL = "https://analyse.kmi.open.ac.uk/open_dataset/download"
MAX_REPORTED = 25
CAMPUS_COLUMNS = {"module": "code_module", "region": "region"}
LINE = "_line"  # column holding each row's line number in its file


@dataclass(frozen=True)
class Problem:
    """One data problem: ``line`` is 1-based in ``file`` (None for the whole file)."""

    file: str
    line: int | None
    column: str | None
    message: str

    def __str__(self) -> str:
        where = self.file
        if self.line is not None:
            where += f", line {self.line}"
        if self.column is not None:
            where += f", column '{self.column}'"
        return f"{where}: {self.message}"


class DataError(Exception):
    """Raised when data cannot be used; ``problems`` lists every problem found."""

    def __init__(self, problems: list[Problem], hint: str = ""):
        self.problems = problems
        shown = [f"  - {p}" for p in problems[:MAX_REPORTED]]
        if len(problems) > MAX_REPORTED:
            shown.append(f"  ... and {len(problems) - MAX_REPORTED} more problems")
        text = f"{len(problems)} data problem(s):\n" + "\n".join(shown)
        super().__init__(text + (f"\n{hint}" if hint else ""))


@dataclass
class Tables:
    """The six OULAD tables as typed DataFrames, keyed by table name (``studentInfo`` ...).

    Each frame keeps a ``_line`` column with the row's line number in its file.
    """

    frames: dict[str, pd.DataFrame]
    source: Path
    notes: list[str] = field(default_factory=list)

    def __getitem__(self, name: str) -> pd.DataFrame:
        return self.frames[name]


def _decode(path: Path, raw: bytes) -> str:
    if raw[:2] in (b"\xff\xfe", b"\xfe\xff"):
        raise DataError([Problem(path.name, None, None, "file is UTF-16 encoded; expected UTF-8 (save it as UTF-8 CSV)")])
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise DataError([Problem(path.name, line, None, f"byte 0x{raw[err.start]:02x} is not UTF-8; expected a UTF-8 encoded CSV (re-export it as UTF-8)")]) from None


def _parse(path: Path, table: Table) -> pd.DataFrame:
    """Split ``path`` into rows of strings; checks header, delimiter and field counts."""
    text = _decode(path, path.read_bytes())
    reader = csv.reader(io.StringIO(text, newline=""))
    header = [h.strip() for h in next(reader, [])]
    expected = [c.name for c in table.columns]
    if len(header) == 1 and expected[0] in header[0]:
        try:
            delim = repr(csv.Sniffer().sniff(text.partition("\n")[0], delimiters=";\t|: ").delimiter)
        except csv.Error:
            delim = "another character"
        raise DataError([Problem(path.name, 1, None, f"columns are separated by {delim}; expected ',' (comma-separated values)")])
    missing = [c for c in expected if c not in header]
    if missing:
        raise DataError([Problem(path.name, 1, c, f"column is missing; expected columns {', '.join(expected)}") for c in missing])
    rows, lines, problems = [], [], []
    width = len(header)
    line = reader.line_num
    for row in reader:
        start, line = line + 1, reader.line_num
        if not row:
            continue
        if len(row) != width:
            problems.append(Problem(path.name, start, None, f"row has {len(row)} fields; expected {width} (truncated or malformed row)"))
            continue
        rows.append(row)
        lines.append(start)
    if problems:
        raise DataError(problems)
    frame = pd.DataFrame(rows, columns=header, dtype=str)[expected]
    frame[LINE] = np.asarray(lines, dtype=np.int64)
    return frame


def _check_column(frame: pd.DataFrame, col: Column, file: str) -> tuple[pd.Series, list[Problem]]:
    raw = frame[col.name].str.strip()
    missing = raw.isin(MISSING_MARKERS)
    problems: list[Problem] = []

    def report(mask: pd.Series, message: str) -> None:
        for line, value in zip(frame.loc[mask, LINE], raw[mask]):
            problems.append(Problem(file, int(line), col.name, message.format(value=value)))

    if not col.nullable:
        report(missing, "value is missing; expected a value")
    if col.kind in ("str",):
        return raw.where(~missing, None), problems
    if col.kind == "cat":
        value = raw.replace(col.aliases)
        report(~missing & ~value.isin(col.vocab), "unexpected value {value!r}; expected one of " + ", ".join(col.vocab))
        return value.where(~missing, None), problems
    number = pd.to_numeric(raw.where(~missing), errors="coerce")
    bad = ~missing & number.isna()
    what = "a whole number" if col.kind == "int" else "a number"
    report(bad, f"{{value!r}} is not {what}")
    ok = number.notna()
    if col.kind == "int":
        report(ok & (number % 1 != 0), "{value!r} is not a whole number (days and counts are integers)")
    if col.positive:
        report(ok & (number <= 0), "{value} is out of range; expected a value > 0")
    if col.low is not None or col.high is not None:
        low = -np.inf if col.low is None else col.low
        high = np.inf if col.high is None else col.high
        report(ok & ((number < low) | (number > high)), f"{{value}} is out of range; expected {low:g} to {high:g}")
    return (number.astype("Int64") if col.kind == "int" and not problems else number), problems


def _read_table(directory: Path, table: Table) -> tuple[pd.DataFrame, list[Problem]]:
    frame = _parse(directory / table.file, table)
    problems: list[Problem] = []
    for col in table.columns:
        frame[col.name], found = _check_column(frame, col, table.file)
        problems += found
    return frame, problems


def _deduplicate(frame: pd.DataFrame, table: Table, notes: list[str]) -> tuple[pd.DataFrame, list[Problem]]:
    values = [c.name for c in table.columns]
    exact = frame.duplicated(values)
    if exact.any():
        notes.append(f"{table.file}: {int(exact.sum())} exact duplicate row(s) merged (lines {', '.join(map(str, frame.loc[exact, LINE].head(5)))}...)")
        frame = frame[~exact]
    clash = frame.duplicated(list(table.key), keep=False)
    problems = []
    if clash.any():
        for key, group in frame[clash].groupby(list(table.key), sort=False):
            first = int(group[LINE].iloc[0])
            for line in group[LINE].iloc[1:]:
                problems.append(Problem(table.file, int(line), None, f"conflicting duplicate of line {first} for {'/'.join(table.key)} = {key}; expected one record per key"))
    return frame, problems


def _missing_refs(child: pd.DataFrame, parent: pd.DataFrame, cols: list[str], file: str, what: str) -> list[Problem]:
    keys = pd.MultiIndex.from_frame(parent[cols])
    absent = ~pd.MultiIndex.from_frame(child[cols]).isin(keys)
    return [
        Problem(file, int(line), None, f"{what} {'/'.join(str(v) for v in vals)} does not exist")
        for line, vals in zip(child.loc[absent, LINE], child.loc[absent, cols].itertuples(index=False))
    ]


def _check_references(f: dict[str, pd.DataFrame]) -> list[Problem]:
    mp = ["code_module", "code_presentation"]
    student = [*mp, "id_student"]
    problems = []
    for name in ("assessments", "vle", "studentInfo"):
        problems += _missing_refs(f[name], f["courses"], mp, f"{name}.csv", "course presentation")
    problems += _missing_refs(f["studentRegistration"], f["studentInfo"], student, "studentRegistration.csv", "student (in studentInfo.csv)")
    problems += _missing_refs(f["studentInfo"], f["studentRegistration"], student, "studentInfo.csv", "registration (in studentRegistration.csv) for student")
    sa = f["studentAssessment"]
    problems += _missing_refs(sa, f["assessments"], ["id_assessment"], "studentAssessment.csv", "assessment")
    known = sa.merge(f["assessments"][["id_assessment", *mp]], on="id_assessment")
    problems += _missing_refs(known, f["studentInfo"], student, "studentAssessment.csv", "student registered on the assessment's presentation (module/presentation/student)")
    return problems


def load_tables(directory: str | os.PathLike) -> Tables:
    """Read and validate the six OULAD tables in ``directory``.

    Returns
    -------
    Tables
        Typed frames; integer columns are ``Int64`` with ``<NA>`` for missing.

    Raises
    ------
    DataError
        Naming every problem found (missing file or column, wrong type, value
        out of range, broken reference, conflicting duplicate, bad encoding,
        delimiter or field count), each with file, line and column.
    """
    directory = Path(directory)
    absent = [t.file for t in TABLES if not (directory / t.file).is_file()]
    if absent:
        raise DataError([Problem(f, None, None, f"file not found in {directory}") for f in absent], hint=HOW_TO_GET_DATA)
    frames, problems, notes = {}, [], []
    for table in TABLES:
        frame, found = _read_table(directory, table)
        if not found:
            frame, found = _deduplicate(frame, table, notes)
        frames[table.name] = frame
        problems += found
    if problems:
        raise DataError(problems)
    problems = _check_references(frames)
    if problems:
        raise DataError(problems)
    return Tables(frames, directory, notes)


HOW_TO_GET_DATA = (
    "How to get the OULAD tables: run `edufl data download` (fills the user cache folder), "
    f"or download anonymisedData.zip from {OULAD_URL}, unzip it and pass --data DIR "
    f"or set {DATA_ENV}=DIR."
)


def cache_dir() -> Path:
    """The user cache folder for the downloaded release (``$XDG_CACHE_HOME/edufl/oulad``)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "edufl" / "oulad"


def resolve_data_dir(data: str | os.PathLike | None = None) -> Path:
    """Where to read OULAD from: ``data``, else ``$EDUFL_DATA``, else :func:`cache_dir`.

    Raises
    ------
    DataError
        When the chosen folder does not hold ``studentInfo.csv``; says how to get the data.
    """
    if data:
        path, origin = Path(data).expanduser(), "--data"
    elif os.environ.get(DATA_ENV):
        path, origin = Path(os.environ[DATA_ENV]).expanduser(), f"${DATA_ENV}"
    else:
        path, origin = cache_dir(), "the user cache folder (no --data, no $EDUFL_DATA)"
    if not (path / STUDENT_INFO.file).is_file():
        raise DataError([Problem(str(path), None, None, f"no OULAD tables found here (from {origin})")], hint=HOW_TO_GET_DATA)
    return path


def download(url: str = OULAD_URL, dest: Path | None = None) -> Path:
    """Fetch the official OULAD release zip, unpack the six tables and check their row counts.

    Raises
    ------
    DataError
        If the download fails, a table is missing from the archive or its row
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
            for table in TABLES:
                if table.file not in members:
                    problems.append(Problem(url, None, None, f"{table.file} is not in the archive"))
                    continue
                with zf.open(members[table.file]) as src, (Path(tmp) / table.file).open("wb") as out:
                    shutil.copyfileobj(src, out)
                rows = sum(1 for _ in csv.reader(io.StringIO((Path(tmp) / table.file).read_text("utf-8-sig"), newline=""))) - 1
                if rows != table.release_rows:
                    problems.append(Problem(table.file, None, None, f"has {rows} rows; the official release has {table.release_rows}"))
            if problems:
                raise DataError(problems)
        for table in TABLES:
            shutil.move(Path(tmp) / table.file, dest / table.file)
    return dest


def file_hashes(directory: Path) -> dict[str, str]:
    """SHA-256 of each table file, for run manifests."""
    return {t.file: hashlib.sha256((directory / t.file).read_bytes()).hexdigest() for t in TABLES}


def dataset_id(directory: Path) -> str:
    """The identity a campus's privacy ledger keys its releases by: SHA-256 over :func:`file_hashes`
    (the same for DP-SGD updates and DP statistics, so that both spend one budget)."""
    return hashlib.sha256(json.dumps(file_hashes(directory), sort_keys=True).encode()).hexdigest()


def campus_of(info: pd.DataFrame, campus_by: str, shards: int = 0) -> pd.Series:
    """The campus of each studentInfo row.

    ``module``: its ``code_module`` (7 campuses in OULAD); ``region``: its
    ``region`` (13); ``shard``: ``S000`` ... one of ``shards`` campuses chosen by a
    hash (CRC-32) of ``id_student``, so all of a student's rows share a campus
    (used to study how a federation scales with many small campuses).
    """
    if campus_by == "shard":
        if shards < 1:
            raise ValueError(f"campus-by shard needs shards >= 1, got {shards}")
        codes = [zlib.crc32(str(s).encode()) % shards for s in info["id_student"]]
        return pd.Series([f"S{c:03d}" for c in codes], index=info.index)
    return info[CAMPUS_COLUMNS[campus_by]]


def campus_names(tables: Tables, campus_by: str, shards: int = 0) -> list[str]:
    """Sorted names of the campuses that hold at least one registration."""
    return sorted(campus_of(tables["studentInfo"], campus_by, shards).unique())


def campus_slice(tables: Tables, campus_by: str, campus: str, shards: int = 0) -> Tables:
    """Only ``campus``'s rows of every table: what that campus would hold itself."""
    info = tables["studentInfo"]
    return _own_rows(tables, info[campus_of(info, campus_by, shards) == campus])


def campus_slices(tables: Tables, campus_by: str, shards: int = 0) -> dict[str, Tables]:
    """Every campus's :func:`campus_slice`, by campus name in sorted order (each row's campus computed once)."""
    info = tables["studentInfo"]
    campus = campus_of(info, campus_by, shards)
    return {name: _own_rows(tables, info[campus == name]) for name in sorted(campus.unique())}


def _own_rows(tables: Tables, info: pd.DataFrame) -> Tables:
    f = tables.frames
    mp = ["code_module", "code_presentation"]
    student = [*mp, "id_student"]
    courses = f["courses"].merge(info[mp].drop_duplicates(), on=mp)
    assessments = f["assessments"].merge(courses[mp], on=mp)
    sa = f["studentAssessment"].merge(assessments[["id_assessment", *mp]], on="id_assessment").merge(info[student], on=student)
    frames = {
        "courses": courses,
        "assessments": assessments,
        "vle": f["vle"].merge(courses[mp], on=mp),
        "studentInfo": info,
        "studentRegistration": f["studentRegistration"].merge(info[student], on=student),
        "studentAssessment": sa[[*f["studentAssessment"].columns]],
    }
    return Tables({k: v.reset_index(drop=True) for k, v in frames.items()}, tables.source)


def write_tables(tables: Tables, directory: Path) -> None:
    """Write ``tables`` in the OULAD file format (quoted CSV, ``?`` for missing)."""
    directory.mkdir(parents=True, exist_ok=True)
    for table in TABLES:
        frame = tables[table.name][[c.name for c in table.columns]]
        frame.to_csv(directory / table.file, index=False, na_rep="?", quoting=csv.QUOTE_ALL)
