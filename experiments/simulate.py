"""``edufl simulate``: one run on one machine, federated (Flower simulation engine) or a baseline.

* ``federated``: the ServerApp and ClientApp of ``server/`` and ``clients/`` on
  Flower's simulation engine, its ClientApps run by worker processes forked from
  this one (:mod:`experiments.workers`), or by Ray's on an existing Ray cluster.
  Each virtual campus reads only a
  folder holding its own rows (the contract's tables as Parquet files), written
  to a private folder of this process (see :func:`campus_folders`) that is
  deleted at the end, on an error, Ctrl-C or SIGTERM (raw rows are never
  written into the results folder). A run killed outright (SIGKILL, out of
  memory) cannot clean up: the next simulation removes its folder when it starts.
* ``centralized`` and ``local``: the baselines of :mod:`experiments.baselines`.

All modes use the same features, splits, model, optimizer and DP-SGD code,
and write the same results folder.

Start-up order (federated, this machine): the main thread imports torch, Opacus and Flower with the
apps, forks the workers (which load what torch loads late while it goes on), validates the tables and
writes the campus folders; this module itself imports nothing heavy. On a Ray cluster, Ray is attached
in the main thread while a worker thread does that preparation.
Inside an :func:`engine` block (``edufl experiment run``), every run uses the
same engine: its workers and their prepared campuses stay up between runs.
With ``ray_address`` the engine attaches to an existing Ray cluster, and the
campus files reach its workers through Ray's object store (:class:`Engine`).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import socket
import stat
import sys
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Literal, get_args

import psutil

from edufl.clients.node import SIM_ENV, SIM_MANIFEST, SIM_STORE_ENV, copies_prefix, simulation_folders
from edufl.federation.fingerprint import file_hashes
from edufl.federation.mapping import CONTRACT_PARQUET
from edufl.federation.partition import Campuses, campus_examples, campus_names, campus_slices
from edufl.federation.runconfig import ConfigError, RunConfig
from edufl.federation.schema import FederationSchema
from edufl.federation.tables import Tables, load_tables
from edufl.federation.tasks import TaskData
from edufl.federation.writers import write_parquet

__all__ = [
    "CAMPUS_ROOT",
    "FOLDERS",
    "MODES",
    "Engine",
    "Mode",
    "announce",
    "campus_folders",
    "campus_spec",
    "campus_root",
    "engine",
    "formation",
    "load_campuses",
    "print_notes",
    "data_provenance",
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
    cfg: RunConfig,
    data_dir: Path | None,
    mode: str = "federated",
    tables: Tables | Campuses | None = None,
    policy: Path | None = None,
    ray_address: str | None = None,
) -> dict:
    """Run ``mode`` on the OULAD tables in ``data_dir`` (or the already loaded ``tables``; then ``data_dir`` may be None).

    Campuses are formed by ``cfg.campus_by``, or are the campus folders of ``tables`` when
    it is :data:`~federation.partition.Campuses` (see :func:`load_campuses`). Federated: every virtual campus
    keeps its privacy ledger under ``cfg.out/campuses/<campus>/`` and, when
    ``policy`` (a campus policy file) is given, enforces it; without one, it
    runs under :data:`~edufl.federation.policy.RESEARCH_POLICY`: the research
    settings of ``cfg`` (no DP, a large ε) run as asked. A ``cfg`` without a
    ``run_name`` gets a unique one (:func:`~edufl.server.coordinator.new_run_name`).
    A federated run uses the :func:`engine` of the enclosing block, else starts
    one for itself, attached to the Ray cluster at ``ray_address`` when given.
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
        return _federated(cfg, data_dir, tables, policy, ray_address)
    from .baselines import baseline  # torch, Opacus and scikit-learn load here

    tables = tables or load_tables(data_dir, schema=cfg.schema)
    return baseline(cfg, tables, announce(cfg, tables, mode), mode)


