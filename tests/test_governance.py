"""Campus governance: the run configuration a campus re-validates, the policy file and its checks, the research
policy, the privacy ledger, the release guard and the audit log."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from campus_contexts import campus_context
from flwr.app import Array, ConfigRecord, Context, Message, RecordDict
from opacus.accountants import RDPAccountant
from pydantic import ValidationError

from edufl.clients.app import train_handler
from edufl.clients.guard import release_guard
from edufl.clients.node import SIM_ENV, SIM_MANIFEST, campus_setup
from edufl.federation.audit import AuditLog, as_dict, payload_digest
from edufl.federation.errors import UserError
from edufl.federation.ledger import PrivacyLedger, Release
from edufl.federation.metrics import TRAIN_METRICS
from edufl.federation.models import build_model, model_arrays
from edufl.federation.policy import RESEARCH_POLICY, CampusPolicy, PolicyError, ResearchPolicy
from edufl.federation.proto.audit_pb2 import DpRelease
from edufl.federation.runconfig import TASKS, ConfigError, RunConfig
from edufl.federation.schema import load_schema
from edufl.federation.tasks import feature_names
from edufl.federation.wire import ARRAYS, BLOCKED, CAMPUS, CONFIG, METRICS, REFUSED

OULAD = load_schema()
"""OULAD's federation schema (federation/schemas/oulad.toml)."""

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


@pytest.mark.parametrize(
    "text, named",
    [
        ("[privacy]\nmax_epsilon = 3\n", "privacy.max_epsilon"),  # unknown key (typo)
        ("[privacy]\ndelta = 1.5\n", "privacy.delta"),
        ("[training]\nmax_rounds = 0\n", "training.max_rounds"),
        ("[privacy]\nmax_epsilon_per_run = inf\n", "privacy.max_epsilon_per_run"),
        ("[releases]\nmin_cohort_size = 5\n", "releases"),
        ("[privacy\n", "not a TOML file"),
    ],
)
def test_bad_policy_file_names_the_key(tmp_path: Path, text: str, named: str):
    path = tmp_path / "policy.toml"
    path.write_text(text)
    with pytest.raises(PolicyError, match=r"policy\.toml: .*" + named.replace(".", r"\.")):
        CampusPolicy.load(path)


@pytest.mark.parametrize(
    "text, named, why",
    [
        ('[privacy]\nmax_epsilon_per_run = "3"\n', "privacy.max_epsilon_per_run", "Input should be a valid number"),  # a string
        ("[privacy]\nmax_epsilon_per_run = 1e308\n", "privacy.max_epsilon_per_run", "Input should be less than or equal to 100"),
        ("[privacy]\nmax_epsilon_per_run = true\n", "privacy.max_epsilon_per_run", "Input should be a valid number"),
        ("[privacy]\ntotal_epsilon_budget = inf\n", "privacy.total_epsilon_budget", "Input should be a finite number"),
        (
            "[privacy]\ntotal_epsilon_budget = 1000.5\n",
            "privacy.total_epsilon_budget",
            "Input should be less than or equal to 1000",
        ),
        ("[privacy]\ndelta = nan\n", "privacy.delta", "Input should be a finite number"),
        ("[privacy]\ndelta = 0.01\n", "privacy.delta", "Input should be less than 0.01"),
        ("[privacy]\nmin_noise_multiplier = 101\n", "privacy.min_noise_multiplier", "Input should be less than or equal to 100"),
        (
            '[training]\nallowed_tasks = ["withdrawl"]\n',
            "training.allowed_tasks.0",
            "Input should be 'withdrawal', 'at_risk', 'final_result' or 'term1_dropout'",
        ),
        (
            '[training]\nallowed_tasks = "withdrawal"\n',
            "training.allowed_tasks",
            "Value error, expected a list, e.g. [\"withdrawal\"], not 'withdrawal'",
        ),
        ("[training]\nmax_rounds = 10001\n", "training.max_rounds", "Input should be less than or equal to 10000"),
        ("[training]\nmax_rounds = 50.0\n", "training.max_rounds", "Input should be a valid integer"),  # a decimal, not a count
        ('[training]\nmax_local_epochs = "5"\n', "training.max_local_epochs", "Input should be a valid integer"),
        ("[training]\nmax_local_epochs = 1001\n", "training.max_local_epochs", "Input should be less than or equal to 1000"),
        ("[release]\nmin_cohort_size = 1000001\n", "release.min_cohort_size", "Input should be less than or equal to 1000000"),
        ("[release]\nmin_cohort_size = true\n", "release.min_cohort_size", "Input should be a valid integer"),
    ],
)
def test_policy_values_are_strictly_typed_and_bounded(tmp_path: Path, text: str, named: str, why: str):
    path = tmp_path / "policy.toml"
    path.write_text(text)
    with pytest.raises(PolicyError) as err:
        CampusPolicy.load(path)
    assert str(err.value) == f"{path}: {named}: {why}"  # the file, the one offending key, and why


