"""A campus's privacy policy: the limits its data steward sets, checked against every request.

The policy is a TOML file kept by the campus (never sent by the coordinator).
Every key is optional; a missing key takes the safe default below, and a
campus always runs under a policy (``CampusPolicy()`` when no file is given).
Each key's allowed values follow its comment::

    [privacy]
    max_epsilon_per_run = 3.0     # ε of one run, at the policy's δ; > 0 and <= 100
    total_epsilon_budget = 10.0   # ε over all runs on this campus's dataset; > 0 and <= 1000
    delta = 1e-5                  # δ of every guarantee (a run may ask for less); > 0 and < 0.01
    min_noise_multiplier = 0.5    # DP-SGD and statistics noise never below this, whatever ε allows; 0 to 100
    [training]
    max_rounds = 50               # a whole number from 1 to 10000
    max_local_epochs = 5          # a whole number from 1 to 1000
    allowed_tasks = ["withdrawal"]  # some of "withdrawal", "at_risk", "final_result" ([]: no training)
    [release]
    min_cohort_size = 10          # no metric or statistic on fewer records; a whole number from 1 to 1000000
    [apps]
    approved_fab_hashes = []      # SHA-256 of each app bundle (FAB) the data steward approved (64 hex digits)
    [data]
    approved_schemas = ["..."]    # SHA-256 of each federation schema the data steward approved (default: OULAD's)

Values are strictly typed: a number is written as a TOML number (``"3"`` is a
string and is refused; a whole number such as ``3`` is accepted where a
decimal is expected), a count as a whole number (``50.0`` is refused), a list
as a TOML list, and ``inf`` or ``nan`` are refused everywhere. The upper
bounds are far above any sensible setting: a value beyond them is a mistake
(a typo, a missing minus sign in an exponent), not a policy. An unknown
section or key is refused too, so a typo never silently leaves a limit at its
default.

``[apps]`` is code approval. A deployed campus (``edufl campus start``) starts a
ClientApp only for a run whose app bundle's SHA-256 (what Flower calls the
run's ``fab_hash``: the digest of the ``.fab`` file ``flwr build`` writes, and
of the bundle ``flwr run`` submits) is listed; the check is made by the
campus's own code before any code of the bundle runs (:mod:`clients.approval`).
An empty or missing list approves no bundle: the campus refuses every run, and
says so when it starts. ``edufl campus approve FAB_OR_APP_DIR --policy FILE``
prints a bundle's hash and adds it here. On the simulation engine (``edufl
simulate``, ``edufl analytics run`` without a SuperLink) there is no bundle:
the virtual campuses run the local edufl code in-process, and the list does
not apply.

``[data]`` is schema approval. A run carries its federation schema (:mod:`federation.schema`), and the
campus checks its data against it; a campus that answered any schema a coordinator sent would let it probe
the data (a category dropped from a vocabulary, a narrower range of an attribute: refused or not, one bit a
run, none of it charged to ε). So a campus takes part only in runs whose schema's SHA-256 is listed, checked
before any record is read; ``edufl campus validate --schema FILE`` prints the digest to list. The default
lists OULAD's schema only.

A run configuration may only be stricter than the policy: :meth:`CampusPolicy.check`
lists every key a request would loosen, so that the campus can refuse it, say
why, and log the refusal. A request for reproducible noise (``reproducible-noise``,
research only: the noise would follow the run's seed, which the coordinator
knows) is refused under every policy file; no key allows it.

Two policies apply when no file is given. A deployed campus runs under the
safe defaults, ``CampusPolicy()``. A virtual campus of a simulation run
without ``--policy`` runs under :data:`RESEARCH_POLICY`, which refuses no
setting (see :class:`ResearchPolicy`); no file can ask for it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field

from .errors import UserError
from .runconfig import TASKS, RunConfig, Task
from .schema import FederationSchema, load_schema
from .tomlfile import listed, load_model

__all__ = [
    "RESEARCH_POLICY",
    "AppApproval",
    "CampusPolicy",
    "DataApproval",
    "PolicyError",
    "PrivacyLimits",
    "ReleaseLimits",
    "ResearchPolicy",
    "TrainingLimits",
]


class PolicyError(UserError):
    """A policy file that cannot be read, or holds an unknown key or a value out of range (exit status 2)."""


class _Section(BaseModel):
    # strict: a string is never a number, a decimal never a count, a bool neither (an int is a valid float)
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class PrivacyLimits(_Section):
    max_epsilon_per_run: float = Field(3.0, gt=0, le=100, allow_inf_nan=False)
    total_epsilon_budget: float = Field(10.0, gt=0, le=1000, allow_inf_nan=False)
    delta: float = Field(1e-5, gt=0, lt=0.01, allow_inf_nan=False)
    min_noise_multiplier: float = Field(0.5, ge=0, le=100, allow_inf_nan=False)


class TrainingLimits(_Section):
    max_rounds: int = Field(50, ge=1, le=10_000)
    max_local_epochs: int = Field(5, ge=1, le=1_000)
    allowed_tasks: Annotated[tuple[Task, ...], BeforeValidator(listed)] = ("withdrawal",)


class ReleaseLimits(_Section):
    min_cohort_size: int = Field(10, ge=1, le=1_000_000)


def _sha256_of(what: str) -> Callable[[str], str]:
    """The validator of a SHA-256 (64 hex digits, stored lowercase) of ``what``."""

    def check(value: str) -> str:
        if not re.fullmatch(r"[0-9a-fA-F]{64}", value):
            raise ValueError(f"{value!r} is not the SHA-256 of {what} (64 hex digits)")
        return value.lower()

    return check


_FabHash = Annotated[str, AfterValidator(_sha256_of("an app bundle"))]
_SchemaHash = Annotated[str, AfterValidator(_sha256_of("a federation schema"))]


class AppApproval(_Section):
    """The app bundles (FABs) the data steward approved, by SHA-256 (see the module docstring)."""

    approved_fab_hashes: Annotated[
        tuple[Annotated[str, AfterValidator(_sha256_of("an app bundle"))], ...], BeforeValidator(listed)
    ] = ()

    def refusal(self, fab_hash: str) -> str | None:
        """Why the app bundle with SHA-256 ``fab_hash`` may not run on this campus; None when it is approved."""
        if fab_hash.lower() in self.approved_fab_hashes:
            return None
        why = f"apps.approved_fab_hashes: app bundle {fab_hash or '(no hash)'} is not approved by the campus's data steward"
        return why if self.approved_fab_hashes else f"{why} (the policy approves no app bundle)"


class DataApproval(_Section):
    """The federation schemas the data steward approved, by SHA-256 (see the module docstring)."""

    approved_schemas: Annotated[
        tuple[Annotated[str, AfterValidator(_sha256_of("a federation schema"))], ...], BeforeValidator(listed)
    ] = (load_schema().digest,)


class CampusPolicy(_Section):
    """The campus's limits (see the module docstring for the file format and defaults)."""

    privacy: PrivacyLimits = PrivacyLimits()
    training: TrainingLimits = TrainingLimits()
    release: ReleaseLimits = ReleaseLimits()
    apps: AppApproval = AppApproval()
    data: DataApproval = DataApproval()

    def schema_refusal(self, schema: FederationSchema) -> str | None:
        """Why a run under federation ``schema`` may not read this campus's data (policy key
        ``data.approved_schemas``); None when the schema is approved."""
        if schema.digest in self.data.approved_schemas:
            return None
        return f"federation schema {schema.name!r} (sha256 {schema.digest}) is not approved by the campus's data steward"

    @classmethod
    def load(cls, path: str | Path | None) -> CampusPolicy:
        """The policy in the TOML file ``path`` (the safe defaults when ``path`` is None).

        Raises
        ------
        PolicyError
            When the file is missing or not TOML, or a key is unknown or out of
            range; the message names the file and each offending key.
        """
        if path is None:
            return cls()
        return load_model(cls, path, PolicyError, "policy file")

    def check(self, cfg: RunConfig) -> list[tuple[str, str]]:
        """Every way ``cfg`` would loosen this policy, as (policy key, explanation) pairs.

        An empty list means the request is within the policy. DP off, a run ε
        above ``max_epsilon_per_run``, a δ above ``delta``, more rounds or local
        epochs than allowed, or a task not allowed are each reported, and so is
        reproducible noise (key ``reproducible-noise``), which no policy file allows.
        The noise floor and the total budget depend on the campus's data and
        ledger and are enforced when a round is planned (see ``clients.app``).
        """
        p, t = self.privacy, self.training
        found = []
        if not cfg.dp:
            found.append(("privacy.max_epsilon_per_run", "the run asks for no differential privacy (noise 0)"))
        elif cfg.target_epsilon > p.max_epsilon_per_run:
            found.append(("privacy.max_epsilon_per_run", f"target-epsilon {cfg.target_epsilon:g} > {p.max_epsilon_per_run:g}"))
        if cfg.delta > p.delta:
            found.append(("privacy.delta", f"delta {cfg.delta:g} > {p.delta:g}"))
        if cfg.num_rounds > t.max_rounds:
            found.append(("training.max_rounds", f"num-rounds {cfg.num_rounds} > {t.max_rounds}"))
        if cfg.local_epochs > t.max_local_epochs:
            found.append(("training.max_local_epochs", f"local-epochs {cfg.local_epochs} > {t.max_local_epochs}"))
        if cfg.task not in t.allowed_tasks:
            found.append(("training.allowed_tasks", f"task {cfg.task!r} is not one of {', '.join(t.allowed_tasks) or '(none)'}"))
        if why := self.schema_refusal(cfg.schema):
            found.append(("data.approved_schemas", why))
        if cfg.reproducible_noise:
            found.append(
                (
                    "reproducible-noise",
                    "the run asks for DP noise and batch sampling that follow its seed, so the "
                    "coordinator, which knows the seed, could predict the noise and subtract "
                    "it; no campus policy allows this (research simulations only)",
                )
            )
        return found

    def over_budget(self, spent: list[tuple[float, float, int]], planned: tuple[float, float, int]) -> str | None:
        """Why the release ``planned`` (σ, q, steps) may not follow the dataset's releases ``spent``
        under ``privacy.total_epsilon_budget`` (ε composed at the policy's δ); None when it may."""
        from .privacy import epsilon  # Opacus: loaded only where a campus accounts, not by the command line

        limits = self.privacy
        total = epsilon([*spent, planned], limits.delta)
        if total <= limits.total_epsilon_budget:
            return None
        return (
            f"privacy.total_epsilon_budget: the dataset's ε over all runs would reach {total:.3f} > "
            f"{limits.total_epsilon_budget:g} (spent {epsilon(spent, limits.delta):.3f})"
        )

    def noise_multiplier(self, calibrated: float) -> float:
        """The noise multiplier a round uses: the calibrated one, never below ``min_noise_multiplier``."""
        return max(calibrated, self.privacy.min_noise_multiplier)


