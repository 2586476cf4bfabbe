"""The data contract: the six OULAD tables and the fixed feature vocabularies.

Everything a campus needs to turn its own rows into model inputs is declared
here, once, so that every campus encodes categories and scales numbers the same
way without any raw row leaving it (no vocabulary or scaler is fitted on pooled
data). Source of the table layout: Kuzilek, Hlosta and Zdrahal, "Open
University Learning Analytics dataset", Scientific Data 4, 170171 (2017).
"""

from __future__ import annotations

from dataclasses import dataclass, field

MISSING_MARKERS = frozenset({"", "?"})
"""Cell values read as missing: OULAD writes ``?`` in some files and blanks in others."""


@dataclass(frozen=True)
class Column:
    """One column of a table.

    ``kind`` is ``"str"`` (free text), ``"int"`` (whole number), ``"float"``
    (number) or ``"cat"`` (one of ``vocab``, after ``aliases`` are applied).
    ``low``/``high`` bound numbers (inclusive); ``positive`` requires > 0.
    """

    name: str
    kind: str
    nullable: bool = False
    low: float | None = None
    high: float | None = None
    positive: bool = False
    vocab: tuple[str, ...] = ()
    aliases: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Table:
    """One CSV file: its columns, primary key and expected row count in the official release."""

    file: str
    columns: tuple[Column, ...]
    key: tuple[str, ...]
    release_rows: int

    @property
    def name(self) -> str:
        return self.file.removesuffix(".csv")


_MODULE = Column("code_module", "str")
_PRESENTATION = Column("code_presentation", "str")
_STUDENT = Column("id_student", "int", low=0)
_DAY = {"low": -1000, "high": 1000}

GENDER = ("F", "M")
REGIONS = (
    "East Anglian Region", "East Midlands Region", "Ireland", "London Region",
    "North Region", "North Western Region", "Scotland", "South East Region",
    "South Region", "South West Region", "Wales", "West Midlands Region",
    "Yorkshire Region",
)
EDUCATION = (
    "No Formal quals", "Lower Than A Level", "A Level or Equivalent",
    "HE Qualification", "Post Graduate Qualification",
)
IMD_BANDS = (
    "0-10%", "10-20%", "20-30%", "30-40%", "40-50%",
    "50-60%", "60-70%", "70-80%", "80-90%", "90-100%",
)
AGE_BANDS = ("0-35", "35-55", "55<=")
DISABILITY = ("N", "Y")
FINAL_RESULTS = ("Distinction", "Fail", "Pass", "Withdrawn")
ASSESSMENT_TYPES = ("CMA", "Exam", "TMA")

COURSES = Table(
    "courses.csv",
    (_MODULE, _PRESENTATION, Column("module_presentation_length", "int", positive=True, high=1000)),
    key=("code_module", "code_presentation"),
    release_rows=22,
)
ASSESSMENTS = Table(
    "assessments.csv",
    (
        _MODULE, _PRESENTATION, Column("id_assessment", "int", low=0),
        Column("assessment_type", "cat", vocab=ASSESSMENT_TYPES),
        Column("date", "int", nullable=True, **_DAY),
        Column("weight", "float", low=0, high=100),
    ),
    key=("id_assessment",),
    release_rows=206,
)
VLE = Table(
    "vle.csv",
    (
        Column("id_site", "int", low=0), _MODULE, _PRESENTATION, Column("activity_type", "str"),
        Column("week_from", "int", nullable=True, low=0, high=100),
        Column("week_to", "int", nullable=True, low=0, high=100),
    ),
    key=("id_site",),
    release_rows=6364,
)
STUDENT_INFO = Table(
    "studentInfo.csv",
    (
        _MODULE, _PRESENTATION, _STUDENT,
        Column("gender", "cat", vocab=GENDER),
        Column("region", "cat", vocab=REGIONS),
        Column("highest_education", "cat", vocab=EDUCATION),
        # The official release writes one band as "10-20" without the percent sign.
        Column("imd_band", "cat", nullable=True, vocab=IMD_BANDS, aliases={"10-20": "10-20%"}),
        Column("age_band", "cat", vocab=AGE_BANDS),
        Column("num_of_prev_attempts", "int", low=0, high=100),
        Column("studied_credits", "int", positive=True, high=1000),
        Column("disability", "cat", vocab=DISABILITY),
        Column("final_result", "cat", vocab=FINAL_RESULTS),
    ),
    key=("code_module", "code_presentation", "id_student"),
    release_rows=32593,
)
STUDENT_REGISTRATION = Table(
    "studentRegistration.csv",
    (
        _MODULE, _PRESENTATION, _STUDENT,
        Column("date_registration", "int", nullable=True, **_DAY),
        Column("date_unregistration", "int", nullable=True, **_DAY),
    ),
    key=("code_module", "code_presentation", "id_student"),
    release_rows=32593,
)
STUDENT_ASSESSMENT = Table(
    "studentAssessment.csv",
    (
        Column("id_assessment", "int", low=0), _STUDENT,
        Column("date_submitted", "int", **_DAY),
        Column("is_banked", "int", low=0, high=1),
        Column("score", "float", nullable=True, low=0, high=100),
    ),
    key=("id_assessment", "id_student"),
    release_rows=173912,
)

TABLES: tuple[Table, ...] = (
    COURSES, ASSESSMENTS, VLE, STUDENT_INFO, STUDENT_REGISTRATION, STUDENT_ASSESSMENT,
)

# --- Feature contract -------------------------------------------------------
# Categorical features are one-hot encoded over these fixed vocabularies, with
# one extra "missing" slot where the column is nullable. Numeric features are
# clipped to [low, high] and scaled to [0, 1] with these fixed bounds.
CATEGORICAL_FEATURES: dict[str, tuple[str, ...]] = {
    "gender": GENDER,
    "region": REGIONS,
    "highest_education": EDUCATION,
    "imd_band": IMD_BANDS,
    "age_band": AGE_BANDS,
    "disability": DISABILITY,
}
NUMERIC_FEATURES: dict[str, tuple[float, float]] = {
    "num_of_prev_attempts": (0, 6),
    "studied_credits": (0, 360),
    "date_registration": (-365, 180),
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
}
