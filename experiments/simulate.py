"""``edufl simulate``: one run on one machine, federated (Flower simulation engine) or a baseline.

* ``federated``: the ServerApp and ClientApp of ``server/`` and ``clients/`` on
  Flower's simulation engine (Ray backend). Each virtual campus reads only a
  folder holding its own rows (the contract's tables as Parquet files), written
  to a private folder of this process (see :func:`campus_folders`) that is
  deleted at the end, on an error, Ctrl-C or SIGTERM (raw rows are never
  written into the results folder). A run killed outright (SIGKILL, out of
  memory) cannot clean up: the next simulation removes its folder when it starts.
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
import shutil
import signal
import stat
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Literal, get_args

import psutil

from edufl.clients.node import SIM_ENV, SIM_MANIFEST
from edufl.federation.fingerprint import file_hashes
from edufl.federation.mapping import CONTRACT_PARQUET
from edufl.federation.partition import campus_names, campus_slices
from edufl.federation.runconfig import RunConfig
from edufl.federation.tables import Tables, load_tables
from edufl.federation.writers import write_parquet

__all__ = [
    "CAMPUS_ROOT",
    "MODES",
    "Mode",
    "announce",
    "campus_folders",
    "campus_root",
    "provenance",
    "remove_stale_campus_folders",
    "run_engine",
    "simulate",
]

Mode = Literal["federated", "centralized", "local"]
MODES = get_args(Mode)

CAMPUS_ROOT = "edufl-campuses"
"""Name of the folder in the temporary directory (``$TMPDIR``) that holds the campus folders of
this user's simulations (``-<uid>`` appended where the system has user ids)."""
_START_TOLERANCE_S = 2.0  # a process's start time as the system reports it may move by up to ~1 s


def simulate(
    cfg: RunConfig, data_dir: Path, mode: str = "federated", tables: Tables | None = None, policy: Path | None = None
) -> dict:
    """Run ``mode`` on the OULAD tables in ``data_dir`` (or the already loaded ``tables``).

    Campuses are formed by ``cfg.campus_by``. Federated: every virtual campus
    keeps its privacy ledger under ``cfg.out/campuses/<campus>/`` and, when
    ``policy`` (a campus policy file) is given, enforces it; without one, it
    runs under :data:`~edufl.federation.policy.RESEARCH_POLICY`: the research
    settings of ``cfg`` (no DP, a large ε) run as asked. A ``cfg`` without a
    ``run_name`` gets a unique one (:func:`~edufl.server.coordinator.new_run_name`).
    Returns the summary dict written to ``cfg.out/summary.json``.

    Raises
    ------
    DataError
        When the tables fail validation.
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {', '.join(MODES)}")
    if not cfg.run_name:  # every run has a unique name: summary.json records it, campuses key their ledger by it
        from edufl.server.coordinator import new_run_name

        cfg = cfg.model_copy(update={"run_name": new_run_name(Path(cfg.out))})
    if mode == "federated":
        return _federated(cfg, data_dir, tables, policy)
    from .baselines import baseline  # torch, Opacus and scikit-learn load here

    tables = tables or load_tables(data_dir)
    return baseline(cfg, tables, announce(cfg, tables, mode), mode)


def announce(cfg: RunConfig, tables: Tables, mode: str) -> list[str]:
    """Print the data notes and a one-line description of the run; return the campus names."""
    from edufl.federation.privacy import PRIVACY_UNIT_SHORT
    from edufl.federation.randomness import REPRODUCIBLE_WARNING

    for note in tables.notes:
        print(f"note: {note}")
    names = campus_names(tables, cfg.campus_by, cfg.shards)
    privacy = (
        f"DP-SGD, ε ≤ {cfg.target_epsilon:g} per campus at δ = {cfg.delta:g}, privacy unit: {PRIVACY_UNIT_SHORT}"
        if cfg.dp
        else "NO DP"
    )
    privacy += f" ({REPRODUCIBLE_WARNING})" if cfg.dp and cfg.reproducible_noise else ""
    print(
        f"edufl simulate: {mode}, {len(names)} campuses by {cfg.campus_by}, task {cfg.task} at day {cfg.cutoff_day}, "
        f"{cfg.model}, {cfg.num_rounds} round{'s' if cfg.num_rounds != 1 else ''}, {privacy}"
    )
    return names


def provenance(mode: str, cfg: RunConfig, tables: Tables, names: list[str]) -> dict:
    """The results folder's record of what ran on which data (mode, settings, campuses, file hashes)."""
    return {
        "mode": mode,
        **cfg.to_flower(),
        "campuses": names,
        "data": str(tables.source.resolve()),
        "data_sha256": file_hashes(tables.source),
    }


