"""DP-SGD and its accounting: ε against an independent recomputation, empty batches,
no stacked hooks or reset accountant across rounds, and campus-side enforcement."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from campus_contexts import campus_context
from dp_accounting import dp_event, pld, rdp
from flwr.app import ConfigRecord, Context, Message, RecordDict
from opacus.accountants.utils import get_noise_multiplier

from edufl.clients.app import CampusRefusal, evaluate_handler, train_handler
from edufl.clients.node import SIM_ENV, SIM_MANIFEST
from edufl.federation.ledger import PrivacyLedger
from edufl.federation.models import build_model, load_model_arrays, model_arrays
from edufl.federation.privacy import ORDERS, DPSettings, calibrate_noise, epsilon, poisson_plan
from edufl.federation.runconfig import RunConfig
from edufl.federation.schema import load_schema
from edufl.federation.tasks import TaskData, early_warning, feature_names, split
from edufl.federation.training import train
from edufl.federation.wire import ARRAYS, CAMPUS, CONFIG, METRICS

OULAD = load_schema()
"""OULAD's federation schema (federation/schemas/oulad.toml)."""


def _events(history) -> dp_event.DpEvent:
    """``history`` [(noise multiplier, sampling rate, steps)] as Google dp-accounting's events."""
    return dp_event.ComposedDpEvent(
        [
            dp_event.SelfComposedDpEvent(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma)), steps)
            for sigma, q, steps in history
        ]
    )


def _google_rdp_epsilon(history, delta: float) -> float:
    """ε by Google's dp-accounting RDP accountant (its own sampled-Gaussian RDP and conversion to (ε, δ)),
    at the RDP orders edufl uses: code independent of Opacus's, over the same orders."""
    accountant = rdp.RdpAccountant(orders=list(ORDERS))
    accountant.compose(_events(history))
    return float(accountant.get_epsilon(delta))


def _pld_epsilon(history, delta: float) -> float:
    """ε by Google's privacy-loss-distribution accountant: close to the exact ε of the same events."""
    accountant = pld.PLDAccountant(value_discretization_interval=1e-5)
    accountant.compose(_events(history))
    return float(accountant.get_epsilon(delta))


@pytest.fixture(scope="module")
def aaa_train(aaa) -> TaskData:
    return split(early_warning(aaa, 60, "withdrawal"), "stratified", 0.2, 0)[0]


def test_calibrated_epsilon_is_positive_below_target_and_matches_recomputation(aaa_train):
    settings = DPSettings(target_epsilon=2.0, delta=1e-5, max_grad_norm=1.0)
    q, spe = poisson_plan(len(aaa_train), 64)
    sigma = calibrate_noise(settings, len(aaa_train), 64, 3 * 2)
    model = build_model("mlp", len(feature_names(OULAD)))
    history = []
    for r in range(3):  # three rounds of two local epochs, one process
        result = train(
            model,
            aaa_train,
            epochs=2,
            batch_size=64,
            learning_rate=0.3,
            seed=r,
            noise_multiplier=sigma,
            max_grad_norm=1.0,
            history=history,
        )
        assert result.steps == 2 * spe
        history = result.history
        spent = epsilon(history, 1e-5)
        assert spent == pytest.approx(_google_rdp_epsilon([(sigma, q, (r + 1) * 2 * spe)], 1e-5), rel=5e-3)
    assert history == [(sigma, q, 3 * 2 * spe)]  # never reset between rounds
    assert 0 < spent <= 2.0 and spent > 1.9
    # no Opacus hooks or per-sample attributes left on the caller's model
    assert all(not m._forward_hooks and not m._backward_hooks for m in model.modules())
    assert all(not hasattr(p, "grad_sample") for p in model.parameters())


