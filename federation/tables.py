"""A campus's export as validated learner-record contract tables.

A campus's export is read through its mapping (:mod:`federation.mapping`; the
OULAD release when none is given) into the contract tables of
:mod:`federation.contract`, against the federation's schema (:mod:`federation.schema`;
OULAD's when none is given): each file is read (:mod:`federation.reading`), its
values checked (:mod:`federation.validation`), then the references between the
tables (:mod:`federation.references`). Every problem found is reported at once
in one :class:`~federation.problems.DataError`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from .contract import ATTRIBUTES, EVENTS, TABLES
from .engagement import check_events, read_events
from .mapping import Mapping, MappingError, load_mapping
from .problems import DataError, Problem
from .reading import START, Headers
from .references import check_references
from .schema import FederationSchema, load_schema
from .validation import deduplicate, read_table

__all__ = ["DATA_ENV", "HOW_TO_GET_DATA", "OULAD_URL", "Tables", "load_tables"]

DATA_ENV = "EDUFL_DATA"
"""The environment variable naming the folder of the OULAD tables."""
OULAD_URL = "https://analyse.kmi.open.ac.uk/open_dataset/download"
"""Where the official OULAD release is published."""
HOW_TO_GET_DATA = (
    "How to get the OULAD tables: run `edufl data download` (fills the user cache folder), "
    f"or download anonymisedData.zip from {OULAD_URL}, unzip it and pass --data DIR "
    f"or set {DATA_ENV}=DIR."
)
"""What a :class:`DataError` about missing OULAD files suggests."""


@dataclass
class Tables:
    """The contract tables (``presentations``, ``assessments``, ``learners``, ``registrations``,
    ``submissions``, and ``resources`` and ``events`` where the mapping provides module engagement)
    as typed DataFrames, keyed by table name.

    Each frame but ``events`` (the click log, millions of rows) keeps a ``_line`` column with the row's
    line number in its export file;
    ``mapping`` is how the export in ``source`` was read, and ``schema`` the federation schema its values were
    checked against (vocabularies, attributes); ``notes`` say what was merged
    (exact duplicate rows), left out by a row filter, and which columns of each file no table reads;
    ``missingness`` (from :func:`load_tables`) counts the
    missing values of every contract field.
    """

    frames: dict[str, pd.DataFrame]
    source: Path
    mapping: Mapping = field(default_factory=load_mapping)
    schema: FederationSchema = field(default_factory=load_schema)
    notes: list[str] = field(default_factory=list)
    missingness: pd.DataFrame | None = None

    def __getitem__(self, name: str) -> pd.DataFrame:
        return self.frames[name]

    def __contains__(self, name: str) -> bool:
        return name in self.frames

    @property
    def modules(self) -> frozenset[str]:
        """The optional contract modules these tables provide (``core`` left out)."""
        return frozenset(t.module for t in TABLES if t.name in self.frames) - {"core"}


def _schema_problems(mapping: Mapping, schema: FederationSchema) -> list[str]:
    """Where ``mapping`` names what ``schema`` lacks: an attribute it does not declare, or a label of ``codes``
    or ``bins`` outside the field's vocabulary."""
    problems = []
    for table in mapping.tables():
        parts = mapping.parts(table.name)
        columns = {c.name: c for c in schema.table(table).columns}
        for i, given in enumerate(parts):
            where = table.name if len(parts) == 1 else f"{table.name}[{i}]"
            if table.name == ATTRIBUTES.name:
                for key in ("columns", "constants", "codes", "bins"):
                    unknown = [n for n in getattr(given, key) if n not in columns]
                    if unknown:
                        problems.append(
                            f"{where}.{key}: {', '.join(unknown)} not an attribute of federation schema {schema.name!r} "
                            f"(it declares {', '.join(schema.attributes) or 'none'})"
                        )
            labels = {n: spec.labels for n, spec in given.bins.items()} | {n: tuple(c.values()) for n, c in given.codes.items()}
            for name, found in labels.items():
                vocab = columns[name].vocab if name in columns and columns[name].kind == "cat" else None
                wrong = sorted({label for label in found if vocab is not None and label not in vocab})
                if wrong:
                    kind = "bins" if name in given.bins and set(wrong) & set(given.bins[name].labels) else "codes"
                    problems.append(
                        f"{where}.{kind}.{name}: {', '.join(map(repr, wrong))} not in federation schema {schema.name!r}'s "
                        f"vocabulary ({', '.join(vocab or ()) or 'none: the schema gives this field no value'})"
                    )
    return problems


def load_tables(
    directory: str | os.PathLike[str],
    mapping: Mapping | str | os.PathLike[str] | None = None,
    schema: FederationSchema | None = None,
) -> Tables:
    """Read and validate a campus's export in ``directory`` as contract tables, against a federation schema.

    ``mapping`` is a :class:`~federation.mapping.Mapping` or the path of a
    mapping file; None reads the OULAD release. ``schema`` gives each categorical field's vocabulary and the
    attributes of module attributes (OULAD's schema when None).

    Returns
    -------
    Tables
        Typed frames under contract names; integer columns are ``Int64`` with ``<NA>`` for missing.

    Raises
    ------
    MappingError
        When the mapping file cannot be used, or names an attribute or label the schema lacks.
    DataError
        Naming every problem found (missing file or column, wrong type, value
        out of range, unparseable date, broken reference, conflicting duplicate,
        bad encoding, delimiter or field count), each with the export's file,
        line, column and value.
    """
    directory = Path(directory)
    if not isinstance(mapping, Mapping):
        mapping = load_mapping(mapping)
    schema = schema or load_schema()
    if unfit := _schema_problems(mapping, schema):
        raise MappingError("the mapping does not fit the federation schema: " + "; ".join(unfit))
    absent = [name for name in mapping.files() if not (directory / name).is_file()]
    if absent:
        raise DataError(
            [Problem(f, None, None, f"file not found in {directory}") for f in absent],
            hint=HOW_TO_GET_DATA if mapping == load_mapping() else "",
        )
    frames: dict[str, pd.DataFrame] = {}
    problems: list[Problem] = []
    notes: list[str] = []
    missing: list[dict[str, str | int | float]] = []
    headers: Headers = {}
    for table in map(schema.table, mapping.tables()):
        if table.name == EVENTS.name:
            frame, found, counts = read_events(directory, mapping)
        else:
            parts = [read_table(directory, mapping, table, frames, given, headers, notes) for given in mapping.parts(table.name)]
            frame = pd.concat([p[0] for p in parts], ignore_index=True) if len(parts) > 1 else parts[0][0]
            found, counts = [x for p in parts for x in p[1]], [x for p in parts for x in p[2]]
        missing += counts
        if not found and table.key:
            frame, found = deduplicate(frame, table, mapping.table(table.name).file, notes)
        frames[table.name] = frame
        problems += found
    frames["presentations"] = frames["presentations"].drop(columns=[START], errors="ignore")  # used while reading
    for file, (header, used) in headers.items():
        unused = [h for h in header if h not in used]
        if unused:
            notes.append(f"{file}: {len(unused)} column(s) not used by the mapping: {', '.join(unused)}")
    missingness = pd.DataFrame(missing)
    if problems:
        raise DataError(problems, missingness=missingness)
    problems = check_references(frames, mapping)
    if "events" in frames and not problems:
        problems = check_events(frames["events"], frames, mapping.table("events").file, mapping.table("events").columns)
    if problems:
        raise DataError(problems, missingness=missingness)
    return Tables(frames, directory, mapping, schema, notes, missingness)
