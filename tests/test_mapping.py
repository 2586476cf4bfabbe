"""Bring your own export: a differently shaped export, read through a mapping, is the same learner-record data."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict

from edufl.clients.app import train_handler
from edufl.clients.guard import release_guard
from edufl.federation.contract import ATTRIBUTES, EVENTS, TABLES, from_proto, to_proto
from edufl.federation.mapping import MappingError, load_mapping
from edufl.federation.models import build_model, model_arrays
from edufl.federation.problems import DataError
from edufl.federation.proto.learner_pb2 import CampusData
from edufl.federation.runconfig import RunConfig
from edufl.federation.schema import load_schema
from edufl.federation.tables import Tables, load_tables
from edufl.federation.tasks import early_warning, feature_names
from edufl.federation.wire import ARRAYS, CONFIG, REFUSED
from edufl.federation.writers import write_parquet

OULAD = load_schema()
"""OULAD's federation schema (federation/schemas/oulad.toml)."""

ROOT = Path(__file__).parents[1]
EXAMPLE = ROOT / "docs" / "mapping-example" / "student_records.toml"
STARTS = {"2013B": "2013-02-01", "2013J": "2013-10-01", "2014B": "2014-02-01", "2014J": "2014-10-01"}


def _date(days, presentation: str) -> str:
    if pd.isna(days):
        return "NA"
    return (pd.Timestamp(STARTS[presentation]) + pd.Timedelta(days=int(days))).strftime("%d/%m/%Y")


def write_student_records(tables: Tables, out: Path) -> Path:
    """``tables`` exported as the worked example's student-records system would export them
    (docs/mapping-example): written here with pandas, independently of edufl's reader."""
    out.mkdir(parents=True)
    bom = {"sep": ";", "index": False, "encoding": "utf-8-sig", "na_rep": "NA"}
    p = tables["presentations"]
    pd.DataFrame(
        {
            "module": p["course"],
            "term": p["presentation"],
            "length_days": p["length_days"],
            "starts_on": [_date(0, t) for t in p["presentation"]],
        }
    ).to_csv(out / "offerings.csv", **bom)
    a = tables["assessments"]
    pd.DataFrame(
        {
            "assessment": a["assessment_id"],
            "module": a["course"],
            "term": a["presentation"],
            "kind": a["assessment_type"].map({"TMA": 1, "CMA": 2, "Exam": 3}),
            "due_on": [_date(d, t) for d, t in zip(a["due_day"], a["presentation"], strict=True)],
            "weight_pct": a["weight"],
        }
    ).to_csv(out / "assessments.csv", **bom)
    s = tables["learners"]
    pd.DataFrame(
        {
            "module": s["course"],
            "term": s["presentation"],
            "student": s["student_id"],
            "sex": s["gender"].map({"F": 1, "M": 2}),
            "region": s["region"],
            "entry_qualification": s["highest_education"],
            "imd": s["imd_band"].fillna(""),
            "age_group": s["age_band"].map({"0-35": 1, "35-55": 2, "55<=": 3}),
            "attempts": s["prev_attempts"],
            "credits": s["studied_credits"],
            "disabled": s["disability"].map({"N": 0, "Y": 1}),
            "outcome": s["final_result"].map({"Distinction": 1, "Pass": 2, "Fail": 3, "Withdrawn": 4}),
        }
    ).to_csv(out / "students.csv", **bom)
    r = tables["registrations"]
    pd.DataFrame(
        {
            "module": r["course"],
            "term": r["presentation"],
            "student": r["student_id"],
            "enrolled_on": [_date(d, t) for d, t in zip(r["registration_day"], r["presentation"], strict=True)],
            "withdrew_on": [_date(d, t) for d, t in zip(r["unregistration_day"], r["presentation"], strict=True)],
        }
    ).to_csv(out / "enrolments.csv", **bom)
    m = tables["submissions"]
    pd.DataFrame(
        {
            "assessment": m["assessment_id"].astype("int64"),
            "student": m["student_id"].astype("int64"),
            "day_submitted": m["submission_day"].astype("int64"),
            "carried_over": m["banked"].astype(bool),
            "mark": m["score"],
        }
    ).to_parquet(out / "results.parquet")
    return out


@pytest.fixture
def records_dir(aaa: Tables, tmp_path: Path) -> Path:
    return write_student_records(aaa, tmp_path / "sis")


def _contract(tables: Tables, name: str) -> pd.DataFrame:
    table = next(t for t in TABLES if t.name == name)
    return tables[name][[c.name for c in table.columns]].sort_values(list(table.key)).reset_index(drop=True)