def test_policy_accepts_whole_numbers_for_decimals_and_values_at_their_bounds(tmp_path: Path):
    path = tmp_path / "policy.toml"
    path.write_text(
        "[privacy]\nmax_epsilon_per_run = 100\ntotal_epsilon_budget = 1000\ndelta = 0.0099\n"
        "min_noise_multiplier = 0\n[training]\nmax_rounds = 10000\nmax_local_epochs = 1000\n"
        'allowed_tasks = ["final_result", "at_risk"]\n[release]\nmin_cohort_size = 1000000\n'
    )
    policy = CampusPolicy.load(path)
    assert (policy.privacy.max_epsilon_per_run, policy.privacy.total_epsilon_budget) == (100.0, 1000.0)
    assert type(policy.privacy.max_epsilon_per_run) is float and type(policy.privacy.min_noise_multiplier) is float
    assert (policy.privacy.delta, policy.training.max_rounds, policy.training.max_local_epochs) == (0.0099, 10000, 1000)
    assert policy.training.allowed_tasks == ("final_result", "at_risk") and policy.release.min_cohort_size == 1_000_000
    assert [k for k, _ in policy.check(RunConfig(task="withdrawal"))] == ["training.allowed_tasks"]
    assert policy.check(RunConfig(task="at_risk", target_epsilon=100.0, num_rounds=10000)) == []


def test_default_policy_allows_only_the_withdrawal_task_as_documented():
    policy = CampusPolicy()
    assert policy.training.allowed_tasks == ("withdrawal",) and CampusPolicy.load(None) == policy
    assert (policy.training.max_rounds, policy.training.max_local_epochs, policy.release.min_cohort_size) == (50, 5, 10)
    assert policy.check(RunConfig(task="withdrawal")) == []
    for task in ("at_risk", "final_result"):
        [(key, why)] = policy.check(RunConfig(task=task))
        assert (key, why) == ("training.allowed_tasks", f"task {task!r} is not one of withdrawal")
    none = CampusPolicy.model_validate({"training": {"allowed_tasks": []}})  # a campus that trains nothing
    assert none.check(RunConfig()) == [("training.allowed_tasks", "task 'withdrawal' is not one of (none)")]


def test_reproducible_noise_is_refused_under_every_policy():
    request = RunConfig(reproducible_noise=True)
    [(key, why)] = CampusPolicy().check(request)
    assert key == "reproducible-noise" and "coordinator" in why and "seed" in why and "predict the noise" in why
    loosest = CampusPolicy.model_validate(
        {
            "privacy": {"max_epsilon_per_run": 100, "total_epsilon_budget": 1000, "delta": 0.0099, "min_noise_multiplier": 0},
            "training": {"max_rounds": 10000, "max_local_epochs": 1000, "allowed_tasks": list(TASKS)},
            "release": {"min_cohort_size": 1},
        }
    )
    assert loosest.check(RunConfig()) == []
    assert [k for k, _ in loosest.check(request)] == ["reproducible-noise"]
    # reported with every other key the request loosens
    assert [k for k, _ in CampusPolicy().check(RunConfig(reproducible_noise=True, num_rounds=51))] == [
        "training.max_rounds",
        "reproducible-noise",
    ]


