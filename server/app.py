"""The coordinator side: a Flower ServerApp running FedAvg, FedProx or FedAdam.

The strategy is one of Flower's own (``flwr.serverapp.strategy``), wrapped by
:class:`ReportingStrategy`, which only observes replies: it records each
campus's metrics and ε, prints a progress line per round and never changes
what is aggregated. The run ends with the results folder written by
:class:`federation.results.Report`.

With ``secure-aggregation = "secaggplus"`` the training rounds run through
Flower's SecAgg+ workflow instead (:mod:`server.secagg`): the coordinator
learns only the sum of the campuses' updates; evaluation, the round lines and
checkpoints go through :class:`ReportingStrategy` as in any run.

A run with a run name (every ``edufl coordinator run``) writes a checkpoint,
``checkpoint.pt`` in its results folder, after every round, and a ServerApp
started with the run name and results folder of a checkpoint continues after
its round (``edufl coordinator run --resume``). A file named ``STOP`` in the
results folder pauses the run once the round in progress is checkpointed.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from pathlib import Path

import torch

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping, FedAdam, FedAvg, FedProx, Strategy

from edufl.federation.audit import payload_digest
from edufl.federation.models import build_model
from edufl.federation.results import Report
from edufl.federation.runconfig import BLOCKED, CAMPUS, FAILED, METRICS, NUM_EXAMPLES, REFUSED, RunConfig, subgroup_keys
from edufl.federation.statistics import QUERY_KEY
from edufl.federation.tasks import feature_names, n_outputs

app = ServerApp()
CHECKPOINT = "checkpoint.pt"
STOP_FILE = "STOP"


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
    With ``central-dp = "fixed"`` (FedAvg or FedProx) the strategy is wrapped in
    Flower's server-side fixed-clipping DP wrapper (DP-FedAvg: McMahan et al.,
    ICLR 2018) over :class:`EqualWeights`.
    """
    common = dict(
        fraction_train=1.0, fraction_evaluate=1.0, min_train_nodes=cfg.min_campuses,
        min_evaluate_nodes=cfg.min_campuses, min_available_nodes=cfg.min_campuses,
        train_metrics_aggr_fn=_train_metrics,
    )
    if cfg.strategy == "fedadam":
        return FedAdam(**common, eta=cfg.learning_rate, eta_l=cfg.learning_rate)
    strategy = FedProx(**common, proximal_mu=cfg.proximal_mu) if cfg.strategy == "fedprox" else FedAvg(**common)
    if cfg.central_dp == "off":
        return strategy
    return DifferentialPrivacyServerSideFixedClipping(
        EqualWeights(strategy, cfg.min_campuses), cfg.central_noise_multiplier, cfg.central_clipping_norm, cfg.min_campuses)


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


class RunPaused(Exception):
    """The run was paused (a ``STOP`` file) after the round it names was checkpointed."""


def strategy_state(strategy: Strategy) -> dict[str, dict[str, torch.Tensor]]:
    """What ``strategy`` carries from round to round: FedAdam's first and second moments (empty for FedAvg, FedProx)."""
    return {name: {k: torch.from_numpy(v.copy()) for k, v in getattr(strategy, name).items()}
            for name in ("m_t", "v_t") if getattr(strategy, name, None)}


def load_checkpoint(out: Path, run_name: str) -> dict | None:
    """The checkpoint in results folder ``out`` if it belongs to run ``run_name``, else None.

    Keys: ``run-name``, ``config`` (the run config, dashed keys), ``round``
    (the last finished round), ``arrays`` (global model after it, a state
    dict), ``strategy`` (:func:`strategy_state`), ``report`` (Report.state()).
    """
    path = Path(out) / CHECKPOINT
    if not run_name or not path.is_file():
        return None
    saved = torch.load(path, weights_only=True)
    return saved if saved["run-name"] == run_name else None


NO_REPLY = "node {node}: no reply (disconnected, or past round-timeout)"
CAMPUS_CODES = (REFUSED, BLOCKED, FAILED)
"""Error codes set by a campus's release guard, whose reasons it builds without data (:mod:`clients.guard`)."""


def error_reason(reply: Message) -> str:
    """What the coordinator keeps of an error reply: the campus guard's reason for its own codes; for any other
    code (Flower's, e.g. a ClientApp that crashed outside the guard) only the code, since Flower's reason may
    carry an exception's text."""
    node, code = reply.metadata.src_node_id, reply.error.code
    if code in CAMPUS_CODES:
        return f"node {node}: {reply.error.reason}"
    name = next((k for k, v in vars(ErrorCode).items() if v == code and not k.startswith("_")), "UNKNOWN")
    return f"node {node}: Flower error {code} ({name}); its reason is not kept"


