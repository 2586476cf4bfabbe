"""Reading, validating, locating and splitting a campus's data as learner-record contract tables.

A campus's export is read through its mapping (:mod:`federation.mapping`; the
OULAD release when none is given) into the five contract tables of
:mod:`federation.contract`. Every problem in a file is collected before
anything is reported (lazy validation), and reported with the export's file,
line (the header is line 1; a Parquet file's first row is row 1), column, value
and what was expected. Nothing is silently dropped: exact duplicate rows are
merged and counted in :attr:`Tables.notes`; conflicting duplicates are errors.
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

from .contract import TABLES, Column, Table
from .mapping import CONTRACT_PARQUET, Mapping, TableMapping, load_mapping

DATA_ENV = "EDUFL_DATA"
OULAD_URL = "https://analyse.kmi.open.ac.uk/open_dataset/download"
# Rows in each file of the official release that the OULAD mapping reads.
OULAD_RELEASE_ROWS = {"courses.csv": 22, "assessments.csv": 206, "studentInfo.csv": 32593,
                      "studentRegistration.csv": 32593, "studentAssessment.csv": 173912}
MAX_REPORTED = 25
CAMPUS_COLUMNS = {"module": "course", "region": "region"}
LINE = "_line"  # column holding each row's line number in its file
START = "_start"  # presentations: the start date, when the export gives days as dates


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


@dataclass
class Tables:
    """The contract tables (``presentations``, ``assessments``, ``learners``, ``registrations``,
    ``submissions``) as typed DataFrames, keyed by table name.

    Each frame keeps a ``_line`` column with the row's line number in its export file;
    ``mapping`` is how the export in ``source`` was read; ``missingness`` (from
    :func:`load_tables`) counts the missing values of every contract field.
    """

    frames: dict[str, pd.DataFrame]
    source: Path
    mapping: Mapping = field(default_factory=load_mapping)
    notes: list[str] = field(default_factory=list)
    missingness: pd.DataFrame | None = None

    def __getitem__(self, name: str) -> pd.DataFrame:
        return self.frames[name]


class DataError(Exception):
    """Raised when data cannot be used; ``problems`` lists every problem found and, once every
    file could be parsed, ``missingness`` counts the missing values per contract field."""

    def __init__(self, problems: list[Problem], hint: str = "", missingness: pd.DataFrame | None = None):
        self.problems = problems
        self.missingness = missingness
        shown = [f"  - {p}" for p in problems[:MAX_REPORTED]]
        if len(problems) > MAX_REPORTED:
            shown.append(f"  ... and {len(problems) - MAX_REPORTED} more problems")
        text = f"{len(problems)} data problem(s):\n" + "\n".join(shown)
        super().__init__(text + (f"\n{hint}" if hint else ""))


def _decode(path: Path, raw: bytes, encoding: str) -> str:
    if raw[:2] in (b"\xff\xfe", b"\xfe\xff") and not encoding.lower().startswith("utf-16"):
        raise DataError([Problem(path.name, None, None, f"file is UTF-16 encoded; expected {encoding} (save it as {encoding}, or set encoding in the mapping)")])
    try:
        return raw.decode("utf-8-sig" if encoding.lower().replace("_", "-") in ("utf-8", "utf8") else encoding)
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise DataError([Problem(path.name, line, None, f"byte 0x{raw[err.start]:02x} is not {encoding}; expected a {encoding} encoded file (re-export it, or set encoding in the mapping)")]) from None


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
        raise DataError([Problem(path.name, 1, None, f"columns are separated by {found}; expected {delimiter!r} (set delimiter in the mapping)")])
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
    return header, rows, lines


def _parse(directory: Path, mapping: Mapping, table: Table) -> pd.DataFrame:
    """The export file of ``table`` as strings under contract column names, with ``_line`` (and ``_start``)."""
    given = mapping.table(table.name)
    path = directory / given.file
    extra = {START: mapping.start_date} if table.name == "presentations" and mapping.start_date else {}
    source = {**{c.name: given.columns[c.name] for c in table.columns}, **extra}
    if path.suffix == ".parquet":
        data = pd.read_parquet(path)
        header, lines = [str(c) for c in data.columns], np.arange(1, len(data) + 1)
    else:
        header, rows, lines = _rows(path, given.delimiter or mapping.delimiter, given.encoding or mapping.encoding,
                                    list(source.values()))
    absent = [(name, col) for name, col in source.items() if col not in header]
    if absent:
        raise DataError([Problem(path.name, 1, col, f"column is missing (mapped to contract field {table.name}.{name}); "
                                 f"the file has columns {', '.join(header)}") for name, col in absent])
    if path.suffix == ".parquet":  # typed columns, as text (missing as ""), checked like a text file's
        frame = pd.DataFrame({name: data[col].astype(object).where(data[col].notna(), "").astype(str)
                              for name, col in source.items()})
    else:
        frame = pd.DataFrame(rows, columns=header, dtype=str)[list(source.values())]
        frame.columns = list(source)
    frame[LINE] = np.asarray(lines, dtype=np.int64)
    return frame


def _check_column(frame: pd.DataFrame, col: Column, file: str, source: str, missing_markers: frozenset[str],
                  codes: dict[str, str], reported: pd.Series | None = None) -> tuple[pd.Series, list[Problem], int]:
    """The typed column, its problems (rows in ``reported`` already have one) and its count of missing values."""
    raw = frame[col.name].str.strip()
    missing = raw.isin(missing_markers)
    problems: list[Problem] = []
    n_missing = int(missing.sum())
    fresh = ~reported if reported is not None else pd.Series(True, index=frame.index)

    def report(mask: pd.Series, message: str) -> None:
        mask = mask & fresh
        for line, value in zip(frame.loc[mask, LINE], raw[mask]):
            problems.append(Problem(file, int(line), source, message.format(value=value)))

    if not col.nullable:
        report(missing, "value is missing; expected a value")
    if codes:
        raw = raw.replace(codes)
    if col.kind in ("str",):
        return raw.where(~missing, None), problems, n_missing
    if col.kind == "cat":
        expected = ", ".join(col.vocab) + (f" (or a code: {', '.join(codes)})" if codes else "")
        report(~missing & ~raw.isin(col.vocab), "unexpected value {value!r}; expected one of " + expected)
        return raw.where(~missing, None), problems, n_missing
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
    return (number.astype("Int64") if col.kind == "int" and not problems else number), problems, n_missing


def _dates(frame: pd.DataFrame, name: str, missing: pd.Series, file: str, column: str, fmt: str
           ) -> tuple[pd.Series, list[Problem]]:
    """The calendar dates in ``frame[name]`` (format ``fmt``; NaT where ``missing`` or unreadable), and a
    problem naming the export's ``file`` and ``column`` for each unreadable one."""
    raw = frame[name].str.strip()
    dates = pd.to_datetime(raw.where(~missing), format=fmt, errors="coerce")
    bad = ~missing & dates.isna()
    return dates, [Problem(file, int(line), column, f"{value!r} is not a date in format {fmt!r}")
                   for line, value in zip(frame.loc[bad, LINE], raw[bad])]


