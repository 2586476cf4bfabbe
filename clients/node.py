"""Where a campus's data, state and policy come from (see :mod:`clients.app`)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from edufl.federation.errors import EduflError
from edufl.federation.policy import RESEARCH_POLICY, CampusPolicy

__all__ = ["CampusRefusal", "CampusSetup", "SIM_ENV", "SIM_MANIFEST", "campus_setup", "run_id"]

SIM_ENV = "EDUFL_SIM_DIR"
"""Simulation only: the environment variable naming the folder of per-campus data folders."""
SIM_MANIFEST = "campuses.json"
"""Simulation only: the manifest in that folder mapping each virtual SuperNode's partition-id to its campus."""


class CampusRefusal(EduflError):
    """The campus does not take part: a requested round would break its policy, take an ε past its limit or
    change the run's privacy settings; or, at ``edufl campus start``, the coordinator cannot be trusted or
    turns the campus away, or its SuperNode or code-approval gate stops with an error (exit status 1)."""


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
        policy = CampusPolicy.load(manifest["policy"]) if manifest["policy"] else RESEARCH_POLICY
        mapping = Path(manifest["mapping"]) if manifest.get("mapping") else None  # None: OULAD layout
        return CampusSetup(name, root / name, Path(manifest["state-root"]) / name, policy, mapping)
    raise RuntimeError("this SuperNode has no campus data: start it with --node-config \"data-dir='DIR' campus='NAME'\"")


def run_id(config, context) -> str:
    """The run a request belongs to, as the privacy ledger and audit log key it: the coordinator's
    ``run-name`` in the request's config (kept by a resumed run), else Flower's run id."""
    return str(config.get("run-name") or context.run_id)
