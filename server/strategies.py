"""The Flower strategies a training run aggregates with: FedAvg, FedProx or FedAdam, optionally with central DP.

The strategy is one of Flower's own (``flwr.serverapp.strategy``); with
central DP it is wrapped in Flower's server-side fixed-clipping DP wrapper over
:class:`EqualWeights`.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping, FedAdam, FedAvg, FedProx, Strategy

from edufl.federation.runconfig import RunConfig

__all__ = ["EqualWeights", "FedAdamFloat32", "build_strategy"]


def _train_metrics(records: list[RecordDict], weight_key: str) -> MetricRecord:
    """Example-weighted training loss and the maximum ε over the replying campuses."""
    metrics = [next(iter(r.metric_records.values())) for r in records]
    total = sum(m[weight_key] for m in metrics)
    losses = [(m["train-loss"], m[weight_key]) for m in metrics if m[weight_key] > 0]
    return MetricRecord(
        {
            "train-loss": sum(loss * w for loss, w in losses) / total if total else float("nan"),
            "epsilon-max": max(m["epsilon"] for m in metrics),
        }
    )


def build_strategy(cfg: RunConfig) -> Strategy:
    """Flower strategy named by ``cfg.strategy``; every connected campus trains and evaluates each round.

    FedAvg: McMahan et al., AISTATS 2017. FedProx: Li et al., MLSys 2020 (the
    proximal term is applied by each campus). FedAdam: Reddi et al., ICLR 2021.
    With ``central-dp = "fixed"`` (FedAvg or FedProx) the strategy is wrapped in
    Flower's server-side fixed-clipping DP wrapper (DP-FedAvg: McMahan et al.,
    ICLR 2018) over :class:`EqualWeights`.
    """
    common = dict(
        fraction_train=1.0,
        fraction_evaluate=1.0,
        min_train_nodes=cfg.min_campuses,
        min_evaluate_nodes=cfg.min_campuses,
        min_available_nodes=cfg.min_campuses,
        train_metrics_aggr_fn=_train_metrics,
    )
    if cfg.strategy == "fedadam":
        return FedAdamFloat32(**common, eta=cfg.learning_rate, eta_l=cfg.learning_rate)
    strategy = FedProx(**common, proximal_mu=cfg.proximal_mu) if cfg.strategy == "fedprox" else FedAvg(**common)
    if cfg.central_dp == "off":
        return strategy
    return DifferentialPrivacyServerSideFixedClipping(
        EqualWeights(strategy, cfg.min_campuses), cfg.central_noise_multiplier, cfg.central_clipping_norm, cfg.min_campuses
    )


class FedAdamFloat32(FedAdam):
    """Flower's FedAdam whose new global model is cast back to float32, the dtype a model travels in
    (:func:`federation.models.model_arrays`); campuses refuse any other.

    Flower's update scales by NumPy float64 scalars, which NumPy 2's promotion rules (NEP 50) let widen the
    float32 arrays to float64. Its moments stay float64.
    """

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        arrays, metrics = super().aggregate_train(server_round, replies)
        if arrays is not None:
            arrays = ArrayRecord({name: Array(a.numpy().astype(np.float32)) for name, a in arrays.items()})
        return arrays, metrics


class EqualWeights(Strategy):
    """Delegates to ``inner`` (FedAvg or FedProx) but averages the campuses' updates with equal weights,
    and leaves the global model unchanged in a round with fewer than ``campuses`` replies.

    Central DP (DP-FedAvg: McMahan et al., ICLR 2018) adds noise of standard
    deviation σ·C/m to the mean of m updates clipped to C. That covers one campus
    only when each campus moves the mean by at most C/m: equal weights (an
    example-weighted mean lets a large campus move it further), over at least m
    campuses.
    """

    def __init__(self, inner: FedAvg, campuses: int):
        self.inner, self.campuses = inner, campuses

    def summary(self) -> None:
        self.inner.summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        return self.inner.configure_train(server_round, arrays, config, grid)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        replies = [r for r in replies if not r.has_error()]
        if len(replies) < self.campuses:
            return None, None
        for reply in replies:
            next(iter(reply.content.metric_records.values()))[self.inner.weighted_by_key] = 1
        return self.inner.aggregate_train(server_round, replies)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]):
        return self.inner.aggregate_evaluate(server_round, replies)