def campus_root(base: Path | str | None = None) -> Path:
    """The folder of this user's simulation campus folders, created with mode 0700 if missing.

    Parameters
    ----------
    base
        The folder to hold it; default: the temporary directory (``$TMPDIR``, else ``/tmp``).

    Returns
    -------
    Path
        ``base/edufl-campuses-<uid>``.

    Raises
    ------
    PermissionError
        When that path exists but is not a folder of this user closed to everyone else (a
        symbolic link, another user's folder, or one others may read): raw rows are not
        written there.
    """
    uid = os.getuid() if hasattr(os, "getuid") else None
    name = CAMPUS_ROOT if uid is None else f"{CAMPUS_ROOT}-{uid}"
    root = Path(tempfile.gettempdir() if base is None else base) / name
    try:
        os.mkdir(root, 0o700)
    except FileExistsError:
        pass
    info = os.lstat(root)
    if not stat.S_ISDIR(info.st_mode) or (uid is not None and info.st_uid != uid) or info.st_mode & 0o077:
        raise PermissionError(
            f"{root} is not a private folder of this user (mode 0700, not a link): campus rows "
            "are not written there; remove it, or point TMPDIR at another folder"
        )
    return root


def _owner_tag(pid: int, started: float) -> str:
    """The start of a campus folder's name: its owner's process id and start time (ms since the epoch)."""
    return f"{pid}-{round(started * 1000)}"


def _owner_alive(name: str) -> bool | None:
    """Whether the process named by a campus folder's name still runs (None: not such a name)."""
    pid, _, rest = name.partition("-")
    started, _, _ = rest.partition("-")
    if not (pid.isdigit() and started.isdigit()):
        return None
    try:
        owner = psutil.Process(int(pid))
        # The same pid with another start time is a new process: the owner has ended.
        return abs(owner.create_time() - int(started) / 1000) < _START_TOLERANCE_S and owner.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True  # it exists and may be the owner: keep its rows


def remove_stale_campus_folders(root: Path | str | None = None) -> int:
    """Remove the campus folders under ``root`` whose owning process has ended.

    A run that could not clean up (killed with SIGKILL, out of memory) leaves
    its campus folder behind; every simulation calls this when it starts.
    Folders of running processes are left alone, and so is anything not
    named as a campus folder (``<pid>-<start, ms>-...``).

    Parameters
    ----------
    root
        The folder of campus folders; default: :func:`campus_root`.

    Returns
    -------
    int
        How many folders were removed.

    Raises
    ------
    PermissionError
        When ``root`` is not given and :func:`campus_root` refuses its folder.
    """
    root = campus_root() if root is None else Path(root)
    removed = 0
    for entry in sorted(root.iterdir()):
        if entry.is_dir() and not entry.is_symlink() and _owner_alive(entry.name) is False:
            shutil.rmtree(entry, ignore_errors=True)
            removed += not entry.exists()
    return removed


@contextmanager
def campus_folders(base: Path | str | None = None) -> Iterator[Path]:
    """A new folder (mode 0700) for one simulation's campus folders, removed when the block ends.

    Before creating it, removes the folders of simulations whose process has
    ended (:func:`remove_stale_campus_folders`; one line says how many). The
    folder is ``<root>/<pid>-<process start, ms>-<random>`` (``<root>``: see
    :func:`campus_root`), so that a later start can tell whether its owner
    still runs. It is removed when the block ends, normally or by an
    exception (Ctrl-C included). In the main thread, a
    SIGTERM handler is installed for the block: SIGTERM raises
    ``SystemExit(143)``, the folder is removed, the previous handler is put
    back and the SIGTERM raised again for it (by default it ends the process:
    a simulation's ServerApp thread would otherwise keep it alive until its
    round timeout). A SIGTERM arriving while the folder is being removed takes
    effect once it is gone.

    Parameters
    ----------
    base
        Where the folder of campus folders is (see :func:`campus_root`); default: ``$TMPDIR``.

    Yields
    ------
    Path
        The run's folder, empty.

    Raises
    ------
    PermissionError
        When :func:`campus_root` refuses the folder of campus folders.
    SystemExit
        On SIGTERM during the block (status 143), when the previous SIGTERM handler
        does not end the process.
    """
    root = campus_root(base)
    stale = remove_stale_campus_folders(root)
    if stale:
        print(
            f"edufl simulate: removed {stale} campus folder{'s' if stale != 1 else ''} "
            f"left in {root} by simulations that ended without cleaning up"
        )
    me = psutil.Process()
    with _sigterm_exits() as hold:
        path = Path(tempfile.mkdtemp(prefix=f"{_owner_tag(me.pid, me.create_time())}-", dir=root))
        try:
            yield path
        finally:
            hold()
            shutil.rmtree(path, ignore_errors=True)
            if path.exists():
                print(f"edufl simulate: could not remove {path}; the next simulation removes it")


