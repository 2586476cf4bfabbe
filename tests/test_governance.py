"""Campus governance: the policy file and its checks, the privacy ledger, the release guard and the audit log."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from opacus.accountants import RDPAccountant

from clients.app import train_handler
from clients.guard import release_guard
from federation.audit import AuditLog, as_dict, payload_digest
from federation.ledger import PrivacyLedger, Release
from federation.models import build_model
from federation.policy import CampusPolicy, PolicyError
from federation.runconfig import ARRAYS, BLOCKED, CAMPUS, CONFIG, METRICS, REFUSED, TRAIN_METRICS, RunConfig
from federation.tasks import feature_names

POLICY = """
[privacy]
max_epsilon_per_run = 2.0
total_epsilon_budget = 5.0
delta = 1e-6
min_noise_multiplier = 0.8
[training]
max_rounds = 20
max_local_epochs = 2
allowed_tasks = ["withdrawal"]
[release]
min_cohort_size = 25
"""


def test_policy_file_is_read_and_defaults_are_safe(tmp_path: Path):
    path = tmp_path / "policy.toml"
    path.write_text(POLICY)
    policy = CampusPolicy.load(path)
    assert (policy.privacy.max_epsilon_per_run, policy.privacy.delta, policy.privacy.min_noise_multiplier) == (2.0, 1e-6, 0.8)
    assert (policy.training.max_rounds, policy.release.min_cohort_size) == (20, 25)
    default = CampusPolicy.load(None)
    assert default.privacy.max_epsilon_per_run == 3.0 and default.privacy.total_epsilon_budget == 10.0
    assert default.check(RunConfig()) == []  # the default run fits the default policy


@pytest.mark.parametrize("text, named", [
    ("[privacy]\nmax_epsilon = 3\n", "privacy.max_epsilon"),  # unknown key (typo)
    ("[privacy]\ndelta = 1.5\n", "privacy.delta"),
    ("[training]\nmax_rounds = 0\n", "training.max_rounds"),
    ("[privacy]\nmax_epsilon_per_run = inf\n", "privacy.max_epsilon_per_run"),
    ("[releases]\nmin_cohort_size = 5\n", "releases"),
    ("[privacy\n", "not a TOML file"),
])
def test_bad_policy_file_names_the_key(tmp_path: Path, text: str, named: str):
    path = tmp_path / "policy.toml"
    path.write_text(text)
    with pytest.raises(PolicyError, match=r"policy\.toml: .*" + named.replace(".", r"\.")):
        CampusPolicy.load(path)


@pytest.mark.parametrize("request_, key", [
    (dict(dp=False), "privacy.max_epsilon_per_run"),
    (dict(target_epsilon=1e6), "privacy.max_epsilon_per_run"),
    (dict(delta=1e-3), "privacy.delta"),
    (dict(num_rounds=21), "training.max_rounds"),
    (dict(local_epochs=3), "training.max_local_epochs"),
])
def test_a_looser_request_is_refused_by_key(tmp_path: Path, request_: dict, key: str):
    path = tmp_path / "policy.toml"
    path.write_text(POLICY)
    policy = CampusPolicy.load(path)
    strict = dict(target_epsilon=2.0, delta=1e-6, num_rounds=20, local_epochs=2)
    assert policy.check(RunConfig(**strict)) == []
    assert [k for k, _ in policy.check(RunConfig(**{**strict, **request_}))] == [key]


def test_unlisted_task_is_refused():
    policy = CampusPolicy.model_validate({"training": {"allowed_tasks": ["at_risk"]}})
    assert [k for k, _ in policy.check(RunConfig())] == ["training.allowed_tasks"]


def test_noise_floor():
    policy = CampusPolicy()
    assert policy.noise_multiplier(0.3) == 0.5 and policy.noise_multiplier(1.7) == 1.7


def _release(run: str, rnd: int, sigma: float = 1.1, q: float = 0.02, steps: int = 50) -> Release:
    return Release("data-sha", "AAA", run, rnd, "withdrawal", "dp-sgd", sigma, q, steps, 0.0, 1e-5)


def test_ledger_persists_and_composes_across_runs(tmp_path: Path):
    ledger = PrivacyLedger(tmp_path)
    for rnd in (1, 2, 3):
        ledger.record(_release("run-1", rnd))
    ledger.record(_release("run-2", 1, sigma=0.9, q=0.04, steps=25))
    ledger.close()

    reopened = PrivacyLedger(tmp_path)  # a restarted campus sees everything it released
    assert [(r.run_id, r.server_round) for r in reopened.releases("data-sha")] == [("run-1", 1), ("run-1", 2), ("run-1", 3), ("run-2", 1)]
    assert reopened.releases()[0].recorded_at  # time-stamped

    reference = RDPAccountant()  # independent recomputation with Opacus's accountant
    reference.history = [(1.1, 0.02, 50)] * 3 + [(0.9, 0.04, 25)]
    total = reopened.spent("data-sha", 1e-5)
    assert total == pytest.approx(reference.get_epsilon(1e-5), rel=1e-12)
    run1, run2 = reopened.spent("data-sha", 1e-5, "run-1"), reopened.spent("data-sha", 1e-5, "run-2")
    assert max(run1, run2) < total <= run1 + run2  # RDP composition, never more than the plain sum
    assert reopened.spent("other-data", 1e-5) == 0.0
    assert reopened.datasets() == {"data-sha": "AAA"}


# --- the release guard and the audit log, around the real ClientApp handlers ---------------------------------------

def _train_request(cfg: RunConfig, server_round: int = 1) -> Message:
    model = build_model(cfg.model, len(feature_names()))
    config = ConfigRecord({**cfg.to_flower(), "server-round": server_round})
    return Message(RecordDict({ARRAYS: ArrayRecord(model.state_dict()), CONFIG: config}), dst_node_id=1, message_type="train")


def _context(aaa_dir: Path, **node_config) -> Context:
    config = {"data-dir": str(aaa_dir), "campus": "AAA", "state-dir": str(aaa_dir.parent / "state"), **node_config}
    return Context(run_id=5, node_id=1, node_config=config, state=RecordDict(), run_config={})


def test_guard_lets_a_declared_update_leave_and_logs_exactly_what_left(aaa_dir, task_identity):
    cfg = RunConfig(model="logistic", num_rounds=2)
    reply = release_guard(_train_request(cfg), _context(aaa_dir), train_handler)
    assert not reply.has_error()
    [record] = AuditLog(aaa_dir.parent / "state").records()
    assert (record.campus, record.run_id, record.server_round, record.message_type, record.sent) == ("AAA", "5", 1, "train", True)
    assert [(a.name, list(a.shape), a.dtype) for a in record.arrays] == [("0.0.weight", [1, len(feature_names())], "float32"), ("0.0.bias", [1], "float32")]
    assert (record.payload_bytes, record.payload_sha256) == payload_digest(reply.content)
    assert record.num_examples == 563 and sorted(record.metric_keys) == sorted(TRAIN_METRICS)
    [release] = PrivacyLedger(aaa_dir.parent / "state").releases()
    assert (record.dp.noise_multiplier, record.dp.steps, record.dp.epsilon) == (release.noise_multiplier, release.steps, release.epsilon)
    assert record.dp.epsilon == reply.content[METRICS]["epsilon"] > 0


@pytest.mark.parametrize("tamper, reason", [
    (lambda c: c[ARRAYS].__setitem__("extra", Array(np.zeros(3, dtype=np.float32))), "are not the logistic model's parameters"),
    (lambda c: c[METRICS].__setitem__("scores", [0.1, 0.7, 0.2]), "hold lists of values"),
    (lambda c: c.__setitem__("rows", ConfigRecord({"id_student": "11391"})), "records \\['arrays', 'campus', 'metrics', 'rows'\\]"),
    (lambda c: c[CAMPUS].__setitem__("note", "hello"), "campus record keys"),
])
def test_guard_blocks_anything_undeclared_and_logs_the_block(aaa_dir, task_identity, tamper, reason):
    def leaky_handler(msg: Message, context: Context) -> Message:
        reply = train_handler(msg, context)
        tamper(reply.content)
        return reply

    reply = release_guard(_train_request(RunConfig(model="logistic")), _context(aaa_dir), leaky_handler)
    assert reply.has_error() and reply.error.code == BLOCKED and "release guard blocked" in reply.error.reason
    assert not reply.has_content()  # nothing of the content leaves
    [record] = AuditLog(aaa_dir.parent / "state").records()
    assert not record.sent and re.search(reason, record.reason)


def test_guard_answers_a_refusal_with_its_reason_only_and_logs_it(aaa_dir, task_identity):
    reply = release_guard(_train_request(RunConfig(model="logistic", dp=False)), _context(aaa_dir), train_handler)
    assert reply.error.code == REFUSED and "privacy.max_epsilon_per_run" in reply.error.reason
    [record] = AuditLog(aaa_dir.parent / "state").records()
    assert not record.sent and record.reason.startswith("refused: campus AAA refuses round 1")
    assert as_dict(record)["sent"] is False  # the JSON form `edufl campus audit --format json` prints


def test_guard_withholds_metrics_on_a_cohort_smaller_than_the_policy_minimum(aaa_dir, task_identity, tmp_path):
    policy = tmp_path / "policy.toml"
    policy.write_text("[release]\nmin_cohort_size = 600\n")  # AAA trains on 563 rows
    reply = release_guard(_train_request(RunConfig(model="logistic")), _context(aaa_dir, policy=str(policy)), train_handler)
    assert reply.error.code == BLOCKED and "fewer than release.min_cohort_size 600" in reply.error.reason