@pytest.mark.parametrize(
    "request_, key",
    [
        (dict(dp=False), "privacy.max_epsilon_per_run"),
        (dict(target_epsilon=1e6), "privacy.max_epsilon_per_run"),
        (dict(delta=1e-3), "privacy.delta"),
        (dict(num_rounds=21), "training.max_rounds"),
        (dict(local_epochs=3), "training.max_local_epochs"),
    ],
)
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


def test_the_research_policy_refuses_no_setting_but_keeps_the_release_minimum():
    research = [
        RunConfig(dp=False),
        RunConfig(reproducible_noise=True),
        RunConfig(task="final_result", target_epsilon=1e6, delta=0.5, num_rounds=10_000, local_epochs=1_000),
    ]
    assert [RESEARCH_POLICY.check(cfg) for cfg in research] == [[], [], []]
    assert all(CampusPolicy().check(cfg) for cfg in research)  # each one breaks the safe defaults
    spent, planned = [(1.0, 1.0, 20)], (1.0, 1.0, 20)  # ε about 49 at δ 1e-5
    assert RESEARCH_POLICY.over_budget(spent, planned) is None
    assert CampusPolicy().over_budget(spent, planned).startswith("privacy.total_epsilon_budget: ")
    assert RESEARCH_POLICY.noise_multiplier(0.3) == 0.3  # no floor
    assert RESEARCH_POLICY.release.min_cohort_size == CampusPolicy().release.min_cohort_size == 10
    assert RESEARCH_POLICY.training.allowed_tasks == TASKS


def test_no_policy_file_means_the_research_policy_in_a_simulation_and_the_safe_defaults_on_a_campus(tmp_path, monkeypatch):
    manifest = {"campuses": ["AAA"], "state-root": str(tmp_path / "state"), "policy": None}
    (tmp_path / SIM_MANIFEST).write_text(json.dumps(manifest))
    monkeypatch.setenv(SIM_ENV, str(tmp_path))
    assert campus_setup({"partition-id": 0}).policy is RESEARCH_POLICY
    deployed = campus_setup({"data-dir": str(tmp_path / "AAA")}).policy
    assert deployed == CampusPolicy() and not isinstance(deployed, ResearchPolicy)
    policy = tmp_path / "policy.toml"
    policy.write_text(POLICY)
    (tmp_path / SIM_MANIFEST).write_text(json.dumps({**manifest, "policy": str(policy)}))
    assert campus_setup({"partition-id": 0}).policy == CampusPolicy.load(policy)  # --policy: the file, as given


