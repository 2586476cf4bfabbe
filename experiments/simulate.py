"""``edufl simulate``: one run on one machine, federated (Flower simulation engine) or a baseline.

* ``federated``: the ServerApp and ClientApp of ``server/`` and ``clients/`` on
  Flower's simulation engine (Ray backend). Each virtual campus reads only a
  folder holding its own rows, written to a temporary directory that is
  deleted at the end (raw rows are never written into the results folder).
* ``centralized``: one model trained on all campuses' training rows pooled
  (research only: pooling is what federation avoids), evaluated on every
  campus's test rows; with DP, ε is that of the pooled dataset.
* ``local``: every campus trains alone and is evaluated on its own test rows.

All modes use the same features, splits, model, optimizer and DP-SGD code,
and write the same results folder.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from federation.data import Tables, campus_names, campus_slice, file_hashes, load_tables, write_tables
from federation.models import build_model
from federation.privacy import PRIVACY_UNIT_SHORT, DPSettings, calibrate_noise, epsilon, steps_per_epoch
from federation.results import Report
from federation.runconfig import RunConfig
from federation.tasks import TaskData, build_task, feature_names, split
from federation.training import evaluate, train

MODES = ("federated", "centralized", "local")


def simulate(cfg: RunConfig, data_dir: Path, mode: str = "federated", tables: Tables | None = None) -> dict:
    """Run ``mode`` on the OULAD tables in ``data_dir`` (or the already loaded ``tables``).

    Campuses are formed by ``cfg.campus_by``. Returns the summary dict written
    to ``cfg.out/summary.json``.

    Raises
    ------
    DataError
        When the tables fail validation.
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {', '.join(MODES)}")
    if mode == "federated":
        return _federated(cfg, data_dir, tables)
    tables = tables or load_tables(data_dir)
    names = _announce(cfg, tables, mode)
    campuses = {}
    for name in names:
        data = build_task(cfg.task, campus_slice(tables, cfg.campus_by, name, cfg.shards), cfg.cutoff_day)
        campuses[name] = split(data, cfg.split, cfg.test_fraction, cfg.seed)
    return _baseline(cfg, campuses, mode, _provenance(mode, cfg, tables, names))


def _announce(cfg: RunConfig, tables: Tables, mode: str) -> list[str]:
    for note in tables.notes:
        print(f"note: {note}")
    names = campus_names(tables, cfg.campus_by, cfg.shards)
    privacy = (f"DP-SGD, ε ≤ {cfg.target_epsilon:g} per campus at δ = {cfg.delta:g}, privacy unit: {PRIVACY_UNIT_SHORT}"
               if cfg.dp else "NO DP")
    print(f"edufl simulate: {mode}, {len(names)} campuses by {cfg.campus_by}, task {cfg.task} at day {cfg.cutoff_day}, "
          f"{cfg.model}, {cfg.num_rounds} round{'s' if cfg.num_rounds != 1 else ''}, {privacy}")
    return names


def _provenance(mode: str, cfg: RunConfig, tables: Tables, names: list[str]) -> dict:
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
    Flower: about 3 s) overlap with loading the tables here.
    """
    import ray

    from clients.app import SIM_ENV

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


def _write_campus_folders(cfg: RunConfig, data_dir: Path, tables: Tables | None, sim_dir: str) -> tuple[Tables, list[str]]:
    from clients.app import SIM_MANIFEST

    tables = tables or load_tables(data_dir)
    names = _announce(cfg, tables, "federated")
    for name in names:
        write_tables(campus_slice(tables, cfg.campus_by, name, cfg.shards), Path(sim_dir) / name)
    (Path(sim_dir) / SIM_MANIFEST).write_text(json.dumps(names))
    return tables, names


def _federated(cfg: RunConfig, data_dir: Path, tables: Tables | None) -> dict:
    import ray
    from flwr.app import Context, RecordDict
    from flwr.simulation.run_simulation import _run_simulation
    from flwr.supercore.telemetry import EventType

    from clients.app import app as client_app
    from server.app import app as server_app

    logging.getLogger("flwr").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="edufl-campuses-") as sim_dir, ThreadPoolExecutor(1) as pool:
        # Loading, validating and splitting the tables overlaps with Ray's start-up.
        prepared = pool.submit(_write_campus_folders, cfg, data_dir, tables, sim_dir)
        _start_ray(sim_dir)
        try:
            tables, names = prepared.result()
        except BaseException:
            ray.shutdown()
            raise
        cfg = RunConfig.from_flower({**cfg.to_flower(), "min-campuses": len(names)})
        # The public run_simulation() takes no run config; this pinned (flwr==1.42.0)
        # internal entry point runs the same engine with the ServerApp's context given.
        _run_simulation(
            num_supernodes=len(names),
            exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE,
            client_app=client_app,
            server_app=server_app,
            server_app_context=Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config=cfg.to_flower()),
            backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
        )
    path = Path(cfg.out) / "summary.json"
    summary = json.loads(path.read_text())
    summary["config"].update(_provenance("federated", cfg, tables, names))  # known to the researcher, not the ServerApp
    path.write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _baseline(cfg: RunConfig, campuses: dict[str, tuple[TaskData, TaskData]], mode: str, report_config: dict) -> dict:
    started = time.perf_counter()
    report = Report(config=report_config, dp=cfg.dp, delta=cfg.delta)
    if mode == "centralized":
        pooled = TaskData.concat([train_part for train_part, _ in campuses.values()])
        groups = {"pooled": (pooled, list(campuses))}
    else:
        groups = {name: (train_part, [name]) for name, (train_part, _) in campuses.items()}
    models = {g: build_model(cfg.model, len(feature_names()), seed=cfg.seed) for g in groups}
    histories = {g: [] for g in groups}
    steps_done = {g: 0 for g in groups}
    sigmas = {}
    for g, (train_part, _) in groups.items():
        spe = steps_per_epoch(len(train_part), cfg.batch_size)
        if cfg.dp and len(train_part):
            sigmas[g] = calibrate_noise(DPSettings(cfg.target_epsilon, cfg.delta, cfg.max_grad_norm), 1.0 / spe, cfg.num_rounds * cfg.local_epochs * spe)
    for server_round in range(1, cfg.num_rounds + 1):
        for g, (train_part, members) in groups.items():
            if not len(train_part):
                continue
            result = train(
                models[g], train_part, epochs=cfg.local_epochs, batch_size=cfg.batch_size,
                learning_rate=cfg.learning_rate, seed=cfg.seed * 1_000_003 + server_round,
                noise_multiplier=sigmas.get(g), max_grad_norm=cfg.max_grad_norm, history=histories[g],
            )
            histories[g] = result.history
            steps_done[g] += result.steps
            eps = epsilon(result.history, cfg.delta) if cfg.dp else float("inf")
            for name in members:
                report.add_train(name, n_train=len(campuses[name][0]), loss=result.loss, epsilon=eps,
                                 noise_multiplier=sigmas.get(g, float("nan")), sample_rate=result.sample_rate,
                                 steps=steps_done[g])
            for name in members:
                train_part_c, test_part = campuses[name]
                report.add_evaluation(name, n_test=len(test_part), metrics=evaluate(models[g], train_part_c, test_part))
        report.end_round(server_round, cfg.num_rounds)
    state = models["pooled"].state_dict() if mode == "centralized" else None
    return report.write(Path(cfg.out), state, time.perf_counter() - started)
