"""`edufl campus dashboard` and `edufl coordinator dashboard` in a real browser: Debian's chromium driven by
Playwright, against the state folders and results folder of a real simulated run (and a gate refusal written
as the campus's code-approval gate writes it), and a results folder written round by round."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from processes import approved_policy, simulate

from edufl.experiments.cli import main
from edufl.federation.audit import AuditLog
from edufl.federation.deploy import flwr_env, free_port
from edufl.federation.ledger import PrivacyLedger
from edufl.federation.policy import CampusPolicy
from edufl.federation.schema import load_schema
from edufl.federation.store import now

OULAD = load_schema()
"""OULAD's federation schema (federation/schemas/oulad.toml)."""

CHROMIUM = Path("/usr/bin/chromium")
POLICY = "[privacy]\ntotal_epsilon_budget = 8.0\n"
REFUSED_FAB = "ab" * 32  # the app bundle the campus's gate refuses: not in its policy
SCREENSHOTS = os.environ.get("EDUFL_SCREENSHOTS")  # a folder: the screenshot test also saves its PNGs there (docs/img)


@pytest.fixture(scope="module")
def run(tmp_path_factory, data_dir) -> Path:
    """Two rounds of the 7 module campuses under an approving policy; then campus AAA's gate refuses a bundle."""
    from flwr.proto.task_pb2 import Task
    from flwr.supercore.constant import TaskType

    from edufl.clients.approval import Gate

    root = tmp_path_factory.mktemp("dashboard")
    policy = approved_policy(root / "policy.toml", POLICY)
    simulate(data_dir, root / "out", "--rounds", "2", "--model", "logistic", "--policy", str(policy))
    gate = Gate("AAA", root / "out" / "campuses" / "AAA", policy)
    task = Task(type=TaskType.CLIENT_APP, fab_hash=REFUSED_FAB, run_id=4711)
    with AuditLog(gate.state_dir) as log:  # what the gate's refusal writes (clients.approval.Gate._log)
        log.append(gate.record(task, gate.refusal(task)))
    return root


@contextmanager
def dashboard(*args: str, printed: list[str] | None = None) -> Iterator[str]:
    """`edufl ARGS... --port P` as a user runs it; yields its address once it says it serves (what it printed
    until then added to ``printed``), stops it on leaving."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "edufl.experiments.cli", *args, "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=flwr_env(),
        start_new_session=True,
    )
    lines = [] if printed is None else printed
    try:
        for line in proc.stdout:
            lines.append(line)
            if "serving at" in line:
                break
        else:
            pytest.fail(f"the dashboard stopped with status {proc.wait()}:\n{''.join(lines)}")
        yield f"http://127.0.0.1:{port}"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.is_file():
        pytest.skip(f"Debian's chromium is not installed ({CHROMIUM}): apt-get install -y chromium (.ci/run installs it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM))
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser):
    """A fresh page that records every script error and console error it shows."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.errors = []
    page.on("pageerror", lambda err: page.errors.append(str(err)))
    page.on("console", lambda msg: page.errors.append(msg.text) if msg.type == "error" else None)
    page.on("requestfailed", lambda request: page.errors.append(f"{request.url} failed"))
    yield page
    context.close()


def chart_points(page) -> list[list[float]]:
    """The y values of every series of the page's chart, as Chart.js holds them."""
    return page.evaluate("Chart.getChart(document.querySelector('canvas')).data.datasets.map(d => d.data.map(p => p.y))")


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.mark.simulation
def test_campus_page_shows_the_budget_of_edufl_campus_budget(run, page, capsys):
    state, policy = run / "out" / "campuses" / "AAA", run / "policy.toml"
    assert main(["campus", "budget", "--state", str(state), "--policy", str(policy)]) == 0
    (dataset,) = PrivacyLedger(state).datasets()
    row = next(line for line in capsys.readouterr().out.splitlines() if dataset[:12] in line)
    _, _, _, releases, spent, left = [c.strip() for c in row.strip("│ ").split("│")]
    before = digests(state)
    with dashboard("campus", "dashboard", "--state", str(state), "--policy", str(policy)) as url:
        page.goto(url)
        assert page.locator(f"[data-epsilon='{dataset}']").inner_text() == spent
        assert page.locator(f"[data-remaining='{dataset}']").inner_text() == left
        campus_series, budget_line = chart_points(page)
        assert len(campus_series) == int(releases) == 2  # one point per release
        assert f"{campus_series[-1]:.3f}" == spent and campus_series[0] < campus_series[1]
        assert budget_line == [8.0, 8.0]
        (fab,) = CampusPolicy.load(policy).apps.approved_fab_hashes
        approval = page.locator("#policy tr", has_text=fab).inner_text()
        assert f"approved {now()[:10]}" in approval  # the note `edufl campus approve` wrote beside the hash
        assert "privacy.total_epsilon_budget\t8.0" in page.locator("#policy").inner_text()
        assert page.errors == []
    assert digests(state) == before  # read-only: neither store changed