@pytest.mark.parametrize(
    "values, message",
    [
        ({"num-rounds": 0}, "num-rounds = 0; expected a whole number from 1 to 10000"),
        ({"num-rounds": 5.0}, "num-rounds = 5.0; expected an int"),
        ({"batch-size": True}, "batch-size = True; expected an int"),
        ({"learning-rate": math.inf}, "learning-rate = inf; expected a finite number > 0"),
        ({"learning-rate": "0.3"}, "learning-rate = '0.3'; expected a float"),
        ({"delta": 1.0}, "delta = 1.0; expected a number in (0, 1)"),
        ({"proximal-mu": -0.1}, "proximal-mu = -0.1; expected a finite number >= 0"),
        ({"strategy": "fedsgd"}, "strategy = 'fedsgd'; expected one of fedavg, fedprox, fedadam"),
        ({"contract-version": "one"}, "contract-version = 'one'; expected MAJOR.MINOR, e.g. \"1.0\""),
        ({"dp": 1}, "dp = 1; expected a bool"),
        (
            {"secagg-num-shares": 2.0},
            "secagg-num-shares = 2.0; expected a fraction of the campuses in (0, 1] or a whole number of shares >= 3",
        ),
        (
            {"num-rounds": 0, "shards": 0},
            "num-rounds = 0; expected a whole number from 1 to 10000; shards = 0; expected a whole number from 1 to 100000",
        ),
        ({"central-dp": "fixed", "strategy": "fedadam"}, "central-dp = 'fixed' needs strategy fedavg or fedprox, not fedadam"),
        ({"num-round": 5}, "unknown configuration key(s): num-round"),
    ],
)
def test_run_config_errors_name_the_dashed_key_and_what_was_expected(values: dict, message: str):
    named = {key.replace("-", "_"): value for key, value in values.items()}
    for build in (lambda: RunConfig.from_flower(values), lambda: RunConfig(**named)):
        with pytest.raises(ConfigError) as err:
            build()
        assert str(err.value) == message
        assert isinstance(err.value, UserError) and err.value.exit_code == 2


def test_run_config_round_trips_through_flower_and_documents_every_key():
    cfg = RunConfig(num_rounds=3, learning_rate=1, run_name="r")  # a whole number where a decimal is expected
    assert type(cfg.learning_rate) is float and cfg.to_flower()["learning-rate"] == 1.0
    flower = cfg.to_flower()
    assert RunConfig.from_flower({**flower, "server-round": 2}) == cfg  # the coordinator's round key is not a setting
    assert list(flower) == [name.replace("_", "-") for name in RunConfig.model_fields]
    assert all(field.description for field in RunConfig.model_fields.values())
    assert RunConfig.from_flower({}) == RunConfig() and RunConfig().num_rounds == 10
    with pytest.raises(ValidationError):
        cfg.seed = 1  # frozen


def _release(run: str, rnd: int, sigma: float = 1.1, q: float = 0.02, steps: int = 50) -> Release:
    return Release(
        "data-sha",
        "AAA",
        run,
        rnd,
        "withdrawal",
        DpRelease(mechanism="dp-sgd", noise_multiplier=sigma, sample_rate=q, steps=steps, delta=1e-5, accountant="rdp"),
    )


def test_ledger_persists_and_composes_across_runs(tmp_path: Path):
    ledger = PrivacyLedger(tmp_path)
    for rnd in (1, 2, 3):
        ledger.record(_release("run-1", rnd))
    ledger.record(_release("run-2", 1, sigma=0.9, q=0.04, steps=25))
    ledger.close()

    reopened = PrivacyLedger(tmp_path)  # a restarted campus sees everything it released
    assert [(r.run_id, r.server_round) for r in reopened.releases("data-sha")] == [
        ("run-1", 1),
        ("run-1", 2),
        ("run-1", 3),
        ("run-2", 1),
    ]
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
    model = build_model(cfg.model, len(feature_names(OULAD)))
    config = ConfigRecord({**cfg.to_flower(), "server-round": server_round})
    return Message(RecordDict({ARRAYS: model_arrays(model), CONFIG: config}), dst_node_id=1, message_type="train")


def test_guard_lets_a_declared_update_leave_and_logs_exactly_what_left(aaa_dir, task_identity):
    cfg = RunConfig(model="logistic", num_rounds=2)
    reply = release_guard(_train_request(cfg), campus_context(aaa_dir), train_handler)
    assert not reply.has_error()
    [record] = AuditLog(aaa_dir.parent / "state").records()
    assert (record.campus, record.run_id, record.server_round, record.message_type, record.sent) == ("AAA", "5", 1, "train", True)
    # the logistic model's weight row and bias, flattened into the one array a model travels as
    assert [(a.name, list(a.shape), a.dtype) for a in record.arrays] == [("weights", [len(feature_names(OULAD)) + 1], "float32")]
    assert (record.payload_bytes, record.payload_sha256) == payload_digest(reply.content)
    assert record.num_examples == 563 and sorted(record.metric_keys) == sorted(TRAIN_METRICS)
    [release] = PrivacyLedger(aaa_dir.parent / "state").releases()
    assert (
        record.dp == release.dp and record.dp.mechanism == "dp-sgd" and record.dp.accountant == "rdp"
    )  # the ledger's row, as sent
    assert record.dp.epsilon == reply.content[METRICS]["epsilon"] > 0


