"""Checkpoints of a training run: the state after each round, to continue the run after it, and its pause file.

A run with a run name writes ``checkpoint.pt`` in its results folder after
every round (:func:`save_checkpoint`); a ServerApp started with that run name
and results folder continues after its round (:func:`load_checkpoint`). A file
named ``STOP`` in the results folder pauses the run once the round in progress
is checkpointed (:class:`RunPaused`).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from flwr.app import ArrayRecord
from flwr.serverapp.strategy import Strategy

from edufl.federation.runconfig import RunConfig

__all__ = ["CHECKPOINT", "STOP_FILE", "RunPaused", "load_checkpoint", "save_checkpoint", "strategy_state"]

CHECKPOINT = "checkpoint.pt"
"""File name of a run's checkpoint in its results folder."""
STOP_FILE = "STOP"
"""File name that, in a run's results folder, pauses the run after the round in progress."""


class RunPaused(Exception):
    """The run was paused (a ``STOP`` file) after the round it names was checkpointed."""


def strategy_state(strategy: Strategy) -> dict[str, dict[str, torch.Tensor]]:
    """What ``strategy`` carries from round to round: FedAdam's first and second moments (empty for FedAvg, FedProx)."""
    return {
        name: {k: torch.from_numpy(v.copy()) for k, v in getattr(strategy, name).items()}
        for name in ("m_t", "v_t")
        if getattr(strategy, name, None)
    }


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


def save_checkpoint(path: Path, cfg: RunConfig, server_round: int, arrays: ArrayRecord, strategy: Strategy, report: dict) -> None:
    """Write the checkpoint file ``path`` of run ``cfg`` after ``server_round``: global model ``arrays``,
    ``strategy``'s state (:func:`strategy_state`) and ``report`` (the Report's state), keys as in
    :func:`load_checkpoint`. The file is replaced whole: a checkpoint is never half-written."""
    saved = {
        "run-name": cfg.run_name,
        "config": cfg.to_flower(),
        "round": server_round,
        "arrays": arrays.to_torch_state_dict(),
        "strategy": strategy_state(strategy),
        "report": report,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(saved, path.with_suffix(".tmp"))
    os.replace(path.with_suffix(".tmp"), path)