def campus_spec(spec: str, folder: Path | None = None) -> tuple[str, Path, Path | None]:
    """The (name, data folder, mapping file or None) of a campus spec ``NAME=DIR`` (the OULAD release) or
    ``NAME=DIR:MAPPING`` (an export read with the mapping file ``MAPPING``); relative paths are taken relative to
    ``folder`` when given (a study config's), else to the working directory.

    Raises
    ------
    ValueError
        For a spec not of that form, or a name that is not 1-64 letters, digits, ``_``, ``-`` or ``.`` (not
        starting with ``.``); the message quotes the spec.
    """
    name, eq, where = spec.partition("=")
    data, _, mapping = where.partition(":")
    if not eq or not data:
        raise ValueError(f"{spec!r}: expected NAME=DIR or NAME=DIR:MAPPING")
    if not _CAMPUS_NAME.fullmatch(name):
        raise ValueError(f"{spec!r}: a campus name is 1-64 letters, digits, '_', '-' or '.' (not starting with '.')")

    def path(text: str) -> Path:
        given = Path(text).expanduser()
        return given if folder is None else folder / given

    return name, path(data), path(mapping) if mapping else None


def load_campuses(specs: list[str], schema: FederationSchema, what: str = "--campus") -> dict[str, Tables]:
    """Read and validate the campuses of ``specs`` (see :func:`campus_spec`) as one federation of the federation
    ``schema``.

    Returns
    -------
    dict
        Each campus's tables by name, in the order given.

    Raises
    ------
    ConfigError
        For a bad spec (:func:`campus_spec`), a folder that does not exist, or a name or folder given twice (the
        same learners twice); the message starts with ``what``.
    MappingError, DataError
        As :func:`~federation.tables.load_tables`, for the first campus whose mapping or data fail.
    """
    campuses: dict[str, Tables] = {}
    folders: dict[Path, str] = {}
    for spec in specs:
        try:
            name, data, mapping = campus_spec(spec)
        except ValueError as err:
            raise ConfigError(f"{what} {err}") from None
        if name in campuses:
            raise ConfigError(f"{what} {spec!r}: campus {name!r} is given twice")
        if not data.is_dir():
            raise ConfigError(f"{what} {spec!r}: {data} is not a folder; expected the campus's data folder")
        if (seen := folders.setdefault(data.resolve(), name)) != name:
            raise ConfigError(f"{what} {spec!r}: campus {seen!r} reads that folder already; each campus holds its own learners")
        campuses[name] = load_tables(data, mapping, schema)
    return campuses


FOLDERS = "folders"
"""The ``campus-by`` of a federation of campus folders (:func:`load_campuses`), in provenance and study rows."""
_CAMPUS_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,63}")


def formation(cfg: RunConfig, tables: Tables | Campuses) -> str:
    """How the run's campuses are formed, for a headline: ``by <campus-by>`` of one release, or ``from campus folders``."""
    return f"by {cfg.campus_by}" if isinstance(tables, Tables) else "from campus folders"


def announce(cfg: RunConfig, tables: Tables | Campuses, mode: str) -> list[str]:
    """Print the data notes and a one-line description of the run; return the campus names."""
    from edufl.federation.contract import PRIVACY_UNIT_SHORT
    from edufl.federation.randomness import REPRODUCIBLE_WARNING

    print_notes(tables)
    names = campus_names(tables, cfg.campus_by, cfg.shards)
    privacy = (
        f"DP-SGD, ε ≤ {cfg.target_epsilon:g} per campus at δ = {cfg.delta:g}, privacy unit: {PRIVACY_UNIT_SHORT}"
        if cfg.dp
        else "NO DP"
    )
    privacy += f" ({REPRODUCIBLE_WARNING})" if cfg.dp and cfg.reproducible_noise else ""
    print(
        f"edufl simulate: {mode}, {len(names)} campuses {formation(cfg, tables)}, task {cfg.task} at day {cfg.cutoff_day}, "
        f"{cfg.model}, {cfg.num_rounds} round{'s' if cfg.num_rounds != 1 else ''}, {privacy}"
    )
    return names


def provenance(mode: str, cfg: RunConfig, data: dict, names: list[str]) -> dict:
    """The results folder's record of what ran on which data: mode, settings, campuses, and ``data``, the
    tables' :func:`data_provenance`."""
    return {"mode": mode, **cfg.to_flower(), "campuses": names, **data}


