"""The early-warning tasks: population, leakage, fixed vocabularies, splits (final_result: tests/test_final_result.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from edufl.federation.contract import CATEGORICAL_FEATURES
from edufl.federation.partition import campus_names, campus_slice
from edufl.federation.schema import SchemaError, TemporalSplit, load_schema
from edufl.federation.tables import Tables, load_tables
from edufl.federation.tasks import MISSING_SLOT, early_warning, feature_names, split

OULAD = load_schema()
"""OULAD's federation schema (federation/schemas/oulad.toml)."""

D = 60
EXAMPLE = Path(__file__).parents[1] / "docs" / "single-table-example"
EXAMPLE_SCHEMA = EXAMPLE / "federation.toml"


def _future_scrambled(tables: Tables, cutoff: int) -> Tables:
    """A copy where everything dated at or after ``cutoff``, and every outcome, is changed."""
    f = {k: v.copy() for k, v in tables.frames.items()}
    info = f["learners"]
    info["final_result"] = np.where(info["final_result"] == "Withdrawn", "Pass", "Withdrawn")
    reg = f["registrations"]
    late = reg["unregistration_day"].notna() & (reg["unregistration_day"] >= cutoff)
    reg.loc[late, "unregistration_day"] = reg.loc[late, "unregistration_day"] + 50
    reg.loc[reg["unregistration_day"].isna(), "unregistration_day"] = pd.array([cutoff + 7], dtype="Int64")[0]
    sa = f["submissions"]
    future = sa["submission_day"] >= cutoff
    sa.loc[future, "score"] = 100 - sa.loc[future, "score"].fillna(0)
    sa.loc[future, "banked"] = 1 - sa.loc[future, "banked"]
    # Assessment weights are course design, published at the start; due days at or after
    # the cutoff may move without changing any feature.
    a = f["assessments"]
    due_late = a["due_day"].notna() & (a["due_day"] >= cutoff)
    a.loc[due_late, "due_day"] = a.loc[due_late, "due_day"] + 30
    return Tables(f, tables.source, tables.mapping)


def test_no_feature_uses_outcomes_or_data_dated_at_or_after_cutoff(tables):
    campus = campus_slice(tables, "module", "DDD")
    before = early_warning(campus, D, "withdrawal")
    after = early_warning(_future_scrambled(campus, D), D, "withdrawal")
    assert len(before) == len(after) > 5000
    pd.testing.assert_frame_equal(before.rows, after.rows)
    np.testing.assert_array_equal(before.x, after.x)
    assert not np.array_equal(before.y, after.y)  # the scrambling did change the labels


def test_population_excludes_unregistered_before_cutoff_and_late_registrations(tables):
    data = early_warning(tables, D, "withdrawal")
    key = ["course", "presentation", "student_id"]
    reg = data.rows.merge(tables["registrations"], on=key)
    assert len(reg) == len(data)
    assert not (reg["unregistration_day"] < D).any()
    assert not (reg["registration_day"] >= D).any()
    everyone = tables["registrations"]
    expected = (everyone["registration_day"].isna() | (everyone["registration_day"] < D)) & (
        everyone["unregistration_day"].isna() | (everyone["unregistration_day"] >= D)
    )
    assert len(data) == int(expected.sum()) == 26395
    assert data.y.mean() == pytest.approx(0.1505, abs=1e-4)


def test_assessment_features_for_a_known_student(tables):
    # Student 11391 (AAA 2013J) submitted TMA 1752 (due 19) on day 18 with score 78.
    data = early_warning(campus_slice(tables, "module", "AAA"), 30, "withdrawal")
    row = data.rows.index[(data.rows["student_id"] == 11391) & (data.rows["presentation"] == "2013J")][0]
    names = feature_names(OULAD)
    x = dict(zip(names, data.x[row], strict=True))
    assert x["n_submitted"] == pytest.approx(1 / 20)
    assert x["mean_score"] == pytest.approx(0.78)
    assert x["n_assessments_due"] == pytest.approx(1 / 12)
    assert x["n_missing_due"] == 0 and x["n_late"] == 0
    assert x["gender=M"] == 1 and x["imd_band=90-100%"] == 1


def test_vocabularies_identical_across_campuses(tables):
    widths = set()
    for campus in campus_names(tables, "region")[:4] + campus_names(tables, "module"):
        by = "region" if " " in campus or campus in ("Ireland", "Scotland", "Wales") else "module"
        data = early_warning(campus_slice(tables, by, campus), D, "withdrawal")
        widths.add(data.x.shape[1])
        start = 0
        for vocab in map(OULAD.vocabulary, CATEGORICAL_FEATURES):
            block = data.x[:, start : start + len(vocab) + 1]
            np.testing.assert_array_equal(block.sum(axis=1), 1.0)  # exactly one slot per category
            start += len(vocab) + 1
        assert data.x.min() >= 0 and data.x.max() <= 1
    assert widths == {len(feature_names(OULAD))}
    assert f"imd_band={MISSING_SLOT}" in feature_names(OULAD)