@pytest.mark.parametrize(
    ("target", "n", "batch_size", "epochs", "delta"),
    [
        (3.0, 21_000, 64, 10, 1e-5),  # the main job's largest campus
        (3.0, 1_000, 64, 10, 1e-5),
        (3.0, 400, 200, 10, 1e-5),  # q = 0.5, as shard campuses
        (0.5, 5_000, 64, 3, 1e-7),
        (30.0, 300, 64, 10, 1e-5),
        (1.0, 1, 1, 1, 1e-6),  # one Gaussian release (DP statistics)
        (0.05, 1, 1, 1, 0.5),  # a large δ: ε goes below 0 on the way
        (0.003, 1, 1, 1, 0.3),  # and the answer's ε is below 0
    ],
)
def test_calibrated_noise_spends_the_target_to_within_opacus_tolerance(target, n, batch_size, epochs, delta):
    sigma = calibrate_noise(DPSettings(target, delta, 1.0), n, batch_size, epochs)
    q, steps = poisson_plan(n, batch_size)
    history = [(sigma, q, epochs * steps)]
    assert target - 0.01 <= epsilon(history, delta) <= target
    # Opacus's own search answers within the same tolerance: the two σ spend within 0.01 of each other
    opacus_sigma = get_noise_multiplier(
        target_epsilon=target, target_delta=delta, sample_rate=q, steps=epochs * steps, accountant="rdp"
    )
    assert epsilon(history, delta) == pytest.approx(epsilon([(opacus_sigma, q, epochs * steps)], delta), abs=0.01)


def test_a_target_no_noise_multiplier_meets_is_refused():
    with pytest.raises(ValueError, match="no noise multiplier up to 1e"):
        calibrate_noise(DPSettings(1e-8, 1e-5, 1.0), 1, 1, 1)


def test_dp_update_differs_from_non_dp_update_on_same_seed(aaa_train):
    updates = {}
    for dp in (False, True):
        model = build_model("mlp", len(feature_names(OULAD)), seed=0)
        train(
            model,
            aaa_train,
            epochs=1,
            batch_size=64,
            learning_rate=0.3,
            seed=7,
            noise_multiplier=1.0 if dp else None,
            max_grad_norm=1.0,
        )
        updates[dp] = torch.cat([p.detach().flatten() for p in model.parameters()])
    model = build_model("mlp", len(feature_names(OULAD)), seed=0)
    train(model, aaa_train, epochs=1, batch_size=64, learning_rate=0.3, seed=7)
    same = torch.cat([p.detach().flatten() for p in model.parameters()])
    torch.testing.assert_close(same, updates[False])  # plain training is reproducible
    assert (updates[True] - updates[False]).abs().max() > 1e-3


def test_tiny_campus_with_empty_poisson_batches_trains_and_accounts_every_step(aaa_train):
    tiny = aaa_train.take(np.arange(3))
    model = build_model("logistic", len(feature_names(OULAD)))
    before = [p.detach().clone() for p in model.parameters()]
    result = train(model, tiny, epochs=20, batch_size=1, learning_rate=0.1, seed=0, noise_multiplier=1.0, max_grad_norm=1.0)
    # q = 1/3: about 30% of the 60 Poisson batches are empty, and each still counts.
    assert result.steps == 60 and result.history == [(1.0, 1 / 3, 60)]
    assert epsilon(result.history, 1e-5) == pytest.approx(_google_rdp_epsilon([(1.0, 1 / 3, 60)], 1e-5), rel=5e-3)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_invalid_privacy_inputs_fail_closed():
    for bad in (dict(target_epsilon=0.0), dict(target_epsilon=math.inf), dict(delta=0.0), dict(max_grad_norm=-1.0)):
        with pytest.raises(ValueError):
            DPSettings(**{**dict(target_epsilon=1.0, delta=1e-5, max_grad_norm=1.0), **bad})
    with pytest.raises(ValueError, match="unknown configuration key"):
        RunConfig.from_flower({"noise-multiplier": 0.0})
    with pytest.raises(ValueError, match="target-epsilon"):
        RunConfig.from_flower({"target-epsilon": -1.0})


def _message(cfg: RunConfig, model, server_round: int, kind: str = "train") -> Message:
    config = ConfigRecord({**cfg.to_flower(), "server-round": server_round})
    return Message(RecordDict({ARRAYS: model_arrays(model), CONFIG: config}), dst_node_id=1, message_type=kind)


