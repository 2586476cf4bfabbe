"""Secure aggregation on the coordinator: training rounds through Flower's SecAgg+ workflow.

With ``secure-aggregation = "secaggplus"`` the ServerApp runs Flower's legacy
``DefaultWorkflow`` with ``SecAggPlusWorkflow`` (:class:`SecAggPlus`) as its fit
step, over a ``LegacyContext`` and Flower's legacy ``FedAvg`` (SecAgg+ in flwr
1.42 drives legacy strategies only). Each round:

* training: the four SecAgg+ stages (:mod:`clients.secagg` describes the
  campus side). The coordinator receives public keys, key shares encrypted for
  other campuses, masked vectors and, at the end, the shares that remove the
  masks of the *sum*; it learns the example-weighted sum of the campuses'
  updates and each campus's example count and training metrics, never one
  campus's update. Flower's legacy FedAvg turns the sum into the new global
  model (FedProx: the same server step; each campus applies the proximal term);
* evaluation: the Message-API evaluation of :class:`server.reporting.ReportingStrategy`
  (per-campus test metrics, receipts, round line and checkpoint), unchanged.

:class:`CampusGrid` sits between the workflow and Flower's grid: it adds the
run configuration (with the round) to every stage message, so campuses check
and log each stage against their run like any other request, and records what
each stage's replies were (receipts, failures, per-campus training metrics).
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Context, Message
from flwr.common import ndarrays_to_parameters
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.server import LegacyContext, ServerConfig
from flwr.server.strategy import FedAvg as LegacyFedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp import Grid

from edufl.federation.runconfig import RunConfig
from edufl.federation.secaggplus import named_arrays
from edufl.federation.wire import CONFIG

from .replies import DelegatingGrid, await_connected_nodes
from .reporting import ReportingStrategy

__all__ = ["CampusGrid", "SecAggFedAvg", "SecAggPlus", "phase", "run_secaggplus"]

FIT_METRICS = "fitres.metrics"  # a masked-vector reply's training metrics (Flower's legacy FitRes)


def phase(stage: str) -> str:
    """How receipts, failures and the campuses' audit logs name a SecAgg+ stage."""
    return f"secaggplus:{stage}"


def _shares(value: float) -> int | float:
    # Flower reads a float as a fraction (of the campuses, of the shares) and an int as a count.
    return float(value) if value <= 1 else int(value)


class CampusGrid(DelegatingGrid):
    """Passes every call to ``grid``; gives each SecAgg+ stage message the run configuration with its round,
    and records the stage's replies in ``reporting`` (a :class:`server.reporting.ReportingStrategy`)."""

    def __init__(self, grid: Grid, cfg: RunConfig, reporting: ReportingStrategy):
        super().__init__(grid)
        self.cfg, self.reporting = cfg, reporting

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        stages = {
            m.content.config_records[RECORD_KEY_CONFIGS][Key.STAGE]
            for m in messages
            if RECORD_KEY_CONFIGS in m.content.config_records
        }
        if not stages:  # evaluation: Message-API messages that already carry the run configuration
            return self.grid.send_and_receive(messages, timeout=timeout)
        [stage] = stages
        server_round = int(messages[0].metadata.group_id) + self.reporting.offset
        for message in messages:
            message.content[CONFIG] = ConfigRecord({**self.cfg.to_flower(), "server-round": server_round})
        self.reporting.ask(messages)
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        for campus, content in self.reporting.received(server_round, phase(stage), replies):
            if FIT_METRICS in content.config_records:
                self.reporting.add_train(campus, content.config_records[FIT_METRICS])
        return replies


class SecAggFedAvg(LegacyFedAvg):
    """Flower's legacy FedAvg over every connected campus, which waits at most ``round-timeout`` seconds
    for ``min-campuses`` of them before each round (:func:`server.replies.await_connected_nodes`)."""

    def __init__(self, grid: Grid, cfg: RunConfig, offset: int, initial: ArrayRecord):
        super().__init__(
            fraction_fit=1.0,
            fraction_evaluate=0.0,
            min_fit_clients=cfg.min_campuses,
            min_available_clients=cfg.min_campuses,
            fit_metrics_aggregation_fn=lambda _: {},
            initial_parameters=ndarrays_to_parameters([a.numpy() for a in initial.values()]),
        )
        self.grid, self.cfg, self.offset = grid, cfg, offset

    def configure_fit(self, server_round, parameters, client_manager):
        await_connected_nodes(self.grid, self.cfg.min_campuses, self.cfg.round_timeout, server_round + self.offset)
        return super().configure_fit(server_round, parameters, client_manager)