@contextmanager
def _sigterm_exits() -> Iterator[Callable[[], None]]:
    """For the block, SIGTERM unwinds the main thread's stack, then takes its own effect.

    In the main thread (elsewhere, or where SIGTERM is ignored, nothing
    changes), the first SIGTERM raises ``SystemExit(143)``, so that the blocks
    it leaves clean up; when this block ends, the previous handler is put back
    and the SIGTERM raised again for it (by default: the process ends). The
    yielded function, called as the block's last cleanup starts, holds any
    SIGTERM until then.
    """
    state = {"holding": False, "received": False}

    def on_sigterm(signum, frame) -> None:
        first = not state["received"]
        state["received"] = True
        if first and not state["holding"]:
            raise SystemExit(128 + signum)

    def hold() -> None:
        state["holding"] = True

    install = threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) != signal.SIG_IGN
    previous = signal.signal(signal.SIGTERM, on_sigterm) if install else None
    try:
        yield hold
    finally:
        if install:  # previous None: a handler not set from Python, i.e. the default one
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
            if state["received"]:
                sys.stdout.flush()
                sys.stderr.flush()
                signal.raise_signal(signal.SIGTERM)


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
    os.environ.update(OMP_NUM_THREADS="1", RAY_preload_python_modules="edufl.clients.app")
    # ray.init() sets its own SIGTERM handler (and its core worker a C++ one that ends the
    # process with SIGABRT): put back the run's, which removes the campus folders (campus_folders).
    main = threading.current_thread() is threading.main_thread()
    sigterm = signal.getsignal(signal.SIGTERM) if main else None
    try:
        ray.init(include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    finally:
        if sigterm is not None:
            signal.signal(signal.SIGTERM, sigterm)
        os.environ.pop("RAY_preload_python_modules")
        if saved is None:
            os.environ.pop("OMP_NUM_THREADS")
        else:
            os.environ["OMP_NUM_THREADS"] = saved


def _prepare(
    cfg: RunConfig,
    data_dir: Path,
    tables: Tables | None,
    sim_dir: str,
    policy: Path | None,
    headline: Callable[[RunConfig, Tables, str], list[str]],
):
    """Runs while Ray starts: validate the tables, write one folder per campus, load the apps."""
    from flwr.simulation.run_simulation import _run_simulation

    from edufl.clients.app import app as client_app
    from edufl.server.app import app as server

    tables = tables or load_tables(data_dir)
    names = headline(cfg, tables, "federated")
    for name, own in campus_slices(tables, cfg.campus_by, cfg.shards).items():
        write_parquet(own, Path(sim_dir) / name)  # the contract's tables: each campus reads them without a CSV parse
    manifest = {
        "campuses": names,
        "state-root": str(Path(cfg.out).resolve() / "campuses"),
        "policy": str(policy.resolve()) if policy else None,
        "mapping": str(CONTRACT_PARQUET),
    }
    (Path(sim_dir) / SIM_MANIFEST).write_text(json.dumps(manifest))
    return tables, names, _run_simulation, client_app, server


def _federated(cfg: RunConfig, data_dir: Path, tables: Tables | None, policy: Path | None) -> dict:
    cfg, tables, names = run_engine(cfg, data_dir, tables, policy)
    path = Path(cfg.out) / "summary.json"
    summary = json.loads(path.read_text())
    summary["config"].update(provenance("federated", cfg, tables, names))  # known to the researcher, not the ServerApp
    path.write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def run_engine(
    cfg: RunConfig,
    data_dir: Path,
    tables: Tables | None,
    policy: Path | None,
    headline: Callable[[RunConfig, Tables, str], list[str]] = announce,
    extra_config: dict | None = None,
) -> tuple[RunConfig, Tables, list[str]]:
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

    with campus_folders() as folder, ThreadPoolExecutor(1) as pool:
        sim_dir = str(folder)
        prepared = pool.submit(_prepare, cfg, data_dir, tables, sim_dir, policy, headline)
        try:
            _start_ray(sim_dir)
            tables, names, run_simulation, client_app, server = prepared.result()
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
                server_app_context=Context(
                    run_id=0,
                    node_id=0,
                    node_config={},
                    state=RecordDict(),
                    run_config={**cfg.to_flower(), **(extra_config or {})},
                ),
                backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
            )
        except BaseException:
            # Stop the engine's processes now: after a SIGTERM the process ends by the signal
            # (campus_folders), without the exit handler that would stop them.
            ray.shutdown()
            raise
    return cfg, tables, names