def data_provenance(tables: Tables | Campuses) -> dict:
    """Where ``tables`` came from: ``data`` (the folder) and ``data_sha256`` (its files' hashes); for campus
    folders, ``campus-by`` ``folders`` and each campus's ``data`` and ``data_sha256``, by name."""
    if isinstance(tables, Tables):
        return {"data": str(tables.source.resolve()), "data_sha256": file_hashes(tables.source, tables.mapping)}
    return {
        "campus-by": FOLDERS,
        "data": {name: str(own.source.resolve()) for name, own in tables.items()},
        "data_sha256": {name: file_hashes(own.source, own.mapping) for name, own in tables.items()},
    }


def print_notes(tables: Tables | Campuses) -> None:
    """Print what reading the tables noted (merged rows, unused columns), each campus folder's under its name."""
    for campus, own in ({"": tables} if isinstance(tables, Tables) else tables).items():
        for note in own.notes:
            print(f"note: {campus + ': ' if campus else ''}{note}")


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


class _CampusStore:
    """A Ray actor (on an existing cluster only) holding the current run's manifest and every campus's files.

    Workers on any node fetch them through Ray's object store (:func:`clients.node.campus_setup`); the
    store records which node fetched which campus (:meth:`fetched`)."""

    def __init__(self) -> None:
        self._manifest: dict = {}
        self._files: dict[tuple[str, str], dict[str, bytes]] = {}
        self._fetched: dict[str, set[str]] = {}

    def add(self, partition: str, campus: str, files: dict[str, bytes]) -> None:
        self._files[(partition, campus)] = files

    def set_manifest(self, manifest: dict) -> None:
        self._manifest = manifest

    def manifest(self) -> dict:
        return self._manifest

    def files(self, partition: str, campus: str, node: str) -> dict[str, bytes]:
        self._fetched.setdefault(node, set()).add(campus)
        return self._files[(partition, campus)]

    def fetched(self) -> dict[str, list[str]]:
        return {node: sorted(campuses) for node, campuses in self._fetched.items()}


def _remove_copies(store_name: str) -> int:
    """Remove this node's worker copies of the campus files of store ``store_name``; return how many."""
    found = [p for p in Path(tempfile.gettempdir()).glob(f"{copies_prefix(store_name)}*") if p.is_dir() and not p.is_symlink()]
    for folder in found:
        shutil.rmtree(folder, ignore_errors=True)
    return len(found)


_CONNECT_TIMEOUT_S = 5.0


