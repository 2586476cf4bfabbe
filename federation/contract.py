"""The learner-record data contract: its tables and fields, the features' names and bounds, and their protobuf form.

The contract (``protos/learner.proto``, package ``edufl.contract.v1``) says what
a campus's data must hold about each student in a course presentation: a small
core (the presentation, the learner and the outcome, the registration) and
optional modules, each provided only by a campus that has its data: module
``assessments`` (assessments, due day and weight, and submissions, day and
score), ``engagement`` (contract 1.1: the online resources of each presentation
and the student's daily clicks on them), ``terms`` (contract 1.2: units enrolled
in and approved and the grade of each term) and ``attributes`` (contract 1.3:
extra attributes of each registration, such as an admission grade). A campus
maps its own export to these tables with a mapping file
(:mod:`federation.mapping`); everything after loading, the feature pipeline
included, reads only the contract's names.

What the contract leaves to each federation, its federation schema fixes
(:mod:`federation.schema`): the vocabulary of every categorical field, the
outcomes and what they mean, the extra attributes and the modules the tasks
use. The fields' names follow the Open University Learning Analytics Dataset
(Kuzilek, Hlosta and Zdrahal, Scientific Data 4, 170171, 2017), renamed to
system-neutral terms; OULAD's vocabularies are its schema, not the contract's.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

import pandas as pd
from google.protobuf.message import Message

from .proto import learner_pb2 as pb

__all__ = [
    "ASSESSMENTS",
    "ASSESSMENTS_MODULE",
    "ATTRIBUTES",
    "ATTRIBUTES_MODULE",
    "ATTRIBUTES_SINCE",
    "CATEGORICAL_FEATURES",
    "CONTRACT_VERSION",
    "Column",
    "ENGAGEMENT",
    "EVENTS",
    "LEARNERS",
    "NUMERIC_FEATURES",
    "OPTIONAL_MODULES",
    "PRESENTATIONS",
    "PRE_START_DAYS",
    "PRIVACY_UNIT",
    "PRIVACY_UNIT_SHORT",
    "REGISTRATIONS",
    "RESOURCES",
    "SUBMISSIONS",
    "TABLE",
    "TABLES",
    "TERMS",
    "TERMS_MODULE",
    "TERMS_SINCE",
    "Table",
    "from_proto",
    "parse_version",
    "supports",
    "to_proto",
    "version_text",
]

CONTRACT_VERSION = (1, 3)
"""(major, minor) of the learner-record contract this code reads; the major is the protobuf package's ``v1``."""
PRIVACY_UNIT_SHORT = "one registration row"
PRIVACY_UNIT = (
    f"{PRIVACY_UNIT_SHORT} (a student in one module presentation). edufl reports this "
    "registration-level ε. A student registered in k presentations on one campus has k rows; "
    "rows per student are not bounded, so a student-level guarantee follows only by group "
    "privacy: (k·ε, k·exp((k-1)·ε)·δ)."
)
"""What every ε edufl reports protects: one row of the contract's ``registrations`` table (short and long form)."""


def version_text(version: tuple[int, int]) -> str:
    return f"{version[0]}.{version[1]}"


def parse_version(text: str) -> tuple[int, int]:
    """``"1.0"`` -> ``(1, 0)``; ValueError for anything else."""
    major, dot, minor = str(text).partition(".")
    if not (major.isdigit() and (not dot or minor.isdigit())):
        raise ValueError(f'contract version {text!r} is not MAJOR.MINOR (e.g. "1.0")')
    return int(major), int(minor or 0)


def supports(run: tuple[int, int], data: tuple[int, int]) -> bool:
    """Whether code reading contract ``run`` can read data mapped to contract ``data``:
    the same major version and no newer minor version (fields are only added within a major)."""
    return data[0] == run[0] and data[1] <= run[1]


@dataclass(frozen=True)
class Column:
    """One column of a table.

    ``kind`` is ``"str"`` (free text), ``"int"`` (whole number), ``"float"``
    (number) or ``"cat"`` (one of ``vocab``).
    ``low``/``high`` bound numbers (inclusive); ``positive`` requires > 0.
    """

    name: str
    kind: str
    nullable: bool = False
    low: float | None = None
    high: float | None = None
    positive: bool = False
    vocab: tuple[str, ...] = ()


