"""A federated training run on the coordinator: the rounds, from the first or a checkpoint, to the results folder.

The strategy (:mod:`server.strategies`) is wrapped by
:class:`server.reporting.ReportingStrategy`, which only observes replies. The
run ends with the results folder written by :class:`server.results.Report`.

With ``secure-aggregation = "secaggplus"`` the training rounds run through
Flower's SecAgg+ workflow instead (:mod:`server.secagg`): the coordinator
learns only the sum of the campuses' updates; evaluation, the round lines and
checkpoints go through the reporting strategy as in any run.
"""

from __future__ import annotations

import time
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid

from edufl.federation.models import build_model, load_model_arrays, model_arrays
from edufl.federation.runconfig import RunConfig
from edufl.federation.tasks import feature_names, n_outputs

from .checkpoint import CHECKPOINT, STOP_FILE, RunPaused, load_checkpoint
from .reporting import ReportingStrategy
from .results import Report
from .secagg import run_secaggplus
from .strategies import build_strategy

__all__ = ["run_federation"]


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
        width, outputs = len(feature_names(cfg.schema)), n_outputs(cfg.task, cfg.schema)
        arrays = model_arrays(build_model(cfg.model, width, seed=cfg.seed, outputs=outputs))
    first = saved["round"] + 1 if saved else 1
    strategy = ReportingStrategy(
        inner,
        report,
        cfg.num_rounds,
        cfg.min_campuses,
        cfg.round_timeout,
        first_round=first,
        checkpoint=(out / CHECKPOINT, cfg) if cfg.run_name else None,
        evaluate_in_train=cfg.evaluate_in_train and cfg.secure_aggregation == "off",
    )
    config = ConfigRecord(cfg.to_flower())
    try:
        if cfg.secure_aggregation == "secaggplus":
            report.console.print(
                "secure aggregation: SecAgg+; the coordinator receives masked updates and learns only their weighted sum"
            )
            trained = run_secaggplus(grid, context, cfg, strategy, arrays)
        else:
            result = strategy.start(
                grid=grid,
                initial_arrays=arrays,
                num_rounds=cfg.num_rounds - first + 1,
                timeout=cfg.round_timeout,
                train_config=config,
                evaluate_config=config,
            )
            trained = len(result.arrays) > 0
    except RunPaused as paused:
        report.console.print(
            f"paused after round {paused.args[0]}/{cfg.num_rounds} ({STOP_FILE} file); "
            f"continue with `edufl coordinator run --resume {out}`"
        )
        return None
    state = None
    if trained or saved:  # model.pt holds the model's named state_dict, not the wire's one flat array
        model = build_model(cfg.model, len(feature_names(cfg.schema)), outputs=n_outputs(cfg.task, cfg.schema))
        final = load_model_arrays(model, strategy.arrays)
        state = final.state_dict()
    return report.write(out, state, time.perf_counter() - started)