def _check_reachable(address: str) -> None:
    """Fail at once (Ray itself retries for minutes) when nothing listens at ``HOST:PORT``."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        return  # "auto", or a form Ray resolves itself (e.g. ray://...)
    try:
        socket.create_connection((host, int(port)), timeout=_CONNECT_TIMEOUT_S).close()
    except OSError as err:
        raise ConfigError(f"--ray-address {address}: no Ray cluster answers there ({err})") from None


def _add_messages_to_queue(state: Any, queue: Any, nodes_mapping: dict, f_stop: threading.Event) -> None:
    """Flower's loop handing each virtual SuperNode's next message to the actors (flwr==1.42.0,
    ``vce_api.add_messages_to_queue``), asking only for the nodes that have an undelivered message.

    Flower's asks the LinkState for every node's message every 0.1 s, and each ask checks every stored
    message: N² checks a tick with N campuses, which kept one of this machine's two cores busy through every
    round of 200 campuses. Here a tick first reads which nodes wait for a message (the in-memory LinkState's
    store, under its lock), then asks for those nodes' messages as Flower does, in its node order; ticks
    are 0.01 s apart, so a round's messages wait 5 ms on average instead of 50 ms.
    """
    while not f_stop.is_set():
        with state.lock:
            waiting = {m.metadata.dst_node_id for m in state.message_ins_store.values() if m.metadata.delivered_at == ""}
        for node_id in (n for n in nodes_mapping if n in waiting):
            for message in state.get_message_ins(node_id=node_id, limit=1):
                queue.put(message)
        f_stop.wait(0.01)


class Engine:
    """Flower's simulation engine kept running for several runs (see :func:`engine`).

    On this machine, one pool of worker processes forked from this one (:mod:`experiments.workers`);
    with ``address``, an existing Ray cluster attached and one pool of ClientApp actors on it. Either
    is built by the first run and kept by the next ones: a study pays once for starting the workers,
    for their imports and for preparing each campus (the workers keep their campuses' examples between
    runs). ``folder`` holds one
    sub-folder of campus folders per way of forming campuses (written once, see
    :meth:`partition`) and the current run's manifest. On a cluster, campus files
    and manifest reach the workers through a store actor and Ray's object store,
    and each worker keeps a copy in a private folder (mode 0700) of its node's temporary
    directory, removed by :meth:`close` (a driver killed outright leaves them, named by
    :func:`~clients.node.copies_prefix`; remove them by hand).
    """

    def __init__(self, folder: Path, address: str | None = None) -> None:
        self.folder, self.address = folder, address
        self.store_name = f"edufl-campus-store-{uuid.uuid4().hex[:12]}"
        self._store: Any = None
        self._pool: Any = None  # on a cluster: Flower's BasicActorPool, built by the first run
        self._workers: Any = None  # on this machine: the forked workers (experiments.workers.Workers)
        self._partitions: dict[tuple, tuple[Tables | Campuses, str]] = {}  # the tables are kept: their id is in the key
        self._uploaded: set[str] = set()
        self._lock = threading.Lock()
        self._restore: Callable[[], None] | None = None

    def start(self) -> None:
        """Start the engine's workers: on this machine, fork them (:class:`~experiments.workers.Workers`)
        once the ClientApp (torch, Opacus, Flower) is imported, so that they inherit it; on a Ray cluster,
        attach to it.

        Call it from the main thread while no other thread of this process runs: a lock held elsewhere at
        the fork would stay held in every worker, and Ray's processes are tied to the life of the thread
        that starts them.
        """
        if self.address is None:
            os.environ[SIM_ENV] = str(self.folder)  # the workers, forked from this process, read it
            from edufl.clients.app import app as client_app

            from .workers import Workers

            self._workers = Workers()
            self._keep_actors()
            self._workers.start(client_app)
            return
        import ray

        if ray.is_initialized():
            ray.shutdown()  # its workers would still see another run's campus folders
        os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # CPU-only actors; silences a Ray notice
        # ray.init() sets its own SIGTERM handler (and its core worker a C++ one that ends the
        # process with SIGABRT): put back the run's, which removes the campus folders (campus_folders).
        main = threading.current_thread() is threading.main_thread()
        sigterm = signal.getsignal(signal.SIGTERM) if main else None
        # One core per virtual campus (client_resources below): torch in the workers reads OMP_NUM_THREADS.
        env = {SIM_STORE_ENV: self.store_name, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
        os.environ.pop(SIM_ENV, None)
        _check_reachable(self.address)
        try:
            ray.init(address=self.address, runtime_env={"env_vars": env}, log_to_driver=False, logging_level=logging.WARNING)
        except ConnectionError as err:
            raise ConfigError(f"--ray-address {self.address}: no Ray cluster answers there ({err})") from None
        finally:
            if sigterm is not None:
                signal.signal(signal.SIGTERM, sigterm)
        self._store = ray.remote(num_cpus=0)(_CampusStore).options(name=self.store_name).remote()
        self._keep_actors()

    def _keep_actors(self) -> None:
        # Flower's simulation builds a RayBackend per run (looked up in its module at each run, flwr==1.42.0)
        # and ends the run by stopping the actors and Ray. On this machine it is replaced by the engine's
        # forked workers; on a cluster, the first run's actor pool serves every run, and stopping is left to
        # close(). Its loop handing messages to the actors is replaced too (_add_messages_to_queue).
        from flwr.server.superlink.fleet.vce import vce_api
        from flwr.server.superlink.fleet.vce.backend import raybackend

        base, pools = raybackend.RayBackend, self
        if self._workers is not None:
            from .workers import local_backend

            backend: type = local_backend(self._workers)
        else:

            class KeptRayBackend(base):  # type: ignore[misc,valid-type]
                def build(self, app_fn) -> None:
                    if pools._pool is None:
                        super().build(app_fn)
                        pools._pool = self.pool
                    else:
                        self.pool, self.app_fn = pools._pool, app_fn

                def terminate(self) -> None:
                    pass

            backend = KeptRayBackend

        flowers = vce_api.add_messages_to_queue
        raybackend.RayBackend, vce_api.add_messages_to_queue = backend, _add_messages_to_queue

        def restore() -> None:
            raybackend.RayBackend, vce_api.add_messages_to_queue = base, flowers

        self._restore = restore

    def partition(self, tables: Tables | Campuses, campus_by: str, shards: int) -> str:
        """The sub-folder of :attr:`folder` with one folder per campus of ``tables`` by ``campus_by``
        (the contract's tables as Parquet files: each campus reads them without a CSV parse), written on first use."""
        key = (id(tables), campus_by, shards if campus_by == "shard" else 0)
        with self._lock:
            if key not in self._partitions:
                name = f"{len(self._partitions)}-{campus_by}"
                for campus, own in campus_slices(tables, campus_by, shards).items():
                    write_parquet(own, simulation_folders(self.folder, name, campus)[0])
                self._partitions[key] = (tables, name)
            return self._partitions[key][1]

    def share_examples(self, partition: str, cfg: RunConfig, examples: Callable[[], dict[str, TaskData]]) -> int:
        """Leave each campus of ``partition`` its examples for ``cfg`` where its workers look first
        (:func:`clients.app.share_examples`), taken from ``examples()``, every campus's examples by name as
        :func:`federation.partition.campus_examples` computes them from the tables written to the campus folders
        (called only when some campus lacks them: a study's later runs often do not): no worker reads and
        validates a campus folder again. Returns how many campuses got them: none on a Ray cluster (its workers
        share no folder)."""
        if self.address is not None:
            return 0
        from edufl.clients.app import share_examples

        computed: dict[str, TaskData] = {}

        def of(name: str) -> TaskData:
            if not computed:
                computed.update(examples())
            return computed[name]

        names = sorted(d.name for d in (self.folder / partition).iterdir())
        return sum(
            share_examples(name, *simulation_folders(self.folder, partition, name), cfg, lambda n=name: of(n)) for name in names
        )

    def publish(self, partition: str, manifest: dict) -> None:
        """Make ``manifest`` (campus names in partition-id order, state root, policy, mapping) the one the
        workers read, with the campus folders of ``partition``; on a cluster, send those folders' files first."""
        manifest = {**manifest, "partition": partition}
        if self._store is not None:
            import ray

            if partition not in self._uploaded:
                ray.get(
                    [
                        self._store.add.remote(partition, d.name, {f.name: f.read_bytes() for f in d.iterdir()})
                        for d in sorted((self.folder / partition).iterdir())
                    ]
                )
                self._uploaded.add(partition)
            ray.get(self._store.set_manifest.remote(manifest))
        path = self.folder / SIM_MANIFEST
        partial = path.with_suffix(".partial")
        partial.write_text(json.dumps(manifest))
        os.replace(partial, path)  # a worker reads the whole manifest, old or new

    def fetched(self) -> dict[str, list[str]]:
        """On a cluster: the campuses whose files each node (by Ray node id) fetched; locally: empty."""
        import ray

        return {} if self._store is None else ray.get(self._store.fetched.remote())

    def close(self) -> None:
        """Stop the workers (on a cluster: the ClientApp actors, remove the workers' copies of campus files
        and disconnect from Ray)."""
        try:
            if self._workers is not None:
                self._workers.close()
            if self.address is not None:
                self._leave_cluster()
        finally:
            if self._restore is not None:
                self._restore()

    def _leave_cluster(self) -> None:
        import ray

        try:
            if self._pool is not None:
                self._pool.terminate_all_actors()
            if self._store is not None:
                from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

                remove = ray.remote(num_cpus=0)(_remove_copies)
                on = [NodeAffinitySchedulingStrategy(n["NodeID"], soft=False) for n in ray.nodes() if n["Alive"]]
                ray.get([remove.options(scheduling_strategy=node).remote(self.store_name) for node in on])
        finally:
            ray.shutdown()

    @contextmanager
    def running(self) -> Iterator[Engine]:
        """Start the engine for the block (runs in it use it, see :func:`run_engine`); close it when the block ends."""
        try:
            self.start()
            _RUNNING.append(self)
            yield self
        finally:
            if self in _RUNNING:
                _RUNNING.remove(self)
            self.close()


_RUNNING: list[Engine] = []


@contextmanager
def engine(address: str | None = None) -> Iterator[Engine]:
    """Flower's simulation engine, started once for every federated run of the block.

    Parameters
    ----------
    address
        An existing Ray cluster's address (``HOST:PORT`` of its head, or ``auto``) to attach to;
        default: start Ray on this machine.

    Yields
    ------
    Engine
        The running engine; :func:`simulate` and :func:`run_engine` use it until the block ends.

    Raises
    ------
    PermissionError
        As :func:`campus_folders`.
    ConfigError
        When no Ray cluster answers at ``address`` (exit status 2).
    """
    with campus_folders() as folder, Engine(folder, address).running() as running:
        yield running


def _prepare(
    engine: Engine,
    cfg: RunConfig,
    data_dir: Path | None,
    tables: Tables | Campuses | None,
    headline: Callable[[RunConfig, Tables | Campuses, str], list[str]],
    read: Callable[[], tuple[dict, list[str], str, dict[str, TaskData]]] | None = None,
):
    """Load the apps, validate the tables, write one folder per campus and their examples (or take all of that
    from ``read``, :func:`_read_ahead`'s)."""
    from flwr.simulation.run_simulation import _run_simulation

    from edufl.clients.app import app as client_app
    from edufl.server.app import app as server

    if read is not None:
        data, names, partition, examples = read()
        engine.share_examples(partition, cfg, lambda: examples)
        return data, names, partition, _run_simulation, client_app, server
    tables = tables or load_tables(data_dir, schema=cfg.schema)
    names = headline(cfg, tables, "federated")
    partition = engine.partition(tables, cfg.campus_by, cfg.shards)
    engine.share_examples(partition, cfg, lambda: campus_examples(tables, cfg.campus_by, cfg.shards, cfg.cutoff_day, cfg.task))
    return data_provenance(tables), names, partition, _run_simulation, client_app, server


@contextmanager
def _read_ahead(
    engine: Engine, cfg: RunConfig, data_dir: Path, headline: Callable[[RunConfig, Tables | Campuses, str], list[str]]
) -> Iterator[Callable[[], tuple[dict, list[str], str, dict[str, TaskData]]]]:
    """Fork a process that reads and validates the tables in ``data_dir``, prints ``headline``'s lines, writes
    ``engine``'s campus folders while it computes every campus's examples, while this process imports torch, Opacus
    and Flower and starts the workers: on two cores the two take about as long as the reading alone. Call it
    before anything heavy is imported and while no other thread runs (the fork copies this process). The
    process is stopped if it still runs when the block ends.

    Yields
    ------
    Callable
        Waits for that process and returns its (:func:`data_provenance`, campus names, partition, examples
        by campus name); raises what it raised (a :class:`~federation.problems.DataError` for bad data).
    """
    context = get_context("fork")
    receive, send = context.Pipe(duplex=False)

    def read() -> None:
        try:
            tables = load_tables(data_dir, schema=cfg.schema)
            names = headline(cfg, tables, "federated")
            with ThreadPoolExecutor(1) as writer:  # both only read the tables; writing Parquet mostly frees the GIL
                written = writer.submit(engine.partition, tables, cfg.campus_by, cfg.shards)
                examples = campus_examples(tables, cfg.campus_by, cfg.shards, cfg.cutoff_day, cfg.task)
                partition = written.result()
            sys.stdout.flush()
            send.send((data_provenance(tables), names, partition, examples))
        except BaseException as err:  # every error, the user's included, is raised again where the run waits for it
            sys.stdout.flush()
            send.send(err)

    reader = context.Process(target=read, name="edufl-read-tables", daemon=True)
    reader.start()
    send.close()

    def result() -> tuple[dict, list[str], str, dict[str, TaskData]]:
        try:
            got = receive.recv()
        except EOFError:
            reader.join()
            raise RuntimeError(f"the process reading the tables ended without a result (exit code {reader.exitcode})") from None
        reader.join()
        if isinstance(got, BaseException):
            raise got
        return got

    try:
        yield result
    finally:
        if reader.is_alive():
            reader.terminate()
            reader.join()


def _federated(
    cfg: RunConfig, data_dir: Path | None, tables: Tables | Campuses | None, policy: Path | None, ray_address: str | None = None
) -> dict:
    cfg, data, names = run_engine(cfg, data_dir, tables, policy, ray_address=ray_address)
    path = Path(cfg.out) / "summary.json"
    summary = json.loads(path.read_text())
    summary["config"].update(provenance("federated", cfg, data, names))  # known to the researcher, not the ServerApp
    path.write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def run_engine(
    cfg: RunConfig,
    data_dir: Path | None,
    tables: Tables | Campuses | None,
    policy: Path | None,
    headline: Callable[[RunConfig, Tables | Campuses, str], list[str]] = announce,
    extra_config: dict | None = None,
    ray_address: str | None = None,
) -> tuple[RunConfig, dict, list[str]]:
    """Run the ServerApp (``server/app.py``) and the campuses' ClientApp on Flower's simulation engine.

    One virtual SuperNode per campus of ``cfg.campus_by``, each reading only
    its own rows and keeping its state under ``cfg.out/campuses/<campus>/``
    (enforcing ``policy`` when given). ``headline(cfg, tables, mode)`` prints
    what runs and returns the campus names; the ServerApp's run config is
    ``cfg`` (with ``min-campuses`` set to the number of campuses) plus
    ``extra_config``. Inside an :func:`engine` block the run uses that engine
    (``ray_address`` is then ignored); otherwise it starts one for this run
    (attached to the Ray cluster at ``ray_address`` when given, preparing the
    campuses while Ray attaches; on this machine, reading ``data_dir`` while the engine starts,
    :func:`_read_ahead`). Returns that config, the data's :func:`data_provenance` and the campus names.

    Raises
    ------
    DataError
        When the tables fail validation.
    """
    if _RUNNING:
        running = _RUNNING[-1]
        return _run(running, cfg, policy, extra_config, _prepare(running, cfg, data_dir, tables, headline))
    if not ray_address:
        with campus_folders() as folder:
            local = Engine(folder)
            ahead = _read_ahead(local, cfg, data_dir, headline) if tables is None and data_dir is not None else nullcontext()
            with ahead as read, local.running():
                return _run(local, cfg, policy, extra_config, _prepare(local, cfg, data_dir, tables, headline, read))
    _check_reachable(ray_address)  # before any data is read
    with campus_folders() as folder, ThreadPoolExecutor(1) as pool:  # the campuses are prepared while Ray attaches
        fresh = Engine(folder, ray_address)
        prepared = pool.submit(_prepare, fresh, cfg, data_dir, tables, headline)
        try:
            with fresh.running():
                return _run(fresh, cfg, policy, extra_config, prepared.result())
        finally:
            prepared.cancel()


def _run(engine: Engine, cfg: RunConfig, policy: Path | None, extra_config: dict | None, prepared: tuple):
    data, names, partition, run_simulation, client_app, server = prepared
    engine.publish(
        partition,
        {
            "campuses": names,
            "state-root": str(Path(cfg.out).resolve() / "campuses"),
            "policy": str(policy.resolve()) if policy else None,
            "mapping": str(CONTRACT_PARQUET),
        },
    )
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
            run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={**cfg.to_flower(), **(extra_config or {})}
        ),
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
    )
    return cfg, data, names
