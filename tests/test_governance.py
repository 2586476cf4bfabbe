"""Campus governance: the policy file, its checks against coordinator requests, and the privacy ledger."""

from __future__ import annotations

from pathlib import Path

import pytest
from opacus.accountants import RDPAccountant

from federation.ledger import PrivacyLedger, Release
from federation.policy import CampusPolicy, PolicyError
from federation.runconfig import RunConfig

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
