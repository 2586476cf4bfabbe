"""Mapping a campus's own export to the learner-record contract.

A mapping is a TOML file kept by the campus. For each contract table
(:data:`federation.contract.TABLES`) it names the file of the export that holds
it and, for every contract column, the export's column; it may recode values
(integer codes, other labels), declare other missing-value markers, another
delimiter or encoding, and day fields given as calendar dates. The OULAD
release is one such mapping, shipped with edufl (``federation/mappings/oulad.toml``)::

    contract_version = "1.0"          # the contract the mapping was written for
    delimiter = ";"                   # defaults for every file (each table may override)
    encoding = "utf-8"                # a byte-order mark is always accepted
    missing = ["", "NA"]              # cell values read as missing
    date_format = "%d/%m/%Y"          # for columns listed in a table's `dates`
    start_date = "start"              # presentations file column holding each presentation's start date

    [learners]
    file = "students.csv"
    columns = { course = "module", student_id = "student_no", gender = "sex", ... }
    codes.gender = { "1" = "F", "2" = "M" }   # export value -> contract label; other values pass unchanged

    [registrations]
    file = "enrolments.csv"
    columns = { ..., registration_day = "enrolled_on" }
    dates = ["registration_day"]      # calendar dates, turned into days since the presentation's start

Parquet files (``.parquet``) are read with their own column types; delimiter
and encoding then do not apply.

Optional modules are declared by giving their tables; a mapping without them
provides none of their data (nothing is made up for it). The core is
``presentations``, ``learners`` and ``registrations``; module ``assessments`` is
the pair ``assessments`` and ``submissions``; module ``engagement``
(contract 1.1) is the pair of tables ``resources`` (each online resource of a
presentation and its activity type) and ``events`` (a student's clicks on one
resource on one day)::

    [resources]
    file = "vle.csv"
    columns = { site_id = "id_site", course = "code_module", presentation = "code_presentation", activity_type = "activity_type" }

    [events]
    file = "studentVle.parquet"       # or the CSV; read column by column (millions of rows)
    columns = { course = "code_module", presentation = "code_presentation", student_id = "id_student",
                site_id = "id_site", day = "date", clicks = "sum_click" }

Events give days as day counts (``dates`` and ``codes`` do not apply to them).
"""

from __future__ import annotations

import codecs
import os
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path

import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .contract import (
    ASSESSMENTS_MODULE,
    ATTRIBUTES,
    ATTRIBUTES_MODULE,
    ATTRIBUTES_SINCE,
    CONTRACT_VERSION,
    ENGAGEMENT,
    TABLES,
    TERMS_MODULE,
    TERMS_SINCE,
    Table,
    parse_version,
    supports,
    version_text,
)
from .errors import UserError
from .tomlfile import load_model

__all__ = [
    "CONTRACT_PARQUET",
    "DAY_COLUMNS",
    "ENGAGEMENT_SINCE",
    "Bins",
    "Mapping",
    "MappingError",
    "OULAD_MAPPING",
    "TableMapping",
    "load_mapping",
    "parquet_layout",
]

OULAD_MAPPING = Path(__file__).parent / "mappings" / "oulad.toml"
CONTRACT_PARQUET = Path(__file__).parent / "mappings" / "contract-parquet.toml"
ENGAGEMENT_SINCE = (1, 1)
"""The contract version that added module engagement (mappings written for 1.0 read as before)."""
DAY_COLUMNS = frozenset({"due_day", "registration_day", "unregistration_day", "submission_day"})


def _format_problems(prefix: str, delimiter: str | None, encoding: str | None) -> list[str]:
    problems = []
    if delimiter is not None and len(delimiter) != 1:
        problems.append(f"{prefix}delimiter: {delimiter!r} must be one character")
    if encoding is not None:
        try:
            codecs.lookup(encoding)
        except LookupError:
            problems.append(f"{prefix}encoding: unknown encoding {encoding!r}")
    return problems


