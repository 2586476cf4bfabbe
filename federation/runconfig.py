"""The run configuration shared by coordinator and campuses, and the message keys they exchange.

Flower carries the run configuration as a flat ``ConfigRecord`` with dashed
keys (``target-epsilon``); :class:`RunConfig` is its typed, validated form.
A campus re-validates every configuration it receives before touching data.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

from .contract import CATEGORICAL_FEATURES, CONTRACT_VERSION, FINAL_RESULTS, parse_version, version_text

# Allowed values of the run's choices. They live here, with no heavy imports, so
# that the command line starts (and the simulation engine with it) before torch loads.
TASKS = ("withdrawal", "at_risk", "final_result")
SPLITS = ("stratified", "temporal")
MODELS = ("mlp", "logistic")
STRATEGIES = ("fedavg", "fedprox", "fedadam")
CAMPUS_BY = ("module", "region", "shard")
CENTRAL_DP = ("off", "fixed")
SECURE_AGGREGATION = ("off", "secaggplus")

# Keys of records inside Flower messages (one place, used by both sides).
ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"
CAMPUS = "campus"
NUM_EXAMPLES = "num-examples"
# Error codes of a campus's error replies: it refused the request (its policy,
# its privacy budget, an invalid config), its release guard blocked the reply, or
# handling the message failed on the campus (the reason then is a fixed sentence).
REFUSED = 4000
BLOCKED = 4001
FAILED = 4002
# The metric keys of each reply (evaluate: per task, and the subgroup_keys below): the
# campus's release guard lets no other key leave.
TRAIN_METRICS = (NUM_EXAMPLES, "train-loss", "epsilon", "delta", "noise-multiplier", "sample-rate", "steps")
_BINARY_METRICS = ("auc", "average-precision", "f1", "brier", "loss")
EVALUATE_METRICS = {
    "withdrawal": (NUM_EXAMPLES, *_BINARY_METRICS),
    "at_risk": (NUM_EXAMPLES, *_BINARY_METRICS),
    "final_result": (NUM_EXAMPLES, "macro-f1", "accuracy", "macro-auc", *(f"f1-{c}" for c in FINAL_RESULTS), "loss"),
}
# The metric each task is judged by: in the worst-campus figure, study tables and plots, and per subgroup.
PRIMARY_METRIC = {"withdrawal": "auc", "at_risk": "auc", "final_result": "macro-f1"}
# The fairness view: besides EVALUATE_METRICS, a campus releases, for every value of these
# attributes held by at least release.min_cohort_size of its test rows, that group's number
# of test rows and the task's primary metric on them (subgroup_keys); smaller groups are not
# sent (see federation.training.subgroup_metrics).
SUBGROUPS = {a: CATEGORICAL_FEATURES[a] for a in ("gender", "age_band", "disability", "imd_band")}

# Simulation only: the folder of per-campus data folders, and the manifest in it
# mapping each virtual SuperNode's partition-id to its campus.
SIM_ENV = "EDUFL_SIM_DIR"
SIM_MANIFEST = "campuses.json"


def subgroup_keys(task: str) -> dict[tuple[str, str], tuple[str, str]]:
    """The declared per-subgroup metric keys of ``task``'s evaluate replies.

    Returns
    -------
    dict
        ``(attribute, value) -> (count key, metric key)`` for every value of
        every attribute of :data:`SUBGROUPS`, e.g. ``("gender", "F") ->
        ("group:gender=F:num-examples", "group:gender=F:auc")``.
    """
    metric = PRIMARY_METRIC[task]
    return {(a, v): (f"group:{a}={v}:{NUM_EXAMPLES}", f"group:{a}={v}:{metric}")
            for a, vocab in SUBGROUPS.items() for v in vocab}


LIMITS = {"num_rounds": 10_000, "local_epochs": 1_000, "batch_size": 1_000_000, "min_campuses": 100_000,
          "shards": 100_000}
"""The largest value of each whole-number setting (a run that large is a mistake, not a study)."""


class ConfigError(ValueError):
    """A run configuration value outside its documented range, or an unknown key."""


@dataclass(frozen=True)
class RunConfig:
    """Every setting of a federated run (the ``[tool.flwr.app.config]`` keys, dashes as underscores).

    ``run_name`` is the coordinator's name for the run: campuses key their
    privacy ledger by it, so a resumed run keeps spending the same run budget.
    Empty means Flower's run id.

    ``contract_version`` is the learner-record contract (MAJOR.MINOR) the run's
    code reads; a campus whose data are mapped to a contract it cannot read
    (another major version, or a newer minor one) refuses to join.

    ``central_dp`` adds client-level (central) DP on the coordinator, on top of
    each campus's DP-SGD: ``fixed`` clips each campus's update (new weights
    minus the round's global weights) to L2 norm ``central_clipping_norm`` and
    adds Gaussian noise of ``central_noise_multiplier`` times that norm to
    their sum (the mean's noise is that divided by the number of campuses).

    ``secure_aggregation = "secaggplus"`` runs the training rounds through
    Flower's SecAgg+ protocol (``SecAggPlusWorkflow`` on the coordinator,
    ``secaggplus_mod`` on the campuses): the coordinator receives only masked
    updates and learns only their example-weighted sum. Each campus's secrets
    are split into ``secagg_num_shares`` shares (a number <= 1: that fraction
    of the campuses; above 1: that many), any ``secagg_reconstruction_threshold``
    of which rebuild them (<= 1: that fraction of the shares, above 0.5 so that
    a majority is needed; above 1: that many). ``secagg_max_weight`` bounds a
    campus's weight (its training rows) in the masked sum.

    Raises
    ------
    ConfigError
        On any value outside its documented range (see :meth:`validate`).
    """

    task: str = "withdrawal"
    num_rounds: int = 10
    local_epochs: int = 1
    batch_size: int = 64
    learning_rate: float = 0.3
    model: str = "mlp"
    strategy: str = "fedavg"
    proximal_mu: float = 0.01
    dp: bool = True
    target_epsilon: float = 3.0
    delta: float = 1e-5
    max_grad_norm: float = 1.0
    cutoff_day: int = 60
    split: str = "stratified"
    campus_by: str = "module"
    shards: int = 50
    test_fraction: float = 0.2
    seed: int = 0
    min_campuses: int = 2
    round_timeout: float = 3600.0
    out: str = "results/run"
    run_name: str = ""
    central_dp: str = "off"
    central_noise_multiplier: float = 1.0
    central_clipping_norm: float = 1.0
    contract_version: str = version_text(CONTRACT_VERSION)
    secure_aggregation: str = "off"
    secagg_num_shares: float = 1.0
    secagg_reconstruction_threshold: float = 0.67
    secagg_max_weight: float = 100000.0
    reproducible_noise: bool = False

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check every field; raises ConfigError naming the key and the allowed range."""
        choices = {"task": TASKS, "model": MODELS, "strategy": STRATEGIES, "split": SPLITS, "campus_by": CAMPUS_BY,
                   "central_dp": CENTRAL_DP, "secure_aggregation": SECURE_AGGREGATION}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ConfigError(f"{_key(key)} = {getattr(self, key)!r}; expected one of {', '.join(allowed)}")
        for key, most in LIMITS.items():
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= most:
                raise ConfigError(f"{_key(key)} = {value!r}; expected a whole number from 1 to {most}")
        for key in ("learning_rate", "target_epsilon", "max_grad_norm", "round_timeout", "central_noise_multiplier",
                    "central_clipping_norm", "secagg_num_shares", "secagg_reconstruction_threshold", "secagg_max_weight"):
            value = getattr(self, key)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ConfigError(f"{_key(key)} = {value!r}; expected a finite number > 0")
        try:
            parse_version(self.contract_version)
        except ValueError as err:
            raise ConfigError(f"contract-version: {err}") from None
        if not (0 < self.delta < 1):
            raise ConfigError(f"delta = {self.delta!r}; expected a number in (0, 1)")
        if not (0 < self.test_fraction < 1):
            raise ConfigError(f"test-fraction = {self.test_fraction!r}; expected a number in (0, 1)")
        if not (math.isfinite(self.proximal_mu) and self.proximal_mu >= 0):
            raise ConfigError(f"proximal-mu = {self.proximal_mu!r}; expected a finite number >= 0")
        if self.central_dp != "off" and self.strategy == "fedadam":
            # FedAdam's server step rescales the averaged update before the wrapper adds
            # noise, so the noise would no longer match one campus's clipped influence.
            raise ConfigError(f"central-dp = {self.central_dp!r} needs strategy fedavg or fedprox, not fedadam")
        self._validate_secure_aggregation()

    def _validate_secure_aggregation(self) -> None:
        shares, threshold = self.secagg_num_shares, self.secagg_reconstruction_threshold
        if shares > 1 and (shares != int(shares) or shares < 3):
            raise ConfigError(f"secagg-num-shares = {shares!r}; expected a fraction of the campuses in (0, 1] "
                              "or a whole number of shares >= 3")
        if threshold <= 0.5 or (threshold > 1 and threshold != int(threshold)):
            raise ConfigError(f"secagg-reconstruction-threshold = {threshold!r}; expected a fraction of the shares "
                              "in (0.5, 1] (a majority) or a whole number >= 2")
        if threshold > 1 and shares > 1 and not (shares / 2 < threshold < shares):
            raise ConfigError(f"secagg-reconstruction-threshold = {threshold:g} with secagg-num-shares = {shares:g}; "
                              "expected more than half of the shares and fewer than all of them")
        if self.secure_aggregation == "off":
            return
        if self.central_dp != "off":
            # The wrapper clips each campus's update on the coordinator, which under SecAgg+ sees only the sum.
            raise ConfigError(f"secure-aggregation = {self.secure_aggregation!r} cannot be combined with "
                              f"central-dp = {self.central_dp!r}: the coordinator sees only the sum of the updates, "
                              "not the individual updates central DP clips")
        if self.strategy == "fedadam":
            raise ConfigError(f"secure-aggregation = {self.secure_aggregation!r} needs strategy fedavg or fedprox, "
                              "not fedadam")

    def to_flower(self) -> dict[str, int | float | str | bool]:
        """The flat dict with dashed keys that Flower's ConfigRecord and run config use."""
        return {_key(k): v for k, v in asdict(self).items()}

    @classmethod
    def from_flower(cls, values: dict) -> RunConfig:
        """Build from a Flower run config or ConfigRecord; unknown keys are refused.

        Raises
        ------
        ConfigError
            On an unknown key or an invalid value.
        """
        known = {_key(f.name): f for f in fields(cls)}
        unknown = sorted(set(values) - set(known) - {"server-round"})
        if unknown:
            raise ConfigError(f"unknown configuration key(s): {', '.join(unknown)}")
        kwargs = {}
        for key, value in values.items():
            if key not in known:
                continue
            kind = type(getattr(cls, known[key].name))
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if kind is not type(value):
                raise ConfigError(f"{key} = {value!r}; expected a {kind.__name__}")
            kwargs[known[key].name] = value
        return cls(**kwargs)


def _key(name: str) -> str:
    return name.replace("_", "-")
