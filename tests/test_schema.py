"""The federation schema: vocabularies, outcomes and attributes declared once, checked on every campus before it joins."""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
from campus_contexts import campus_context
from flwr.app import ConfigRecord, Message, RecordDict

from edufl.clients.app import campus_tables, evaluate_handler, load_campus, train_handler
from edufl.clients.guard import release_guard
from edufl.clients.node import CampusRefusal, CampusSetup
from edufl.federation.mapping import MappingError, load_mapping
from edufl.federation.models import build_model, model_arrays
from edufl.federation.policy import RESEARCH_POLICY
from edufl.federation.problems import DataError
from edufl.federation.runconfig import ConfigError, RunConfig
from edufl.federation.schema import OULAD_SCHEMA, FederationSchema, SchemaError, TemporalSplit, load_schema, schema_from_text
from edufl.federation.tables import load_tables
from edufl.federation.tasks import early_warning, feature_names, n_outputs
from edufl.federation.wire import ARRAYS, CONFIG, REFUSED

EXAMPLE = Path(__file__).parents[1] / "docs" / "single-table-example"
MAPPING = EXAMPLE / "student_records.toml"
SCHEMA = EXAMPLE / "federation.toml"
TEMPORAL = 'name = "x"\ncontract_version = "1.3"\noutcomes = { A = "passed", B = "failed" }\n[temporal_split]\n'
"""A schema's head, then its [temporal_split] table's header."""


def test_oulad_schema_is_the_default_and_travels_as_text():
    oulad = load_schema()
    assert oulad == load_schema(OULAD_SCHEMA) and oulad.name == "oulad"
    assert oulad.vocabulary("final_result") == ("Distinction", "Fail", "Pass", "Withdrawn", "Studying")
    assert oulad.labels("failed", "withdrawn") == ("Fail", "Withdrawn") and len(oulad.vocabulary("region")) == 13
    assert schema_from_text(oulad.text()) == oulad and schema_from_text("") == oulad
    assert RunConfig().schema == oulad and RunConfig(federation_schema=oulad.text()).schema.digest == oulad.digest
    assert oulad.temporal_split == TemporalSplit(train="2013*", test="2014*")
    # A schema without [temporal_split] travels without the key: its digest, which policies approve, is unchanged.
    own = load_schema(SCHEMA)
    assert "temporal_split" not in own.text() and schema_from_text(own.text()).temporal_split is None


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
        (TEMPORAL + 'train = "2013*"\n', r"temporal_split\.test: Field required"),
        (TEMPORAL + 'train = "2013*"\ntest = "2014*"\nvalid = "2015*"\n', r"temporal_split\.valid: Extra inputs are not"),
        (
            TEMPORAL + 'train = ""\ntest = 2014\n',
            r"temporal_split\.train: String should have at least 1 character; temporal_split\.test: Input should be a valid str",
        ),
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


def _with_temporal_split(tmp_path: Path, train: str, test: str) -> FederationSchema:
    """The worked example's schema (cohorts 2021 and 2022) with a ``[temporal_split]`` of ``train`` and ``test``."""
    path = tmp_path / f"federation-{len(list(tmp_path.glob('federation-*')))}.toml"
    path.write_text(SCHEMA.read_text() + f'\n[temporal_split]\ntrain = "{train}"\ntest = "{test}"\n')
    return load_schema(path)


def test_split_temporal_is_refused_before_anything_runs_under_a_schema_without_temporal_split():
    from edufl.server.run_options import run_config

    text = load_schema(SCHEMA).text()
    expected = r"split = 'temporal' needs .*federation schema 'student_records' declares no \[temporal_split\]; add that table"
    with pytest.raises(ConfigError, match=expected):
        RunConfig(split="temporal", federation_schema=text)
    with pytest.raises(ConfigError, match=f"^--{expected}"):  # the command line names the option
        run_config({"split": "temporal", "federation_schema": text})
    with pytest.raises(ConfigError, match=expected):  # a campus validates the run config it receives
        RunConfig.from_flower({**RunConfig().to_flower(), "federation-schema": text, "split": "temporal"})
    assert RunConfig(split="temporal").schema.temporal_split is not None  # OULAD's declares it
    assert RunConfig(split="stratified", federation_schema=text).split == "stratified"


def _request(cfg: RunConfig, schema: FederationSchema, kind: str) -> Message:
    model = build_model(cfg.model, len(feature_names(schema)), outputs=n_outputs(cfg.task, schema))
    config = ConfigRecord({**cfg.to_flower(), "server-round": 1})
    return Message(RecordDict({ARRAYS: model_arrays(model), CONFIG: config}), dst_node_id=1, message_type=kind)


def test_a_campus_refuses_the_part_the_temporal_split_leaves_it_no_rows_for(tmp_path, task_identity):
    """A campus of the worked example (cohorts 2021 and 2022) under patterns that leave one part empty."""
    replies = {}
    cases = [("2030", "2022", "train", train_handler), ("2021", "2030", "evaluate", evaluate_handler)]
    for train, test, kind, handler in cases:
        schema = _with_temporal_split(tmp_path, train, test)
        policy = tmp_path / f"policy-{kind}.toml"
        policy.write_text(f'[data]\napproved_schemas = ["{schema.digest}"]\n')
        cfg = RunConfig(model="logistic", split="temporal", federation_schema=schema.text())
        context = campus_context(EXAMPLE / "north", tmp_path / "state", mapping=str(MAPPING), policy=str(policy))
        replies[kind] = release_guard(_request(cfg, schema, kind), context, handler)
    assert replies["train"].error.code == REFUSED and replies["train"].error.reason == (
        "campus AAA refuses round 1: split temporal leaves it no train rows, since none of its presentations matches "
        "temporal_split.train '2030' of federation schema 'student_records'"
    )
    assert replies["evaluate"].error.code == REFUSED and replies["evaluate"].error.reason == (
        "campus AAA refuses to release metrics: split temporal leaves it no test rows, since none of its presentations "
        "matches temporal_split.test '2030' of federation schema 'student_records'"
    )


def test_a_campus_splits_by_the_runs_temporal_split_and_refuses_a_presentation_in_both_parts(tmp_path):
    setup = CampusSetup("north", EXAMPLE / "north", tmp_path / "state", RESEARCH_POLICY, MAPPING)
    schema = _with_temporal_split(tmp_path, "2021", "2022")
    campus = load_campus(setup, RunConfig(split="temporal", federation_schema=schema.text()))
    assert set(campus.train.rows["presentation"]) == {"2021"} and set(campus.test.rows["presentation"]) == {"2022"}
    both = _with_temporal_split(tmp_path, "20*", "*2")
    with pytest.raises(CampusRefusal) as refused:
        load_campus(setup, RunConfig(split="temporal", federation_schema=both.text()))
    assert str(refused.value).startswith(
        "campus north cannot join: its presentations do not fit the temporal_split of federation schema 'student_records'"
    )
    assert "presentation(s) '2022' match both temporal_split.train '20*' and temporal_split.test '*2'" in refused.value.detail
