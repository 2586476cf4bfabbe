"""Strategy selection and the campus-side FedProx proximal step."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx

from edufl.federation.models import build_model, load_model_arrays, model_arrays
from edufl.federation.runconfig import RunConfig
from edufl.federation.schema import load_schema
from edufl.federation.tasks import early_warning, feature_names, split
from edufl.federation.training import train
from edufl.server.strategies import FedAdamFloat32, build_strategy

OULAD = load_schema()
"""OULAD's federation schema (federation/schemas/oulad.toml)."""


@pytest.mark.parametrize(("name", "cls"), [("fedavg", FedAvg), ("fedprox", FedProx), ("fedadam", FedAdamFloat32)])
def test_build_strategy(name, cls):
    strategy = build_strategy(RunConfig(strategy=name, min_campuses=7, proximal_mu=0.5))
    assert type(strategy) is cls and strategy.min_available_nodes == 7
    if name == "fedprox":
        assert strategy.proximal_mu == 0.5


class TwoNodes:
    """The one Grid method a strategy's configure step calls: two connected SuperNodes."""

    def get_node_ids(self) -> list[int]:
        return [1, 2]


def test_fedadam_sends_each_rounds_model_as_the_float32_array_campuses_accept(task_identity):
    strategy = build_strategy(RunConfig(strategy="fedadam", min_campuses=2, learning_rate=0.1))
    assert isinstance(strategy, FedAdam)
    arrays = model_arrays(build_model("logistic", len(feature_names(OULAD)), seed=0))
    for server_round in (1, 2):
        requests = list(strategy.configure_train(server_round, arrays, ConfigRecord({}), TwoNodes()))
        replies = []
        for i, request in enumerate(requests):
            model = load_model_arrays(build_model("logistic", len(feature_names(OULAD))), request.content["arrays"])
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(0.01 * (i + 1))
            content = RecordDict(
                {
                    "arrays": model_arrays(model),
                    "metrics": MetricRecord({"num-examples": 10 * (i + 1), "train-loss": 0.5, "epsilon": 1.0}),
                }
            )
            replies.append(Message(content, reply_to=request))
        arrays, _ = strategy.aggregate_train(server_round, replies)
        assert [a.dtype for a in arrays.values()] == ["float32"]  # Flower's own FedAdam returns float64 from round 1 on
    moved = load_model_arrays(build_model("logistic", len(feature_names(OULAD))), arrays)
    start = build_model("logistic", len(feature_names(OULAD)), seed=0)
    assert all((p - q).abs().min() > 0 for p, q in zip(moved.parameters(), start.parameters(), strict=True))


def test_proximal_term_keeps_weights_near_the_global_model(aaa):
    data = split(early_warning(aaa, 60, "withdrawal"), "stratified", 0.2, 0)[0]
    drift = {}
    for mu in (0.0, 5.0):
        model = build_model("mlp", len(feature_names(OULAD)), seed=0)
        start = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
        train(
            model,
            data,
            epochs=3,
            batch_size=64,
            learning_rate=0.3,
            seed=1,
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            proximal_mu=mu,
        )
        drift[mu] = float((torch.cat([p.detach().flatten() for p in model.parameters()]) - start).norm())
    assert drift[5.0] < 0.8 * drift[0.0]
