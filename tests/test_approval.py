"""Code approval: a campus starts a ClientApp only for an app bundle its policy approves (clients/approval.py).

The gate's decisions, the policy section, the bundle hash and `edufl campus approve` are tested without
processes; one deployment (a coordinator, campus AAA approving this app's bundle, campus BBB approving
the same app with one byte changed) shows a refusal end to end.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from flwr.cli.build import build_fab_from_disk
from flwr.common.config import get_fab_config, get_fused_config_from_fab
from flwr.proto.task_pb2 import Task
from flwr.supercore.constant import TaskType
from flwr.supercore.run import Run
from flwr.supercore.superexec.executor import LaunchResult, LaunchResultStatus
from processes import POLICY, REPO, approved_policy, coordinator_run, edufl, federation, released_rounds

from edufl.clients.approval import GATE_FAILED, Gate, GatePlugin, WarmWorkers, add_approval, gate_command, gate_process
from edufl.clients.campus import supernode_command
from edufl.federation.audit import AuditLog
from edufl.federation.bundle import APP_MODULES, app_folder, bundle_sha256, stage
from edufl.federation.deploy import flwr_env
from edufl.federation.ledger import PrivacyLedger
from edufl.federation.policy import CampusPolicy, PolicyError
from edufl.federation.queries import QUERY_KEY
from edufl.federation.runconfig import ConfigError, RunConfig

OTHER = "ab" * 32
# Flower's FAB build uses pathspec's old pattern name
pytestmark = pytest.mark.filterwarnings("ignore:GitWildMatchPattern:DeprecationWarning")


def app_copy(dest: Path, change: str | None = None) -> Path:
    """The app folder staged (as `coordinator run` stages it) from a copy of this checkout's source folders
    in the new folder ``dest``; ``change``: a source file (relative to the checkout) with one byte changed first."""
    sources = {part: dest / "src" / part for part in ("federation", "clients", "server")}
    for part, folder in sources.items():
        shutil.copytree(REPO / part, folder, ignore=shutil.ignore_patterns("__pycache__"))
    if change:
        source = dest / "src" / change
        content = source.read_bytes()
        source.write_bytes(content.replace(b"campus", b"campuS", 1))
        assert source.read_bytes() != content
    return stage(dest / "app", sources)


def policy_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "policy.toml"
    path.write_text(text)
    return path


def task(fab_hash: str = OTHER, task_type: str = TaskType.CLIENT_APP) -> Task:
    return Task(task_id=7, type=task_type, run_id=42, fab_hash=fab_hash)


# --- the policy section ------------------------------------------------------------------------


def test_policy_lists_approved_bundles_and_approves_none_by_default(tmp_path):
    upper = OTHER.upper()
    policy = CampusPolicy.load(policy_file(tmp_path, f'[apps]\napproved_fab_hashes = ["{upper}"]\n'))
    assert policy.apps.approved_fab_hashes == (OTHER,)  # as Flower writes hashes: lower case
    assert policy.apps.refusal(OTHER) is None
    assert policy.apps.refusal("cd" * 32) == (
        f"apps.approved_fab_hashes: app bundle {'cd' * 32} is not approved by the campus's data steward"
    )
    assert CampusPolicy().apps.refusal(OTHER).endswith("(the policy approves no app bundle)")


@pytest.mark.parametrize(
    "text, message",
    [
        ('[apps]\napproved_fab_hashes = ["abc"]\n', "apps.approved_fab_hashes.0: Value error, 'abc' is not the SHA-256"),
        ("[apps]\nallow_all = true\n", "apps.allow_all: Extra inputs are not permitted"),
    ],
)
def test_policy_refuses_a_malformed_apps_section(tmp_path, text, message):
    with pytest.raises(PolicyError, match=message):
        CampusPolicy.load(policy_file(tmp_path, text))


# --- the bundle's hash and `edufl campus approve` ----------------------------------------------


def test_bundle_hash_is_flowers_fab_hash_and_changes_with_one_byte(tmp_path):
    fab_hash, name = bundle_sha256()
    assert name == "edufl/edufl 0.1.0"
    assert bundle_sha256(app_copy(tmp_path / "same"))[0] == fab_hash  # the installed edufl is this checkout
    built = subprocess.run(
        ["flwr", "build", "--app", str(tmp_path / "same" / "app")], cwd=tmp_path, capture_output=True, text=True, env=flwr_env()
    )
    assert built.returncode == 0, built.stdout + built.stderr
    fab = next(tmp_path.glob("*.fab"))
    assert fab_hash[:8] in fab.name and bundle_sha256(fab)[0] == fab_hash  # `flwr build` names its file by this hash
    assert bundle_sha256(app_copy(tmp_path / "changed", change="clients/app.py"))[0] != fab_hash
    with pytest.raises(ConfigError, match="not a Flower app bundle"):
        bundle_sha256(REPO / "README.md")


@pytest.mark.parametrize(
    "outside",
    [
        "clients/campus.py",
        "clients/approval.py",
        "server/coordinator.py",
        "server/pki.py",
        "federation/deploy.py",
        "federation/bundle.py",
    ],
)
def test_an_edit_outside_the_apps_leaves_the_bundle_hash_alone(tmp_path, outside):
    assert bundle_sha256(app_copy(tmp_path, change=outside))[0] == bundle_sha256()[0]


def test_the_bundle_holds_exactly_the_modules_the_apps_import(tmp_path):
    with app_folder() as folder:
        # The bundle's own edufl package comes first on the path, as in a flwr-clientapp process: a module
        # missing from it would be imported from the installed edufl, outside the bundle.
        probe = (
            "import sys; sys.path.insert(0, sys.argv[1]); import " + ", ".join(APP_MODULES) + "\n"
            "for name, module in sorted(sys.modules.items()):\n"
            "    if name.startswith('edufl.') and getattr(module, '__file__', None):\n"
            "        print(name, module.__file__)"
        )
        done = subprocess.run([sys.executable, "-c", probe, str(folder)], capture_output=True, text=True, cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        loaded = dict(line.split(" ", 1) for line in done.stdout.splitlines())
        outside = {name: file for name, file in loaded.items() if not file.startswith(str(folder))}
        assert outside == {}, "the apps import modules that are not in the bundle"
        app_entry = [
            sys.executable,
            "-c",
            "import sys; sys.path.insert(0, sys.argv[1]); import edufl.clients.app, "
            "edufl.server.app; print(sorted(m for m in sys.modules if m.startswith('edufl.')))",
            str(folder),
        ]
        eager = subprocess.run(app_entry, capture_output=True, text=True, cwd=tmp_path)
    assert eager.returncode == 0, eager.stderr
    modules = {name for name in loaded if not name.endswith("__init__")} - {
        "edufl.clients",
        "edufl.server",
        "edufl.federation",
        "edufl.federation.proto",
    }
    assert modules == set(APP_MODULES)
    assert {"matplotlib", "ray"}.isdisjoint(eager.stdout)  # the apps load no research code


def test_a_warm_worker_preloads_no_edufl_module_and_flags_one_from_outside_its_bundle(tmp_path):
    worker = REPO / "clients" / "worker.py"
    with app_folder() as folder:
        probe = (
            "import importlib, runpy, sys\n"
            "w = runpy.run_path(sys.argv[1], run_name='probe')\n"
            "for name in w['PRELOAD']: importlib.import_module(name)\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'edufl'))\n"
            "sys.path.insert(0, sys.argv[2]); import edufl.clients.app\n"
            "from pathlib import Path\n"
            "print(w['_stray_modules'](Path(sys.argv[2]).resolve()))\n"
            "import importlib.util as u\n"
            "spec = u.spec_from_file_location('edufl.outside', sys.argv[3])\n"
            "sys.modules['edufl.outside'] = u.module_from_spec(spec)\n"
            "print(w['_stray_modules'](Path(sys.argv[2]).resolve()))\n"
        )
        outside = REPO / "experiments" / "bench.py"
        done = subprocess.run(
            [sys.executable, "-I", "-c", probe, str(worker), str(folder), str(outside)],
            capture_output=True,
            text=True,
            cwd=tmp_path,
        )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["[]", "[]", "['edufl.outside']"]


def test_the_bundles_run_config_is_the_run_config_defaults_as_flower_reads_it():
    with app_folder() as folder:
        fab = build_fab_from_disk(folder)
    assert get_fab_config(fab)["tool"]["flwr"]["app"]["components"] == {
        "serverapp": "edufl.server.app:app",
        "clientapp": "edufl.clients.app:app",
    }
    config = get_fused_config_from_fab(fab, Run.create_empty(run_id=1))
    assert config.pop(QUERY_KEY) == ""  # no DP statistic: the ServerApp trains
    assert RunConfig.from_flower(config) == RunConfig()


def test_approve_adds_the_hash_and_keeps_the_file_as_written(tmp_path):
    path = policy_file(tmp_path, "# campus AAA\n[privacy]\ntotal_epsilon_budget = 20.0  # agreed 2026\n")
    assert add_approval(path, OTHER, "edufl/edufl 0.1.0")
    assert not add_approval(path, OTHER, "again")
    assert add_approval(path, "cd" * 32, "edufl/edufl 0.2.0")
    text = path.read_text()
    assert text.startswith("# campus AAA\n[privacy]\ntotal_epsilon_budget = 20.0  # agreed 2026\n[apps]\n")
    assert f'"{OTHER}",  # edufl/edufl 0.1.0' in text
    policy = CampusPolicy.load(path)
    assert policy.apps.approved_fab_hashes == ("cd" * 32, OTHER) and policy.privacy.total_epsilon_budget == 20.0
    inline = policy_file(tmp_path, f'[apps] # steward: J. Doe\napproved_fab_hashes = ["{OTHER}"]\n')
    assert add_approval(inline, "cd" * 32, "new") and CampusPolicy.load(inline).apps.approved_fab_hashes == ("cd" * 32, OTHER)
    section = policy_file(tmp_path, "[apps]\n[release]\nmin_cohort_size = 20\n")
    assert add_approval(section, OTHER, "new") and CampusPolicy.load(section).apps.approved_fab_hashes == (OTHER,)
    created = tmp_path / "new.toml"
    assert add_approval(created, OTHER, "new") and CampusPolicy.load(created).apps.approved_fab_hashes == (OTHER,)


def test_approve_never_rewrites_a_file_it_cannot_edit_in_place(tmp_path):
    text = f'apps.approved_fab_hashes = ["{OTHER}"]\n'  # a dotted key: not edited, and the file is left as it was
    path = policy_file(tmp_path, text)
    with pytest.raises(PolicyError, match=f'add it by hand under \\[apps\\]: approved_fab_hashes = \\["{"cd" * 32}", ...\\]'):
        add_approval(path, "cd" * 32, "new")
    assert path.read_text() == text and sorted(p.name for p in tmp_path.iterdir()) == ["policy.toml"]


def test_approve_command_prints_the_hash_and_approves_it(tmp_path):
    result = edufl("campus", "approve", "--policy", str(tmp_path / "policy.toml"), timeout=60)
    fab_hash = bundle_sha256()[0]
    assert result.returncode == 0 and f"this edufl: app bundle edufl/edufl 0.1.0, sha256 {fab_hash}" in result.stdout
    assert CampusPolicy.load(tmp_path / "policy.toml").apps.approved_fab_hashes == (fab_hash,)
    bad = edufl("campus", "approve", str(REPO / "README.md"), timeout=60)
    assert bad.returncode == 2 and "not a Flower app bundle" in bad.stderr and "Traceback" not in bad.stderr


# --- the gate ----------------------------------------------------------------------------------


def test_gate_starts_only_clientapps_of_approved_bundles(tmp_path):
    gate = Gate("AAA", tmp_path, policy_file(tmp_path, f'[apps]\napproved_fab_hashes = ["{OTHER}"]\n'))
    assert gate.refusal(task()) is None
    assert "apps.approved_fab_hashes: app bundle " + "cd" * 32 in gate.refusal(task("cd" * 32))
    assert gate.refusal(task(task_type=TaskType.AGENT_APP)) == "a campus runs ClientApps only, not flwr-agentapp"
    assert "(the policy approves no app bundle)" in Gate("AAA", tmp_path, None).refusal(task())
    broken = Gate("AAA", tmp_path, policy_file(tmp_path, "[apps\n"))
    assert broken.refusal(task()).startswith("the campus policy cannot be used (") and "not a TOML file" in broken.refusal(task())


class FakeExecutor:
    """Records what Flower's plugin would have started."""

    def __init__(self):
        self.launched = []

    def launch(self, spec):
        self.launched.append(spec)
        return LaunchResult.accepted()