def test_client_app_carries_epsilon_across_rounds_and_refuses_past_target(aaa_dir, task_identity):
    cfg = RunConfig(num_rounds=2, target_epsilon=1.0, model="logistic")
    context = campus_context(aaa_dir, run_id=1)
    model = build_model(cfg.model, len(feature_names(OULAD)))
    spent = []
    for server_round in (1, 2):
        reply = train_handler(_message(cfg, model, server_round), context)
        metrics = reply.content[METRICS]
        assert reply.content[CAMPUS]["name"] == "AAA"
        assert metrics["num-examples"] == 563
        spent.append(metrics["epsilon"])
        load_model_arrays(model, reply.content[ARRAYS])
    assert 0 < spent[0] < spent[1] <= 1.0
    ledger = PrivacyLedger(aaa_dir.parent / "state")
    releases = ledger.releases()
    assert [(r.campus, r.run_id, r.server_round, r.dp.mechanism) for r in releases] == [
        ("AAA", "1", 1, "dp-sgd"),
        ("AAA", "1", 2, "dp-sgd"),
    ]
    assert [r.dp.epsilon for r in releases] == spent  # what was reported is what was recorded
    assert epsilon(ledger.history(releases[0].dataset), cfg.delta) == pytest.approx(spent[1])
    with pytest.raises(CampusRefusal, match="campus AAA refuses round 3"):
        train_handler(_message(cfg, model, 3), context)
    assert len(ledger.releases()) == 2  # nothing trained, nothing spent
    scores = evaluate_handler(_message(cfg, model, 2, "evaluate"), context).content[METRICS]
    assert scores["num-examples"] == 140 and 0 <= scores["auc"] <= 1 and 0 < scores["brier"] < 0.25


@pytest.mark.parametrize(
    "history",
    [
        [(1.1, 0.01, 700), (0.8, 0.05, 30), (1.1, 0.01, 5)],  # rounds with different settings compose
        [(0.7, 1 / 7, 70)],  # a small campus: large sampling rate, little noise
        [(4.0, 0.001, 10_000)],  # a large campus: many steps, much noise
    ],
)
def test_epsilon_agrees_with_googles_accountants_and_bounds_the_pld_epsilon(history):
    spent = epsilon(history, 1e-5)
    assert spent == pytest.approx(_google_rdp_epsilon(history, 1e-5), rel=5e-3)  # same bound, other code
    assert _pld_epsilon(history, 1e-5) <= spent <= 2 * _pld_epsilon(history, 1e-5)  # an upper bound, not a loose one
    assert epsilon([], 1e-5) == 0.0


def test_client_app_refuses_a_coordinator_that_loosens_privacy_mid_run(aaa_dir, task_identity):
    context = campus_context(aaa_dir, run_id=1)
    cfg = RunConfig(num_rounds=5, target_epsilon=1.0, model="logistic")
    model = build_model(cfg.model, len(feature_names(OULAD)))
    first = train_handler(_message(cfg, model, 1), context).content[METRICS]["epsilon"]
    # each within the campus policy, but looser than what the run agreed at round 1
    for loosened in (
        RunConfig(num_rounds=5, target_epsilon=2.0, model="logistic"),
        RunConfig(num_rounds=10, target_epsilon=1.0, model="logistic"),
    ):
        with pytest.raises(CampusRefusal, match="privacy settings changed"):
            train_handler(_message(loosened, model, 2), context)
    second = train_handler(_message(cfg, model, 2), context).content[METRICS]["epsilon"]
    assert 0 < first < second <= 1.0


def test_research_simulation_without_dp_reports_and_records_infinite_epsilon(aaa_dir, task_identity, monkeypatch):
    # A virtual campus of `edufl simulate` without --policy: research baselines such as no DP run as asked.
    (aaa_dir.parent / SIM_MANIFEST).write_text(
        json.dumps({"campuses": ["AAA"], "state-root": str(aaa_dir.parent / "campuses"), "policy": None})
    )
    monkeypatch.setenv(SIM_ENV, str(aaa_dir.parent))
    context = Context(run_id=7, node_id=1, node_config={"partition-id": 0}, state=RecordDict(), run_config={})
    cfg = RunConfig(num_rounds=1, dp=False, model="logistic")
    reply = train_handler(_message(cfg, build_model(cfg.model, len(feature_names(OULAD))), 1), context)
    assert reply.content[METRICS]["epsilon"] == math.inf and reply.content[CAMPUS]["name"] == "AAA"
    [release] = PrivacyLedger(aaa_dir.parent / "campuses" / "AAA").releases()
    assert (release.dp.mechanism, release.dp.noise_multiplier, release.dp.epsilon, release.run_id) == ("none", 0.0, math.inf, "7")