class ResearchPolicy(CampusPolicy):
    """The policy of a simulated campus run without ``--policy``: research settings run as asked.

    :meth:`check` finds nothing to refuse, so DP off, reproducible noise and any
    ε, δ, round count, local epochs or task run; its limits (see
    :data:`RESEARCH_POLICY`) put no cap on ε or δ and no floor under the noise.
    Only the release limit stays that of the safe defaults: no metric or
    statistic on fewer than ``release.min_cohort_size`` records.

    Research only: the campuses of a simulation are virtual, their data the
    study's, and the person asking is the person whose data it is to use. A
    policy file is always read as a :class:`CampusPolicy`, so no campus can
    run under this one.
    """

    def check(self, cfg: RunConfig) -> list[tuple[str, str]]:
        """Nothing: every request is within the research policy."""
        return []

    def schema_refusal(self, schema: FederationSchema) -> str | None:
        """None: a simulated campus reads its data under any federation schema."""
        return None

    def over_budget(self, spent: list[tuple[float, float, int]], planned: tuple[float, float, int]) -> str | None:
        """None: the research policy sets no total budget (nothing to account at its δ of 1)."""
        return None


RESEARCH_POLICY = ResearchPolicy.model_construct(
    # built without validation: "no cap" (inf, δ up to 1) is outside what a policy file may write
    privacy=PrivacyLimits.model_construct(
        max_epsilon_per_run=math.inf, total_epsilon_budget=math.inf, delta=1.0, min_noise_multiplier=0.0
    ),
    training=TrainingLimits(max_rounds=10_000, max_local_epochs=1_000, allowed_tasks=TASKS),
    release=ReleaseLimits(),
    apps=AppApproval(),
    data=DataApproval(),
)
"""What a simulated campus without ``--policy`` runs under: no ε cap (per run or in total), δ up to 1,
no noise floor, the most rounds and local epochs a run may have, every task, and the safe default's
``release.min_cohort_size`` (10)."""
