"""Where a campus's data, state and policy come from (see :mod:`clients.app`)."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from edufl.federation.errors import EduflError
from edufl.federation.policy import RESEARCH_POLICY, CampusPolicy

__all__ = [
    "CampusRefusal",
    "CampusSetup",
    "copies_prefix",
    "leave_prepared",
    "SIM_ENV",
    "SIM_MANIFEST",
    "SIM_STORE_ENV",
    "campus_setup",
    "prepared",
    "run_id",
    "simulation_folders",
]

SIM_ENV = "EDUFL_SIM_DIR"
"""Simulation only: the environment variable naming the folder of per-campus data folders."""
SIM_MANIFEST = "campuses.json"
"""Simulation only: the manifest in that folder mapping each virtual SuperNode's partition-id to its campus."""
SIM_STORE_ENV = "EDUFL_SIM_STORE"
"""Simulation on an existing Ray cluster only: the environment variable naming the Ray actor that holds
the manifest and each campus's files (``experiments.simulate``); a worker copies its campus's files
into a private folder of its node's temporary directory (named by :func:`copies_prefix`)."""
_PREPARED = ".prepared"  # in a simulation's folder: each campus's examples, prepared once for every worker

T = TypeVar("T")


class CampusRefusal(EduflError):
    """The campus does not take part: a requested round would break its policy, take an ε past its limit or
    change the run's privacy settings, or its data do not fit the run's federation schema; or, at
    ``edufl campus start``, the coordinator cannot be trusted or turns the campus away, or its SuperNode or
    code-approval gate stops with an error (exit status 1).

    The message is the reason the coordinator is sent; ``detail`` (which rows, which values) stays in the
    campus's audit log."""

    def __init__(self, message: str, detail: str = "") -> None:
        super().__init__(message)
        self.detail = detail


@dataclass(frozen=True)
class CampusSetup:
    """What the campus operator configured: name, data folder, state folder, policy (the safe defaults
    without a policy file; in a simulation without one, :data:`~edufl.federation.policy.RESEARCH_POLICY`)
    and the mapping file of its export to the learner-record contract (None: the OULAD layout)."""

    name: str
    data_dir: Path
    state_dir: Path
    policy: CampusPolicy
    mapping: Path | None = None
    cache_dir: Path | None = None  # simulation only: where the campus's prepared examples are shared (see prepared)


def campus_setup(node_config: dict) -> CampusSetup:
    """This SuperNode's campus setup (see :mod:`clients.app` for the node config keys and defaults).

    Raises
    ------
    RuntimeError
        When the node config names no data folder and this is not an edufl simulation.
    PolicyError
        When the policy file cannot be used.
    """
    if "data-dir" in node_config:
        data_dir = Path(str(node_config["data-dir"]))
        name = str(node_config.get("campus", data_dir.name))
        state = Path(str(node_config.get("state-dir", Path.home() / ".edufl" / "campuses" / name)))
        mapping = Path(str(node_config["mapping"])) if node_config.get("mapping") else None
        return CampusSetup(name, data_dir, state, CampusPolicy.load(node_config.get("policy")), mapping)
    if "partition-id" in node_config and (os.environ.get(SIM_ENV) or os.environ.get(SIM_STORE_ENV)):
        root, manifest = _simulation_manifest()
        name = manifest["campuses"][int(node_config["partition-id"])]
        policy = CampusPolicy.load(manifest["policy"]) if manifest["policy"] else RESEARCH_POLICY
        mapping = Path(manifest["mapping"]) if manifest.get("mapping") else None  # None: OULAD layout
        partition = manifest.get("partition", "")  # the sub-folder of this run's campus folders
        data, cache = simulation_folders(root, partition, name) if root is not None else (_copy_from_store(partition, name), None)
        return CampusSetup(name, data, Path(manifest["state-root"]) / name, policy, mapping, cache)
    raise RuntimeError("this SuperNode has no campus data: start it with --node-config \"data-dir='DIR' campus='NAME'\"")


def copies_prefix(store_name: str) -> str:
    """How the folders of the workers' copies of campus files made for store actor ``store_name`` begin."""
    return f"edufl-campus-copy-{store_name}-"


def _simulation_manifest() -> tuple[Path | None, dict]:
    """The folder of campus folders (None on a Ray cluster: the files come from the store actor) and the manifest."""
    if folder := os.environ.get(SIM_ENV):
        root = Path(folder)
        return root, json.loads((root / SIM_MANIFEST).read_text())
    import ray

    return None, ray.get(ray.get_actor(os.environ[SIM_STORE_ENV]).manifest.remote())


_COPIES: dict[tuple[str, str, str], Path] = {}


def _copy_from_store(partition: str, name: str) -> Path:
    """This worker's private copy (folder mode 0700, on its own node) of campus ``name``'s files, fetched once
    from the simulation's store actor through Ray's object store; removed by the simulation when it ends."""
    store_name = os.environ[SIM_STORE_ENV]
    key = (store_name, partition, name)
    if key not in _COPIES:
        import ray

        files: dict[str, bytes] = ray.get(
            ray.get_actor(store_name).files.remote(partition, name, ray.get_runtime_context().get_node_id())
        )
        folder = Path(tempfile.mkdtemp(prefix=copies_prefix(store_name)))  # mode 0700
        try:
            for file, data in files.items():
                (folder / file).write_bytes(data)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        _COPIES[key] = folder
    return _COPIES[key]


def prepared(cache_dir: Path | None, key: tuple, build: Callable[[], T]) -> T:
    """``build()``, shared through ``cache_dir`` by every worker process of a simulation.

    In a simulation the engine's workers take any campus's messages, so each would
    otherwise prepare the same campus again. The first to need ``key`` (a tuple whose
    ``repr`` names the data files and settings the result depends on) builds it and
    leaves it (pickled: a folder of this user's simulation, mode 0700) for the others;
    the simulation itself may have left it already (:func:`leave_prepared`).
    Without a ``cache_dir`` (a deployed campus, or a simulation on a Ray cluster) this is ``build()``.
    """
    if cache_dir is None:
        return build()
    path = _prepared_path(cache_dir, key)
    try:
        return pickle.loads(path.read_bytes())  # written by this simulation's own processes
    except FileNotFoundError:
        pass
    value = build()
    _store(path, value)
    return value


def leave_prepared(cache_dir: Path, key: tuple, build: Callable[[], T]) -> bool:
    """Leave ``build()`` in ``cache_dir`` for :func:`prepared` to find under ``key``, unless it is there already;
    returns whether it was built."""
    path = _prepared_path(cache_dir, key)
    if path.exists():
        return False
    _store(path, build())
    return True


def _prepared_path(cache_dir: Path, key: tuple) -> Path:
    return cache_dir / f"{hashlib.sha256(repr(key).encode()).hexdigest()[:32]}.pickle"


def _store(path: Path, value: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".{os.getpid()}.partial")
    partial.write_bytes(pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL))
    os.replace(partial, path)  # atomic: another worker reads all of it or nothing


def simulation_folders(root: Path, partition: str, name: str) -> tuple[Path, Path]:
    """A simulated campus's data folder and the folder its prepared examples are shared in (:func:`prepared`),
    under the simulation's folder ``root``, for campus ``name`` of the sub-folder ``partition``."""
    return root / partition / name, root / _PREPARED / partition / name


def run_id(config, context) -> str:
    """The run a request belongs to, as the privacy ledger and audit log key it: the coordinator's
    ``run-name`` in the request's config (kept by a resumed run), else Flower's run id."""
    return str(config.get("run-name") or context.run_id)
