"""Module engagement: the OULAD click log read, checked and turned into features dated before the cutoff."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from edufl.federation.engagement import MAX_LISTED, engagement_feature_bounds
from edufl.federation.mapping import OULAD_MAPPING, Mapping, MappingError, load_mapping
from edufl.federation.partition import campus_slice
from edufl.federation.problems import DataError
from edufl.federation.schema import load_schema
from edufl.federation.tables import Tables, load_tables
from edufl.federation.tasks import ASSESSMENT_FEATURES, early_warning, feature_names

OULAD = load_schema()
"""OULAD's federation schema (federation/schemas/oulad.toml)."""
ENGAGEMENT_FEATURES = engagement_feature_bounds(OULAD.vocabulary("activity_type"))

D = 60


def _csv_mapping() -> Mapping:
    """The OULAD mapping reading the click log from the official release's ``studentVle.csv``."""
    oulad = load_mapping()
    return oulad.model_copy(update={"events": oulad.table("events").model_copy(update={"file": "studentVle.csv"})})


def _events_csv(directory: Path, rows: list[list[str]] | None = None) -> Path:
    """Campus AAA's click log as the official CSV (its first 50 rows, or ``rows``), the Parquet file removed."""
    parquet = directory / "studentVle.parquet"
    frame = pd.read_parquet(parquet)
    parquet.unlink()
    path = directory / "studentVle.csv"
    with path.open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow(frame.columns)
        out.writerows(rows if rows is not None else frame.head(50).astype(str).to_numpy().tolist())
    return path


def test_loads_the_click_log_and_resources(tables, data_dir):
    events, resources = tables["events"], tables["resources"]
    assert len(events) == 10_655_280 and len(resources) == 6364
    raw = pq.read_table(data_dir / "studentVle.parquet", columns=["sum_click", "date"])
    assert int(events["clicks"].sum()) == int(raw.column("sum_click").to_numpy().sum())
    assert int(events["day"].min()) == -25 and int(events["day"].max()) == 269
    missing = tables.missingness.set_index(["table", "field"])["missing"]
    assert missing[("events", "clicks")] == 0 and missing[("resources", "activity_type")] == 0


def test_features_of_a_known_student_match_the_raw_log(aaa, data_dir):
    # Student 11391, AAA 2013J, recomputed here from the release's own file, with pandas.
    raw = pd.read_parquet(data_dir / "studentVle.parquet", filters=[("id_student", "==", 11391), ("code_module", "==", "AAA")])
    raw = raw[(raw["code_presentation"] == "2013J") & (raw["date"] < D)]
    vle = pd.read_csv(data_dir / "vle.csv", na_values="?")
    data = early_warning(aaa, D, "at_risk")
    row = data.rows.index[(data.rows["student_id"] == 11391) & (data.rows["presentation"] == "2013J")][0]
    x = dict(zip(feature_names(OULAD), data.x[row], strict=True))
    total = raw["sum_click"].sum()
    assert total > 0
    assert x["clicks_before"] == pytest.approx(np.log1p(total) / np.log1p(20_000), abs=1e-6)
    week1 = raw.loc[raw["date"] >= D - 7, "sum_click"].sum()
    assert x["clicks_week_1"] == pytest.approx(np.log1p(week1) / np.log1p(2_000), abs=1e-6)
    assert x["active_days"] == pytest.approx(raw["date"].nunique() / 365, abs=1e-6)
    assert x["days_since_last_activity"] == pytest.approx((D - raw["date"].max()) / 365, abs=1e-6)
    assert x["no_activity_yet"] == 0 and x["engagement_absent"] == 0
    quiz = raw.merge(vle, on="id_site").query("activity_type == 'quiz'")["sum_click"].sum()
    assert x["clicks_quiz"] == pytest.approx(np.log1p(quiz) / np.log1p(10_000), abs=1e-6)


def test_features_ignore_clicks_at_or_after_the_cutoff(aaa):
    events = aaa["events"].copy()
    late = events["day"] >= D
    assert late.sum() > 100_000
    events.loc[late, "clicks"] = events.loc[late, "clicks"] * 7 + 3
    changed = Tables({**aaa.frames, "events": events.drop(index=events.index[late][:5000])}, aaa.source, aaa.mapping)
    np.testing.assert_array_equal(early_warning(aaa, D, "at_risk").x, early_warning(changed, D, "at_risk").x)


