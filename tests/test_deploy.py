"""Flower's deployment engine with real processes on 127.0.0.1: one coordinator (SuperLink, TLS,
campus authentication) and campuses AAA, BBB, CCC (SuperNodes), each reading only its own export.

One coordinator serves the whole module; campus DDD is registered but never started. Each campus
keeps its privacy ledger and audit log in its own state folder under the module's temporary
folder, under a policy file that approves this app's bundle (`edufl campus approve`). Every
process is started in a process group of its own and the group is killed at teardown, even when
a test fails. Ports are picked free at test time.
"""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import time

import pytest
import torch
from processes import (  # the tests folder is on sys.path (pytest's rootdir-relative imports)
    CAMPUSES,
    CLIENTAPP_STARTED,
    EDUFL,
    REPO,
    approved_policy,
    coordinator_run,
    edufl,
    federation,
    released_rounds,
    start_campus,
    state,
)

from edufl.federation.audit import AuditLog
from edufl.federation.deploy import flwr_env
from edufl.federation.ledger import PrivacyLedger
from edufl.federation.partition import campus_slice
from edufl.federation.tasks import early_warning, split
from edufl.server.pki import make_pki
from edufl.server.replies import CampusesMissing, await_connected_nodes

pytestmark = pytest.mark.deployment


@pytest.fixture(scope="module")
def deployment(tmp_path_factory, tables):
    root = tmp_path_factory.mktemp("deploy")
    make_pki(root / "other-pki", ["AAA"])  # a second CA and an unregistered key
    approved_policy(root / "policy.toml")
    with federation(root, tables, dict.fromkeys(CAMPUSES, "policy.toml"), unstarted=("DDD",)) as (superlink, procs):
        yield root, superlink, procs


def test_two_rounds_over_tls_with_campus_authentication(deployment, tables):
    root, superlink, _ = deployment
    result = coordinator_run(root, superlink, "run1", "--min-campuses", "3")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "round   1/2" in result.stdout and "round   2/2" in result.stdout
    summary = json.loads((root / "run1" / "summary.json").read_text())
    assert [r["round"] for r in summary["rounds"]] == [1, 2]
    assert [c["campus"] for c in summary["campuses"]] == list(CAMPUSES)
    # each campus trained on exactly its own export's training rows
    own = [split(early_warning(campus_slice(tables, "module", c), 60, "withdrawal"), "stratified", 0.2, 0) for c in CAMPUSES]
    assert [(c["n_train"], c["n_test"]) for c in summary["campuses"]] == [(len(tr), len(te)) for tr, te in own]
    assert all(0 < c["epsilon"] <= 3.0 for c in summary["campuses"])
    assert summary["failures"] == []
    assert 0.5 < summary["global"]["auc"] < 1.0
    with open(root / "run1" / "rounds.csv") as f:
        assert [row["campuses_evaluated"] for row in csv.DictReader(f)] == ["3", "3"]
    assert (root / "run1" / "model.pt").is_file()
    run_id = re.search(r"run (\d+) started", result.stdout).group(1)  # this run, whatever else the SuperLink ran
    listing = subprocess.run(
        ["flwr", "ls", "edufl", "--run-id", run_id, "--format", "json"], capture_output=True, text=True, env=flwr_env()
    )
    assert [r["status"] for r in json.loads(listing.stdout)["runs"]] == ["finished:completed"]
    name = summary["config"]["run-name"]
    assert name.startswith("run1-") and f"run {name}," in result.stdout
    assert all(released_rounds(root, c, name) == [1, 2] for c in CAMPUSES)
    # What crossed the wire: every reply the coordinator received is one its campus logged as sent, digest for digest.
    logged = set()
    for campus in CAMPUSES:
        log = AuditLog(root / "state" / campus)
        logged |= {(r.server_round, r.message_type, campus, r.payload_sha256) for r in log.records(name) if r.sent}
        log.close()
    assert logged == {(r["round"], r["phase"], r["campus"], r["payload_sha256"]) for r in summary["receipts"]}
    # one exchange per round (round 1's model is evaluated in round 2's train replies), then the last model's evaluation
    assert sorted((r, t) for r, t, c, _ in logged if c == "AAA") == [(1, "train"), (2, "evaluate"), (2, "train")]
    assert len(logged) == 3 * len(CAMPUSES)


