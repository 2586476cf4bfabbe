"""The coordinator's Flower ServerApp: a federated training run, or one DP statistic query.

Settings come from the run config (``flwr run --run-config``). A run config
with a ``statistic-query`` asks every campus that query
(:func:`server.analytics.answer_query`); any other runs the training rounds
(:func:`server.training.run_federation`).
"""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from edufl.federation.queries import QUERY_KEY
from edufl.federation.runconfig import RunConfig

from .analytics import answer_query
from .replies import PollingGrid
from .results import load_plotting
from .training import run_federation

__all__ = ["app"]

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point on Flower's engines: the statistic query or the training run that ``context.run_config`` names
    (replies collected every :data:`server.replies.POLL_WAITS` s, :data:`server.replies.IN_MEMORY_POLL_WAITS`
    s in a simulation, :class:`server.replies.PollingGrid`)."""
    grid = PollingGrid(grid)
    config = dict(context.run_config)
    if config.pop(QUERY_KEY, ""):
        answer_query(grid, context)
        return
    cfg = RunConfig.from_flower(config)
    load_plotting()  # while the campuses train
    run_federation(grid, cfg, {"mode": "federated", **cfg.to_flower()}, context)