def test_features_are_scaled_into_unit_range_with_fixed_bounds(tables):
    data = early_warning(campus_slice(tables, "module", "GGG"), D, "at_risk")
    names = feature_names(OULAD)
    engagement = data.x[:, [names.index(n) for n in ENGAGEMENT_FEATURES]]
    assert engagement.min() >= 0 and engagement.max() <= 1
    assert names[-len(ENGAGEMENT_FEATURES) :] == list(ENGAGEMENT_FEATURES)
    # A registration without a click before D: no activity yet, 365 days since (scaled to 1).
    idle = data.x[:, names.index("no_activity_yet")] == 1
    assert idle.sum() == 145 and len(data) == 2406
    assert (data.x[idle, names.index("days_since_last_activity")] == 1).all()
    assert (data.x[idle, names.index("clicks_before")] == 0).all()


def test_campus_without_the_module_gets_the_same_width_and_only_the_absent_flag(aaa, aaa_dir):
    core = load_mapping().model_copy(update={"resources": None, "events": None})
    assert core.modules == frozenset({"assessments"}) and load_mapping().modules == frozenset({"assessments", "engagement"})
    tables = load_tables(aaa_dir, core)
    assert "events" not in tables
    data = early_warning(tables, D, "at_risk")
    names = feature_names(OULAD)
    assert data.x.shape == (len(data), len(names))
    engagement = data.x[:, [names.index(n) for n in ENGAGEMENT_FEATURES]]
    assert (engagement[:, :-1] == 0).all() and (engagement[:, -1] == 1).all()
    assert (data.x[:, names.index("assessments_absent")] == 0).all()
    full = early_warning(aaa, D, "at_risk")
    core_width = len(names) - len(ENGAGEMENT_FEATURES)
    np.testing.assert_array_equal(full.x[:, :core_width], data.x[:, :core_width])


def test_parquet_and_csv_read_the_same_events(aaa_dir):
    frame = pd.read_parquet(aaa_dir / "studentVle.parquet")
    from_parquet = load_tables(aaa_dir)["events"]
    _events_csv(aaa_dir, frame.astype(str).to_numpy().tolist())
    from_csv = load_tables(aaa_dir, _csv_mapping())["events"]
    assert len(from_csv) == len(frame) == 350_298
    pd.testing.assert_frame_equal(from_csv, from_parquet, check_categorical=False)


def test_bad_click_rows_are_each_reported_with_line_column_and_expectation(aaa_dir):
    rows = pd.read_parquet(aaa_dir / "studentVle.parquet").head(8).astype(str).to_numpy().tolist()
    rows[0][5] = "0"  # sum_click
    rows[1][3] = "1"  # id_site not in vle.csv
    rows[2][4] = "300"  # date after AAA 2013J's last day (268)
    rows[3][2] = "42"  # a student not registered
    rows[4][5] = "many"  # not a number
    rows[5][4] = ""  # missing day
    _events_csv(aaa_dir, rows)
    with pytest.raises(DataError) as err:
        load_tables(aaa_dir, _csv_mapping())
    assert [str(p) for p in err.value.problems] == [
        "studentVle.csv, line 7, column 'date': value is missing; expected a value",
        "studentVle.csv, line 6, column 'sum_click': 'many' is not a whole number",
        "studentVle.csv, line 2, column 'sum_click': 0 is out of range; expected 1 to 1000000",
    ]
    rows[0][5], rows[4][5], rows[5][4] = "1", "1", "5"  # the rest are references: reported once values are sound
    with (aaa_dir / "studentVle.csv").open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["code_module", "code_presentation", "id_student", "id_site", "date", "sum_click"])
        out.writerows(rows)
    with pytest.raises(DataError) as err:
        load_tables(aaa_dir, _csv_mapping())
    assert [str(p) for p in err.value.problems] == [
        "studentVle.csv, line 5, column 'id_student': student not registered on this course presentation (in learners); "
        "expected a learner's event",
        "studentVle.csv, line 3, column 'id_site': resource not listed for this course presentation (in resources); "
        "expected a known site",
        "studentVle.csv, line 4, column 'date': day is after the presentation's last day; expected at most its length in days",
    ]