@dataclass(frozen=True)
class Table:
    """One contract table: its columns (named as the fields of the protobuf message ``message``) and primary key."""

    name: str
    message: str
    columns: tuple[Column, ...]
    key: tuple[str, ...]
    module: str = "core"


_COURSE = Column("course", "str")
_PRESENTATION = Column("presentation", "str")
_STUDENT = Column("student_id", "int", low=0)
_DAY_LOW, _DAY_HIGH = -1000, 1000

ASSESSMENTS_MODULE = "assessments"
"""The optional contract module of assessments and their submissions: tables :data:`ASSESSMENTS`, :data:`SUBMISSIONS`."""
TERMS_MODULE = "terms"
"""The optional contract module of term-level study (contract 1.2): table :data:`TERMS`, the curricular units
enrolled in and approved and the mean grade of each registration in each term."""
TERMS_SINCE = (1, 2)
"""The contract version that added module terms, the ``Studying`` outcome and the nullable learner attributes."""
ENGAGEMENT = "engagement"
"""The optional contract module of online engagement: tables :data:`RESOURCES` and :data:`EVENTS`."""
ATTRIBUTES_MODULE = "attributes"
"""The optional contract module of extra registration attributes (contract 1.3): table :data:`ATTRIBUTES`, whose
columns besides the key are the attributes the federation schema declares (admission grade, scholarship, ...)."""
ATTRIBUTES_SINCE = (1, 3)
"""The contract version that added module attributes and moved the vocabularies to the federation schema."""
OPTIONAL_MODULES = (ASSESSMENTS_MODULE, ENGAGEMENT, TERMS_MODULE, ATTRIBUTES_MODULE)
PRE_START_DAYS = 365
"""How many days before its presentation's start an engagement event may be dated."""

PRESENTATIONS = Table(
    "presentations",
    "Presentation",
    (_COURSE, _PRESENTATION, Column("length_days", "int", nullable=True, positive=True, high=1000)),
    key=("course", "presentation"),
)
ASSESSMENTS = Table(
    "assessments",
    "Assessment",
    (
        Column("assessment_id", "int", low=0),
        _COURSE,
        _PRESENTATION,
        Column("assessment_type", "cat"),
        Column("due_day", "int", nullable=True, low=_DAY_LOW, high=_DAY_HIGH),
        Column("weight", "float", low=0, high=100),
    ),
    key=("assessment_id",),
    module=ASSESSMENTS_MODULE,
)
LEARNERS = Table(
    "learners",
    "Learner",
    (
        _COURSE,
        _PRESENTATION,
        _STUDENT,
        Column("gender", "cat", nullable=True),
        Column("region", "cat", nullable=True),
        Column("highest_education", "cat", nullable=True),
        Column("imd_band", "cat", nullable=True),
        Column("age_band", "cat", nullable=True),
        Column("prev_attempts", "int", nullable=True, low=0, high=100),
        Column("studied_credits", "int", nullable=True, positive=True, high=1000),
        Column("disability", "cat", nullable=True),
        Column("final_result", "cat"),
    ),
    key=("course", "presentation", "student_id"),
)
REGISTRATIONS = Table(
    "registrations",
    "Registration",
    (
        _COURSE,
        _PRESENTATION,
        _STUDENT,
        Column("registration_day", "int", nullable=True, low=_DAY_LOW, high=_DAY_HIGH),
        Column("unregistration_day", "int", nullable=True, low=_DAY_LOW, high=_DAY_HIGH),
    ),
    key=("course", "presentation", "student_id"),
)
SUBMISSIONS = Table(
    "submissions",
    "Submission",
    (
        Column("assessment_id", "int", low=0),
        _STUDENT,
        Column("submission_day", "int", low=_DAY_LOW, high=_DAY_HIGH),
        Column("banked", "int", low=0, high=1),
        Column("score", "float", nullable=True, low=0, high=100),
    ),
    key=("assessment_id", "student_id"),
    module=ASSESSMENTS_MODULE,
)

RESOURCES = Table(
    "resources",
    "Resource",
    (Column("site_id", "int", low=0), _COURSE, _PRESENTATION, Column("activity_type", "cat")),
    key=("site_id",),
    module=ENGAGEMENT,
)
EVENTS = Table(
    "events",
    "EngagementEvent",
    (
        _COURSE,
        _PRESENTATION,
        _STUDENT,
        Column("site_id", "int", low=0),
        Column("day", "int", low=-PRE_START_DAYS, high=_DAY_HIGH),
        Column("clicks", "int", positive=True, high=1_000_000),
    ),
    key=(),  # one row per student, site and day in OULAD, but a repeated row is a further visit, not a clash
    module=ENGAGEMENT,
)