@pytest.mark.simulation
def test_campus_messages_page_counts_the_audit_log_and_explains_a_refusal(run, page, capsys):
    state = run / "out" / "campuses" / "AAA"
    assert main(["campus", "audit", "--state", str(state), "--format", "json"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    simulated = records[0]["run_id"]
    with dashboard("campus", "dashboard", "--state", str(state), "--policy", str(run / "policy.toml")) as url:
        page.goto(f"{url}/messages")
        sent = [r for r in records if r["run_id"] == simulated and r["sent"]]
        assert len(sent) >= 2 and len(records) == len(sent) + 1  # the simulated run's messages, and the gate's refusal
        assert int(page.locator("#total").inner_text()) == len(records)
        assert page.locator("tr.message").count() == len(records)
        shas = page.locator("tr.message td.hash").all_inner_texts()
        assert [r["payload_sha256"] for r in records] == shas
        page.select_option("select[name=outcome]", "refused")
        page.click("button[type=submit]")
        page.wait_for_url("**outcome=refused**")
        (refusal,) = page.locator("tr.message").all()
        assert refusal.locator(".key").inner_text() == "apps.approved_fab_hashes"
        assert "only app bundles the data steward approved may run" in refusal.inner_text()
        assert REFUSED_FAB in refusal.inner_text() and "4711" in refusal.inner_text()
        page.goto(f"{url}/messages?run={simulated}&outcome=sent")
        assert page.locator("tr.message").count() == len(sent)
        assert page.errors == []


@pytest.mark.simulation
def test_coordinator_page_shows_a_finished_run(run, page):
    out = run / "out"
    summary = json.loads((out / "summary.json").read_text())
    with dashboard("coordinator", "dashboard", str(out)) as url:
        page.goto(url)
        assert page.locator("#runs .status").inner_text() == "finished: 2 of 2 rounds"
        page.click("text=out")
        page.wait_for_url("**/run/1")
        assert page.locator("meta[http-equiv=refresh]").count() == 0  # finished: nothing to follow
        cells = page.locator("#rounds tr").nth(2).locator("td").all_inner_texts()
        last = summary["rounds"][-1]
        assert cells[:4] == ["2", f"{last['auc']:.4f}", f"{last['worst_campus_auc']:.4f}", f"{last['epsilon_max']:.3f}"]
        assert page.locator("tr.campus").count() == 7
        assert page.locator("#fairness tr").count() == 1 + len(summary["fairness"]["groups"])
        weighted, worst, epsilon = chart_points(page)
        assert weighted == [r["auc"] for r in summary["rounds"]] and epsilon == [r["epsilon_max"] for r in summary["rounds"]]
        assert "every campus answered every request" in page.locator("#failures").inner_text()
        assert page.errors == []


def test_coordinator_page_follows_a_run_as_its_results_folder_is_written(tmp_path, page):
    """A run's results folder as the coordinator writes it: a checkpoint after each round, then summary.json."""
    from flwr.serverapp.strategy import FedAvg
    from rich.console import Console

    from edufl.federation.models import build_model, model_arrays
    from edufl.federation.runconfig import RunConfig
    from edufl.federation.tasks import feature_names
    from edufl.server.checkpoint import save_checkpoint
    from edufl.server.results import Report

    out = tmp_path / "live"
    cfg = RunConfig(num_rounds=2, run_name="live-run", out=str(out), model="logistic")
    report = Report(config=cfg.to_flower(), dp=True, delta=cfg.delta, console=Console(quiet=True))
    arrays = model_arrays(build_model("logistic", len(feature_names(OULAD)), seed=0))

    def finish_round(server_round: int, auc: float, failed: bool) -> None:
        report.add_train("AAA", n_train=560, loss=0.5, epsilon=1.4 * server_round, noise_multiplier=1.1, sample_rate=0.1, steps=9)
        metrics = dict(auc=auc, average_precision=0.3, f1=0.4, brier=0.1)
        report.add_evaluation("AAA", n_test=140, metrics=metrics, groups={})
        if failed:
            report.add_failure(server_round, "train", "campus BBB refuses round 2: privacy.max_epsilon_per_run", refused=True)
        report.end_round(server_round, cfg.num_rounds)
        save_checkpoint(out / "checkpoint.pt", cfg, server_round, arrays, FedAvg(), report.state())

    status = page.locator("#summary .status")
    with dashboard("coordinator", "dashboard", str(out), "--refresh", "1") as url:
        page.goto(f"{url}/run/1")
        assert status.inner_text() == "no round finished yet"
        finish_round(1, 0.61, failed=False)
        status.filter(has_text="round 1 of 2 done").wait_for(timeout=30_000)  # the page reloaded itself
        assert page.locator("meta[http-equiv=refresh]").get_attribute("content") == "1"
        assert chart_points(page)[0] == [0.61]
        finish_round(2, 0.66, failed=True)
        status.filter(has_text="round 2 of 2 done").wait_for(timeout=30_000)
        assert chart_points(page) == [[0.61, 0.66], [0.61, 0.66], [1.4, 2.8]]
        refusal = page.locator("tr.failure")
        assert (
            refusal.count() == 1 and "refused" in refusal.inner_text() and "privacy.max_epsilon_per_run" in refusal.inner_text()
        )
        report.write(out, None, 1.0)
        status.filter(has_text="finished: 2 of 2 rounds").wait_for(timeout=30_000)
        assert page.locator("meta[http-equiv=refresh]").count() == 0
        assert page.errors == []


@pytest.mark.simulation
def test_screenshot_of_each_page_renders_without_errors(run, page, tmp_path):
    state = run / "out" / "campuses" / "AAA"
    shots = []
    with dashboard("campus", "dashboard", "--state", str(state), "--policy", str(run / "policy.toml")) as url:
        for path, name in (("/", "campus"), ("/messages", "campus-messages")):
            page.goto(url + path)
            shots.append((name, page.screenshot(full_page=True)))
    with dashboard("coordinator", "dashboard", str(run / "out")) as url:
        for path, name in (("/", "coordinator"), ("/run/1", "coordinator-run")):
            page.goto(url + path)
            shots.append((name, page.screenshot(full_page=True)))
    assert page.errors == []
    for name, png in shots:
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000, name  # a rendered page, not a blank one
        (tmp_path / f"dashboard-{name}.png").write_bytes(png)
        if SCREENSHOTS:
            shutil.copy(tmp_path / f"dashboard-{name}.png", Path(SCREENSHOTS) / f"dashboard-{name}.png")


@pytest.mark.parametrize(
    "args, message",
    [
        (["--host", "0.0.0.0"], "--host 0.0.0.0: not a loopback address"),
        (["--port", "0"], "--port 0: expected a port number from 1 to 65535"),
    ],
)
def test_a_dashboard_listens_on_loopback_unless_told_otherwise(tmp_path, capsys, args, message):
    assert main(["campus", "dashboard", "--state", str(tmp_path), *args]) == 2
    assert message in capsys.readouterr().err
    assert main(["coordinator", "dashboard", str(tmp_path), *args]) == 2
    assert message in capsys.readouterr().err


def test_a_missing_state_folder_is_a_clear_error(tmp_path, capsys):
    assert main(["campus", "dashboard", "--state", str(tmp_path / "missing")]) == 2
    assert f"--state {tmp_path / 'missing'}: no such folder" in capsys.readouterr().err


def test_a_fresh_campus_shows_nothing_spent_and_creates_no_store(tmp_path):
    """Another address with --allow-remote is served, with a warning; a state folder without stores stays empty."""
    printed = []
    with dashboard(
        "campus", "dashboard", "--state", str(tmp_path), "--host", "0.0.0.0", "--allow-remote", printed=printed
    ) as url:
        assert printed[0].startswith("WARNING: --host 0.0.0.0 --allow-remote: anyone who can reach")
        for path in ("/", "/messages"):
            with urllib.request.urlopen(url + path, timeout=60) as reply:
                shown = reply.read().decode()
            assert "no release yet" in shown or "no audit record" in shown
        with pytest.raises(urllib.error.HTTPError, match="400"):
            urllib.request.urlopen(f"{url}/messages?outcome=lost", timeout=60)
    assert list(tmp_path.iterdir()) == []