def test_a_wholly_wrong_column_is_listed_up_to_a_bound_then_counted(aaa_dir):
    frame = pd.read_parquet(aaa_dir / "studentVle.parquet").head(MAX_LISTED + 7)
    frame["sum_click"] = 0
    frame.to_parquet(aaa_dir / "studentVle.parquet", index=False)
    with pytest.raises(DataError) as err:
        load_tables(aaa_dir)
    problems = [str(p) for p in err.value.problems]
    assert len(problems) == MAX_LISTED + 1
    assert problems[0] == "studentVle.parquet, row 1, column 'sum_click': 0 is out of range; expected 1 to 1000000"
    assert problems[-1] == "studentVle.parquet, column 'sum_click': 7 more rows with this problem"
    assert str(err.value).splitlines()[:3] == [
        f"{MAX_LISTED + 7} data problem(s):",
        "by file and column:",
        f"  studentVle.parquet, column 'sum_click': {MAX_LISTED + 7} problems (rows 1, 2, 3, ...)",
    ]


def test_mapped_click_column_missing_is_named(aaa_dir):
    frame = pd.read_parquet(aaa_dir / "studentVle.parquet").rename(columns={"sum_click": "clicks"})
    frame.to_parquet(aaa_dir / "studentVle.parquet", index=False)
    with pytest.raises(DataError) as err:
        load_tables(aaa_dir)
    assert [str(p) for p in err.value.problems] == [
        "studentVle.parquet, row 1, column 'sum_click': column is missing (mapped to contract field events.clicks); "
        "the file has columns code_module, code_presentation, id_student, id_site, date, clicks"
    ]


def test_the_module_needs_both_tables(tmp_path):
    source = OULAD_MAPPING.read_text()
    path = tmp_path / "half.toml"
    path.write_text(source[: source.index("[resources]")] + source[source.index("[events]") :])
    with pytest.raises(MappingError, match="module engagement needs both tables"):
        load_mapping(path)


def test_campus_slices_split_the_click_log(tables):
    sizes = {c: len(campus_slice(tables, "module", c)["events"]) for c in ("AAA", "GGG")}
    assert sizes == {"AAA": 350_298, "GGG": 387_173}


def test_a_mapping_declaring_engagement_needs_contract_1_1(tmp_path):
    path = tmp_path / "old.toml"
    path.write_text(OULAD_MAPPING.read_text().replace('contract_version = "1.1"', 'contract_version = "1.0"'))
    with pytest.raises(
        MappingError,
        match=r'module engagement \(tables resources, events\) is part of contract 1.1 on; set contract_version = "1.1"',
    ):
        load_mapping(path)


def test_a_core_only_export_trains_on_the_core_with_each_absent_module_flagged(aaa, aaa_dir):
    core = load_mapping().model_copy(update={"assessments": None, "submissions": None, "resources": None, "events": None})
    (aaa_dir / "assessments.csv").unlink()  # a core-only export has no such files: none is asked for
    (aaa_dir / "studentAssessment.csv").unlink()
    (aaa_dir / "studentVle.parquet").unlink()
    tables = load_tables(aaa_dir, core)
    assert sorted(tables.frames) == ["learners", "presentations", "registrations"] and core.modules == frozenset()
    data, full = early_warning(tables, D, "at_risk"), early_warning(aaa, D, "at_risk")
    x, names = dict(zip(feature_names(OULAD), data.x.T, strict=True)), feature_names(OULAD)
    assert (x["assessments_absent"] == 1).all() and (x["engagement_absent"] == 1).all()
    assert all((x[n] == 0).all() for n in ASSESSMENT_FEATURES)
    demographics = [i for i, n in enumerate(names) if "=" in n or n in ("prev_attempts", "studied_credits")]
    np.testing.assert_array_equal(data.x[:, demographics], full.x[:, demographics])
    np.testing.assert_array_equal(data.y, full.y)


def test_the_assessments_module_needs_both_tables(tmp_path):
    source = OULAD_MAPPING.read_text()
    path = tmp_path / "half.toml"
    path.write_text(source[: source.index("[submissions]")] + source[source.index("[resources]") :])
    with pytest.raises(MappingError, match="module assessments needs both tables"):
        load_mapping(path)