def test_stratified_split_is_seeded_disjoint_and_stratified(tables):
    data = early_warning(campus_slice(tables, "module", "BBB"), D, "withdrawal")
    train, test = split(data, "stratified", 0.2, seed=3)
    again_train, _ = split(data, "stratified", 0.2, seed=3)
    other_train, _ = split(data, "stratified", 0.2, seed=4)
    keys = lambda d: set(map(tuple, d.rows.to_numpy()))  # noqa: E731
    assert keys(train).isdisjoint(keys(test)) and len(train) + len(test) == len(data)
    assert len(test) == pytest.approx(0.2 * len(data), abs=2)
    assert abs(train.y.mean() - test.y.mean()) < 0.005
    np.testing.assert_array_equal(train.x, again_train.x)
    assert not np.array_equal(train.y, other_train.y) or not np.array_equal(train.x, other_train.x)


def test_temporal_split(tables):
    data = early_warning(campus_slice(tables, "module", "FFF"), D, "withdrawal")
    train, test = split(data, "temporal", 0.2, 0, OULAD)  # OULAD's schema: train = "2013*", test = "2014*"
    assert set(train.rows["presentation"]) == {"2013B", "2013J"}
    assert set(test.rows["presentation"]) == {"2014B", "2014J"}
    assert len(train) + len(test) == len(data)
    # A presentation matching neither pattern is in neither part.
    only_j = OULAD.model_copy(update={"temporal_split": TemporalSplit(train="2013J", test="2014J")})
    train, test = split(data, "temporal", 0.2, 0, only_j)
    assert set(train.rows["presentation"]) == {"2013J"} and set(test.rows["presentation"]) == {"2014J"}
    assert len(train) + len(test) == (data.rows["presentation"].str.endswith("J")).sum() < len(data)
    # A pattern matches the whole code: "2013" alone names no OULAD presentation; "?" and "[...]" as in fnmatch.
    whole = OULAD.model_copy(update={"temporal_split": TemporalSplit(train="2013", test="201[4]?")})
    train, test = split(data, "temporal", 0.2, 0, whole)
    assert len(train) == 0 and set(test.rows["presentation"]) == {"2014B", "2014J"}
    # One matching both is the schema's mistake, named with the presentations.
    overlapping = OULAD.model_copy(update={"temporal_split": TemporalSplit(train="2013*", test="*J")})
    with pytest.raises(SchemaError, match=r"federation schema 'oulad': presentation\(s\) '2013J' match both temporal_split"):
        split(data, "temporal", 0.2, 0, overlapping)
    with pytest.raises(ValueError, match="federation schema 'oulad' declares none"):
        split(data, "temporal", 0.2, 0, OULAD.model_copy(update={"temporal_split": None}))
    with pytest.raises(ValueError, match="no federation schema was given"):
        split(data, "temporal", 0.2, 0)


def test_a_federation_with_its_own_presentation_codes_splits_by_its_own_patterns(tmp_path):
    path = tmp_path / "federation.toml"
    path.write_text(EXAMPLE_SCHEMA.read_text() + '\n[temporal_split]\ntrain = "2021"\ntest = "2022"\n')
    own = load_schema(path)
    data = early_warning(load_tables(EXAMPLE / "north", EXAMPLE / "student_records.toml", own), D, "withdrawal")
    assert set(data.rows["presentation"]) == {"2021", "2022"}  # cohorts by year: no OULAD-shaped code
    train, test = split(data, "temporal", 0.2, 0, own)
    assert set(train.rows["presentation"]) == {"2021"} and set(test.rows["presentation"]) == {"2022"}
    assert len(train) + len(test) == len(data) and len(train) and len(test)
    # OULAD's patterns find nothing here: both parts empty (a campus then refuses, tests/test_schema.py).
    oulad_patterns = own.model_copy(update={"temporal_split": OULAD.temporal_split})
    assert [len(part) for part in split(data, "temporal", 0.2, 0, oulad_patterns)] == [0, 0]


def test_at_risk_shares_population_and_features_and_adds_failures(tables):
    campus = campus_slice(tables, "module", "CCC")
    withdrawn, at_risk = early_warning(campus, 60, "withdrawal"), early_warning(campus, 60, "at_risk")
    assert np.array_equal(withdrawn.x, at_risk.x) and withdrawn.rows.equals(at_risk.rows)
    key = ["course", "presentation", "student_id"]
    results = campus["learners"].set_index(key)["final_result"]
    expected = results.loc[list(at_risk.rows[key].itertuples(index=False, name=None))].isin(["Fail", "Withdrawn"]).to_numpy()
    assert np.array_equal(at_risk.y.astype(bool), expected)
    assert (at_risk.y >= withdrawn.y).all() and at_risk.y.sum() > withdrawn.y.sum()
    with pytest.raises(ValueError, match="unknown task 'final_grade'"):
        early_warning(campus, 60, "final_grade")