def test_paused_run_resumes_after_its_last_round_under_the_same_run_name(deployment):
    root, superlink, _ = deployment
    out = root / "run-resume"
    out.mkdir()
    (out / "STOP").touch()  # pause once round 1 is checkpointed
    paused = coordinator_run(root, superlink, "run-resume", "--min-campuses", "3", "--strategy", "fedadam")
    assert paused.returncode == 1, paused.stdout + paused.stderr
    assert "was paused before its last round" in paused.stderr and f"--resume {out}" in paused.stderr
    assert not (out / "STOP").exists() and not (out / "summary.json").exists()
    saved = torch.load(out / "checkpoint.pt", weights_only=True)
    assert saved["round"] == 1 and sorted(saved["strategy"]) == ["m_t", "v_t"]  # FedAdam's moments
    name = saved["run-name"]
    assert all(released_rounds(root, c, name) == [1] for c in CAMPUSES)

    resumed = edufl("coordinator", "run", "--superlink", superlink, "--pki", str(root / "pki"), "--resume", str(out))
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"resuming run {name} after round 1/2" in resumed.stdout
    assert "round   1/2" not in resumed.stdout and "round   2/2" in resumed.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["run-name"] == name and summary["config"]["strategy"] == "fedadam"
    with open(out / "rounds.csv") as f:
        assert [row["round"] for row in csv.DictReader(f)] == ["1", "2"]  # no round repeated
    assert all(released_rounds(root, c, name) == [1, 2] for c in CAMPUSES)  # the same run's ledger entries
    assert summary["failures"] == [] and 0 < summary["privacy"]["epsilon"] <= 3.0


@pytest.mark.parametrize(
    "args, message",
    [
        (["--rounds", "5"], "continues that run with the settings in its checkpoint: drop the run options"),
        ([], "no checkpoint.pt there"),
    ],
)
def test_resume_needs_a_checkpoint_and_no_run_options(tmp_path, args, message):
    result = edufl("coordinator", "run", "--superlink", "127.0.0.1:1", "--insecure", "--resume", str(tmp_path), *args)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


def test_campus_with_a_bad_policy_file_refuses_to_start(tmp_path, aaa_dir):
    policy = tmp_path / "policy.toml"
    policy.write_text("[privacy]\nmax_epsilon = 3\n")
    result = edufl(
        "campus",
        "start",
        "--campus",
        "AAA",
        "--data",
        str(aaa_dir),
        "--superlink",
        "127.0.0.1:1",
        "--insecure",
        *state(tmp_path, "AAA"),
        "--policy",
        str(policy),
        timeout=60,
    )
    assert result.returncode == 2
    assert f"{policy}: privacy.max_epsilon" in result.stderr and "Traceback" not in result.stderr
    assert "starting its SuperNode" not in result.stdout


def test_too_few_campuses_ends_with_the_missing_ones_named(deployment):
    root, superlink, _ = deployment
    started = time.monotonic()
    result = coordinator_run(root, superlink, "run-few", "--min-campuses", "4", "--wait", "3")
    assert result.returncode == 1
    assert "only 3 campus(es) online after 3 s, 4 needed" in result.stderr
    assert "not online: DDD (registered)" in result.stderr
    assert time.monotonic() - started < 30
    assert "Traceback" not in result.stderr


def test_server_app_never_waits_forever_for_campuses():
    class Grid:
        def get_node_ids(self):
            return [7]

    with pytest.raises(CampusesMissing, match=r"round 2: only 1 of the 2 campuses needed .* after 0.2 s .*: 7\)"):
        await_connected_nodes(Grid(), needed=2, timeout=0.2, server_round=2)


def test_campus_with_an_unregistered_key_is_refused_on_both_sides(deployment):
    root, superlink, procs = deployment
    result = edufl(
        "campus",
        "start",
        "--campus",
        "AAA",
        "--data",
        str(root / "campus-AAA"),
        "--superlink",
        superlink,
        "--root-cert",
        str(root / "pki" / "ca.crt"),
        "--key",
        str(root / "other-pki" / "campus-AAA.key"),
        "--rejoin-wait",
        "0",
        *state(root, "AAA-unregistered"),
        timeout=120,
    )
    assert result.returncode == 1
    assert "the coordinator refused this campus's key: it is not registered there" in result.stderr
    assert "No SuperNode found with the given public key" in procs.output("coordinator")


@pytest.mark.parametrize(
    "tls, message",
    [
        (["--insecure"], "uses TLS: drop --insecure"),
        (
            ["--root-cert", "other-pki/ca.crt", "--key", "pki/campus-AAA.key"],
            "does not vouch for (certificate signature failure)",
        ),
    ],
)
def test_plaintext_or_a_wrong_ca_is_refused_before_connecting(deployment, tls, message):
    root, superlink, _ = deployment
    tls = [str(root / a) if "/" in a else a for a in tls]
    result = edufl(
        "campus",
        "start",
        "--campus",
        "AAA",
        "--data",
        str(root / "campus-AAA"),
        "--superlink",
        superlink,
        *tls,
        *state(root, "AAA-refused"),
        timeout=60,
    )
    assert result.returncode == 1
    assert message in result.stderr and "Traceback" not in result.stderr