def test_example_export_gives_the_native_tables_and_features(aaa, records_dir):
    raw = (records_dir / "students.csv").read_bytes()
    assert raw.startswith(b"\xef\xbb\xbf") and b";" in raw.splitlines()[0]  # the export really is shaped differently
    mapped = load_tables(records_dir, EXAMPLE)
    assert mapped.mapping.modules == frozenset({"assessments"})  # the example export has no click log
    for table in mapped.mapping.tables():
        pd.testing.assert_frame_equal(_contract(mapped, table.name), _contract(aaa, table.name))
    core = Tables({k: v for k, v in aaa.frames.items() if k not in ("resources", "events")}, aaa.source, aaa.mapping)
    for task in ("withdrawal", "at_risk"):
        native, other = early_warning(core, 60, task), early_warning(mapped, 60, task)
        np.testing.assert_array_equal(native.x, other.x)
        np.testing.assert_array_equal(native.y, other.y)
        pd.testing.assert_frame_equal(native.rows, other.rows)
    missing = mapped.missingness.set_index(["table", "field"])
    assert missing.loc[("learners", "imd_band"), "column"] == "imd"
    assert (
        missing.loc[("registrations", "unregistration_day"), "missing"] == aaa["registrations"]["unregistration_day"].isna().sum()
    )


def test_contract_tables_survive_the_protobuf_round_trip(aaa):
    message = CampusData.FromString(to_proto(aaa.frames).SerializeToString())
    assert (message.version.major, message.version.minor) == (1, 3)
    assert len(message.records) == 748 and sum(len(r.submissions) for r in message.records) == len(aaa["submissions"])
    assert sum(len(r.events) for r in message.records) == len(aaa["events"]) == 350_298
    again = Tables(from_proto(message), aaa.source)
    assert sorted(again.frames) == sorted(aaa.frames)  # OULAD has no module terms: none is made up
    for table in (t for t in TABLES if t.name in aaa):
        if table.key:
            pd.testing.assert_frame_equal(_contract(again, table.name), _contract(aaa, table.name))
    names = [c.name for c in EVENTS.columns]
    pd.testing.assert_frame_equal(
        again["events"][names].astype({"course": str, "presentation": str}).sort_values(names).reset_index(drop=True),
        aaa["events"][names].astype({"course": str, "presentation": str}).sort_values(names).reset_index(drop=True),
        check_dtype=False,
    )
    message.version.major = 2
    with pytest.raises(ValueError, match="contract 2.3; this edufl reads contract 1.3"):
        from_proto(message)


def test_proto_fields_are_the_contract_columns():
    from edufl.federation.proto import learner_pb2

    for table in (t for t in TABLES if t is not ATTRIBUTES):  # an Attribute is a name and a value (module attributes)
        descriptor = getattr(learner_pb2, table.message).DESCRIPTOR
        assert [f.name for f in descriptor.fields] == [c.name for c in table.columns], table.name
        assert [f.has_presence for f in descriptor.fields] == [c.nullable for c in table.columns], table.name


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text(encoding="utf-8-sig")
    assert old in text
    path.write_text(text.replace(old, new, 1), encoding="utf-8-sig")


def _problems(directory: Path) -> list[str]:
    with pytest.raises(DataError) as err:
        load_tables(directory, EXAMPLE)
    return [str(p) for p in err.value.problems]


def test_each_problem_names_file_line_column_value_and_expectation(records_dir):
    students = records_dir / "students.csv"
    first = students.read_text(encoding="utf-8-sig").splitlines()[1].split(";")
    _edit(students, ";".join(first), ";".join([*first[:3], "3", *first[4:]]))  # sex code 3
    enrolments = records_dir / "enrolments.csv"
    row = enrolments.read_text(encoding="utf-8-sig").splitlines()[1]
    _edit(enrolments, row, row.replace(row.split(";")[3], "31/02/2013"))  # no such date
    results = pd.read_parquet(records_dir / "results.parquet")
    results.loc[4, "mark"] = 105.0
    results.to_parquet(records_dir / "results.parquet")
    problems = _problems(records_dir)
    assert problems == [
        "students.csv, line 2, column 'sex': unexpected value '3'; expected one of F, M (or a code: 1, 2)",
        "enrolments.csv, line 2, column 'enrolled_on': '31/02/2013' is not a date in format '%d/%m/%Y'",
        "results.parquet, row 5, column 'mark': 105.0 is out of range; expected 0 to 100",
    ]


def test_a_date_without_its_presentation_start_is_a_problem(records_dir):
    offerings = records_dir / "offerings.csv"
    _edit(offerings, "01/10/2014", "")
    problems = _problems(records_dir)
    assert problems[0] == "offerings.csv, line 3, column 'starts_on': '' is not a date in format '%d/%m/%Y'"
    assert any(
        p.startswith("enrolments.csv, line ")
        and p.endswith(
            "column 'enrolled_on': no start date known for this row's presentation; expected one in the presentations file"
        )
        for p in problems
    )


def test_a_missing_column_names_the_contract_field(records_dir):
    _edit(records_dir / "students.csv", "outcome", "result")
    [problem] = _problems(records_dir)
    assert problem.startswith(
        "students.csv, line 1, column 'outcome': column is missing (mapped to contract field "
        "learners.final_result); the file has columns module, term, student"
    )