@dataclass(frozen=True)
class RecordingGate(Gate):
    """Records refusals instead of answering them over the Runtime API."""

    refused: list = field(default_factory=list)

    def refuse(self, runtime_api_address, token, task, why):
        self.refused.append((token, task.fab_hash, why))
        return LaunchResult.accepted()


# A stand-in for clients/worker.py speaking its protocol: it records each task line it reads in tasks.txt
# beside it, and after CRASH_AFTER lines (a number in crash.txt, if any) exits without finishing the last.
FAKE_WORKER = """
import argparse, os, sys
from pathlib import Path
p = argparse.ArgumentParser()
p.add_argument("--runtime-api-address"); p.add_argument("--status-fd", type=int); p.add_argument("--parent-pid")
args = p.parse_args()
here = Path(__file__).parent
crash = int((here / "crash.txt").read_text()) if (here / "crash.txt").exists() else None
with os.fdopen(args.status_fd, "w", buffering=1) as status:
    status.write("ready\\n")
    for n, line in enumerate(sys.stdin, 1):
        with open(here / "tasks.txt", "a") as seen:
            seen.write(line)
        token = line.split()[0]
        status.write(f"start {token}\\n")
        if n == crash:
            sys.exit(9)
        status.write(f"done {token}\\n")
"""