def test_campus_with_invalid_data_refuses_to_start(deployment, aaa_dir):
    root, superlink, _ = deployment
    (aaa_dir / "studentAssessment.csv").unlink()
    lines = (aaa_dir / "studentInfo.csv").read_text().splitlines()
    lines[5] = lines[5].replace('"F"', '"X"').replace('"M"', '"X"')
    (aaa_dir / "studentInfo.csv").write_text("\n".join(lines) + "\n")
    result = edufl(
        "campus",
        "start",
        "--campus",
        "AAA",
        "--data",
        str(aaa_dir),
        "--superlink",
        superlink,
        "--pki",
        str(root / "pki"),
        *state(root, "AAA-invalid"),
        timeout=60,
    )
    assert result.returncode == 2
    assert "studentAssessment.csv: file not found" in result.stderr
    assert "campus AAA does not join with this folder" in result.stderr
    assert "starting its SuperNode" not in result.stdout


def test_campus_killed_mid_round_is_recorded_and_rejoins_after_restart(deployment):
    root, superlink, procs = deployment
    launched = procs.output("BBB").count(CLIENTAPP_STARTED)  # ClientApps BBB's gate started for earlier tests
    run = subprocess.Popen(
        [
            *EDUFL,
            "coordinator",
            "run",
            "--superlink",
            superlink,
            "--pki",
            str(root / "pki"),
            "--rounds",
            "3",
            "--model",
            "logistic",
            "--min-campuses",  # round 1 goes on without BBB; round 2 waits (up to the round timeout) until it is back
            "3",
            "--round-timeout",
            "120",
            "--out",
            str(root / "run-kill"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=REPO,
        env=flwr_env(),
        start_new_session=True,
    )
    try:
        while "started" not in (line := run.stdout.readline()):
            assert line, "coordinator run ended before the run started"
        # Round 1's train message is BBB's first of this run: once its gate starts a ClientApp, BBB has taken
        # the message from the SuperLink and is training on it.
        procs.wait_for("BBB", CLIENTAPP_STARTED, timeout=120, times=launched + 1)
        procs.kill("BBB")
        start_campus(procs, root, superlink, "BBB", timeout=150)  # refused until the SuperLink marks it offline
        output, _ = run.communicate(timeout=400)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
            run.wait()
    assert run.returncode == 4 and "campuses failed during the run" in output, output  # the run names its failures
    summary = json.loads((root / "run-kill" / "summary.json").read_text())
    dropped = [f for f in summary["failures"] if f["round"] == 1 and f["phase"] == "train"]
    assert [f["reason"].split(":")[0].split(" (")[0] for f in dropped] == ["campus BBB"], summary["failures"]
    assert summary["rounds"][-1]["campuses_evaluated"] == 3  # BBB is back by round 3
    assert summary["rounds"][-1]["failures"] == 0


def test_a_dp_statistic_runs_on_the_deployment_and_charges_each_campus(deployment):
    root, superlink, _ = deployment
    out = root / "stats"
    result = edufl(
        "analytics",
        "run",
        str(REPO / "experiments" / "queries" / "score_by_assessment_type.toml"),
        "--superlink",
        superlink,
        "--pki",
        str(root / "pki"),
        "--min-campuses",
        "3",
        "--out",
        str(out),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads((out / "summary.json").read_text())
    name = summary["run_name"]
    assert name.startswith("stats-") and f"run {name}" in result.stdout
    assert [c["campus"] for c in summary["campuses"]] == list(CAMPUSES) and summary["refusals"] == []
    assert all(c["min_cell_count"] == 20 and 0.99 <= c["epsilon"] <= 1.0 for c in summary["campuses"])  # the campuses' policy
    with open(out / "statistics.csv") as f:
        rows = list(csv.DictReader(f))
    assert {(r["assessment_type"], r["p"]) for r in rows} >= {(t, p) for t in ("CMA", "TMA") for p in ("0.25", "0.5", "0.75")}
    assert "| assessment_type | p | quantile | ± 95 % |" in (out / "statistics.md").read_text()
    assert (out / "statistics.png").stat().st_size > 0
    for campus in CAMPUSES:  # each campus charged its own ledger once, and logged what it sent
        ledger = PrivacyLedger(root / "state" / campus)
        [release] = ledger.releases(run_id=name)
        ledger.close()
        assert (release.dp.mechanism, release.task, release.dp.sample_rate, release.dp.steps) == (
            "gaussian",
            "statistic:score-quartiles-by-assessment-type",
            1.0,
            1,
        )
        assert release.dp.epsilon == pytest.approx(summary["campuses"][CAMPUSES.index(campus)]["epsilon"])
        log = AuditLog(root / "state" / campus)
        [record] = [r for r in log.records(name) if r.sent]
        log.close()
        assert (campus, record.payload_sha256) in {(r["campus"], r["payload_sha256"]) for r in summary["receipts"]}