def silent_nodes(asked: Iterable[int], replies: Iterable[Message]) -> list[int]:
    """The nodes in ``asked`` that sent none of ``replies``, in node order."""
    return sorted(set(asked) - {r.metadata.src_node_id for r in replies})


class ReportingStrategy(Strategy):
    """Delegates every step to ``inner`` and records per-campus replies in ``report``, whose
    test-row-weighted metrics (:func:`federation.results.global_metrics`) are the round's aggregated evaluation.

    Before each phase it waits at most ``timeout`` seconds for ``min_campuses``
    connected campuses (:func:`await_campuses`). Rounds are numbered from
    ``first_round`` on (a resumed run continues its numbering). With
    ``checkpoint`` (a file path and the run config), the state after every
    round is saved there (see :func:`load_checkpoint`); a ``STOP`` file next to
    it then pauses the run (:class:`RunPaused`, the file is removed).
    """

    def __init__(self, inner: Strategy, report: Report, num_rounds: int, min_campuses: int, timeout: float,
                 first_round: int = 1, checkpoint: tuple[Path, RunConfig] | None = None):
        self.inner, self.report, self.num_rounds = inner, report, num_rounds
        self.min_campuses, self.timeout = min_campuses, timeout
        self.offset, self.checkpoint = first_round - 1, checkpoint
        self._asked: set[int] = set()  # node ids sent the current phase's message
        self.arrays: ArrayRecord | None = None  # the global model after the latest round

    def ask(self, messages: Iterable[Message]) -> list[Message]:
        """Note the nodes ``messages`` go to (the current phase's); returns the messages as a list."""
        messages = list(messages)
        self._asked = {m.metadata.dst_node_id for m in messages}
        return messages

    def summary(self) -> None:
        self.inner.summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        server_round += self.offset
        self.arrays = arrays
        await_campuses(grid, self.min_campuses, self.timeout, server_round)
        return self.ask(self.inner.configure_train(server_round, arrays, config, grid))

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        server_round += self.offset
        await_campuses(grid, self.min_campuses, self.timeout, server_round)
        return self.ask(self.inner.configure_evaluate(server_round, arrays, config, grid))

    def received(self, server_round: int, phase: str, replies: Iterable[Message]) -> list[tuple[str, RecordDict]]:
        """Record ``replies`` to the nodes last asked (:meth:`ask`) in ``phase``: a receipt for each reply, a failure
        for each error reply and each node that sent none. Returns (campus, content) of the good replies, in campus order."""
        good, replies = [], self._in_campus_order(replies)
        for reply in replies:
            if reply.has_error():
                if reply.metadata.src_node_id in self._asked:  # else the SuperLink's: counted as no reply below
                    self.report.add_failure(server_round, phase, error_reason(reply),
                                            refused=reply.error.code in (REFUSED, BLOCKED))
            else:
                campus = str(reply.content[CAMPUS]["name"])
                self.report.add_receipt(server_round, phase, campus, *payload_digest(reply.content))
                good.append((campus, reply.content))
        for node in silent_nodes(self._asked, replies):
            self.report.add_failure(server_round, phase, NO_REPLY.format(node=node))
        return good

    def add_train(self, campus: str, m) -> None:
        """Record a campus's training metrics (the declared train metrics; under SecAgg+ in a ConfigRecord)."""
        self.report.add_train(
            campus, n_train=int(m[NUM_EXAMPLES]), loss=float(m["train-loss"]), epsilon=float(m["epsilon"]),
            noise_multiplier=float(m["noise-multiplier"]), sample_rate=float(m["sample-rate"]), steps=int(m["steps"]),
        )

    @staticmethod
    def _in_campus_order(replies: Iterable[Message]) -> list[Message]:
        # Replies arrive in completion order; aggregating in campus order makes the
        # floating-point sums, and so a run, reproducible.
        return sorted(replies, key=lambda r: ("" if r.has_error() else str(r.content[CAMPUS]["name"]), r.metadata.src_node_id))

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        server_round += self.offset
        replies = self._in_campus_order(replies)
        for campus, content in self.received(server_round, "train", replies):
            self.add_train(campus, content[METRICS])
        arrays, metrics = self.inner.aggregate_train(server_round, replies)
        self.arrays = self.arrays if arrays is None else arrays
        return arrays, metrics

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]):
        server_round += self.offset
        replies = self._in_campus_order(replies)
        keys = subgroup_keys(self.report.task)
        for campus, content in self.received(server_round, "evaluate", replies):
            m = content[METRICS]
            scores = {k: float(m[k.replace("_", "-")]) for k in self.report.metrics}
            groups = {g: (int(m[n]), float(m[metric])) for g, (n, metric) in keys.items() if n in m}
            self.report.add_evaluation(campus, n_test=int(m[NUM_EXAMPLES]), metrics=scores, groups=groups)
        row = self.report.end_round(server_round, self.num_rounds)
        if self.checkpoint:
            self._save(server_round)
        # The report's test-row-weighted metrics, not the inner strategy's aggregation: Flower's
        # refuses replies whose metric keys differ, and campuses send different subgroups.
        return MetricRecord({k: row[k] for k in self.report.metrics})

    def _save(self, server_round: int) -> None:
        path, cfg = self.checkpoint
        saved = {"run-name": cfg.run_name, "config": cfg.to_flower(), "round": server_round,
                 "arrays": self.arrays.to_torch_state_dict(), "strategy": strategy_state(self.inner),
                 "report": self.report.state()}
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(saved, path.with_suffix(".tmp"))
        os.replace(path.with_suffix(".tmp"), path)  # a checkpoint is whole or absent, never half-written
        stop = path.parent / STOP_FILE
        if stop.exists() and server_round < self.num_rounds:
            stop.unlink()
            raise RunPaused(server_round)


