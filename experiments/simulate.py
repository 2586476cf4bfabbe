"""``edufl simulate``: one run on one machine, federated (Flower simulation engine) or a baseline.

* ``federated``: the ServerApp and ClientApp of ``server/`` and ``clients/`` on
  Flower's simulation engine (Ray backend). Each virtual campus reads only a
  folder holding its own rows (the contract's tables as Parquet files), written
  to a temporary directory that is deleted at the end (raw rows are never
  written into the results folder).
* ``centralized`` and ``local``: the baselines of :mod:`experiments.baselines`.

All modes use the same features, splits, model, optimizer and DP-SGD code,
and write the same results folder.

Start-up order (federated): the engine's processes start first, in the main
thread, while a worker thread imports torch, Opacus and Flower, validates the
tables and writes the campus folders; this module itself imports nothing heavy.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from federation.data import Tables, campus_names, campus_slices, file_hashes, load_tables, write_parquet
from federation.mapping import CONTRACT_PARQUET
from federation.runconfig import SIM_ENV, SIM_MANIFEST, RunConfig

MODES = ("federated", "centralized", "local")


def simulate(cfg: RunConfig, data_dir: Path, mode: str = "federated", tables: Tables | None = None,
             policy: Path | None = None) -> dict:
    """Run ``mode`` on the OULAD tables in ``data_dir`` (or the already loaded ``tables``).

    Campuses are formed by ``cfg.campus_by``. Federated: every virtual campus
    keeps its privacy ledger under ``cfg.out/campuses/<campus>/`` and, when
    ``policy`` (a campus policy file) is given, enforces it; without one, the
    research settings of ``cfg`` (no DP, a large ε) run as asked. Returns the
    summary dict written to ``cfg.out/summary.json``.

    Raises
    ------
    DataError
        When the tables fail validation.
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {', '.join(MODES)}")
    if mode == "federated":
        return _federated(cfg, data_dir, tables, policy)
    from .baselines import baseline  # torch, Opacus and scikit-learn load here

    tables = tables or load_tables(data_dir)
    return baseline(cfg, tables, announce(cfg, tables, mode), mode)


def announce(cfg: RunConfig, tables: Tables, mode: str) -> list[str]:
    """Print the data notes and a one-line description of the run; return the campus names."""
    from federation.privacy import PRIVACY_UNIT_SHORT

    for note in tables.notes:
        print(f"note: {note}")
    names = campus_names(tables, cfg.campus_by, cfg.shards)
    privacy = (f"DP-SGD, ε ≤ {cfg.target_epsilon:g} per campus at δ = {cfg.delta:g}, privacy unit: {PRIVACY_UNIT_SHORT}"
               if cfg.dp else "NO DP")
    print(f"edufl simulate: {mode}, {len(names)} campuses by {cfg.campus_by}, task {cfg.task} at day {cfg.cutoff_day}, "
          f"{cfg.model}, {cfg.num_rounds} round{'s' if cfg.num_rounds != 1 else ''}, {privacy}")
    return names


def provenance(mode: str, cfg: RunConfig, tables: Tables, names: list[str]) -> dict:
    """The results folder's record of what ran on which data (mode, settings, campuses, file hashes)."""
    return {"mode": mode, **cfg.to_flower(), "campuses": names, "data": str(tables.source.resolve()),
            "data_sha256": file_hashes(tables.source)}