TERMS = Table(
    "terms",
    "Term",
    (
        _COURSE,
        _PRESENTATION,
        _STUDENT,
        Column("term", "int", low=1, high=20),
        Column("units_enrolled", "int", nullable=True, low=0, high=100),
        Column("units_approved", "int", nullable=True, low=0, high=100),
        Column("grade", "float", nullable=True, low=0, high=1000),
        Column("grade_max", "float", nullable=True, positive=True, high=1000),
    ),
    key=("course", "presentation", "student_id", "term"),
    module=TERMS_MODULE,
)

ATTRIBUTES = Table(
    "attributes",
    "Attribute",
    (_COURSE, _PRESENTATION, _STUDENT),  # and one column per attribute of the federation schema
    key=("course", "presentation", "student_id"),
    module=ATTRIBUTES_MODULE,
)

TABLES: tuple[Table, ...] = (
    PRESENTATIONS,
    ASSESSMENTS,
    LEARNERS,
    REGISTRATIONS,
    SUBMISSIONS,
    TERMS,
    ATTRIBUTES,
    RESOURCES,
    EVENTS,
)
TABLE = {t.name: t for t in TABLES}

# --- Feature contract -------------------------------------------------------
# Categorical features are one-hot encoded over the federation schema's vocabularies, with one extra
# "missing" slot. Numeric features are clipped to [low, high] and scaled to [0, 1] with fixed bounds:
# these, unless the federation schema's `scaling` sets others.
CATEGORICAL_FEATURES = ("gender", "region", "highest_education", "imd_band", "age_band", "disability")
"""The learner fields one-hot encoded as features, over the federation schema's vocabulary of each."""
NUMERIC_FEATURES: dict[str, tuple[float, float]] = {
    "prev_attempts": (0, 6),
    "studied_credits": (0, 360),
    "registration_day": (-365, 180),
    "registration_missing": (0, 1),
    "n_assessments_due": (0, 12),
    "n_submitted": (0, 20),
    "submitted_fraction_of_due": (0, 1),
    "n_late": (0, 12),
    "n_missing_due": (0, 12),
    "mean_score": (0, 100),
    "weighted_score": (0, 100),
    "no_score_yet": (0, 1),
    "n_banked": (0, 12),
    "assessments_absent": (0, 1),
    "term1_units_enrolled": (0, 12),
    "term1_units_approved": (0, 12),
    "term1_approved_share": (0, 1),
    "term1_grade": (0, 1),
    "terms_absent": (0, 1),
}


# --- Protobuf form ----------------------------------------------------------
def _field_value(value: Any, col: Column) -> bool | int | float | str:
    if col.kind == "int":
        return bool(value) if col.name == "banked" else int(value)
    return float(value) if col.kind == "float" else str(value)


_M = TypeVar("_M", bound=Message)


def _message(cls: type[_M], row: dict[str, Any], table: Table) -> _M:
    return cls(**{c.name: _field_value(row[c.name], c) for c in table.columns if not pd.isna(row[c.name])})


def _frame(messages: Iterable[Any], table: Table) -> pd.DataFrame:
    rows = [
        {c.name: (_field_value(getattr(m, c.name), c) if not c.nullable or m.HasField(c.name) else None) for c in table.columns}
        for m in messages
    ]
    frame = pd.DataFrame(rows, columns=[c.name for c in table.columns])
    for c in table.columns:
        frame[c.name] = frame[c.name].astype("Int64" if c.kind == "int" else "float64" if c.kind == "float" else "str")
    return frame


def _records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    return [{str(k): v for k, v in r.items()} for r in frame.to_dict("records")]


def _by_learner(frame: pd.DataFrame, cls: type[_M], table: Table) -> dict[tuple[Any, ...], list[_M]]:
    grouped: dict[tuple[Any, ...], list[_M]] = {}
    for r in _records(frame):
        grouped.setdefault(tuple(r[k] for k in LEARNERS.key), []).append(_message(cls, r, table))
    return grouped