class MappingError(UserError):
    """A mapping file that cannot be used; the message names the file and the offending key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Bins(_Strict):
    """Value binning of one field: a number ``x`` of the export becomes ``labels[i]`` where ``i`` is the count of
    ``edges`` at or below ``x`` (``x < edges[0]``: ``labels[0]``; ``x >= edges[-1]``: the last label)."""

    edges: tuple[float, ...] = Field(min_length=1)
    labels: tuple[str, ...]

    @model_validator(mode="after")
    def _fits(self) -> Bins:
        if any(b <= a for a, b in zip(self.edges, self.edges[1:], strict=False)):
            raise ValueError(f"edges {list(self.edges)} must increase")
        if len(self.labels) != len(self.edges) + 1:
            raise ValueError(f"{len(self.edges)} edges make {len(self.edges) + 1} bins; {len(self.labels)} labels given")
        return self


class TableMapping(_Strict):
    """Where one contract table comes from (see the module docstring): its file, the export column of each
    contract field (a nullable field may be left out: missing in every row), fixed values (``constants``),
    recodings (``codes``), binning (``bins``), day fields given as dates (``dates``) and a row filter (``keep``)."""

    file: str
    columns: dict[str, str]
    constants: dict[str, str | int | float] = {}
    keep: dict[str, tuple[str | int, ...]] = {}
    codes: dict[str, dict[str, str]] = {}
    bins: dict[str, Bins] = {}
    dates: tuple[str, ...] = ()
    delimiter: str | None = None
    encoding: str | None = None
    missing: tuple[str, ...] | None = None

    def kept(self) -> dict[str, frozenset[str]]:
        """The row filter: export column -> the values (as text) a row must hold in it to be read."""
        return {column: frozenset(str(v) for v in values) for column, values in self.keep.items()}


class Mapping(_Strict):
    """A campus export's mapping to the contract; tables by contract name, plus file-format defaults."""

    contract_version: str
    description: str = ""
    delimiter: str = ","
    encoding: str = "utf-8"
    missing: tuple[str, ...] = ("",)
    date_format: str = "%Y-%m-%d"
    start_date: str | None = None
    presentations: TableMapping
    assessments: TableMapping | None = None
    learners: TableMapping
    registrations: TableMapping
    submissions: TableMapping | None = None
    terms: TableMapping | tuple[TableMapping, ...] | None = None
    attributes: TableMapping | tuple[TableMapping, ...] | None = None
    resources: TableMapping | None = None
    events: TableMapping | None = None

    @field_validator("contract_version")
    @classmethod
    def _readable_version(cls, value: str) -> str:
        version = parse_version(value)
        if not supports(CONTRACT_VERSION, version):
            raise ValueError(
                f"this edufl reads learner-record contract {version_text(CONTRACT_VERSION)}; the mapping was written for {value}"
            )
        return value

    @model_validator(mode="after")
    def _complete(self) -> Mapping:
        problems = _format_problems("", self.delimiter, self.encoding)
        if (self.assessments is None) != (self.submissions is None):
            problems.append(f"assessments, submissions: module {ASSESSMENTS_MODULE} needs both tables (or neither)")
        if (self.resources is None) != (self.events is None):
            problems.append(f"resources, events: module {ENGAGEMENT} needs both tables (or neither)")
        if self.events is not None and parse_version(self.contract_version) < ENGAGEMENT_SINCE:
            problems.append(
                f"contract_version: module {ENGAGEMENT} (tables resources, events) is part of contract "
                f'{version_text(ENGAGEMENT_SINCE)} on; set contract_version = "{version_text(ENGAGEMENT_SINCE)}"'
            )
        if self.terms is not None and parse_version(self.contract_version) < TERMS_SINCE:
            problems.append(
                f"contract_version: module {TERMS_MODULE} (table terms) is part of contract "
                f'{version_text(TERMS_SINCE)} on; set contract_version = "{version_text(TERMS_SINCE)}"'
            )
        if self.attributes is not None and parse_version(self.contract_version) < ATTRIBUTES_SINCE:
            problems.append(
                f"contract_version: module {ATTRIBUTES_MODULE} (table attributes) is part of contract "
                f'{version_text(ATTRIBUTES_SINCE)} on; set contract_version = "{version_text(ATTRIBUTES_SINCE)}"'
            )
        if self.events is not None and (self.events.codes or self.events.dates or self.events.bins or self.events.keep):
            problems.append("events: codes, bins, dates and keep do not apply to events; give day counts and numbers")
        for table in self.tables():
            parts = self.parts(table.name)
            for i, given in enumerate(parts):
                problems += _table_problems(table, given, table.name if len(parts) == 1 else f"{table.name}[{i}]")
        if any(p.dates for t in self.tables() for p in self.parts(t.name)) and not self.start_date:
            problems.append(
                "start_date: day columns are given as dates, so the presentations file must have a start-date column, named here"
            )
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def parts(self, name: str) -> tuple[TableMapping, ...]:
        """The parts contract table ``name`` is read from, in order (one, or those of a ``[[name]]`` array,
        whose rows are concatenated); KeyError when the mapping does not provide it."""
        found: TableMapping | tuple[TableMapping, ...] | None = getattr(self, name)
        if found is None:
            raise KeyError(f"the mapping provides no table {name}")
        return found if isinstance(found, tuple) else (found,)

    def table(self, name: str) -> TableMapping:
        """The mapping of contract table ``name`` (its first part); KeyError when the mapping does not provide it."""
        return self.parts(name)[0]

    def tables(self) -> tuple[Table, ...]:
        """The contract tables this mapping provides, in contract order (the core's and those of its modules)."""
        return tuple(t for t in TABLES if getattr(self, t.name) is not None)

    @property
    def modules(self) -> frozenset[str]:
        """The optional contract modules the mapping provides (e.g. ``{"engagement"}``)."""
        return frozenset(t.module for t in self.tables()) - {"core"}

    def files(self) -> list[str]:
        """The export's file names, each once, in contract table order."""
        return list(dict.fromkeys(p.file for t in self.tables() for p in self.parts(t.name)))

    @property
    def version(self) -> tuple[int, int]:
        return parse_version(self.contract_version)


