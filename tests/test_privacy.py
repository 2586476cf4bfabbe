"""DP-SGD and its accounting: ε against an independent recomputation, empty batches,
no stacked hooks or reset accountant across rounds, and campus-side enforcement."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

from clients.app import PrivacyBudgetExceeded, evaluate_handler, train_handler
from federation.models import build_model
from federation.privacy import DPSettings, calibrate_noise, epsilon, steps_per_epoch
from federation.runconfig import ARRAYS, CAMPUS, CONFIG, METRICS, STATE_PRIVACY, RunConfig
from federation.tasks import TaskData, feature_names, split, withdrawal
from federation.training import train


def _independent_epsilon(sigma: float, q: float, steps: int, delta: float) -> float:
    orders = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
    rdp = compute_rdp(q=q, noise_multiplier=sigma, steps=steps, orders=orders)
    eps, _ = get_privacy_spent(orders=orders, rdp=rdp, delta=delta)
    return float(eps)


@pytest.fixture(scope="module")
def aaa_train(aaa) -> TaskData:
    return split(withdrawal(aaa, 60), "stratified", 0.2, 0)[0]


def test_calibrated_epsilon_is_positive_below_target_and_matches_recomputation(aaa_train):
    settings = DPSettings(target_epsilon=2.0, delta=1e-5, max_grad_norm=1.0)
    spe = steps_per_epoch(len(aaa_train), 64)
    sigma = calibrate_noise(settings, 1 / spe, 3 * 2 * spe)
    model = build_model("mlp", len(feature_names()))
    history = []
    for r in range(3):  # three rounds of two local epochs, one process
        result = train(model, aaa_train, epochs=2, batch_size=64, learning_rate=0.3, seed=r,
                       noise_multiplier=sigma, max_grad_norm=1.0, history=history)
        assert result.steps == 2 * spe
        history = result.history
        spent = epsilon(history, 1e-5)
        assert spent == pytest.approx(_independent_epsilon(sigma, 1 / spe, (r + 1) * 2 * spe, 1e-5), rel=1e-9)
    assert history == [(sigma, 1 / spe, 3 * 2 * spe)]  # never reset between rounds
    assert 0 < spent <= 2.0 and spent > 1.9
    # no Opacus hooks or per-sample attributes left on the caller's model
    assert all(not m._forward_hooks and not m._backward_hooks for m in model.modules())
    assert all(not hasattr(p, "grad_sample") for p in model.parameters())


def test_dp_update_differs_from_non_dp_update_on_same_seed(aaa_train):
    updates = {}
    for dp in (False, True):
        model = build_model("mlp", len(feature_names()), seed=0)
        train(model, aaa_train, epochs=1, batch_size=64, learning_rate=0.3, seed=7,
              noise_multiplier=1.0 if dp else None, max_grad_norm=1.0)
        updates[dp] = torch.cat([p.detach().flatten() for p in model.parameters()])
    model = build_model("mlp", len(feature_names()), seed=0)
    train(model, aaa_train, epochs=1, batch_size=64, learning_rate=0.3, seed=7)
    same = torch.cat([p.detach().flatten() for p in model.parameters()])
    torch.testing.assert_close(same, updates[False])  # plain training is reproducible
    assert (updates[True] - updates[False]).abs().max() > 1e-3


def test_tiny_campus_with_empty_poisson_batches_trains_and_accounts_every_step(aaa_train):
    tiny = aaa_train.take(np.arange(3))
    model = build_model("logistic", len(feature_names()))
    before = [p.detach().clone() for p in model.parameters()]
    result = train(model, tiny, epochs=20, batch_size=1, learning_rate=0.1, seed=0,
                   noise_multiplier=1.0, max_grad_norm=1.0)
    # q = 1/3: about 30% of the 60 Poisson batches are empty, and each still counts.
    assert result.steps == 60 and result.history == [(1.0, 1 / 3, 60)]
    assert epsilon(result.history, 1e-5) == pytest.approx(_independent_epsilon(1.0, 1 / 3, 60, 1e-5))
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


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
    return Message(RecordDict({ARRAYS: ArrayRecord(model.state_dict()), CONFIG: config}), dst_node_id=1, message_type=kind)


@pytest.fixture
def task_identity():
    """Messages built outside a Flower runtime need a task identity, as in run_simulation."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0


