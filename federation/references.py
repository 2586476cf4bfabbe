"""References between the contract tables: every key a row points at must exist in the table it names."""

from __future__ import annotations

import pandas as pd

from .mapping import Mapping
from .problems import Problem
from .reading import LINE

__all__ = ["check_references"]


def _missing_refs(child: pd.DataFrame, parent: pd.DataFrame, cols: list[str], file: str, what: str) -> list[Problem]:
    keys = pd.MultiIndex.from_frame(parent[cols])
    absent = ~pd.MultiIndex.from_frame(child[cols]).isin(keys)
    return [
        Problem(file, int(line), None, f"{what} {'/'.join(str(v) for v in vals)} does not exist")
        for line, vals in zip(child.loc[absent, LINE], child.loc[absent, cols].itertuples(index=False), strict=True)
    ]


def check_references(f: dict[str, pd.DataFrame], mapping: Mapping) -> list[Problem]:
    """Every row of the typed tables ``f`` that points at a row missing from another table: an assessment or
    learner of an unknown presentation, a registration without its learner row (and the reverse), a
    submission of an unknown assessment or of a student not registered on its presentation, a resource of an
    unknown presentation, a term of a student not registered
    (the click log's references: :func:`federation.engagement.check_events`)."""
    mp = ["course", "presentation"]
    student = [*mp, "student_id"]
    file = {t.name: mapping.table(t.name).file for t in mapping.tables()}
    learners, registrations = file["learners"], file["registrations"]
    problems = []
    for name in [n for n in ("assessments", "learners", "resources") if n in f]:
        problems += _missing_refs(
            f[name], f["presentations"], mp, file[name], f"course presentation (in {file['presentations']})"
        )
    problems += _missing_refs(f["registrations"], f["learners"], student, registrations, f"student (in {learners})")
    problems += _missing_refs(
        f["learners"], f["registrations"], student, learners, f"registration (in {registrations}) for student"
    )
    if "terms" in f:
        problems += _missing_refs(f["terms"], f["learners"], student, file["terms"], f"student (in {learners})")
    if "submissions" not in f:
        return problems
    sa = f["submissions"]
    problems += _missing_refs(
        sa, f["assessments"], ["assessment_id"], file["submissions"], f"assessment (in {file['assessments']})"
    )
    known = sa.merge(f["assessments"][["assessment_id", *mp]], on="assessment_id")
    problems += _missing_refs(
        known,
        f["learners"],
        student,
        file["submissions"],
        "student registered on the assessment's presentation (course/presentation/student)",
    )
    return problems