def fake_worker(tmp_path: Path, crash_after: int | None = None) -> Path:
    program = tmp_path / "fake_worker.py"
    program.write_text(FAKE_WORKER)
    if crash_after is not None:
        (tmp_path / "crash.txt").write_text(str(crash_after))
    return program


def test_plugin_hands_an_approved_task_to_its_bundles_warm_worker_and_never_an_unapproved_one(tmp_path):
    gate = RecordingGate("AAA", tmp_path, policy_file(tmp_path, f'[apps]\napproved_fab_hashes = ["{OTHER}"]\n'))
    executor = FakeExecutor()
    plugin = GatePlugin("127.0.0.1:1", True, None, executor=executor, gate=gate)
    plugin.workers = WarmWorkers("127.0.0.1:1", plugin.workers.cold_start, fake_worker(tmp_path))
    assert plugin.launch_task("token-1", task()).status == LaunchResultStatus.ACCEPTED
    assert plugin.launch_task("token-2", task("cd" * 32)).status == LaunchResultStatus.ACCEPTED
    assert plugin.launch_task("token-3", task()).status == LaunchResultStatus.ACCEPTED
    worker = plugin.workers.worker(OTHER)
    worker.proc.stdin.close()  # the worker ends once it has read both tasks
    worker.follower.join(timeout=30)
    assert (tmp_path / "tasks.txt").read_text() == f"token-1 {OTHER}\ntoken-3 {OTHER}\n"  # one process, both tasks
    assert executor.launched == [] and worker.proc.returncode == 0
    assert [(token, fab_hash) for token, fab_hash, _ in gate.refused] == [("token-2", "cd" * 32)]


