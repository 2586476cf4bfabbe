"""Where a campus's data, state and policy come from (see :mod:`clients.app`)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from edufl.federation.policy import CampusPolicy
from edufl.federation.runconfig import SIM_ENV, SIM_MANIFEST


class CampusRefusal(RuntimeError):
    """A requested round would break the campus's policy, take an ε past its limit, or change the run's privacy settings."""


@dataclass(frozen=True)
class CampusSetup:
    """What the campus operator configured: name, data folder, state folder, policy (None: no policy)
    and the mapping file of its export to the learner-record contract (None: the OULAD layout)."""

    name: str
    data_dir: Path
    state_dir: Path
    policy: CampusPolicy | None
    mapping: Path | None = None


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
    if "partition-id" in node_config and os.environ.get(SIM_ENV):
        root = Path(os.environ[SIM_ENV])
        manifest = json.loads((root / SIM_MANIFEST).read_text())
        name = manifest["campuses"][int(node_config["partition-id"])]
        policy = CampusPolicy.load(manifest["policy"]) if manifest["policy"] else None
        mapping = Path(manifest["mapping"]) if manifest.get("mapping") else None  # None: OULAD layout
        return CampusSetup(name, root / name, Path(manifest["state-root"]) / name, policy, mapping)
    raise RuntimeError("this SuperNode has no campus data: start it with --node-config \"data-dir='DIR' campus='NAME'\"")


def run_id(config, context) -> str:
    """The run a request belongs to, as the privacy ledger and audit log key it: the coordinator's
    ``run-name`` in the request's config (kept by a resumed run), else Flower's run id."""
    return str(config.get("run-name") or context.run_id)