class SecAggPlus(SecAggPlusWorkflow):
    """Flower's SecAgg+ workflow, where a campus that drops out before sending its key shares leaves the round.

    In flwr 1.42 such a campus (one that refused, was blocked by its release
    guard, or went offline at ``setup`` or ``share_keys``) stays among the
    round's sampled nodes: at ``unmask`` every other campus is asked for shares
    of its masking key, which it never received, and the round halts. No campus
    masked its vector with it, so there is nothing of it to unmask: after
    ``share_keys`` the round's nodes, and each node's neighbours, are those that
    sent their shares (the protocol's U2 in Bell et al., CCS 2020).
    """

    def share_keys_stage(self, grid: Grid, context: LegacyContext, state) -> bool:
        super().share_keys_stage(grid, context, state)
        state.sampled_node_ids = set(state.active_node_ids)
        state.nid_to_neighbours = {
            nid: neighbours & state.sampled_node_ids
            for nid, neighbours in state.nid_to_neighbours.items()
            if nid in state.sampled_node_ids
        }
        return self._check_threshold(state)


def run_secaggplus(grid: Grid, context: Context, cfg: RunConfig, reporting: ReportingStrategy, arrays: ArrayRecord) -> bool:
    """Run the rounds left (``cfg.num_rounds`` after ``reporting.offset``) from global model ``arrays``:
    training through ``SecAggPlusWorkflow``, evaluation through ``reporting``; the global model after
    each round is ``reporting.arrays``. Returns whether any round aggregated an update.

    Raises whatever ``reporting`` raises (``RunPaused`` after a checkpoint, ``CampusesMissing``).
    """
    campus_grid = CampusGrid(grid, cfg, reporting)
    strategy = SecAggFedAvg(campus_grid, cfg, reporting.offset, arrays)
    legacy = LegacyContext(
        context,
        config=ServerConfig(num_rounds=cfg.num_rounds - reporting.offset, round_timeout=cfg.round_timeout),
        strategy=strategy,
    )
    secaggplus = SecAggPlus(
        _shares(cfg.secagg_num_shares),
        _shares(cfg.secagg_reconstruction_threshold),
        max_weight=cfg.secagg_max_weight,
        timeout=cfg.round_timeout,
    )
    evaluate_config = ConfigRecord(cfg.to_flower())
    aggregated = []

    def fit(grid: Grid, ctx: LegacyContext) -> None:
        before = ctx.state.array_records[MAIN_PARAMS_RECORD]
        secaggplus(grid, ctx)
        aggregated.append(ctx.state.array_records[MAIN_PARAMS_RECORD] is not before)
        if not aggregated[-1]:
            server_round = int(ctx.state.config_records[MAIN_CONFIGS_RECORD][WorkflowKey.CURRENT_ROUND]) + reporting.offset
            reporting.report.add_failure(
                server_round,
                "train",
                "secure aggregation halted: fewer campuses than the reconstruction threshold "
                "completed a SecAgg+ stage (see the failures above); the global model is unchanged",
            )

    def evaluate(grid: Grid, ctx: LegacyContext) -> None:
        server_round = int(ctx.state.config_records[MAIN_CONFIGS_RECORD][WorkflowKey.CURRENT_ROUND])
        reporting.arrays = named_arrays(
            ctx.state.array_records[MAIN_PARAMS_RECORD], [(name, a.shape, a.dtype) for name, a in arrays.items()]
        )
        messages = reporting.configure_evaluate(server_round, reporting.arrays, evaluate_config, grid)
        reporting.aggregate_evaluate(server_round, grid.send_and_receive(messages, timeout=cfg.round_timeout))

    DefaultWorkflow(fit_workflow=fit, evaluate_workflow=evaluate)(campus_grid, legacy)
    return any(aggregated)