def _to_days(frame: pd.DataFrame, name: str, starts: pd.Series, missing_markers: frozenset[str], mapping: Mapping,
             given: TableMapping) -> tuple[list[Problem], pd.Series]:
    """Turn the calendar dates in ``frame[name]`` into days since each row's presentation start (in place).
    ``starts`` holds each row's start date (NaT where unknown). Returns the problems and the rows they concern."""
    raw = frame[name].str.strip()
    missing = raw.isin(missing_markers)
    dates, problems = _dates(frame, name, missing, given.file, given.columns[name], mapping.date_format)
    unknown = ~missing & dates.notna() & starts.isna().to_numpy()
    for line in frame.loc[unknown, LINE]:
        problems.append(Problem(given.file, int(line), given.columns[name], "no start date known for this row's presentation; expected one in the presentations file"))
    days = (dates - pd.to_datetime(starts.to_numpy())).dt.days
    frame[name] = np.where(missing, raw, days.astype("Int64").astype(str))
    return problems, ~missing & (dates.isna() | unknown)


def _start_dates(frame: pd.DataFrame, table: Table, f: dict[str, pd.DataFrame]) -> pd.Series:
    """Start date of each row's presentation (through the row's assessment for submissions)."""
    starts = f["presentations"][["course", "presentation", START]]
    if table.name == "submissions":
        where = f["assessments"][["assessment_id", "course", "presentation"]].astype({"assessment_id": str})
        keys = frame[["assessment_id"]].assign(assessment_id=lambda d: d["assessment_id"].str.strip()).merge(where, how="left")
    else:
        keys = frame[["course", "presentation"]]
    return keys.merge(starts, how="left", on=["course", "presentation"])[START]