def test_download_stores_the_official_click_log_csv_as_parquet(aaa, aaa_dir, tmp_path, monkeypatch):
    import zipfile

    from edufl.experiments import oulad

    _events_csv(aaa_dir, pd.read_parquet(aaa_dir / "studentVle.parquet").astype(str).to_numpy().tolist())
    archive = tmp_path / "release.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(aaa_dir.iterdir()):
            zf.write(path, f"anonymisedData/{path.name}")
    with pytest.raises(DataError) as err:  # campus AAA's rows, not the release's: the counts say so
        oulad.download(archive.resolve().as_uri(), tmp_path / "cache")
    assert "studentVle.csv: has 350298 rows; the official release has 10655280" in [str(p) for p in err.value.problems]
    aaa_rows = {**oulad.OULAD_RELEASE_ROWS, "studentVle.csv": 350_298, "vle.csv": len(aaa["resources"])}
    aaa_rows.update(
        {"courses.csv": 2, "assessments.csv": len(aaa["assessments"]), "studentAssessment.csv": len(aaa["submissions"])}
    )
    aaa_rows.update({"studentInfo.csv": 748, "studentRegistration.csv": 748})
    monkeypatch.setattr(oulad, "OULAD_RELEASE_ROWS", aaa_rows)
    monkeypatch.setattr(oulad, "OULAD_RELEASE_SHA256", {})  # campus AAA's files are not the release's
    dest = oulad.download(archive.resolve().as_uri(), tmp_path / "cache2")
    assert not (dest / "studentVle.csv").exists()
    pd.testing.assert_frame_equal(load_tables(dest)["events"], aaa["events"], check_categorical=False)


def test_dp_engagement_statistic_by_final_result(aaa, data_dir, aaa_dir):
    from edufl.federation.proto.analytics_pb2 import StatisticQuery
    from edufl.federation.queries import QueryError
    from edufl.federation.randomness import Randomness
    from edufl.federation.statistics import answer, exact_cells, noise, noise_multiplier

    query = StatisticQuery(
        name="clicks",
        statistic="mean",
        value="total_clicks",
        low=0,
        high=5000,
        group_by=["final_result"],
        epsilon=1.0,
        delta=1e-5,
    )
    raw = pd.read_parquet(data_dir / "studentVle.parquet", filters=[("code_module", "==", "AAA")])
    per = raw.groupby(["code_presentation", "id_student"])["sum_click"].sum().clip(upper=5000)
    info = aaa["learners"].set_index(["presentation", "student_id"])
    totals = per.reindex(info.index, fill_value=0)  # a registration without a click counts 0
    expected = totals.groupby(info["final_result"].to_numpy()).agg(["size", "sum"])
    exact = exact_cells(query, aaa.frames, OULAD)
    assert {k[0][0]: (n, round(s)) for k, (n, s) in exact.items() if n} == {
        r: (int(row["size"]), int(row["sum"])) for r, row in expected.iterrows()
    }
    z = noise_multiplier(query)
    reply = answer(query, aaa.frames, "AAA", z, 10, schema=OULAD, randomness=Randomness(seed=3))
    pass_cell = next(c for c in reply.cells if list(c.group) == ["Pass"])
    true, std = expected.loc["Pass"], noise(query, z)  # noise of std z·√2 per count and z·√2·5000 per sum
    assert abs(pass_cell.noisy_count - true["size"]) < 4 * std.count_std
    assert abs(pass_cell.noisy_sum - true["sum"]) < 4 * std.sum_std and pass_cell.noisy_sum != true["sum"]
    core = load_mapping().model_copy(update={"resources": None, "events": None})
    with pytest.raises(QueryError, match="this campus's data have no module engagement"):
        exact_cells(query, load_tables(aaa_dir, core).frames, OULAD)


def test_the_dataset_identity_covers_the_core_so_a_new_module_keeps_the_budget_spent(aaa_dir):
    from edufl.federation.fingerprint import dataset_id

    before = dataset_id(aaa_dir)
    events = pd.read_parquet(aaa_dir / "studentVle.parquet")
    events.head(len(events) // 2).to_parquet(aaa_dir / "studentVle.parquet")  # the click log changed
    assert dataset_id(aaa_dir) == before
    with open(aaa_dir / "studentRegistration.csv", "a") as f:  # who the records are about changed
        f.write("\n")
    assert dataset_id(aaa_dir) != before
