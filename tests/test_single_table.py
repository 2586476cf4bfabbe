"""A single-table student-records export (docs/single-table-example) read with a mapping only: constants, row
filters, value binning, code tables, a table read from two parts, and module terms for task term1_dropout."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from edufl.clients.app import load_campus
from edufl.clients.node import CampusRefusal, CampusSetup
from edufl.federation.mapping import load_mapping
from edufl.federation.policy import RESEARCH_POLICY
from edufl.federation.problems import DataError
from edufl.federation.runconfig import RunConfig
from edufl.federation.tables import load_tables
from edufl.federation.tasks import early_warning, feature_names

EXAMPLE = Path(__file__).parents[1] / "docs" / "single-table-example"
MAPPING = EXAMPLE / "student_records.toml"
CAMPUSES = ("north", "south", "west")


def _rows(campus: str) -> list[dict[str, str]]:
    with (EXAMPLE / campus / "students.csv").open(newline="") as f:
        return list(csv.DictReader(f, delimiter=";"))


def test_campus_validate_accepts_each_campus_folder_and_lists_what_it_leaves_out():
    for campus in CAMPUSES:
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "edufl.experiments.cli",
                "campus",
                "validate",
                "--data",
                str(EXAMPLE / campus),
                "--mapping",
                str(MAPPING),
            ],
            capture_output=True,
            text=True,
        )
        exchange = sum(r["Enrolment type"] == "exchange" for r in _rows(campus))
        assert done.returncode == 0, done.stderr
        assert f"OK, {len(_rows(campus)) - exchange} registrations" in done.stdout
        assert f"students.csv: {exchange} row(s) left out of learners by its row filter (keep)" in done.stdout
        assert (
            "students.csv: 4 column(s) not used by the mapping: Admission grade, Scholarship holder, "
            "Tuition fees up to date, Daytime/evening attendance" in done.stdout
        )


def test_the_mapping_reads_bins_codes_constants_and_both_terms_without_invented_values():
    tables = load_tables(EXAMPLE / "north", MAPPING)
    raw = {int(r["Student number"]): r for r in _rows("north") if r["Enrolment type"] == "degree"}
    learners = tables["learners"].set_index("student_id")
    assert len(learners) == len(raw) and load_mapping(MAPPING).modules == frozenset({"terms"})
    for sid, r in list(raw.items())[:50]:
        age = int(r["Age at enrollment"])
        assert learners.loc[sid, "age_band"] == ("0-35" if age < 35 else "35-55" if age < 55 else "55<=")
        assert learners.loc[sid, "gender"] == {"0": "F", "1": "M"}[r["Gender"]]
        assert (
            learners.loc[sid, "final_result"] == {"Dropout": "Withdrawn", "Graduate": "Pass", "Enrolled": "Studying"}[r["Target"]]
        )
    assert learners[["region", "highest_education", "prev_attempts", "disability"]].isna().all().all()  # not in the export
    assert tables["presentations"]["length_days"].isna().all()
    terms = tables["terms"].set_index(["student_id", "term"])
    sid = next(iter(raw))
    assert terms.loc[(sid, 2), "units_approved"] == int(raw[sid]["Curricular units 2nd sem (approved)"])
    assert terms.loc[(sid, 1), "grade"] == pytest.approx(float(raw[sid]["Curricular units 1st sem (grade)"]))
    assert (terms["grade_max"] == 20).all() and len(terms) == 2 * len(raw)


def test_term1_dropout_leaves_out_students_still_enrolled_and_its_features_carry_the_signal():
    parts = [early_warning(load_tables(EXAMPLE / c, MAPPING), 60, "term1_dropout") for c in CAMPUSES]
    names = feature_names()
    for campus, data in zip(CAMPUSES, parts, strict=True):
        rows = [r for r in _rows(campus) if r["Enrolment type"] == "degree"]
        assert len(data) == sum(r["Target"] != "Enrolled" for r in rows)
        assert data.y.sum() == sum(r["Target"] == "Dropout" for r in rows)
        x = dict(zip(names, data.x.T, strict=True))
        assert (x["terms_absent"] == 0).all() and (x["assessments_absent"] == 1).all()
        first = next(r for r in rows if r["Target"] != "Enrolled")
        i = int(np.flatnonzero(data.rows["student_id"] == int(first["Student number"]))[0])
        share = int(first["Curricular units 1st sem (approved)"]) / int(first["Curricular units 1st sem (enrolled)"])
        assert x["term1_approved_share"][i] == pytest.approx(share)
        assert x["term1_grade"][i] == pytest.approx(float(first["Curricular units 1st sem (grade)"]) / 20)
        # No model: a lower share of first-term units approved alone ranks dropouts first.
        assert roc_auc_score(data.y, -x["term1_approved_share"]) > 0.7


def test_a_campus_without_module_terms_refuses_term1_dropout_before_reading_data(tmp_path):
    text = MAPPING.read_text()
    mapping = tmp_path / "no-terms.toml"
    mapping.write_text(text[: text.index("[[terms]]")])
    setup = CampusSetup("north", EXAMPLE / "north", tmp_path / "state", RESEARCH_POLICY, mapping)
    with pytest.raises(
        CampusRefusal,
        match="campus north refuses the run: task term1_dropout needs module terms, and this "
        "campus's mapping provides the core tables only",
    ):
        load_campus(setup, RunConfig(task="term1_dropout"))
    with pytest.raises(ValueError, match="task term1_dropout needs module terms"):
        early_warning(load_tables(EXAMPLE / "north", mapping), 60, "term1_dropout")


def test_a_bad_binned_value_and_a_missing_filter_column_are_reported_with_file_line_and_column(tmp_path):
    folder = tmp_path / "north"
    folder.mkdir()
    lines = (EXAMPLE / "north" / "students.csv").read_text().splitlines()
    cells = lines[3].split(";")
    cells[5] = "twenty"  # Age at enrollment
    lines[3] = ";".join(cells)
    (folder / "students.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as err:
        load_tables(folder, MAPPING)
    assert "students.csv, line 4, column 'Age at enrollment': 'twenty' is not a number (binned by edges 35, 55)" in [
        str(p) for p in err.value.problems
    ]
    mapping = tmp_path / "filter.toml"
    mapping.write_text(MAPPING.read_text().replace('"Enrolment type"', '"Programme type"'))
    with pytest.raises(DataError, match="column 'Programme type': column is missing \\(a row filter of presentations\\)"):
        load_tables(EXAMPLE / "north", mapping)
