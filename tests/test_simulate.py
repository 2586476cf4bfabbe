"""End to end on the real data: `edufl simulate` as a user runs it, federated and baselines."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from processes import simulate

from edufl.federation.audit import AuditLog
from edufl.federation.ledger import PrivacyLedger
from edufl.federation.partition import campus_names, campus_slice
from edufl.federation.tasks import early_warning, split

pytestmark = pytest.mark.simulation

SUMMARY_KEYS = {"config", "versions", "privacy", "rounds", "campuses", "global", "failures", "receipts", "wall_time_s"}
CAMPUS_KEYS = {"campus", "n_train", "n_test", "auc", "average_precision", "f1", "brier", "epsilon", "delta"}


def _summary(out: Path) -> dict:
    summary = json.loads((out / "summary.json").read_text())
    assert SUMMARY_KEYS <= set(summary)
    assert {"auc", "average_precision", "f1", "brier", "worst_campus_auc"} <= set(summary["global"])
    for name in ("rounds.csv", "campuses.csv", "plot.png"):
        assert (out / name).stat().st_size > 0
    return summary


def test_federated_dp_run_beats_constant_predictor_on_every_campus(tables, data_dir, tmp_path):
    out = tmp_path / "fed"
    done = simulate(data_dir, out, "--rounds", "3", "--target-epsilon", "3")
    summary = _summary(out)
    assert [r["round"] for r in summary["rounds"]] == [1, 2, 3]
    assert "round   3/3" in done.stdout and "max ε" in done.stdout
    campuses = {c["campus"]: c for c in summary["campuses"]}
    assert sorted(campuses) == campus_names(tables, "module")
    for name, row in campuses.items():
        assert CAMPUS_KEYS <= set(row)
        assert 0 < row["epsilon"] <= 3.0 and row["delta"] == 1e-5
        test = split(early_warning(campus_slice(tables, "module", name), 60, "withdrawal"), "stratified", 0.2, 0)[1]
        assert row["n_test"] == len(test)
        if test.y.sum() >= 30:
            assert row["auc"] > 0.5, (name, row)  # a constant predictor has AUC 0.5
    assert summary["privacy"]["epsilon"] == max(c["epsilon"] for c in campuses.values())
    assert summary["privacy"]["dp"] is True and "registration" in summary["privacy"]["unit"]
    assert summary["global"]["auc"] > 0.55
    assert (out / "model.pt").stat().st_size > 0
    with (out / "campuses.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 7 and {r["privacy_unit"] for r in rows} == {"one registration row"}
    assert "privacy unit: one registration row" in done.stdout and "per one registration row" in done.stdout
    # Each virtual campus's ledger and audit log: what the coordinator received is exactly what campuses logged as sent.
    logged, spent = set(), {}
    for name in campuses:
        records = AuditLog(out / "campuses" / name).records()
        # One train reply a round (carrying the evaluation of the model it received) and one final evaluate.
        assert [(r.server_round, r.message_type) for r in records] == [(1, "train"), (2, "train"), (3, "train"), (3, "evaluate")]
        assert all(r.sent for r in records)
        logged |= {(r.server_round, r.message_type, name, r.payload_sha256) for r in records}
        [dataset] = PrivacyLedger(out / "campuses" / name).datasets()
        spent[name] = PrivacyLedger(out / "campuses" / name).spent(dataset, 1e-5)
    assert logged == {(r["round"], r["phase"], r["campus"], r["payload_sha256"]) for r in summary["receipts"]}
    assert spent == pytest.approx({name: row["epsilon"] for name, row in campuses.items()})


@pytest.mark.parametrize("mode", ["centralized", "local"])
def test_baselines_write_the_same_results_format(data_dir, tmp_path, mode):
    out = tmp_path / mode
    simulate(data_dir, out, "--mode", mode, "--rounds", "2", "--model", "logistic")
    summary = _summary(out)
    assert summary["config"]["mode"] == mode
    assert len(summary["campuses"]) == 7 and len(summary["rounds"]) == 2
    eps = {c["epsilon"] for c in summary["campuses"]}
    if mode == "centralized":
        assert len(eps) == 1  # one pooled dataset, one ε
    assert all(0 < e <= 3.0 for e in eps)


def test_no_dp_says_so_in_every_output(data_dir, tmp_path):
    out = tmp_path / "nodp"
    done = simulate(data_dir, out, "--mode", "local", "--rounds", "1", "--no-dp", "--campus-by", "region")
    assert "DIFFERENTIAL PRIVACY IS OFF" in done.stdout and "NO DP" in done.stdout
    summary = _summary(out)
    assert summary["privacy"]["dp"] is False and "DIFFERENTIAL PRIVACY IS OFF" in summary["privacy"]["warning"]
    assert len(summary["campuses"]) == 13 and all(c["epsilon"] is None for c in summary["campuses"])
    assert "dp" in (out / "campuses.csv").read_text().splitlines()[0].split(",")


def test_campuses_refusing_a_run_under_their_policy_end_it_with_status_3_naming_them(data_dir, tmp_path):
    policy = tmp_path / "policy.toml"
    policy.write_text("[privacy]\nmax_epsilon_per_run = 1.0\n")
    env = {**os.environ, "EDUFL_DATA": str(data_dir)}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "edufl.experiments.cli",
            "simulate",
            "--out",
            str(tmp_path / "run"),
            "--rounds",
            "1",
            "--campus-by",
            "region",
            "--target-epsilon",
            "3",
            "--policy",
            str(policy),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert done.returncode == 3, done.stderr[-3000:]
    assert "campuses refused the run" in done.stderr
    assert (
        "campus Wales refuses round 1: the request breaks its policy (privacy.max_epsilon_per_run: target-epsilon 3 > 1)"
        in done.stderr
    )
    assert "Traceback" not in done.stderr