def test_a_task_a_stopped_worker_had_not_started_starts_cold_and_the_next_gets_a_new_worker(tmp_path):
    cold = []
    workers = WarmWorkers("127.0.0.1:1", lambda token, t: cold.append(token) or LaunchResult.accepted(), fake_worker(tmp_path, 1))
    first = workers.worker(OTHER)
    assert workers.launch("token-1", task()).status == LaunchResultStatus.ACCEPTED  # started, then the worker dies
    first.follower.join(timeout=30)
    assert first.proc.returncode == 9 and cold == []  # a started task is closed as failed, never run twice
    assert workers.launch("token-2", task()).status == LaunchResultStatus.ACCEPTED
    second = workers.worker(OTHER)
    assert second is not first
    second.follower.join(timeout=30)  # it too stops after its first task
    # A worker that stopped before reading a task: that task runs cold.
    third = workers.worker(OTHER)
    third.proc.kill()
    third.follower.join(timeout=30)
    assert not third.take("token-3", task())
    assert workers.launch("token-4", task()).status == LaunchResultStatus.ACCEPTED
    assert (tmp_path / "tasks.txt").read_text().split("\n")[:2] == [f"token-1 {OTHER}", f"token-2 {OTHER}"]


def test_refusal_is_audited_and_printed_naming_the_bundle_and_the_policy_key(tmp_path, capsys, task_identity):
    from flwr.app import ConfigRecord, Message, RecordDict

    policy = policy_file(tmp_path, "[privacy]\ndelta = 1e-6\n")
    gate = Gate("BBB", tmp_path / "state", policy)
    request = Message(
        RecordDict({"config": ConfigRecord({"run-name": "run1-0a1b2c3d", "server-round": 2})}),
        dst_node_id=1,
        message_type="train",
    )

    class Context:
        run_id = 42

    gate._log(task(), gate.refusal(task()), request, Context())
    gate._log(task(), gate.refusal(task()), None, None)  # the task's input could not be taken: Flower's run id, no round
    log = AuditLog(tmp_path / "state")
    records = log.records()
    log.close()
    assert [(r.run_id, r.server_round, r.message_type, r.sent, r.fab_sha256) for r in records] == [
        ("run1-0a1b2c3d", 2, "train", False, OTHER),
        ("42", 0, "", False, OTHER),
    ]
    assert records[0].reason == f"refused: {gate.reply(gate.refusal(task()))}"
    assert records[0].reason.startswith(
        f"refused: campus BBB refuses to start this app: apps.approved_fab_hashes: app bundle {OTHER}"
    )
    out = capsys.readouterr().out
    assert f"campus BBB: REFUSED train of run run1-0a1b2c3d round 2: apps.approved_fab_hashes: app bundle {OTHER}" in out
    assert f"(policy {policy.resolve()}); no app was started" in out