@pytest.mark.parametrize(
    "tamper, reason",
    [
        (
            lambda c: c[ARRAYS].__setitem__("extra", Array(np.zeros(3, dtype=np.float32))),
            "are not the logistic model's parameters",
        ),
        (lambda c: c[METRICS].__setitem__("scores", [0.1, 0.7, 0.2]), "hold lists of values"),
        (
            lambda c: c.__setitem__("rows", ConfigRecord({"id_student": "11391"})),
            "records \\['arrays', 'campus', 'metrics', 'rows'\\]",
        ),
        (lambda c: c[CAMPUS].__setitem__("note", "hello"), "campus record keys"),
    ],
)
def test_guard_blocks_anything_undeclared_and_logs_the_block(aaa_dir, task_identity, tamper, reason):
    def leaky_handler(msg: Message, context: Context) -> Message:
        reply = train_handler(msg, context)
        tamper(reply.content)
        return reply

    reply = release_guard(_train_request(RunConfig(model="logistic")), campus_context(aaa_dir), leaky_handler)
    assert reply.has_error() and reply.error.code == BLOCKED and "release guard blocked" in reply.error.reason
    assert not reply.has_content()  # nothing of the content leaves
    [record] = AuditLog(aaa_dir.parent / "state").records()
    assert not record.sent and re.search(reason, record.reason)


def test_guard_answers_a_refusal_with_its_reason_only_and_logs_it(aaa_dir, task_identity):
    reply = release_guard(_train_request(RunConfig(model="logistic", dp=False)), campus_context(aaa_dir), train_handler)
    assert reply.error.code == REFUSED and "privacy.max_epsilon_per_run" in reply.error.reason
    [record] = AuditLog(aaa_dir.parent / "state").records()
    assert not record.sent and record.reason.startswith("refused: campus AAA refuses round 1")
    assert as_dict(record)["sent"] is False  # the JSON form `edufl campus audit --format json` prints


def test_campus_refuses_a_request_for_reproducible_noise_before_training(aaa_dir, task_identity):
    reply = release_guard(
        _train_request(RunConfig(model="logistic", reproducible_noise=True)), campus_context(aaa_dir), train_handler
    )
    assert reply.error.code == REFUSED and not reply.has_content()
    assert "the request breaks its policy (reproducible-noise: " in reply.error.reason
    assert PrivacyLedger(aaa_dir.parent / "state").releases() == []  # nothing trained, nothing spent
    [record] = AuditLog(aaa_dir.parent / "state").records()
    assert not record.sent and "reproducible-noise" in record.reason


def test_guard_withholds_metrics_on_a_cohort_smaller_than_the_policy_minimum(aaa_dir, task_identity, tmp_path):
    policy = tmp_path / "policy.toml"
    policy.write_text("[release]\nmin_cohort_size = 600\n")  # AAA trains on 563 rows
    reply = release_guard(_train_request(RunConfig(model="logistic")), campus_context(aaa_dir, policy=str(policy)), train_handler)
    assert reply.error.code == BLOCKED and "fewer than release.min_cohort_size" not in reply.error.reason
    [record] = AuditLog(aaa_dir.parent / "state").records()  # the details stay on the campus
    assert not record.sent and "fewer than release.min_cohort_size 600" in record.reason
