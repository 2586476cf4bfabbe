"""The coordinator side: a Flower ServerApp running FedAvg, FedProx or FedAdam.

The strategy is one of Flower's own (``flwr.serverapp.strategy``), wrapped by
:class:`ReportingStrategy`, which only observes replies: it records each
campus's metrics and ε, prints a progress line per round and never changes
what is aggregated. The run ends with the results folder written by
:class:`federation.results.Report`.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx, Strategy

from federation.audit import payload_digest
from federation.models import build_model
from federation.results import METRICS as METRICS_REPORTED, Report
from federation.runconfig import BLOCKED, CAMPUS, METRICS, NUM_EXAMPLES, REFUSED, RunConfig
from federation.tasks import feature_names

app = ServerApp()


def _train_metrics(records: list[RecordDict], weight_key: str) -> MetricRecord:
    """Example-weighted training loss and the maximum ε over the replying campuses."""
    metrics = [next(iter(r.metric_records.values())) for r in records]
    total = sum(m[weight_key] for m in metrics)
    losses = [(m["train-loss"], m[weight_key]) for m in metrics if m[weight_key] > 0]
    return MetricRecord({
        "train-loss": sum(loss * w for loss, w in losses) / total if total else float("nan"),
        "epsilon-max": max(m["epsilon"] for m in metrics),
    })


def build_strategy(cfg: RunConfig) -> Strategy:
    """Flower strategy named by ``cfg.strategy``; every connected campus trains and evaluates each round.

    FedAvg: McMahan et al., AISTATS 2017. FedProx: Li et al., MLSys 2020 (the
    proximal term is applied by each campus). FedAdam: Reddi et al., ICLR 2021.
    """
    common = dict(
        fraction_train=1.0, fraction_evaluate=1.0, min_train_nodes=cfg.min_campuses,
        min_evaluate_nodes=cfg.min_campuses, min_available_nodes=cfg.min_campuses,
        train_metrics_aggr_fn=_train_metrics,
    )
    if cfg.strategy == "fedprox":
        return FedProx(**common, proximal_mu=cfg.proximal_mu)
    if cfg.strategy == "fedadam":
        return FedAdam(**common, eta=cfg.learning_rate, eta_l=cfg.learning_rate)
    return FedAvg(**common)


class CampusesMissing(RuntimeError):
    """Fewer than ``min-campuses`` campuses were connected when a round had to start."""


def await_campuses(grid: Grid, needed: int, timeout: float, server_round: int) -> None:
    """Return once ``needed`` SuperNodes are connected to ``grid``; poll once a second.

    Flower's strategies wait for their minimum number of nodes without a limit;
    a run must never wait forever.

    Raises
    ------
    CampusesMissing
        When fewer than ``needed`` are connected after ``timeout`` seconds; names the connected node ids.
    """
    deadline = time.monotonic() + timeout
    while len(connected := sorted(grid.get_node_ids())) < needed:
        if time.monotonic() >= deadline:
            raise CampusesMissing(
                f"round {server_round}: only {len(connected)} of the {needed} campuses needed (min-campuses) were "
                f"connected after {timeout:g} s (connected node ids: {', '.join(map(str, connected)) or 'none'})"
            )
        time.sleep(1.0)


class ReportingStrategy(Strategy):
    """Delegates every step to ``inner`` and records per-campus replies in ``report``.

    Before each phase it waits at most ``timeout`` seconds for ``min_campuses``
    connected campuses (:func:`await_campuses`).
    """

    def __init__(self, inner: Strategy, report: Report, num_rounds: int, min_campuses: int, timeout: float):
        self.inner, self.report, self.num_rounds = inner, report, num_rounds
        self.min_campuses, self.timeout = min_campuses, timeout
        self._asked: set[int] = set()  # node ids sent the current phase's message

    def _ask(self, messages: Iterable[Message]) -> list[Message]:
        messages = list(messages)
        self._asked = {m.metadata.dst_node_id for m in messages}
        return messages

    def summary(self) -> None:
        self.inner.summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        await_campuses(grid, self.min_campuses, self.timeout, server_round)
        return self._ask(self.inner.configure_train(server_round, arrays, config, grid))

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        await_campuses(grid, self.min_campuses, self.timeout, server_round)
        return self._ask(self.inner.configure_evaluate(server_round, arrays, config, grid))

    def _ok(self, server_round: int, phase: str, replies: list[Message]) -> list[tuple[str, MetricRecord]]:
        good = []
        for reply in replies:
            if reply.has_error():
                if reply.metadata.src_node_id in self._asked:  # else the SuperLink's: counted as no reply below
                    self.report.add_failure(server_round, phase, f"node {reply.metadata.src_node_id}: {reply.error.reason}",
                                            refused=reply.error.code in (REFUSED, BLOCKED))
            else:
                campus = str(reply.content[CAMPUS]["name"])
                self.report.add_receipt(server_round, phase, campus, *payload_digest(reply.content))
                good.append((campus, reply.content[METRICS]))
        for node in sorted(self._asked - {r.metadata.src_node_id for r in replies}):
            self.report.add_failure(server_round, phase, f"node {node}: no reply (disconnected, or past round-timeout)")
        return good

    @staticmethod
    def _in_campus_order(replies: Iterable[Message]) -> list[Message]:
        # Replies arrive in completion order; aggregating in campus order makes the
        # floating-point sums, and so a run, reproducible.
        return sorted(replies, key=lambda r: ("" if r.has_error() else str(r.content[CAMPUS]["name"]), r.metadata.src_node_id))

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        replies = self._in_campus_order(replies)
        for campus, m in self._ok(server_round, "train", replies):
            self.report.add_train(
                campus, n_train=int(m[NUM_EXAMPLES]), loss=float(m["train-loss"]), epsilon=float(m["epsilon"]),
                noise_multiplier=float(m["noise-multiplier"]), sample_rate=float(m["sample-rate"]), steps=int(m["steps"]),
            )
        return self.inner.aggregate_train(server_round, replies)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]):
        replies = self._in_campus_order(replies)
        for campus, m in self._ok(server_round, "evaluate", replies):
            scores = {k: float(m[k.replace("_", "-")]) for k in METRICS_REPORTED}
            self.report.add_evaluation(campus, n_test=int(m[NUM_EXAMPLES]), metrics=scores)
        self.report.end_round(server_round, self.num_rounds)
        return self.inner.aggregate_evaluate(server_round, replies)


def run_federation(grid: Grid, cfg: RunConfig, report_config: dict) -> dict:
    """Run ``cfg.num_rounds`` rounds on ``grid`` and write the results folder ``cfg.out``.

    Returns the summary dict (as written to ``summary.json``).
    """
    started = time.perf_counter()
    model = build_model(cfg.model, len(feature_names()), seed=cfg.seed)
    report = Report(config=report_config, dp=cfg.dp, delta=cfg.delta)
    strategy = ReportingStrategy(build_strategy(cfg), report, cfg.num_rounds, cfg.min_campuses, cfg.round_timeout)
    config = ConfigRecord(cfg.to_flower())
    result = strategy.start(
        grid=grid, initial_arrays=ArrayRecord(model.state_dict()), num_rounds=cfg.num_rounds,
        timeout=cfg.round_timeout, train_config=config, evaluate_config=config,
    )
    state = result.arrays.to_torch_state_dict() if len(result.arrays) else None
    return report.write(Path(cfg.out), state, time.perf_counter() - started)


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point on Flower's engines; settings come from the run config (``flwr run --run-config``)."""
    cfg = RunConfig.from_flower(dict(context.run_config))
    run_federation(grid, cfg, {"mode": "federated", **cfg.to_flower()})

