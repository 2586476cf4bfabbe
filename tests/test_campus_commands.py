"""`edufl campus budget` and `edufl campus audit` on the state folders of a real simulated run, and what a
campus command loads (the campus side alone: no research code, simulation engine or torch)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from edufl.experiments.cli import main
from edufl.federation.audit import AuditLog
from edufl.federation.ledger import PrivacyLedger

POLICY = "[privacy]\ntotal_epsilon_budget = 8.0\ndelta = 1e-5\n"


@pytest.fixture(scope="module")
def run(tmp_path_factory, data_dir) -> Path:
    """Two rounds of the 7 module campuses under a policy; each campus's state folder is OUT/campuses/NAME."""
    root = tmp_path_factory.mktemp("campus-commands")
    (root / "policy.toml").write_text(POLICY)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "edufl.experiments.cli",
            "simulate",
            "--rounds",
            "2",
            "--model",
            "logistic",
            "--policy",
            str(root / "policy.toml"),
            "--out",
            str(root / "out"),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "EDUFL_DATA": str(data_dir)},
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return root


@pytest.mark.simulation
def test_budget_shows_each_dataset_spent_and_left(run, capsys):
    state = run / "out" / "campuses" / "AAA"
    assert main(["campus", "budget", "--state", str(state), "--policy", str(run / "policy.toml")]) == 0
    shown = capsys.readouterr().out
    ledger = PrivacyLedger(state)
    [(dataset, campus)] = ledger.datasets().items()
    spent = ledger.spent(dataset, 1e-5)
    assert 0 < spent <= 3.0
    row = next(line for line in shown.splitlines() if dataset[:12] in line)
    cells = [c.strip() for c in row.strip("│ ").split("│")]
    assert cells == [campus, dataset[:12], "1", "2", f"{spent:.3f}", f"{8.0 - spent:.3f}"]
    assert main(["campus", "budget", "--state", str(state)]) == 0  # without the policy: no budget left column
    assert "remaining" not in capsys.readouterr().out


@pytest.mark.simulation
def test_audit_lists_every_message_as_json_and_table(run, capsys):
    state = run / "out" / "campuses" / "BBB"
    assert main(["campus", "audit", "--state", str(state), "--format", "json"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    # one exchange per round: round 1's model is evaluated in round 2's train reply, the last model on its own
    assert [(r["server_round"], r["message_type"], r["sent"]) for r in records] == [
        ("1", "train", True),
        ("2", "train", True),
        ("2", "evaluate", True),
    ]
    assert [k for k in records[1]["metric_keys"] if k.startswith("evaluation:")] == [
        f"evaluation:{k}" for k in sorted(records[2]["metric_keys"])
    ]
    releases = PrivacyLedger(state).releases()
    assert [r["dp"]["epsilon"] for r in records if r["message_type"] == "train"] == [r.dp.epsilon for r in releases]
    run_id = records[0]["run_id"]
    assert main(["campus", "audit", "--state", str(state), "--run", run_id]) == 0
    table = capsys.readouterr().out
    for record in AuditLog(state).records(run_id):
        assert record.payload_sha256[:12] in table and str(record.payload_bytes) in table
    assert table.count(" sent ") == 3 and f"{releases[-1].dp.epsilon:.3f}" in table


@pytest.mark.simulation
@pytest.mark.parametrize(
    "command, message",
    [
        (["budget", "--state", "{missing}"], "no such folder"),
        (["budget", "--state", "{empty}"], "no privacy ledger here (ledger.sqlite)"),
        (["audit", "--state", "{empty}"], "no audit log here (audit.sqlite)"),
        (["audit", "--state", "{state}", "--run", "no-such-run"], "--run no-such-run: no audit record of this run"),
        (["budget", "--state", "{state}", "--policy", "{missing}"], "policy file not found"),
    ],
)
def test_a_wrong_state_folder_or_run_is_a_clear_error(run, tmp_path, capsys, command, message):
    paths = {"missing": tmp_path / "missing", "empty": tmp_path, "state": run / "out" / "campuses" / "CCC"}
    assert main(["campus", *[a.format(**paths) for a in command]]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "ledger.sqlite").exists()  # looking never creates a ledger


# Runs `edufl ARGS...` as the `edufl` script does, and writes the names of every module loaded by then to FILE at exit.
PROBE = (
    "import atexit, json, sys\n"
    "out, sys.argv = sys.argv[1], ['edufl', *sys.argv[2:]]\n"
    "atexit.register(lambda: open(out, 'w').write(json.dumps(sorted(sys.modules))))\n"
    "from edufl.experiments.cli import main\n"
    "sys.exit(main())\n"
)


@pytest.mark.parametrize(
    "command, shown",
    [
        (["campus", "validate", "--data", "{campus}"], "OK, 748 registrations (courses AAA)"),
        (["campus", "--help"], "export-oulad"),
    ],
)
def test_a_campus_command_loads_no_research_code_simulation_engine_or_torch(aaa_dir, tmp_path, command, shown):
    loaded = tmp_path / "modules.json"
    done = subprocess.run(
        [sys.executable, "-c", PROBE, str(loaded), *[a.format(campus=aaa_dir) for a in command]],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert shown in done.stdout
    modules = json.loads(loaded.read_text())
    assert "edufl.clients.cli" in modules
    assert {m.split(".")[0] for m in modules}.isdisjoint({"ray", "matplotlib", "torch"})
    assert [m for m in modules if m.startswith("edufl.experiments.")] == ["edufl.experiments.cli"]
