"""A single-table student-records export (docs/single-table-example) read with a mapping only: constants, row
filters, value binning, code tables, a table read from two parts, and module terms for task term1_dropout."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from edufl.clients.app import load_campus
from edufl.clients.node import CampusRefusal, CampusSetup
from edufl.federation.mapping import load_mapping
from edufl.federation.policy import RESEARCH_POLICY
from edufl.federation.problems import DataError
from edufl.federation.runconfig import RunConfig
from edufl.federation.schema import load_schema
from edufl.federation.tables import load_tables
from edufl.federation.tasks import early_warning, feature_names

OULAD = load_schema()
"""OULAD's federation schema (federation/schemas/oulad.toml)."""

EXAMPLE = Path(__file__).parents[1] / "docs" / "single-table-example"
MAPPING = EXAMPLE / "student_records.toml"
SCHEMA = load_schema(EXAMPLE / "federation.toml")
"""The example federation's schema: its vocabularies and admission attributes."""
CAMPUSES = ("north", "south", "west")
GENDER = {"0": "F", "1": "M"}  # the mapping's codes.gender


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
                "--schema",
                str(EXAMPLE / "federation.toml"),
            ],
            capture_output=True,
            text=True,
        )
        exchange = sum(r["Enrolment type"] == "exchange" for r in _rows(campus))
        assert done.returncode == 0, done.stderr
        assert f"OK, {len(_rows(campus)) - exchange} registrations" in done.stdout
        assert f"students.csv: {exchange} row(s) left out of learners by its row filter (keep)" in done.stdout
        assert "not used by the mapping" not in done.stdout  # the attributes read the last 4 columns
        assert "for federation schema 'student_records'" in done.stdout


def test_the_mapping_reads_bins_codes_constants_and_both_terms_without_invented_values():
    tables = load_tables(EXAMPLE / "north", MAPPING, SCHEMA)
    raw = {int(r["Student number"]): r for r in _rows("north") if r["Enrolment type"] == "degree"}
    learners = tables["learners"].set_index("student_id")
    assert len(learners) == len(raw) and load_mapping(MAPPING).modules == frozenset({"terms", "attributes"})
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
    parts = [early_warning(load_tables(EXAMPLE / c, MAPPING, SCHEMA), 60, "term1_dropout") for c in CAMPUSES]
    names = feature_names(SCHEMA)
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
        # Module attributes, encoded as the schema declares: admission grade over [0, 200], one-hot categories.
        assert (x["attributes_absent"] == 0).all()
        assert x["admission_grade"][i] == pytest.approx(float(first["Admission grade"]) / 200)
        assert x[f"scholarship={'yes' if first['Scholarship holder'] == '1' else 'no'}"][i] == 1
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
        "campus's mapping provides attributes",
    ):
        load_campus(setup, RunConfig(task="term1_dropout"))
    with pytest.raises(ValueError, match="task term1_dropout needs module terms"):
        early_warning(load_tables(EXAMPLE / "north", mapping, SCHEMA), 60, "term1_dropout")