def _attributes(frame: pd.DataFrame) -> dict[tuple[Any, ...], list[pb.Attribute]]:
    """Each registration's known attributes (table ``attributes``: a text value is a label, any other a number)."""
    names = [str(c) for c in frame.columns if c not in ATTRIBUTES.key and not str(c).startswith("_")]
    return {
        tuple(r[k] for k in ATTRIBUTES.key): [
            pb.Attribute(name=n, label=r[n]) if isinstance(r[n], str) else pb.Attribute(name=n, number=float(r[n]))
            for n in names
            if not pd.isna(r[n])
        ]
        for r in _records(frame)
    }


def to_proto(frames: dict[str, pd.DataFrame]) -> pb.CampusData:
    """A campus's contract tables (keyed by :data:`TABLE` name) as one ``edufl.contract.v1.CampusData`` message:
    presentations, assessments, resources (module engagement), and one ``LearnerRecord`` per learner with its
    registration, submissions, terms (module terms), attributes (module attributes) and engagement events."""

    def rows(name: str) -> list[dict[str, Any]]:
        return _records(frames[name][[c.name for c in TABLE[name].columns]]) if name in frames else []

    key = list(LEARNERS.key)
    registration = {tuple(r[k] for k in key): r for r in rows("registrations")}
    submissions = {}
    if "assessments" in frames:
        where = frames["assessments"][["assessment_id", "course", "presentation"]]
        submissions = _by_learner(frames["submissions"].merge(where, on="assessment_id"), pb.Submission, SUBMISSIONS)
    events = _by_learner(frames["events"], pb.EngagementEvent, EVENTS) if "events" in frames else {}
    terms = _by_learner(frames["terms"], pb.Term, TERMS) if "terms" in frames else {}
    attributes = _attributes(frames["attributes"]) if "attributes" in frames else {}
    records = [
        pb.LearnerRecord(
            learner=_message(pb.Learner, r, LEARNERS),
            registration=_message(pb.Registration, registration[k], REGISTRATIONS),
            submissions=submissions.get(k, []),
            events=events.get(k, []),
            terms=terms.get(k, []),
            attributes=attributes.get(k, []),
        )
        for r in rows("learners")
        for k in [tuple(r[c] for c in key)]
    ]
    return pb.CampusData(
        version=pb.ContractVersion(major=CONTRACT_VERSION[0], minor=CONTRACT_VERSION[1]),
        presentations=[_message(pb.Presentation, r, PRESENTATIONS) for r in rows("presentations")],
        assessments=[_message(pb.Assessment, r, ASSESSMENTS) for r in rows("assessments")],
        records=records,
        resources=[_message(pb.Resource, r, RESOURCES) for r in rows("resources")],
    )


def from_proto(data: pb.CampusData) -> dict[str, pd.DataFrame]:
    """The contract tables (DataFrames by table name) held in a ``CampusData`` message (inverse of :func:`to_proto`;
    the tables of a module only when the message holds its rows: ``assessments`` and ``submissions`` when
    it has assessments, ``terms`` when a record has terms, ``attributes`` (one column per attribute name, NaN where
    unknown) when a record has attributes, ``resources`` and ``events`` when it has resources).

    Raises
    ------
    ValueError
        When the message's contract version is not one this code reads (:func:`supports`).
    """
    version = (data.version.major, data.version.minor)
    if not supports(CONTRACT_VERSION, version):
        raise ValueError(
            f"data follow learner-record contract {version_text(version)}; "
            f"this edufl reads contract {version_text(CONTRACT_VERSION)}"
        )
    frames = {
        "presentations": _frame(data.presentations, PRESENTATIONS),
        "learners": _frame([r.learner for r in data.records], LEARNERS),
        "registrations": _frame([r.registration for r in data.records], REGISTRATIONS),
    }
    if data.assessments:
        frames["assessments"] = _frame(data.assessments, ASSESSMENTS)
        frames["submissions"] = _frame([s for r in data.records for s in r.submissions], SUBMISSIONS)
    if any(r.terms for r in data.records):
        frames["terms"] = _frame([t for r in data.records for t in r.terms], TERMS)
    if any(r.attributes for r in data.records):
        frames["attributes"] = pd.DataFrame(
            [
                {
                    **{k: getattr(r.learner, k) for k in ATTRIBUTES.key},
                    **{a.name: getattr(a, str(a.WhichOneof("value"))) for a in r.attributes},
                }
                for r in data.records
            ]
        )
    if data.resources:
        frames["resources"] = _frame(data.resources, RESOURCES)
        frames["events"] = _frame([e for r in data.records for e in r.events], EVENTS)
    return frames