@pytest.mark.parametrize(
    "change, named",
    [
        (dict(dp=False), "privacy.max_epsilon_per_run: the run asks for no differential privacy"),
        (dict(target_epsilon=1e6), "privacy.max_epsilon_per_run: target-epsilon 1e\\+06 > 3"),
        (dict(delta=0.01), "privacy.delta: delta 0.01 > 1e-05"),
        (dict(num_rounds=1000), "training.max_rounds: num-rounds 1000 > 50"),
        (dict(task="final_grade"), "task = 'final_grade'; expected one of withdrawal, at_risk"),
        (dict(sneaky_key=1), "unknown configuration key\\(s\\): sneaky_key"),
    ],
)
def test_campus_policy_refuses_a_malicious_coordinator_before_training(aaa_dir, task_identity, change, named):
    values = {**RunConfig(model="logistic").to_flower(), "server-round": 1}
    values.update({k.replace("_", "-") if k != "sneaky_key" else k: v for k, v in change.items()})
    msg = Message(
        RecordDict({ARRAYS: model_arrays(build_model("logistic", len(feature_names(OULAD)))), CONFIG: ConfigRecord(values)}),
        dst_node_id=1,
        message_type="train",
    )
    with pytest.raises(Exception, match=named):
        train_handler(msg, campus_context(aaa_dir, run_id=1))  # the default policy: a real campus always has one
    assert PrivacyLedger(aaa_dir.parent / "state").releases() == []  # nothing trained, nothing released


def test_total_budget_is_spent_across_runs_and_restarts_then_refused(aaa_dir, task_identity, tmp_path):
    policy = tmp_path / "policy.toml"
    policy.write_text("[privacy]\nmax_epsilon_per_run = 1.0\ntotal_epsilon_budget = 2.5\n")
    model = build_model("logistic", len(feature_names(OULAD)))
    finished = 0
    with pytest.raises(CampusRefusal, match="privacy.total_epsilon_budget: the dataset's ε over all runs would reach"):
        for run in range(1, 10):
            cfg = RunConfig(num_rounds=2, target_epsilon=1.0, model="logistic", run_name=f"run-{run}")
            context = campus_context(aaa_dir, run_id=1, policy=str(policy))  # a fresh process each run: state is the ledger's
            for server_round in (1, 2):
                train_handler(_message(cfg, model, server_round), context)
            finished = run
    ledger = PrivacyLedger(aaa_dir.parent / "state")
    releases = ledger.releases()
    assert finished >= 2 and len(releases) in (2 * finished, 2 * finished + 1)  # refused before training, never after
    total = ledger.spent(releases[0].dataset, 1e-5)
    reference = _google_rdp_epsilon([(r.dp.noise_multiplier, r.dp.sample_rate, r.dp.steps) for r in releases], 1e-5)
    assert total == pytest.approx(reference, rel=5e-3) and total <= 2.5
    assert all(ledger.spent(r.dataset, 1e-5, r.run_id) <= 1.0 for r in releases)


def test_metrics_on_fewer_test_rows_than_the_cohort_minimum_are_not_released(aaa_dir, task_identity, tmp_path):
    policy = tmp_path / "policy.toml"
    policy.write_text("[release]\nmin_cohort_size = 1000\n")
    cfg = RunConfig(model="logistic")
    with pytest.raises(CampusRefusal, match=r"fewer test rows than release.min_cohort_size \(1000\)"):
        evaluate_handler(
            _message(cfg, build_model("logistic", len(feature_names(OULAD))), 1, "evaluate"),
            campus_context(aaa_dir, run_id=1, policy=str(policy)),
        )
