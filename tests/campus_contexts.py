"""Flower contexts as a campus's SuperNode hands them to the ClientApp, for tests that call the app's
handlers directly (no Flower runtime)."""

from __future__ import annotations

from pathlib import Path

from flwr.app import Context, RecordDict


def campus_context(data_dir: Path, state: Path | None = None, run_id: int = 5, **node_config: object) -> Context:
    """Campus AAA's context: its export in ``data_dir``, its state folder ``state`` (default: ``state``
    beside ``data_dir``), Flower run ``run_id``, and any other ``node_config`` entries."""
    config = {"data-dir": str(data_dir), "campus": "AAA", "state-dir": str(state or data_dir.parent / "state"), **node_config}
    return Context(run_id=run_id, node_id=1, node_config=config, state=RecordDict(), run_config={})
