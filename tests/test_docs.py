"""The user guides stay true: every command they show exists with every option they name, the researcher's
first run runs as written, and the campus side runs without the research dependencies."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

from edufl.federation.contract import CONTRACT_VERSION, TABLES, Column, Table, version_text

ROOT = Path(__file__).resolve().parents[1]
GUIDES = [
    "README.md",
    "docs/researcher.md",
    "docs/campus.md",
    "docs/coordinator.md",
    "docs/privacy.md",
    "docs/multi-host.md",
    "docs/dashboard.md",
    "docs/contract.md",
    "docs/single-table-example/README.md",
]
GROUPS = {"campus", "coordinator", "data", "analytics", "experiment"}
ENV = {**os.environ, "COLUMNS": "250", "TERM": "dumb"}


def _commands(text: str) -> list[tuple[tuple[str, ...], set[str]]]:
    """Every `edufl ...` command in the guide's code blocks: (subcommand path, options named), with the
    indented synopsis lines and backslash continuations that follow a command counted as its own."""
    found: list[tuple[tuple[str, ...], set[str]]] = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S):
        current = None
        for line in block.splitlines():
            code = line.split(" #")[0]
            start = re.search(r"(?:^|&& |\.venv/bin/)(?:[A-Z_]+=\S+ )*edufl ((?:[a-z][a-z-]* ?)+)", code)
            if start and not line.startswith(" "):
                words = start.group(1).split()
                path = tuple(words[:2]) if words[0] in GROUPS else (words[0],)
                current = (path, set())
                found.append(current)
                code = code[start.start() :]  # what precedes the command (an install) is not its options
            elif current is None or not line.startswith(" "):
                current = None
                continue
            current[1].update(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", code))
    return found


@cache
def _help(path: tuple[str, ...]) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "edufl.experiments.cli", *path, "--help"], capture_output=True, text=True, env=ENV, timeout=120
    )
    assert done.returncode == 0, (path, done.stderr[-2000:])
    return done.stdout


@pytest.mark.parametrize("guide", GUIDES)
def test_every_command_a_guide_shows_exists_with_every_option_it_names(guide):
    commands = _commands((ROOT / guide).read_text())
    if guide not in ("docs/privacy.md", "docs/contract.md"):  # reference pages
        assert commands, f"{guide} shows no edufl command"
    for path, options in commands:
        text = _help(path)
        missing = sorted(o for o in options - {"--help"} if not re.search(rf"{re.escape(o)}(?![\w-])", text))
        assert not missing, f"{guide}: `edufl {' '.join(path)}` has no option {', '.join(missing)}"


def test_guide_commands_are_parsed_as_a_reader_types_them():
    text = "```\nedufl campus start --data DIR [--mapping FILE]\n      [--pki DIR] # a comment --not-an-option\nedufl bench\n```"
    assert _commands(text) == [(("campus", "start"), {"--data", "--mapping", "--pki"}), (("bench",), set())]


@pytest.mark.simulation
def test_the_researcher_guide_first_run_runs_as_written(data_dir, tmp_path):
    guide = (ROOT / "docs/researcher.md").read_text()
    [command] = re.findall(r"^edufl simulate --rounds 2 [^\n]*", guide, flags=re.M)
    assert command == "edufl simulate --rounds 2 --model logistic --out results/first"
    edufl = [sys.executable, "-m", "edufl.experiments.cli"]
    done = subprocess.run(
        [*edufl, *command.split()[1:]],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**ENV, "EDUFL_DATA": str(data_dir)},
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp_path / "results/first/summary.json").read_text())
    assert [r["round"] for r in summary["rounds"]] == [1, 2] and 0 < summary["privacy"]["epsilon"] <= 3
    assert re.fullmatch(r"first-[0-9a-f]{8}", summary["config"]["run-name"])
    assert (tmp_path / "results/first/plot.png").stat().st_size > 0
    assert "done: weighted AUC" in done.stdout


# A campus install ('edufl[campus]') has neither Ray nor matplotlib: the campus commands must not need them.
_WITHOUT_RESEARCH = """
import sys
class Absent:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("ray", "matplotlib"):
            raise ImportError(f"{name} is not installed")
sys.meta_path.insert(0, Absent())
sys.argv = ["edufl", *sys.argv[1:]]
from edufl.experiments.cli import main
main()
"""


@pytest.mark.parametrize("args", [["campus", "--help"], ["campus", "validate", "--data", "{data}"], ["campus", "approve"]])
def test_campus_commands_run_without_ray_or_matplotlib(data_dir, args):
    args = [a.format(data=data_dir) for a in args]
    done = subprocess.run([sys.executable, "-c", _WITHOUT_RESEARCH, *args], capture_output=True, text=True, env=ENV, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "not installed" not in done.stderr


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def _values(column: Column) -> str:
    if column.kind == "str":
        return "any"
    if column.kind == "cat":
        return ", ".join(column.vocab) or "the federation schema's vocabulary"
    low = _number(column.low) if column.low is not None else None
    if column.positive:
        low = "1" if column.kind == "int" else "more than 0"
    high = _number(column.high) if column.high is not None else None
    if low and high:
        return f"{low} to {high}"
    return f"at least {low}" if low else f"at most {high}"


def field_reference(table: Table) -> str:
    """docs/contract.md's section on one contract table, as federation/contract.py declares it."""
    kinds = {"str": "text", "int": "whole number", "float": "number", "cat": "category"}
    rows = [f"| `{c.name}` | {kinds[c.kind]} | {'yes' if c.nullable else 'no'} | {_values(c)} |" for c in table.columns]
    key = ", ".join(table.key) or "none"
    head = f"### `{table.name}` (module {table.module}; protobuf `{table.message}`; key: {key})"
    return "\n".join([head, "", "| field | type | nullable | values |", "|---|---|---|---|", *rows]) + "\n"


def test_the_contract_reference_shows_every_table_and_field_as_the_code_declares_them():
    text = (ROOT / "docs/contract.md").read_text()
    assert f"(version {version_text(CONTRACT_VERSION)})" in text.splitlines()[0]
    for table in TABLES:
        assert field_reference(table) in text, f"docs/contract.md: section on `{table.name}` differs from federation/contract.py"
    assert len(re.findall(r"^### `", text, flags=re.M)) == len(TABLES)