def _read_table(directory: Path, mapping: Mapping, table: Table, f: dict[str, pd.DataFrame]
                ) -> tuple[pd.DataFrame, list[Problem], list[dict]]:
    """The table's typed frame, its problems, and one missingness row per contract field."""
    frame = _parse(directory, mapping, table)
    given = mapping.table(table.name)
    missing_markers = frozenset(given.missing if given.missing is not None else mapping.missing)
    problems: list[Problem] = []
    if table.name == "presentations" and mapping.start_date:  # every presentation needs its start date
        frame[START], problems = _dates(frame, START, pd.Series(False, index=frame.index), given.file,
                                        mapping.start_date, mapping.date_format)
    reported = {}
    for name in given.dates:
        found, reported[name] = _to_days(frame, name, _start_dates(frame, table, f), missing_markers, mapping, given)
        problems += found
    missingness = []
    for col in table.columns:
        frame[col.name], found, n_missing = _check_column(frame, col, given.file, given.columns[col.name],
                                                          missing_markers, given.codes.get(col.name, {}),
                                                          reported.get(col.name))
        problems += found
        missingness.append({"table": table.name, "field": col.name, "file": given.file, "column": given.columns[col.name],
                            "rows": len(frame), "missing": n_missing,
                            "share": round(n_missing / len(frame), 4) if len(frame) else 0.0})
    return frame, problems, missingness


def _deduplicate(frame: pd.DataFrame, table: Table, file: str, notes: list[str]) -> tuple[pd.DataFrame, list[Problem]]:
    values = [c.name for c in table.columns]
    exact = frame.duplicated(values)
    if exact.any():
        notes.append(f"{file}: {int(exact.sum())} exact duplicate row(s) merged (lines {', '.join(map(str, frame.loc[exact, LINE].head(5)))}...)")
        frame = frame[~exact]
    clash = frame.duplicated(list(table.key), keep=False)
    problems = []
    if clash.any():
        for key, group in frame[clash].groupby(list(table.key), sort=False):
            first = int(group[LINE].iloc[0])
            for line in group[LINE].iloc[1:]:
                problems.append(Problem(file, int(line), None, f"conflicting duplicate of line {first} for {'/'.join(table.key)} = {key}; expected one record per key"))
    return frame, problems


def _missing_refs(child: pd.DataFrame, parent: pd.DataFrame, cols: list[str], file: str, what: str) -> list[Problem]:
    keys = pd.MultiIndex.from_frame(parent[cols])
    absent = ~pd.MultiIndex.from_frame(child[cols]).isin(keys)
    return [
        Problem(file, int(line), None, f"{what} {'/'.join(str(v) for v in vals)} does not exist")
        for line, vals in zip(child.loc[absent, LINE], child.loc[absent, cols].itertuples(index=False))
    ]


def _check_references(f: dict[str, pd.DataFrame], mapping: Mapping) -> list[Problem]:
    mp = ["course", "presentation"]
    student = [*mp, "student_id"]
    file = {t.name: mapping.table(t.name).file for t in TABLES}
    learners, registrations = file["learners"], file["registrations"]
    problems = []
    for name in ("assessments", "learners"):
        problems += _missing_refs(f[name], f["presentations"], mp, file[name], f"course presentation (in {file['presentations']})")
    problems += _missing_refs(f["registrations"], f["learners"], student, registrations, f"student (in {learners})")
    problems += _missing_refs(f["learners"], f["registrations"], student, learners, f"registration (in {registrations}) for student")
    sa = f["submissions"]
    problems += _missing_refs(sa, f["assessments"], ["assessment_id"], file["submissions"], f"assessment (in {file['assessments']})")
    known = sa.merge(f["assessments"][["assessment_id", *mp]], on="assessment_id")
    problems += _missing_refs(known, f["learners"], student, file["submissions"], "student registered on the assessment's presentation (course/presentation/student)")
    return problems