def test_a_bad_binned_value_and_a_missing_filter_column_are_reported_with_file_line_and_column(tmp_path):
    folder = tmp_path / "north"
    folder.mkdir()
    lines = (EXAMPLE / "north" / "students.csv").read_text().splitlines()
    cells = lines[3].split(";")
    cells[5] = "twenty"  # Age at enrollment
    lines[3] = ";".join(cells)
    (folder / "students.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as err:
        load_tables(folder, MAPPING, SCHEMA)
    assert "students.csv, line 4, column 'Age at enrollment': 'twenty' is not a number (binned by edges 35, 55)" in [
        str(p) for p in err.value.problems
    ]
    mapping = tmp_path / "filter.toml"
    mapping.write_text(MAPPING.read_text().replace('"Enrolment type"', '"Programme type"'))
    with pytest.raises(DataError, match="column 'Programme type': column is missing \\(a row filter of presentations\\)"):
        load_tables(EXAMPLE / "north", mapping, SCHEMA)


def _simulate(*args: str) -> subprocess.CompletedProcess:
    campuses = [f"--campus={c}={EXAMPLE / c}:{MAPPING}" for c in CAMPUSES]
    command = [
        sys.executable,
        "-m",
        "edufl.experiments.cli",
        "simulate",
        *campuses,
        "--schema",
        str(EXAMPLE / "federation.toml"),
        *args,
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=900)


@pytest.mark.simulation
def test_simulate_trains_on_the_three_campus_folders_and_its_centralized_baseline(tmp_path):
    common = ("--task", "term1_dropout", "--rounds", "3", "--model", "logistic", "--seed", "0")
    summaries = {}
    for mode in ("federated", "centralized"):
        done = _simulate(*common, "--mode", mode, "--out", str(tmp_path / mode))
        assert done.returncode == 0, done.stderr[-3000:]
        assert f"edufl simulate: {mode}, 3 campuses from campus folders, task term1_dropout" in done.stdout
        summaries[mode] = json.loads((tmp_path / mode / "summary.json").read_text())
    for summary in summaries.values():
        config = summary["config"]
        assert config["campus-by"] == "folders" and config["campuses"] == list(CAMPUSES)
        assert config["data"] == {c: str((EXAMPLE / c).resolve()) for c in CAMPUSES}
        assert set(config["data_sha256"]["north"]) == {"students.csv"}
        assert [c["campus"] for c in summary["campuses"]] == list(CAMPUSES)
        assert 0 < summary["privacy"]["epsilon"] <= 3
        # Students still enrolled are no examples: each campus's test rows come from its Dropout/Graduate rows only.
        assert all(c["n_test"] < len(_rows(c["campus"])) for c in summary["campuses"])
    # The first-term results predict dropout well on this export (AUC well above a constant predictor's 0.5),
    # federated near its centralized baseline.
    assert summaries["centralized"]["global"]["auc"] > 0.8
    assert summaries["federated"]["global"]["auc"] > summaries["centralized"]["global"]["auc"] - 0.05
    assert sorted(p.name for p in (tmp_path / "federated" / "campuses").iterdir()) == list(CAMPUSES)


@pytest.mark.simulation
def test_a_study_names_its_schema_and_campus_folders_and_runs_like_simulate(tmp_path, capsys):
    from edufl.experiments.study import run

    out = run(EXAMPLE / "study.toml", tmp_path / "study", None)
    rows = pd.read_csv(out / "rows.csv")
    assert rows["cell"].tolist() == [f"folders-d60-{m}-eps3-s0" for m in ("centralized", "local", "federated-fedavg")]
    assert set(rows["campus_by"]) == {"folders"} and set(rows["task"]) == {"term1_dropout"}
    campus_rows = pd.read_csv(out / "campus_rows.csv")
    assert sorted(set(campus_rows["campus"])) == list(CAMPUSES)
    federated = json.loads((out / "cells" / "folders-d60-federated-fedavg-eps3-s0" / "summary.json").read_text())
    assert federated["config"]["campus-by"] == "folders" and federated["config"]["campuses"] == list(CAMPUSES)
    assert federated["config"]["federation-schema"] == SCHEMA.text()  # every campus ran under the study's schema
    assert 0 < federated["privacy"]["epsilon"] <= 3
    # The first-term results carry the signal here too (see the simulate test above): well above chance.
    assert rows["auc"].min() > 0.7
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["schema"]["name"] == SCHEMA.name and manifest["schema"]["sha256"] == SCHEMA.digest
    assert manifest["data"] == {c: str((EXAMPLE / c).resolve()) for c in CAMPUSES}
    assert manifest["config"]["campus_by"] == ["folders"] and manifest["config"]["schema"] == str(EXAMPLE / "federation.toml")
    assert "| folders | 60 | federated (fedavg) | 3 |" in (out / "summary.md").read_text()


def test_a_study_with_campus_folders_refuses_data_too(data_dir, capsys):
    from edufl.experiments.cli import main

    assert main(["experiment", "run", str(EXAMPLE / "study.toml"), "--data", str(data_dir)]) == 2
    assert capsys.readouterr().err == f"edufl: {EXAMPLE / 'study.toml'}: study.campuses gives the campuses: leave out --data\n"


@pytest.mark.parametrize(
    ("campus", "expected"),
    [
        (["north"], "expected NAME=DIR or NAME=DIR:MAPPING"),
        ([f"../up={EXAMPLE / 'north'}:{MAPPING}"], "a campus name is 1-64 letters"),
        ([f"a={EXAMPLE / 'north'}:{MAPPING}", f"a={EXAMPLE / 'south'}:{MAPPING}"], "campus 'a' is given twice"),
        ([f"a={EXAMPLE / 'east'}:{MAPPING}"], f"{EXAMPLE / 'east'} is not a folder; expected the campus's data folder"),
        (
            [f"a={EXAMPLE / 'north'}:{MAPPING}", f"b={EXAMPLE / 'south' / '..' / 'north'}:{MAPPING}"],
            "campus 'a' reads that folder already; each campus holds its own learners",
        ),
    ],
)
def test_a_bad_campus_folder_option_is_refused_with_exit_status_2(campus, expected):
    command = [sys.executable, "-m", "edufl.experiments.cli", "simulate", *(f"--campus={c}" for c in campus), "--schema"]
    command.append(str(EXAMPLE / "federation.toml"))
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and expected in done.stderr, done.stderr[-2000:]
    assert "Traceback" not in done.stderr


def test_campus_folders_with_data_or_campus_by_are_refused(data_dir):
    done = _simulate("--data", str(data_dir))
    assert done.returncode == 2 and "leave out --data, --campus-by and --shards" in done.stderr


def test_a_campus_folder_with_bad_data_names_its_file_and_exits_2(tmp_path):
    (tmp_path / "students.csv").write_text("Student number;Course\n1;2\n")
    command = [sys.executable, "-m", "edufl.experiments.cli", "simulate", f"--campus=bad={tmp_path}:{MAPPING}", "--schema"]
    command.append(str(EXAMPLE / "federation.toml"))
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "students.csv" in done.stderr and "Traceback" not in done.stderr, done.stderr[-2000:]


@pytest.mark.simulation
def test_a_dp_statistic_over_the_three_campus_folders_is_within_its_stated_bound(tmp_path):
    query = tmp_path / "dropout_by_gender.toml"
    query.write_text(
        'name = "dropout-by-gender"\nstatistic = "mean"\nvalue = "final_result=Withdrawn"\n'
        'group_by = ["gender"]\nepsilon = 1.0\ndelta = 1e-5\n'
    )
    campuses = [f"--campus={c}={EXAMPLE / c}:{MAPPING}" for c in CAMPUSES]
    command = [
        sys.executable,
        "-m",
        "edufl.experiments.cli",
        "analytics",
        "run",
        str(query),
        *campuses,
        "--schema",
        str(EXAMPLE / "federation.toml"),
        "--out",
        str(tmp_path / "q"),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "3 campuses from campus folders" in done.stdout
    summary = json.loads((tmp_path / "q" / "summary.json").read_text())
    assert summary["refusals"] == [] and [c["campus"] for c in summary["campuses"]] == list(CAMPUSES)
    degree = [r for c in CAMPUSES for r in _rows(c) if r["Enrolment type"] == "degree"]
    released = {e["gender"]: e for e in summary["estimates"]}
    assert {"F", "M"} <= released.keys()
    # A declared cell with no rows (gender missing) is noise alone; its noisy count may pass the threshold.
    assert not [r for r in degree if GENDER[r["Gender"]] not in ("F", "M")] and released.keys() <= {"F", "M", "missing"}
    for gender in ("F", "M"):
        estimate = released[gender]
        group = [r for r in degree if GENDER[r["Gender"]] == gender]
        truth = sum(r["Target"] == "Dropout" for r in group) / len(group)
        assert estimate["campuses"] == 3
        assert abs(estimate["estimate"] - truth) <= 5 * estimate["std"], (estimate, truth)  # 5 σ: fails once in ~2 million
