"""The federation schema: vocabularies, outcomes and attributes declared once, checked on every campus before it joins."""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from edufl.clients.app import campus_tables
from edufl.clients.node import CampusRefusal
from edufl.federation.mapping import MappingError, load_mapping
from edufl.federation.problems import DataError
from edufl.federation.runconfig import ConfigError, RunConfig
from edufl.federation.schema import OULAD_SCHEMA, SchemaError, load_schema, schema_from_text
from edufl.federation.tables import load_tables
from edufl.federation.tasks import early_warning, feature_names

EXAMPLE = Path(__file__).parents[1] / "docs" / "single-table-example"
MAPPING = EXAMPLE / "student_records.toml"
SCHEMA = EXAMPLE / "federation.toml"


def test_oulad_schema_is_the_default_and_travels_as_text():
    oulad = load_schema()
    assert oulad == load_schema(OULAD_SCHEMA) and oulad.name == "oulad"
    assert oulad.vocabulary("final_result") == ("Distinction", "Fail", "Pass", "Withdrawn", "Studying")
    assert oulad.labels("failed", "withdrawn") == ("Fail", "Withdrawn") and len(oulad.vocabulary("region")) == 13
    assert schema_from_text(oulad.text()) == oulad and schema_from_text("") == oulad
    assert RunConfig().schema == oulad and RunConfig(federation_schema=oulad.text()).schema.digest == oulad.digest


def test_another_federation_has_its_own_vocabularies_features_and_outcomes():
    own = load_schema(SCHEMA)
    assert own.vocabulary("region") == () and own.vocabulary("final_result") == ("Pass", "Withdrawn", "Studying")
    names = feature_names(own)
    assert "region=<missing>" in names and not any(n.startswith("region=") and n != "region=<missing>" for n in names)
    assert {"admission_grade", "admission_grade=<missing>", "scholarship=yes", "attendance=evening", "attributes_absent"} <= set(
        names
    )
    assert not any(n.startswith("clicks_oucontent") for n in names)  # no activity type: no click feature per type
    data = early_warning(load_tables(EXAMPLE / "north", MAPPING, own), 60, "withdrawal")
    assert data.x.shape == (len(data), len(names)) and 0 <= data.x.min() and data.x.max() <= 1


@pytest.mark.parametrize(
    "text, named",
    [
        ('name = "x"\ncontract_version = "1.3"\noutcomes = { A = "passed" }\n', "outcomes"),
        ('name = "x"\ncontract_version = "1.3"\noutcomes = { A = "passed", B = "lost" }\n', "outcomes.B"),
        (
            'name = "x"\ncontract_version = "1.3"\noutcomes = { A = "passed", B = "failed" }\n[vocabularies]\ntown = ["a"]\n',
            "town",
        ),
        (
            'name = "x"\ncontract_version = "1.3"\noutcomes = { A = "passed", B = "failed" }\n'
            '[attributes.grade]\nkind = "number"\nlow = 0\n',
            "finite bounds low and high",
        ),
        ('name = "x"\ncontract_version = "2.0"\noutcomes = { A = "passed", B = "failed" }\n', "contract_version"),
    ],
)
def test_a_bad_schema_names_the_file_and_key(tmp_path, text, named):
    path = tmp_path / "federation.toml"
    path.write_text(text)
    with pytest.raises(SchemaError, match=rf"federation\.toml: .*{named}"):
        load_schema(path)
    with pytest.raises(ConfigError, match="federation-schema"):
        RunConfig(federation_schema='{"name": "x"}')


def test_data_outside_the_schema_are_listed_by_file_line_and_column(tmp_path):
    folder = tmp_path / "north"
    shutil.copytree(EXAMPLE / "north", folder)
    csv = folder / "students.csv"
    lines = csv.read_text().splitlines()
    header = lines[0].split(";")
    row = lines[1].split(";")
    row[header.index("Admission grade")] = "250"  # outside the schema's [0, 200]
    lines[1] = ";".join(row)
    csv.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as err:
        load_tables(folder, MAPPING, load_schema(SCHEMA))
    [problem] = err.value.problems
    assert (problem.file, problem.line, problem.column) == (
        "students.csv",
        2,
        "Admission grade",
    ) and "0 to 200" in problem.message
    with pytest.raises(MappingError, match="attendance.*not an attribute of federation schema 'oulad'"):
        load_tables(EXAMPLE / "north", MAPPING)  # OULAD's schema declares no attribute


def test_a_campus_whose_data_do_not_fit_refuses_the_run_without_sending_a_value(tmp_path):
    text = MAPPING.read_text().replace('codes.gender = { "0" = "F", "1" = "M" }', 'codes.gender = { "0" = "female", "1" = "M" }')
    mapping = tmp_path / "mapping.toml"
    mapping.write_text(text)
    setup = SimpleNamespace(name="north", data_dir=EXAMPLE / "north")
    with pytest.raises(CampusRefusal) as refused:
        campus_tables(setup, load_mapping(mapping), load_schema(SCHEMA))
    reason = str(refused.value)
    assert "do not fit federation schema 'student_records'" in reason and "female" not in reason
    assert "'female' not in federation schema 'student_records''s vocabulary" in refused.value.detail  # its audit log only


def test_a_campus_takes_part_only_under_a_schema_its_policy_approves(tmp_path):
    from edufl.federation.policy import RESEARCH_POLICY, CampusPolicy, PolicyError

    own = load_schema(SCHEMA)
    run = RunConfig(federation_schema=own.text())
    assert CampusPolicy().check(RunConfig()) == []  # the defaults approve OULAD's schema
    [(key, why)] = CampusPolicy().check(run)
    assert key == "data.approved_schemas" and own.digest in why
    policy = tmp_path / "policy.toml"
    policy.write_text(f'[data]\napproved_schemas = ["{own.digest.upper()}"]\n')
    assert CampusPolicy.load(policy).check(run) == [] and CampusPolicy.load(policy).schema_refusal(load_schema()) is not None
    assert RESEARCH_POLICY.check(run) == [] and RESEARCH_POLICY.schema_refusal(own) is None
    policy.write_text('[data]\napproved_schemas = ["oulad"]\n')
    with pytest.raises(PolicyError, match="data.approved_schemas.*64 hex digits"):
        CampusPolicy.load(policy)