def _table_problems(table: Table, given: TableMapping, where: str) -> list[str]:
    """What is wrong with the mapping ``given`` of contract ``table`` (``where``: its key in the file). The
    fields of table ``attributes`` beyond its key are the federation schema's, checked when the data are read
    against it (:func:`federation.tables.load_tables`), as are the labels of ``codes`` and ``bins``."""
    columns = {c.name: c for c in table.columns}
    problems = []
    absent = [n for n, c in columns.items() if not c.nullable and n not in given.columns and n not in given.constants]
    if absent:
        problems.append(
            f"{where}.columns: no export column given for {', '.join(absent)} "
            "(nor a constant; only nullable fields may be left out)"
        )
    if table.name != ATTRIBUTES.name:
        for key in ("columns", "constants", "codes", "bins"):
            unknown = [n for n in getattr(given, key) if n not in columns]
            if unknown:
                problems.append(f"{where}.{key}: {', '.join(unknown)} not in the contract (expected {', '.join(columns)})")
    both = sorted(set(given.columns) & set(given.constants))
    if both:
        problems.append(f"{where}.constants: {', '.join(both)} also given in columns; give each field one source")
    for name in [n for n in given.bins if n in columns and columns[n].kind != "cat"]:
        problems.append(f"{where}.bins: {name} is not a categorical field; bins turn numbers into labels")
    for name in given.dates:
        if name not in DAY_COLUMNS or name not in given.columns:
            problems.append(f"{where}.dates: {name} is not a day column of {table.name} given in columns")
    return problems + _format_problems(f"{where}.", given.delimiter, given.encoding)


def load_mapping(path: str | os.PathLike[str] | None = None) -> Mapping:
    """The mapping in the TOML file ``path`` (the OULAD mapping when None).

    Raises
    ------
    MappingError
        When the file is missing or not TOML, a contract column has no export
        column, a key is unknown, or the contract version is not one this edufl reads.
    """
    return load_model(Mapping, path, MappingError, "mapping file") if path else _oulad()


def parquet_layout(directory: Path, tables: Iterable[str] | None = None) -> Mapping:
    """The mapping of :data:`CONTRACT_PARQUET` (the contract's own tables, one Parquet file each: what
    ``edufl simulate`` gives each virtual campus) for a campus holding only the tables ``tables``, by default
    those whose file is in ``directory``: the layout has a file exactly for each table the campus has, and the
    modules it lacks have none. Table ``attributes`` reads every column of its file, each named after its attribute.

    Raises
    ------
    MappingError
        When what is left gives an optional module only in part.
    """
    full = load_mapping(CONTRACT_PARQUET)
    held = (
        set(tables)
        if tables is not None
        else {t.name for t in full.tables() if (Path(directory) / full.table(t.name).file).is_file()}
    )
    layout = {**full.model_dump(), **{t.name: None for t in full.tables() if t.name not in held}}
    if layout["attributes"] is not None and (Path(directory) / full.table("attributes").file).is_file():
        names = pq.read_schema(Path(directory) / full.table("attributes").file).names
        layout["attributes"]["columns"] = {n: n for n in names if not n.startswith("__")}
    try:
        return Mapping.model_validate(layout)
    except ValidationError as err:
        raise MappingError(f"{directory}: {'; '.join(e['msg'] for e in err.errors())}") from None


@lru_cache(maxsize=1)
def _oulad() -> Mapping:
    return load_model(Mapping, OULAD_MAPPING, MappingError, "mapping file")