@pytest.mark.parametrize(
    "change, named",
    [
        ((', final_result = "outcome" }', " }"), "learners.columns: no export column given for final_result"),
        (
            ('final_result = "outcome" }', 'final_result = "outcome", grade = "g" }'),
            "learners.columns: grade not in the contract",
        ),
        (('dates = ["due_day"]', 'dates = ["weight"]'), "assessments.dates: weight is not a day column of assessments"),
        (('start_date = "starts_on"', ""), "start_date: day columns are given as dates"),
        (
            ('contract_version = "1.0"', 'contract_version = "2.0"'),
            "contract_version: .*reads learner-record contract 1.3; the mapping was written for 2.0",
        ),
        (('delimiter = ";"', 'delimiter = ";;"'), "delimiter: ';;' must be one character"),
        (('encoding = "utf-8"', 'encoding = "utf-9"'), "encoding: unknown encoding 'utf-9'"),
        (("codes.gender", "codes.sex"), "learners.codes: sex not in the contract"),
        (
            (
                'columns = { course = "module", presentation = "term", length_days',
                'constants = { length_days = 7 }\ncolumns = { course = "module", presentation = "term", length_days',
            ),
            "presentations.constants: length_days also given in columns",
        ),
        (
            ("codes.age_band = {", 'bins.age_band = { edges = [35, 20], labels = ["0-35", "35-55", "55<="] }\ncodes.x = {'),
            "learners.bins.age_band: Value error, edges .*35.0, 20.0.* must increase",
        ),
    ],
)
def test_a_bad_mapping_names_the_file_and_key(tmp_path, change, named):
    text = EXAMPLE.read_text()
    assert change[0] in text
    path = tmp_path / "mapping.toml"
    path.write_text(text.replace(change[0], change[1], 1))
    with pytest.raises(
        MappingError, match=r"mapping\.toml: .*" + named.replace("(", r"\(").replace(".", r"\.").replace(r"\.*", ".*")
    ):
        load_mapping(path)


def test_the_oulad_mapping_is_the_default():
    assert load_mapping() == load_mapping(ROOT / "federation" / "mappings" / "oulad.toml")
    assert load_mapping().learners.codes == {"imd_band": {"10-20": "10-20%"}}


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edufl.experiments.cli", *args], capture_output=True, text=True)


def test_campus_validate_with_a_mapping(records_dir):
    done = _cli("campus", "validate", "--data", str(records_dir), "--mapping", str(EXAMPLE))
    assert done.returncode == 0, done.stderr
    assert "OK, 748 registrations (courses AAA)" in done.stdout
    assert "withdrew_on" in done.stdout and "imd" in done.stdout  # missingness per field, by the export's column
    students = records_dir / "students.csv"
    first = students.read_text(encoding="utf-8-sig").splitlines()[1].split(";")
    _edit(students, ";".join(first), ";".join([*first[:3], "9", *first[4:]]))
    done = _cli("campus", "validate", "--data", str(records_dir), "--mapping", str(EXAMPLE))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "students.csv, line 2, column 'sex': unexpected value '9'" in done.stderr
    assert "withdrew_on" in done.stdout  # the missingness summary comes with the problems


def test_a_campus_whose_contract_version_the_run_does_not_read_is_refused_at_join(records_dir, tmp_path, task_identity):
    cfg = RunConfig(model="logistic", contract_version="2.0")
    model = build_model(cfg.model, len(feature_names(OULAD)))
    request = Message(
        RecordDict({ARRAYS: model_arrays(model), CONFIG: ConfigRecord({**cfg.to_flower(), "server-round": 1})}),
        dst_node_id=1,
        message_type="train",
    )
    context = Context(
        run_id=5,
        node_id=1,
        state=RecordDict(),
        run_config={},
        node_config={
            "data-dir": str(records_dir),
            "campus": "SIS",
            "state-dir": str(tmp_path / "state"),
            "mapping": str(EXAMPLE),
        },
    )
    reply = release_guard(request, context, train_handler)
    assert reply.error.code == REFUSED
    assert (
        "campus SIS cannot join: its data are mapped to learner-record contract 1.0, and this run reads "
        "contract 2.0 (contract-version)"
    ) in reply.error.reason
    accepted = release_guard(
        Message(
            RecordDict(
                {
                    ARRAYS: model_arrays(model),
                    CONFIG: ConfigRecord({**RunConfig(model="logistic").to_flower(), "server-round": 1}),
                }
            ),
            dst_node_id=1,
            message_type="train",
        ),
        context,
        train_handler,
    )
    assert not accepted.has_error()  # the same campus, mapped, trains in a run that reads contract 1.0


def test_the_contract_parquet_layout_reads_back_the_same_tables(aaa, tmp_path):
    # What `edufl simulate` gives each virtual campus: the contract's own tables as Parquet files.
    mapping = write_parquet(aaa, tmp_path / "AAA")
    assert sorted(p.name for p in (tmp_path / "AAA").iterdir()) == sorted(f"{name}.parquet" for name in aaa.frames)
    again = load_tables(tmp_path / "AAA", mapping)
    for table in (t for t in TABLES if t.name in aaa):
        pd.testing.assert_frame_equal(_contract(again, table.name), _contract(aaa, table.name))