def test_client_app_carries_epsilon_across_rounds_and_refuses_past_target(aaa_dir, task_identity):
    cfg = RunConfig(num_rounds=2, target_epsilon=1.0, model="logistic")
    context = Context(run_id=1, node_id=1, node_config={"data-dir": str(aaa_dir), "campus": "AAA"},
                      state=RecordDict(), run_config={})
    model = build_model(cfg.model, len(feature_names()))
    spent = []
    for server_round in (1, 2):
        reply = train_handler(_message(cfg, model, server_round), context)
        metrics = reply.content[METRICS]
        assert reply.content[CAMPUS]["name"] == "AAA"
        assert metrics["num-examples"] == 563
        spent.append(metrics["epsilon"])
        model.load_state_dict(reply.content[ARRAYS].to_torch_state_dict())
    assert 0 < spent[0] < spent[1] <= 1.0
    state = context.state[STATE_PRIVACY]
    assert epsilon(list(zip(state["sigma"], state["q"], state["steps"])), cfg.delta) == pytest.approx(spent[1])
    with pytest.raises(PrivacyBudgetExceeded, match="campus AAA refuses round 3"):
        train_handler(_message(cfg, model, 3), context)
    assert context.state[STATE_PRIVACY]["steps"] == state["steps"]  # nothing trained, nothing spent
    scores = evaluate_handler(_message(cfg, model, 2, "evaluate"), context).content[METRICS]
    assert scores["num-examples"] == 140 and 0 <= scores["auc"] <= 1 and 0 < scores["brier"] < 0.25


def test_cached_accounting_equals_opacus_rdp_accountant():
    from opacus.accountants import RDPAccountant

    history = [(1.1, 0.01, 700), (0.8, 0.05, 30), (1.1, 0.01, 5)]
    accountant = RDPAccountant()
    accountant.history = list(history)
    assert epsilon(history, 1e-5) == accountant.get_epsilon(1e-5)
    assert epsilon([], 1e-5) == 0.0


def test_client_app_refuses_a_coordinator_that_loosens_privacy_mid_run(aaa_dir, task_identity):
    context = Context(run_id=1, node_id=1, node_config={"data-dir": str(aaa_dir), "campus": "AAA"},
                      state=RecordDict(), run_config={})
    cfg = RunConfig(num_rounds=5, target_epsilon=1.0, model="logistic")
    model = build_model(cfg.model, len(feature_names()))
    first = train_handler(_message(cfg, model, 1), context).content[METRICS]["epsilon"]
    for loosened in (RunConfig(num_rounds=5, target_epsilon=1e6, model="logistic"),
                     RunConfig(num_rounds=5, target_epsilon=1.0, dp=False, model="logistic"),
                     RunConfig(num_rounds=50, target_epsilon=1.0, model="logistic")):
        with pytest.raises(PrivacyBudgetExceeded, match="privacy settings changed"):
            train_handler(_message(loosened, model, 2), context)
    second = train_handler(_message(cfg, model, 2), context).content[METRICS]["epsilon"]
    assert 0 < first < second <= 1.0


def test_client_app_without_dp_reports_infinite_epsilon(aaa_dir, task_identity):
    context = Context(run_id=1, node_id=1, node_config={"data-dir": str(aaa_dir)}, state=RecordDict(), run_config={})
    cfg = RunConfig(num_rounds=1, dp=False, model="logistic")
    reply = train_handler(_message(cfg, build_model(cfg.model, len(feature_names())), 1), context)
    assert reply.content[METRICS]["epsilon"] == math.inf and reply.content[CAMPUS]["name"] == "AAA"