def _start_ray(sim_dir: str) -> None:
    """Start the simulation engine's backend (Ray); Flower's Ray backend uses it as it is.

    Worker processes inherit this process's environment when Ray starts, so the
    campus folder variable is set first. Ray must start in the main thread: its
    processes are tied to the life of the thread that starts them. Ray starts
    one idle worker per core at once, and the ClientApp actors are placed on
    them; asking Ray to import the ClientApp's module in those workers as they
    start (``RAY_preload_python_modules``) lets the imports (torch, Opacus,
    Flower: about 3 s) overlap with the work of this process.
    """
    import ray

    if ray.is_initialized():
        ray.shutdown()  # its workers would still see another run's campus folders
    os.environ[SIM_ENV] = sim_dir
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # CPU-only actors; silences a Ray notice
    # One core per virtual campus (client_resources below): torch in the workers reads
    # OMP_NUM_THREADS when the preloaded import starts its thread pool. Set only while
    # Ray starts, so that this process's own torch keeps its settings.
    saved = os.environ.get("OMP_NUM_THREADS")
    os.environ.update(OMP_NUM_THREADS="1", RAY_preload_python_modules="clients.app")
    try:
        ray.init(include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    finally:
        os.environ.pop("RAY_preload_python_modules")
        if saved is None:
            os.environ.pop("OMP_NUM_THREADS")
        else:
            os.environ["OMP_NUM_THREADS"] = saved


def _prepare(cfg: RunConfig, data_dir: Path, tables: Tables | None, sim_dir: str, policy: Path | None,
             headline: Callable[[RunConfig, Tables, str], list[str]]):
    """Runs while Ray starts: validate the tables, write one folder per campus, load the apps."""
    from flwr.simulation.run_simulation import _run_simulation

    from clients.app import app as client_app
    from server.app import app as server

    tables = tables or load_tables(data_dir)
    names = headline(cfg, tables, "federated")
    for name, own in campus_slices(tables, cfg.campus_by, cfg.shards).items():
        write_parquet(own, Path(sim_dir) / name)  # the contract's tables: each campus reads them without a CSV parse
    manifest = {"campuses": names, "state-root": str(Path(cfg.out).resolve() / "campuses"),
                "policy": str(policy.resolve()) if policy else None, "mapping": str(CONTRACT_PARQUET)}
    (Path(sim_dir) / SIM_MANIFEST).write_text(json.dumps(manifest))
    return tables, names, _run_simulation, client_app, server


def _federated(cfg: RunConfig, data_dir: Path, tables: Tables | None, policy: Path | None) -> dict:
    cfg, tables, names = run_engine(cfg, data_dir, tables, policy)
    path = Path(cfg.out) / "summary.json"
    summary = json.loads(path.read_text())
    summary["config"].update(provenance("federated", cfg, tables, names))  # known to the researcher, not the ServerApp
    path.write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def run_engine(cfg: RunConfig, data_dir: Path, tables: Tables | None, policy: Path | None,
               headline: Callable[[RunConfig, Tables, str], list[str]] = announce,
               extra_config: dict | None = None) -> tuple[RunConfig, Tables, list[str]]:
    """Run the ServerApp (``server/app.py``) and the campuses' ClientApp on Flower's simulation engine.

    One virtual SuperNode per campus of ``cfg.campus_by``, each reading only
    its own rows and keeping its state under ``cfg.out/campuses/<campus>/``
    (enforcing ``policy`` when given). ``headline(cfg, tables, mode)`` prints
    what runs and returns the campus names; the ServerApp's run config is
    ``cfg`` (with ``min-campuses`` set to the number of campuses) plus
    ``extra_config``. Returns that config, the tables and the campus names.

    Raises
    ------
    DataError
        When the tables fail validation.
    """
    import ray

    with tempfile.TemporaryDirectory(prefix="edufl-campuses-") as sim_dir, ThreadPoolExecutor(1) as pool:
        prepared = pool.submit(_prepare, cfg, data_dir, tables, sim_dir, policy, headline)
        _start_ray(sim_dir)
        try:
            tables, names, run_simulation, client_app, server = prepared.result()
        except BaseException:
            ray.shutdown()
            raise
        from flwr.app import Context, RecordDict
        from flwr.supercore.telemetry import EventType

        logging.getLogger("flwr").setLevel(logging.WARNING)
        cfg = RunConfig.from_flower({**cfg.to_flower(), "min-campuses": len(names)})
        # The public run_simulation() takes no run config; this pinned (flwr==1.42.0)
        # internal entry point runs the same engine with the ServerApp's context given.
        run_simulation(
            num_supernodes=len(names),
            exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE,
            client_app=client_app,
            server_app=server,
            server_app_context=Context(run_id=0, node_id=0, node_config={}, state=RecordDict(),
                                       run_config={**cfg.to_flower(), **(extra_config or {})}),
            backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
        )
    return cfg, tables, names