def run_federation(grid: Grid, cfg: RunConfig, report_config: dict, context: Context | None = None) -> dict | None:
    """Run ``cfg.num_rounds`` rounds on ``grid`` and write the results folder ``cfg.out``.

    With ``cfg.run_name`` set, a checkpoint is written after every round, and a
    checkpoint of this run in ``cfg.out`` is continued after its round. With
    ``cfg.secure_aggregation = "secaggplus"`` the training rounds run through
    Flower's SecAgg+ workflow (:mod:`server.secagg`; it needs the ServerApp's ``context``).
    Returns the summary dict (as written to ``summary.json``), or None when the
    run was paused (a ``STOP`` file in ``cfg.out``).
    """
    started = time.perf_counter()
    out = Path(cfg.out)
    report = Report(config=report_config, dp=cfg.dp, delta=cfg.delta)
    inner = build_strategy(cfg)
    saved = load_checkpoint(out, cfg.run_name)
    if saved:
        arrays = ArrayRecord(saved["arrays"])
        for name, moments in saved["strategy"].items():
            setattr(inner, name, {k: t.numpy() for k, t in moments.items()})
        report.restore(saved["report"])
        started -= saved["report"]["elapsed_s"]
        report.console.print(f"resuming run {cfg.run_name} after round {saved['round']}/{cfg.num_rounds}")
    else:
        arrays = ArrayRecord(build_model(cfg.model, len(feature_names()), seed=cfg.seed, outputs=n_outputs(cfg.task)).state_dict())
    first = saved["round"] + 1 if saved else 1
    strategy = ReportingStrategy(inner, report, cfg.num_rounds, cfg.min_campuses, cfg.round_timeout, first_round=first,
                                 checkpoint=(out / CHECKPOINT, cfg) if cfg.run_name else None)
    config = ConfigRecord(cfg.to_flower())
    try:
        if cfg.secure_aggregation == "secaggplus":
            from .secagg import run_secaggplus  # Flower's legacy server API, loaded for SecAgg+ runs only

            report.console.print("secure aggregation: SecAgg+; the coordinator receives masked updates and learns only "
                                 "their weighted sum")
            trained = run_secaggplus(grid, context, cfg, strategy, arrays)
        else:
            result = strategy.start(
                grid=grid, initial_arrays=arrays, num_rounds=cfg.num_rounds - first + 1,
                timeout=cfg.round_timeout, train_config=config, evaluate_config=config,
            )
            trained = len(result.arrays) > 0
    except RunPaused as paused:
        report.console.print(f"paused after round {paused.args[0]}/{cfg.num_rounds} ({STOP_FILE} file); "
                             f"continue with `edufl coordinator run --resume {out}`")
        return None
    state = strategy.arrays.to_torch_state_dict() if trained or saved else None
    return report.write(out, state, time.perf_counter() - started)


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point on Flower's engines; settings come from the run config (``flwr run --run-config``).

    A run config with a ``statistic-query`` runs that DP statistic instead (:func:`server.analytics.answer_query`).
    """
    config = dict(context.run_config)
    if config.pop(QUERY_KEY, ""):
        from .analytics import answer_query  # here: server.analytics imports this module

        answer_query(grid, context)
        return
    cfg = RunConfig.from_flower(config)
    run_federation(grid, cfg, {"mode": "federated", **cfg.to_flower()}, context)

