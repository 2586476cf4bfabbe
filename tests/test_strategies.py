"""Strategy selection and the campus-side FedProx proximal step."""

from __future__ import annotations

import pytest
import torch
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx

from edufl.federation.models import build_model
from edufl.federation.runconfig import RunConfig
from edufl.federation.tasks import early_warning, feature_names, split
from edufl.federation.training import train
from edufl.server.strategies import build_strategy


@pytest.mark.parametrize(("name", "cls"), [("fedavg", FedAvg), ("fedprox", FedProx), ("fedadam", FedAdam)])
def test_build_strategy(name, cls):
    strategy = build_strategy(RunConfig(strategy=name, min_campuses=7, proximal_mu=0.5))
    assert type(strategy) is cls and strategy.min_available_nodes == 7
    if name == "fedprox":
        assert strategy.proximal_mu == 0.5


def test_proximal_term_keeps_weights_near_the_global_model(aaa):
    data = split(early_warning(aaa, 60, "withdrawal"), "stratified", 0.2, 0)[0]
    drift = {}
    for mu in (0.0, 5.0):
        model = build_model("mlp", len(feature_names()), seed=0)
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
