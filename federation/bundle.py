"""The app bundle (Flower's FAB): the code a coordinator submits and a campus approves by SHA-256.

The bundle holds exactly the modules the ServerApp and ClientApp execute
(:data:`APP_MODULES`, laid out as the ``edufl`` package), the export mappings and
OULAD's federation schema they read, and a ``pyproject.toml`` declaring the two apps with
:class:`~edufl.federation.runconfig.RunConfig`'s defaults as the app config
(plus an empty ``statistic-query``: set, it makes the ServerApp answer that DP
statistic instead of training).
Commands, certificates, process supervision, plots and the approval gate stay
outside it, so editing them leaves every campus's approval valid. Files are read
from the installed edufl (a wheel or an editable checkout), and the bundle is
built by Flower's own ``build_fab_from_disk``: the hash equals the ``fab_hash``
Flower gives the run.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import tomli_w

from .queries import QUERY_KEY
from .runconfig import ConfigError, RunConfig

__all__ = ["APP_MODULES", "COMPONENTS", "app_folder", "bundle_sha256", "installed_sources", "stage"]

# Every edufl module the ServerApp and ClientApp import, lazily imported ones included
# (tests/test_approval.py checks this list against what the apps really import).
APP_MODULES = (
    "edufl.clients.app",
    "edufl.clients.audit_trail",
    "edufl.clients.gate",
    "edufl.clients.guard",
    "edufl.clients.node",
    "edufl.clients.query_budget",
    "edufl.clients.reply_checks",
    "edufl.clients.secagg",
    "edufl.clients.secagg_checks",
    "edufl.server.analytics",
    "edufl.server.app",
    "edufl.server.checkpoint",
    "edufl.server.combine",
    "edufl.server.replies",
    "edufl.server.reporting",
    "edufl.server.results",
    "edufl.server.secagg",
    "edufl.server.strategies",
    "edufl.server.training",
    "edufl.federation.audit",
    "edufl.federation.contract",
    "edufl.federation.engagement",
    "edufl.federation.errors",
    "edufl.federation.fingerprint",
    "edufl.federation.ledger",
    "edufl.federation.mapping",
    "edufl.federation.metrics",
    "edufl.federation.models",
    "edufl.federation.policy",
    "edufl.federation.privacy",
    "edufl.federation.problems",
    "edufl.federation.proto.analytics_pb2",
    "edufl.federation.proto.audit_pb2",
    "edufl.federation.proto.learner_pb2",
    "edufl.federation.queries",
    "edufl.federation.randomness",
    "edufl.federation.reading",
    "edufl.federation.references",
    "edufl.federation.runconfig",
    "edufl.federation.schema",
    "edufl.federation.secaggplus",
    "edufl.federation.statistics",
    "edufl.federation.store",
    "edufl.federation.tables",
    "edufl.federation.tasks",
    "edufl.federation.tomlfile",
    "edufl.federation.training",
    "edufl.federation.validation",
    "edufl.federation.wire",
)
COMPONENTS = {"serverapp": "edufl.server.app:app", "clientapp": "edufl.clients.app:app"}
PUBLISHER = "edufl"
_DATA = ("federation/mappings", "federation/schemas")  # data files the apps read, bundled whole


def installed_sources() -> dict[str, Path]:
    """{subpackage: folder} of the installed edufl: ``{"federation": .../federation, "clients": ..., "server": ...}``."""
    found = {}
    for part in ("federation", "clients", "server"):
        spec = importlib.util.find_spec(f"edufl.{part}")
        if spec is None or not spec.submodule_search_locations:
            raise ConfigError(f"edufl.{part} is not installed: reinstall edufl (pip install edufl)")
        found[part] = Path(next(iter(spec.submodule_search_locations)))
    return found


def _files(sources: Mapping[str, Path]) -> dict[str, Path]:
    """{path in the bundle: source file} for :data:`APP_MODULES`, their packages' ``__init__.py`` and the data files."""
    files: dict[str, Path] = {}
    for module in APP_MODULES:
        part, *rest = module.split(".")[1:]
        for depth in range(len(rest)):  # each package on the way down, e.g. federation/proto/__init__.py
            package = "/".join([part, *rest[:depth]])
            files[f"edufl/{package}/__init__.py"] = sources[part].joinpath(*rest[:depth], "__init__.py")
        files[f"edufl/{part}/{'/'.join(rest)}.py"] = sources[part].joinpath(*rest[:-1], f"{rest[-1]}.py")
    for folder in _DATA:
        part, *rest = folder.split("/")
        for path in sorted(sources[part].joinpath(*rest).iterdir()):
            if path.is_file():
                files[f"edufl/{folder}/{path.name}"] = path
    return files


def _pyproject() -> dict[str, Any]:
    return {
        "build-system": {"requires": ["setuptools>=69"], "build-backend": "setuptools.build_meta"},
        "project": {"name": "edufl", "version": importlib.metadata.version("edufl"), "dependencies": []},
        "tool": {
            "flwr": {
                "app": {"publisher": PUBLISHER, "components": COMPONENTS, "config": {**RunConfig().to_flower(), QUERY_KEY: ""}}
            }
        },
    }


def stage(dest: Path, sources: Mapping[str, Path] | None = None) -> Path:
    """Write the app folder to the new folder ``dest`` and return it: ``pyproject.toml``, an empty
    ``edufl/__init__.py`` and the bundled files, copied from ``sources`` ({subpackage: folder};
    default :func:`installed_sources`).

    Raises
    ------
    ConfigError
        When a bundled file is missing from ``sources``.
    """
    dest = Path(dest)
    dest.mkdir(parents=True)
    (dest / "pyproject.toml").write_text(tomli_w.dumps(_pyproject()))
    (dest / "edufl").mkdir()
    (dest / "edufl" / "__init__.py").write_bytes(b"")
    for target, source in _files(sources or installed_sources()).items():
        if not source.is_file():
            raise ConfigError(f"{source}: missing from this edufl installation (the app bundle needs it as {target})")
        (dest / target).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, dest / target)
    return dest


@contextmanager
def app_folder() -> Iterator[Path]:
    """The installed edufl's app folder (:func:`stage`), in a temporary folder removed on leaving."""
    with tempfile.TemporaryDirectory(prefix="edufl-app-") as tmp:
        yield stage(Path(tmp) / "edufl")


def bundle_sha256(path: Path | None = None) -> tuple[str, str]:
    """(SHA-256, "publisher/name version") of the app bundle ``path``: a ``.fab`` file, or an app folder
    built into one as ``flwr run`` builds it; None: this installed edufl's bundle (:func:`app_folder`).

    Raises
    ------
    ConfigError
        When ``path`` is neither a readable FAB nor a Flower app folder.
    """
    # Flower's CLI stack loads in ~0.4 s: only when a bundle is built, so that `edufl simulate`,
    # whose commands import this module, starts its engine without waiting for it.
    from flwr.cli.build import build_fab_from_disk
    from flwr.cli.config_utils import get_fab_metadata

    if path is None:
        with app_folder() as folder:
            return bundle_sha256(folder)
    path = Path(path)
    try:
        content = build_fab_from_disk(path) if path.is_dir() else path.read_bytes()
        fab_id, version = get_fab_metadata(content)
    except Exception as err:  # Flower raises click, zip, TOML and OS errors alike
        raise ConfigError(f"{path}: not a Flower app bundle (.fab) or app folder ({err})") from None
    return hashlib.sha256(content).hexdigest(), f"{fab_id} {version}"