def test_supernode_leaves_every_app_launch_to_the_gate(tmp_path):
    command = supernode_command("AAA", tmp_path, tmp_path, None, "127.0.0.1:9200", None, None, 9301, tmp_path / "secret")
    assert command[command.index("--isolation") + 1] == "process"  # the SuperNode starts no app process itself
    assert command[command.index("--superexec-auth-secret-file") + 1] == str(tmp_path / "secret")
    gate = gate_command("AAA", Path("state"), Path("policy.toml"), "127.0.0.1:9301", tmp_path / "secret")
    assert gate[:3] == [sys.executable, "-m", "edufl.clients.approval"]
    assert gate[gate.index("--policy") + 1] == str(Path("policy.toml").resolve())
    assert gate[gate.index("--runtime-api-address") + 1] == "127.0.0.1:9301"


@pytest.mark.parametrize(
    "status, supernode_running, failed",
    [
        (GATE_FAILED, True, True),
        (1, True, False),  # Flower's graceful exit on Ctrl-C: the SuperNode is stopping too
        (-9, False, False),  # killed after its SuperNode ended, by the campus command's clean-up
    ],
)
def test_a_gate_that_fails_stops_its_supernode(status, supernode_running, failed):
    stops = []
    gate = gate_process(
        [sys.executable, "-c", f"raise SystemExit({status})" if status >= 0 else "import os; os.kill(os.getpid(), 9)"]
    )
    gate.stop = lambda: stops.append(True) or supernode_running
    gate.on_line("INFO :      Starting Flower SuperNode")
    assert gate.proc is None  # not before the SuperNode serves
    gate.on_line("INFO :      SuperNode ID: 123")
    gate.watcher.join(timeout=30)
    assert gate.failed == (status if failed else None) and bool(stops) == (status != 1)


# --- end to end --------------------------------------------------------------------------------


@pytest.mark.deployment
def test_unapproved_bundle_is_refused_before_any_app_starts(tmp_path, tables):
    approved_policy(tmp_path / "approved.toml")
    (tmp_path / "changed.toml").write_text(POLICY)  # BBB's steward approved this app with one byte changed
    add_approval(tmp_path / "changed.toml", bundle_sha256(app_copy(tmp_path / "changed", change="clients/app.py"))[0], "")
    fab_hash = bundle_sha256()[0]
    with federation(tmp_path, tables, {"AAA": "approved.toml", "BBB": "changed.toml"}) as (superlink, procs):
        result = coordinator_run(tmp_path, superlink, "run1", "--rounds", "1", "--min-campuses", "2")
        aaa, bbb = procs.output("AAA"), procs.output("BBB")
    assert result.returncode == 3, result.stdout + result.stderr  # the run completed with AAA; BBB's refusal is named
    assert "campuses refused the run" in result.stderr and "apps.approved_fab_hashes" in result.stderr
    assert f"app bundle edufl/edufl 0.1.0, sha256 {fab_hash}" in result.stdout
    summary = json.loads((tmp_path / "run1" / "summary.json").read_text())
    name = summary["config"]["run-name"]
    # AAA ran the approved bundle; BBB refused it, in each phase, and the coordinator says so by campus name.
    assert [c["campus"] for c in summary["campuses"]] == ["AAA"] and released_rounds(tmp_path, "AAA", name) == [1]
    assert [(f["phase"], f["refused"]) for f in summary["failures"]] == [("train", True), ("evaluate", True)]
    assert all(
        f["reason"].startswith("campus BBB (node ") and f"apps.approved_fab_hashes: app bundle {fab_hash}" in f["reason"]
        for f in summary["failures"]
    )
    ledger = PrivacyLedger(tmp_path / "state" / "BBB")
    assert ledger.releases() == []
    ledger.close()
    log = AuditLog(tmp_path / "state" / "BBB")
    records = log.records()
    log.close()
    assert [(r.run_id, r.server_round, r.message_type, r.sent, r.fab_sha256) for r in records] == [
        (name, 1, "train", False, fab_hash),
        (name, 1, "evaluate", False, fab_hash),
    ]  # the gate's, and no app's
    assert f"campus BBB: REFUSED train of run {name} round 1: apps.approved_fab_hashes: app bundle {fab_hash}" in bbb
    assert "starting its ClientApp" not in bbb and f"app bundle {fab_hash} is approved; starting its ClientApp" in aaa
