"""The reporting strategy: a wrapper around the run's Flower strategy that records every reply and never changes
what is aggregated.

:class:`ReportingStrategy` records each campus's metrics, ε and payload
digests in the run's :class:`server.results.Report`, prints a progress line
per round and checkpoints the run after each (:mod:`server.checkpoint`).

With ``evaluate-in-train`` (the default) a run makes one exchange per round:
round r's global model reaches the campuses in round r + 1's train request,
which asks them (:data:`~federation.wire.EVALUATE_RECEIVED`) to evaluate it
before training; their train replies carry that evaluation, which closes
round r's row. Only the last round's model (and that of a round the run pauses
after) is evaluated in an evaluate exchange of its own. The rows, metrics and
checkpoints are those of a run that evaluates every round separately.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from edufl.federation.metrics import subgroup_keys
from edufl.federation.runconfig import RunConfig
from edufl.federation.training import Subgroup
from edufl.federation.wire import EVALUATE_RECEIVED, EVALUATION, METRICS, NUM_EXAMPLES

from .checkpoint import STOP_FILE, RunPaused, save_checkpoint
from .replies import Answered, Failed, await_connected_nodes, collect, in_campus_order
from .results import Report

__all__ = ["ReportingStrategy"]


class ReportingStrategy(Strategy):
    """Delegates every step to ``inner`` and records per-campus replies in ``report``, whose
    test-row-weighted metrics (:func:`server.results.global_metrics`) are the round's aggregated evaluation.

    Before each phase it waits at most ``timeout`` seconds for ``min_campuses``
    connected campuses (:func:`server.replies.await_connected_nodes`). Rounds are numbered from
    ``first_round`` on (a resumed run continues its numbering). With
    ``checkpoint`` (a file path and the run config), the state after every
    round is saved there (see :func:`server.checkpoint.load_checkpoint`); a ``STOP`` file next to
    it then pauses the run (:class:`RunPaused`, the file is removed). With
    ``evaluate_in_train``, a round's model is evaluated in the next round's
    train replies (see the module docstring).
    """

    def __init__(
        self,
        inner: Strategy,
        report: Report,
        num_rounds: int,
        min_campuses: int,
        timeout: float,
        first_round: int = 1,
        checkpoint: tuple[Path, RunConfig] | None = None,
        evaluate_in_train: bool = False,
    ):
        self.inner, self.report, self.num_rounds = inner, report, num_rounds
        self.min_campuses, self.timeout = min_campuses, timeout
        self.offset, self.checkpoint = first_round - 1, checkpoint
        self.evaluate_in_train = evaluate_in_train
        self._asked: set[int] = set()  # node ids sent the current phase's message
        self._deferred: int | None = None  # the round whose model the next train request has evaluated
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
        if self._deferred is not None:
            config = ConfigRecord({**config, EVALUATE_RECEIVED: True})
        await_connected_nodes(grid, self.min_campuses, self.timeout, server_round)
        return self.ask(self.inner.configure_train(server_round, arrays, config, grid))

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        server_round += self.offset
        pausing = self.checkpoint is not None and (self.checkpoint[0].parent / STOP_FILE).exists()
        if self.evaluate_in_train and server_round < self.num_rounds and not pausing:
            self._deferred = server_round  # evaluated by the next round's train request
            return []
        await_connected_nodes(grid, self.min_campuses, self.timeout, server_round)
        return self.ask(self.inner.configure_evaluate(server_round, arrays, config, grid))

    def received(self, server_round: int, phase: str, replies: Iterable[Message]) -> list[tuple[str, RecordDict]]:
        """Record ``replies`` to the nodes last asked (:meth:`ask`) in ``phase``: a receipt for each reply, a failure
        for each error reply and each node that sent none. Returns (campus, content) of the good replies, in campus order."""
        return self.record(server_round, phase, *collect(self._asked, replies))

    def record(
        self, server_round: int, phase: str, answered: list[Answered], failed: list[Failed]
    ) -> list[tuple[str, RecordDict]]:
        """:meth:`received` for replies already sorted by :func:`server.replies.collect`."""
        for failure in failed:
            self.report.add_failure(server_round, phase, failure.reason, refused=failure.refused)
        for a in answered:
            self.report.add_receipt(server_round, phase, a.campus, a.payload_bytes, a.payload_sha256)
        return [(a.campus, a.content) for a in answered]

    def add_train(self, campus: str, m) -> None:
        """Record a campus's training metrics (the declared train metrics; under SecAgg+ in a ConfigRecord)."""
        self.report.add_train(
            campus,
            n_train=int(m[NUM_EXAMPLES]),
            loss=float(m["train-loss"]),
            epsilon=float(m["epsilon"]),
            noise_multiplier=float(m["noise-multiplier"]),
            sample_rate=float(m["sample-rate"]),
            steps=int(m["steps"]),
        )

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        server_round += self.offset
        replies = in_campus_order(replies)
        answered, failed = collect(self._asked, replies)
        if self._deferred is not None:  # first close the previous round, with the evaluations these replies carry
            evaluated, self._deferred = self._deferred, None
            self.close_round(evaluated, [(a.campus, a.content.pop(EVALUATION)) for a in answered if EVALUATION in a.content])
        for campus, content in self.record(server_round, "train", answered, failed):
            self.add_train(campus, content[METRICS])
        arrays, metrics = self.inner.aggregate_train(server_round, replies)
        self.arrays = self.arrays if arrays is None else arrays
        return arrays, metrics

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]):
        server_round += self.offset
        if self._deferred == server_round:
            return None
        row = self.close_round(
            server_round, [(c, content[METRICS]) for c, content in self.received(server_round, "evaluate", list(replies))]
        )
        # The report's test-row-weighted metrics, not the inner strategy's aggregation: Flower's
        # refuses replies whose metric keys differ, and campuses send different subgroups.
        return MetricRecord({k: row[k] for k in self.report.metrics})

    def close_round(self, server_round: int, evaluations: list[tuple[str, MetricRecord]]) -> dict:
        """Record each campus's evaluation of round ``server_round``'s global model, end the round's row and
        checkpoint the run; returns the row."""
        keys = subgroup_keys(self.report.task, self.report.schema)
        for campus, m in evaluations:
            scores = {k: float(m[k.replace("_", "-")]) for k in self.report.metrics}
            groups = {g: Subgroup(int(m[n]), *(float(m[k]) for k in rest)) for g, (n, *rest) in keys.items() if n in m}
            self.report.add_evaluation(campus, n_test=int(m[NUM_EXAMPLES]), metrics=scores, groups=groups)
        row = self.report.end_round(server_round, self.num_rounds)
        if self.checkpoint:
            self._save(server_round)
        return row

    def _save(self, server_round: int) -> None:
        path, cfg = self.checkpoint
        save_checkpoint(path, cfg, server_round, self.arrays, self.inner, self.report.state())
        stop = path.parent / STOP_FILE
        if stop.exists() and server_round < self.num_rounds:
            stop.unlink()
            raise RunPaused(server_round)