def load_tables(directory: str | os.PathLike, mapping: Mapping | str | os.PathLike | None = None) -> Tables:
    """Read and validate a campus's export in ``directory`` as contract tables.

    ``mapping`` is a :class:`~federation.mapping.Mapping` or the path of a
    mapping file; None reads the OULAD release.

    Returns
    -------
    Tables
        Typed frames under contract names; integer columns are ``Int64`` with ``<NA>`` for missing.

    Raises
    ------
    MappingError
        When the mapping file cannot be used.
    DataError
        Naming every problem found (missing file or column, wrong type, value
        out of range, unparseable date, broken reference, conflicting duplicate,
        bad encoding, delimiter or field count), each with the export's file,
        line, column and value.
    """
    directory = Path(directory)
    if not isinstance(mapping, Mapping):
        mapping = load_mapping(mapping)
    absent = [name for name in mapping.files() if not (directory / name).is_file()]
    if absent:
        raise DataError([Problem(f, None, None, f"file not found in {directory}") for f in absent],
                        hint=HOW_TO_GET_DATA if mapping == load_mapping() else "")
    frames, problems, notes, missing = {}, [], [], []
    for table in TABLES:
        frame, found, counts = _read_table(directory, mapping, table, frames)
        missing += counts
        if not found:
            frame, found = _deduplicate(frame, table, mapping.table(table.name).file, notes)
        frames[table.name] = frame
        problems += found
    frames["presentations"] = frames["presentations"].drop(columns=[START], errors="ignore")  # used while reading
    missingness = pd.DataFrame(missing)
    if problems:
        raise DataError(problems, missingness=missingness)
    problems = _check_references(frames, mapping)
    if problems:
        raise DataError(problems, missingness=missingness)
    return Tables(frames, directory, mapping, notes, missingness)


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


def file_hashes(directory: Path, mapping: Mapping | None = None) -> dict[str, str]:
    """SHA-256 of each file of the export ``mapping`` reads (OULAD's when None), for run manifests."""
    files = (mapping or load_mapping()).files()
    return {name: hashlib.sha256((directory / name).read_bytes()).hexdigest() for name in files}


def dataset_id(directory: Path, mapping: Mapping | None = None) -> str:
    """The identity a campus's privacy ledger keys its releases by: SHA-256 over :func:`file_hashes`
    (the same for DP-SGD updates and DP statistics, so that both spend one budget)."""
    return hashlib.sha256(json.dumps(file_hashes(directory, mapping), sort_keys=True).encode()).hexdigest()


def campus_of(learners: pd.DataFrame, campus_by: str, shards: int = 0) -> pd.Series:
    """The campus of each learners row.

    ``module``: its ``course`` (7 campuses in OULAD); ``region``: its
    ``region`` (13); ``shard``: ``S000`` ... one of ``shards`` campuses chosen by a
    hash (CRC-32) of ``student_id``, so all of a student's rows share a campus
    (used to study how a federation scales with many small campuses).
    """
    if campus_by == "shard":
        if shards < 1:
            raise ValueError(f"campus-by shard needs shards >= 1, got {shards}")
        codes = [zlib.crc32(str(s).encode()) % shards for s in learners["student_id"]]
        return pd.Series([f"S{c:03d}" for c in codes], index=learners.index)
    return learners[CAMPUS_COLUMNS[campus_by]]


def campus_names(tables: Tables, campus_by: str, shards: int = 0) -> list[str]:
    """Sorted names of the campuses that hold at least one registration."""
    return sorted(campus_of(tables["learners"], campus_by, shards).unique())


def campus_slice(tables: Tables, campus_by: str, campus: str, shards: int = 0) -> Tables:
    """Only ``campus``'s rows of every table: what that campus would hold itself."""
    learners = tables["learners"]
    return _own_rows(tables, learners[campus_of(learners, campus_by, shards) == campus])


def campus_slices(tables: Tables, campus_by: str, shards: int = 0) -> dict[str, Tables]:
    """Every campus's :func:`campus_slice`, by campus name in sorted order (each row's campus computed once)."""
    learners = tables["learners"]
    campus = campus_of(learners, campus_by, shards)
    return {name: _own_rows(tables, learners[campus == name]) for name in sorted(campus.unique())}


def _own_rows(tables: Tables, learners: pd.DataFrame) -> Tables:
    f = tables.frames
    mp = ["course", "presentation"]
    student = [*mp, "student_id"]
    presentations = f["presentations"].merge(learners[mp].drop_duplicates(), on=mp)
    assessments = f["assessments"].merge(presentations[mp], on=mp)
    subs = f["submissions"].merge(assessments[["assessment_id", *mp]], on="assessment_id").merge(learners[student], on=student)
    frames = {
        "presentations": presentations,
        "assessments": assessments,
        "learners": learners,
        "registrations": f["registrations"].merge(learners[student], on=student),
        "submissions": subs[[*f["submissions"].columns]],
    }
    return Tables({k: v.reset_index(drop=True) for k, v in frames.items()}, tables.source, tables.mapping)


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
