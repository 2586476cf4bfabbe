"""Loading and validating the OULAD release as learner-record contract tables: real files, and each kind of broken file."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from edufl.experiments.oulad import CLICK_LOG, OULAD_RELEASE_ROWS, download, resolve_data_dir
from edufl.federation.contract import TABLES
from edufl.federation.errors import UserError
from edufl.federation.mapping import load_mapping
from edufl.federation.partition import campus_names, campus_slice
from edufl.federation.problems import DataError
from edufl.federation.tables import load_tables


def test_loads_every_table_with_release_row_counts(tables):
    oulad = load_mapping()
    rows = {oulad.table(t.name).file.replace(CLICK_LOG[1], CLICK_LOG[0]): len(tables[t.name]) for t in TABLES if t.name in tables}
    assert rows == OULAD_RELEASE_ROWS
    info = tables["learners"]
    # '?' and blanks are missing values; the "10-20" quirk maps to the contract's band.
    assert info["imd_band"].isna().sum() == 1111
    assert (info["imd_band"] == "10-20%").sum() == 3516
    assert tables["submissions"]["score"].isna().sum() == 173
    assert tables["registrations"]["unregistration_day"].notna().sum() == 10072
    assert tables.notes == ["vle.csv: 2 column(s) not used by the mapping: week_from, week_to"]  # listed, not dropped silently
    missing = tables.missingness.set_index(["table", "field"])["missing"]
    assert missing[("learners", "imd_band")] == 1111 and missing[("registrations", "unregistration_day")] == 22521
    assert missing[("assessments", "due_day")] == 11 and missing.sum() == 1111 + 22521 + 11 + 45 + 173


def test_campuses(tables):
    assert campus_names(tables, "module") == ["AAA", "BBB", "CCC", "DDD", "EEE", "FFF", "GGG"]
    assert len(campus_names(tables, "region")) == 13
    sizes = {c: len(campus_slice(tables, "module", c)["learners"]) for c in campus_names(tables, "module")}
    assert sizes["AAA"] == 748 and sum(sizes.values()) == 32593


def test_slice_round_trips_through_files(aaa, aaa_dir):
    again = load_tables(aaa_dir)
    assert sorted(again.frames) == sorted(aaa.frames)
    for t in (t for t in TABLES if t.name in aaa):
        assert len(again[t.name]) == len(aaa[t.name])
    assert again["submissions"]["score"].sum() == pytest.approx(aaa["submissions"]["score"].sum())


def test_bom_crlf_and_unquoted(aaa_dir):
    path = aaa_dir / "studentInfo.csv"
    text = path.read_text().replace('"', "")
    path.write_bytes(b"\xef\xbb\xbf" + text.replace("\n", "\r\n").encode())
    info = load_tables(aaa_dir)["learners"]
    assert len(info) == 748 and info.columns[0] == "course"


def _edit(path: Path, line: int, old: str, new: str) -> None:
    lines = path.read_text().splitlines(keepends=True)
    assert old in lines[line - 1], lines[line - 1]
    lines[line - 1] = lines[line - 1].replace(old, new, 1)
    path.write_text("".join(lines))


def _problems(directory: Path) -> list[str]:
    with pytest.raises(DataError) as err:
        load_tables(directory)
    return [str(p) for p in err.value.problems]


def _score_line(path: Path) -> tuple[int, str]:
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if n > 1 and line.endswith(',"78.0"'):
            return n, '"78.0"'
    raise AssertionError("no score 78 found")


def test_missing_file(aaa_dir):
    (aaa_dir / "studentAssessment.csv").unlink()
    with pytest.raises(DataError, match="studentAssessment.csv: file not found") as err:
        load_tables(aaa_dir)
    assert "edufl data download" in str(err.value)


def test_missing_column(aaa_dir):
    path = aaa_dir / "courses.csv"
    _edit(path, 1, '"module_presentation_length"', '"length"')
    assert _problems(aaa_dir) == [
        "courses.csv, line 1, column 'module_presentation_length': column is missing "
        "(mapped to contract field presentations.length_days); the file has columns "
        "code_module, code_presentation, length"
    ]


def test_wrong_type_and_ranges(aaa_dir):
    sa = aaa_dir / "studentAssessment.csv"
    line, old = _score_line(sa)
    _edit(sa, line, old, '"high"')
    _edit(aaa_dir / "studentInfo.csv", 2, '"240"', '"0"')  # studied_credits
    _edit(aaa_dir / "assessments.csv", 2, '"19"', '"19.5"')  # due day
    problems = _problems(aaa_dir)
    assert f"studentAssessment.csv, line {line}, column 'score': 'high' is not a number" in problems
    assert "studentInfo.csv, line 2, column 'studied_credits': 0 is out of range; expected a value > 0" in problems
    assert any(p.startswith("assessments.csv, line 2, column 'date': '19.5' is not a whole number") for p in problems)


def test_score_out_of_range_and_bad_category(aaa_dir):
    sa = aaa_dir / "studentAssessment.csv"
    line, old = _score_line(sa)
    _edit(sa, line, old, '"105"')
    _edit(aaa_dir / "studentInfo.csv", 3, '"F"', '"X"')
    problems = _problems(aaa_dir)
    assert f"studentAssessment.csv, line {line}, column 'score': 105 is out of range; expected 0 to 100" in problems
    assert "studentInfo.csv, line 3, column 'gender': unexpected value 'X'; expected one of F, M" in problems


def test_broken_references(aaa_dir):
    sa = aaa_dir / "studentAssessment.csv"
    _edit(sa, 2, '"1752"', '"999999"')
    problems = _problems(aaa_dir)
    assert problems == ["studentAssessment.csv, line 2: assessment (in assessments.csv) 999999 does not exist"]


def test_student_not_registered_on_presentation(aaa_dir):
    sa = aaa_dir / "studentAssessment.csv"
    _edit(sa, 2, '"11391"', '"42"')
    assert _problems(aaa_dir) == [
        "studentAssessment.csv, line 2: student registered on the assessment's presentation "
        "(course/presentation/student) AAA/2013J/42 does not exist"
    ]


def test_conflicting_duplicate_registration_and_exact_duplicate(aaa_dir):
    path = aaa_dir / "studentRegistration.csv"
    lines = path.read_text().splitlines(keepends=True)
    conflicting = lines[1].replace('"-159"', '"-100"')
    path.write_text("".join([*lines, conflicting]))
    assert _problems(aaa_dir) == [
        f"studentRegistration.csv, line {len(lines) + 1}: conflicting duplicate of line 2 for "
        "course/presentation/student_id = ('AAA', '2013J', 11391); expected one record per key"
    ]
    path.write_text("".join([*lines, lines[1]]))
    tables = load_tables(aaa_dir)
    assert len(tables["registrations"]) == 748
    assert tables.notes == ["studentRegistration.csv: 1 exact duplicate row(s) merged (lines 750...)"]


def test_truncated_row(aaa_dir):
    path = aaa_dir / "studentInfo.csv"
    lines = path.read_text().splitlines(keepends=True)
    lines[4] = ",".join(lines[4].split(",")[:7]) + "\n"
    path.write_text("".join(lines))
    assert _problems(aaa_dir) == ["studentInfo.csv, line 5: row has 7 fields; expected 12 (truncated or malformed row)"]


def test_other_encoding_and_delimiter(aaa_dir):
    info = aaa_dir / "studentInfo.csv"
    info.write_bytes(info.read_text().replace("Scotland", "Sc\u00f6tland").encode("latin-1"))
    problems = _problems(aaa_dir)
    assert len(problems) == 1 and problems[0].startswith("studentInfo.csv, line ")
    assert "is not utf-8; expected a utf-8 encoded file" in problems[0]
    info.write_text((aaa_dir / "courses.csv").read_text())  # restore something valid below
    courses = aaa_dir / "courses.csv"
    courses.write_text(courses.read_text().replace(",", ";"))
    assert (
        _problems(aaa_dir)[0] == "courses.csv, line 1: columns are separated by ';'; expected ',' (set delimiter in the mapping)"
    )


def test_utf16(aaa_dir):
    courses = aaa_dir / "courses.csv"
    courses.write_bytes(courses.read_text().encode("utf-16"))
    assert _problems(aaa_dir) == [
        "courses.csv: file is UTF-16 encoded; expected utf-8 (save it as utf-8, or set encoding in the mapping)"
    ]


def test_no_data_found_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.delenv("EDUFL_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    with pytest.raises(DataError, match="edufl data download") as err:
        resolve_data_dir(None)
    assert isinstance(err.value, UserError) and err.value.exit_code == 2  # a user mistake: exit status 2
    assert [str(p) for p in err.value.problems] == [
        f"{tmp_path / 'edufl' / 'oulad'}: no OULAD tables found here (from the user cache folder (no --data, no $EDUFL_DATA))"
    ]


def test_cli_exit_code_2_without_traceback(aaa_dir):
    _edit(aaa_dir / "studentInfo.csv", 3, '"F"', '"X"')
    done = subprocess.run(
        [sys.executable, "-m", "edufl.experiments.cli", "data", "validate", "--data", str(aaa_dir)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2
    assert "studentInfo.csv, line 3, column 'gender': unexpected value 'X'" in done.stderr
    assert "Traceback" not in done.stderr


def test_simulate_reports_bad_data_read_while_the_engine_starts(aaa_dir, tmp_path):
    # `edufl simulate --data DIR` reads the tables in a forked process while it imports the apps: a problem
    # found there ends the run as one found in the process itself would (exit 2, every detail, no traceback).
    _edit(aaa_dir / "studentInfo.csv", 3, '"F"', '"X"')
    done = subprocess.run(
        [sys.executable, "-m", "edufl.experiments.cli", "simulate", "--data", str(aaa_dir), "--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        env={**os.environ, "FLWR_HOME": str(tmp_path / "flwr")},
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.count("studentInfo.csv, line 3, column 'gender': unexpected value 'X'") == 1
    assert "Traceback" not in done.stderr and "round" not in done.stdout
    assert not (tmp_path / "out" / "summary.json").exists()


def _zip(directory: Path, target: Path) -> str:
    import zipfile

    with zipfile.ZipFile(target, "w") as zf:
        for name in load_mapping().files():
            zf.write(directory / name, f"anonymisedData/{name}")
    return target.resolve().as_uri()


def test_download_unpacks_and_checks_row_counts(data_dir, aaa_dir, tmp_path):
    dest = download(_zip(data_dir, tmp_path / "release.zip"), tmp_path / "cache")
    assert len(load_tables(dest)["submissions"]) == 173912
    with pytest.raises(DataError) as err:
        download(_zip(aaa_dir, tmp_path / "partial.zip"), tmp_path / "cache2")
    assert "studentInfo.csv: has 748 rows; the official release has 32593" in [str(p) for p in err.value.problems]
    assert not (tmp_path / "cache2" / "studentInfo.csv").exists()  # nothing half-installed


def test_header_names_match_after_normalising_whitespace(aaa_dir):
    path = aaa_dir / "studentInfo.csv"
    lines = path.read_text().splitlines(keepends=True)
    lines[0] = lines[0].replace('"id_student"', '" id_student  "').replace('"final_result"', '"final_result\t"')
    path.write_text("".join(lines))
    assert len(load_tables(aaa_dir)["learners"]) == 748


def test_problems_are_summarised_by_file_and_column_before_the_details(aaa_dir):
    path = aaa_dir / "studentInfo.csv"
    lines = path.read_text().splitlines(keepends=True)
    for n in range(1, 41):  # 40 genders out of the vocabulary
        lines[n] = lines[n].replace('"M"', '"X"').replace('"F"', '"X"')
    fields = lines[3].split(",")
    fields[9] = '"0"'  # and one studied_credits out of range
    lines[3] = ",".join(fields)
    path.write_text("".join(lines))
    with pytest.raises(DataError) as err:
        load_tables(aaa_dir)
    text = str(err.value).splitlines()
    assert text[:5] == [
        "41 data problem(s):",
        "by file and column:",
        "  studentInfo.csv, column 'gender': 40 problems (lines 2, 3, 4, ...)",
        "  studentInfo.csv, column 'studied_credits': 1 problem (lines 4)",
        "first problems:",
    ]
    assert text[5] == "  - studentInfo.csv, line 2, column 'gender': unexpected value 'X'; expected one of F, M"
    assert text[-1] == "  ... and 16 more problems"
