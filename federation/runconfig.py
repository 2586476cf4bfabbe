"""The run configuration shared by coordinator and campuses.

Flower carries the run configuration as a flat ``ConfigRecord`` with dashed
keys (``target-epsilon``); :class:`RunConfig` is its typed, validated form.
A campus re-validates every configuration it receives before touching data.
The allowed values and ranges are the fields' constraints; this module has no
heavy imports, so that the command line (and the simulation engine with it)
starts before torch loads.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal, get_args

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic.fields import FieldInfo
from pydantic_core import ErrorDetails

from .contract import CONTRACT_VERSION, parse_version, version_text
from .errors import UserError
from .schema import FederationSchema, SchemaError, schema_from_text
from .wire import EVALUATE_RECEIVED

__all__ = [
    "CAMPUS_BY",
    "CENTRAL_DP",
    "MODELS",
    "SECURE_AGGREGATION",
    "SPLITS",
    "STRATEGIES",
    "TASKS",
    "CampusBy",
    "ConfigError",
    "LocalEpochs",
    "Model",
    "Rounds",
    "RunConfig",
    "Strategy",
    "Task",
]

Task = Literal["withdrawal", "at_risk", "final_result", "term1_dropout"]
Split = Literal["stratified", "temporal"]
Model = Literal["mlp", "logistic"]
Strategy = Literal["fedavg", "fedprox", "fedadam"]
CampusBy = Literal["module", "region", "shard"]
CentralDP = Literal["off", "fixed"]
SecureAggregation = Literal["off", "secaggplus"]
TASKS, SPLITS, MODELS, STRATEGIES, CAMPUS_BY, CENTRAL_DP, SECURE_AGGREGATION = (
    get_args(t) for t in (Task, Split, Model, Strategy, CampusBy, CentralDP, SecureAggregation)
)

# The upper bounds of the whole-number settings are far above any study: a run that large is a mistake.
Rounds = Annotated[int, Field(ge=1, le=10_000)]
LocalEpochs = Annotated[int, Field(ge=1, le=1_000)]
_Positive = Annotated[float, Field(gt=0, allow_inf_nan=False)]
_Fraction = Annotated[float, Field(gt=0, lt=1)]


class ConfigError(UserError):
    """A run configuration value outside its documented range, or an unknown key (exit status 2)."""


def _contract_version(text: str) -> str:
    try:
        parse_version(text)
    except ValueError:
        raise ValueError('MAJOR.MINOR, e.g. "1.0"') from None
    return text


def _federation_schema(text: str) -> str:
    try:
        schema_from_text(text)
    except SchemaError as err:
        raise ValueError(str(err)) from None
    return text


def _num_shares(shares: float) -> float:
    if shares > 1 and (shares != int(shares) or shares < 3):
        raise ValueError("a fraction of the campuses in (0, 1] or a whole number of shares >= 3")
    return shares


def _reconstruction_threshold(threshold: float) -> float:
    if threshold <= 0.5 or (threshold > 1 and threshold != int(threshold)):
        raise ValueError("a fraction of the shares in (0.5, 1] (a majority) or a whole number >= 2")
    return threshold


class RunConfig(BaseModel):
    """Every setting of a federated run (the ``[tool.flwr.app.config]`` keys, dashes as underscores).

    Each field's description gives its unit and meaning; its constraints are
    the allowed values. Values are strictly typed (a whole number is accepted
    where a decimal is expected, nothing else is converted), and the model is
    frozen.

    ``central_dp = "fixed"`` adds client-level (central) DP on the coordinator,
    on top of each campus's DP-SGD: it clips each campus's update (new weights
    minus the round's global weights) to L2 norm ``central_clipping_norm`` and
    adds Gaussian noise of ``central_noise_multiplier`` times that norm to
    their sum (the mean's noise is that divided by the number of campuses).

    ``secure_aggregation = "secaggplus"`` runs the training rounds through
    Flower's SecAgg+ protocol (``SecAggPlusWorkflow`` on the coordinator,
    ``secaggplus_mod`` on the campuses): the coordinator receives only masked
    updates and learns only their example-weighted sum.

    ``split = "temporal"`` needs a federation schema declaring ``[temporal_split]``
    (:class:`~federation.schema.TemporalSplit`); without one, the run is refused.

    Raises
    ------
    ConfigError
        On an unknown key or any value outside its range; the message names
        each offending dashed key, the value and what was expected.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    task: Task = Field("withdrawal", description="what the model predicts for each registration (federation.tasks)")
    num_rounds: Rounds = Field(10, description="federated rounds: local training on every campus, then aggregation")
    local_epochs: LocalEpochs = Field(1, description="passes over its training rows each campus makes per round")
    batch_size: int = Field(64, ge=1, le=1_000_000, description="expected batch size of DP-SGD's Poisson sampling, in rows")
    learning_rate: _Positive = Field(0.3, description="SGD step size of local training")
    model: Model = Field("mlp", description="the network every campus trains (federation.models)")
    strategy: Strategy = Field("fedavg", description="how the coordinator aggregates the campuses' weights")
    proximal_mu: float = Field(
        0.01, ge=0, allow_inf_nan=False, description="weight of FedProx's proximal term (strategy fedprox only)"
    )
    dp: bool = Field(
        True,
        description="DP-SGD on every campus; false trains without noise (research only: every campus policy file refuses it)",
    )
    target_epsilon: _Positive = Field(3.0, description="ε each campus spends on the whole run at delta (DP-SGD)")
    delta: _Fraction = Field(1e-5, description="δ of every campus's (ε, δ) guarantee")
    max_grad_norm: _Positive = Field(1.0, description="L2 norm each example's gradient is clipped to (DP-SGD)")
    cutoff_day: int = Field(
        60,
        description="day of the module presentation (days from its start) up to which "
        "the features are read: the early-warning point",
    )
    split: Split = Field(
        "stratified", description="how each campus's rows split into training and test rows (federation.tasks.split)"
    )
    campus_by: CampusBy = Field("module", description="simulation: what makes OULAD's rows one campus")
    shards: int = Field(50, ge=1, le=100_000, description="simulation: the number of campuses of campus-by shard")
    test_fraction: _Fraction = Field(0.2, description="share of each campus's rows held out for testing (split stratified)")
    seed: int = Field(0, description="seed of splits, model initialisation and, with reproducible-noise, DP noise")
    min_campuses: int = Field(2, ge=1, le=100_000, description="campuses a round needs: the coordinator waits for this many")
    round_timeout: _Positive = Field(3600.0, description="seconds a round waits for the campuses' replies")
    out: str = Field("results/run", description="the coordinator's results folder")
    run_name: str = Field(
        "",
        description="the coordinator's name for the run, which keys each campus's privacy "
        "ledger, so that a resumed run keeps spending the same run budget; empty: "
        "Flower's run id",
    )
    central_dp: CentralDP = Field(
        "off", description="client-level DP on the coordinator, on top of DP-SGD (see the class docstring)"
    )
    central_noise_multiplier: _Positive = Field(1.0, description="central DP: noise standard deviation over the clipping norm")
    central_clipping_norm: _Positive = Field(1.0, description="central DP: L2 norm each campus's update is clipped to")
    contract_version: Annotated[str, AfterValidator(_contract_version)] = Field(
        version_text(CONTRACT_VERSION),
        description="the learner-record contract (MAJOR.MINOR) the run's code reads; "
        "a campus mapped to a contract it cannot read (another major, or "
        "a newer minor version) refuses to join",
    )
    federation_schema: Annotated[str, AfterValidator(_federation_schema)] = Field(
        "",
        description="the federation schema (federation.schema, as its JSON text): the vocabularies, outcomes, "
        "attributes and modules every campus checks its data against before it trains or answers; empty: OULAD's",
    )
    secure_aggregation: SecureAggregation = Field(
        "off", description="secure aggregation of the training rounds (see the class docstring)"
    )
    secagg_num_shares: Annotated[_Positive, AfterValidator(_num_shares)] = Field(
        1.0,
        description="SecAgg+: shares each campus's secrets are split into; <= 1: that fraction of the campuses, "
        "above 1: that many",
    )
    secagg_reconstruction_threshold: Annotated[_Positive, AfterValidator(_reconstruction_threshold)] = Field(
        0.67,
        description="SecAgg+: shares that rebuild a secret; <= 1: that fraction of the shares (more than half), "
        "above 1: that many",
    )
    secagg_max_weight: _Positive = Field(
        100000.0, description="SecAgg+: the largest weight (training rows) of one campus in the masked sum"
    )
    evaluate_in_train: bool = Field(
        True,
        description="each campus evaluates the global model it receives for training on its test rows and sends "
        "those metrics with its training reply: one exchange per round (the last round's model is evaluated by "
        "one more exchange); false: a separate evaluation exchange after every round. SecAgg+ runs always "
        "evaluate separately",
    )
    reproducible_noise: bool = Field(
        False,
        description="DP noise and batch sampling follow the seed (research only: "
        "the coordinator knows the seed; every campus policy file "
        "refuses it)",
    )

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as err:
            raise ConfigError("; ".join(_problem(e) for e in err.errors())) from None

    @model_validator(mode="after")
    def _combinations(self) -> RunConfig:
        if self.split == "temporal" and self.schema.temporal_split is None:
            example = 'train = "2013*", test = "2014*"'
            raise ValueError(
                "split = 'temporal' needs the federation schema to say which presentations it trains and tests on, "
                f"and federation schema {self.schema.name!r} declares no [temporal_split]; add that table to it with keys "
                f"train and test, each a glob pattern the whole presentation code matches (OULAD's: {example}), "
                "or use split stratified"
            )
        if self.central_dp != "off" and self.strategy == "fedadam":
            # FedAdam's server step rescales the averaged update before the wrapper adds
            # noise, so the noise would no longer match one campus's clipped influence.
            raise ValueError(f"central-dp = {self.central_dp!r} needs strategy fedavg or fedprox, not fedadam")
        shares, threshold = self.secagg_num_shares, self.secagg_reconstruction_threshold
        if threshold > 1 and shares > 1 and not (shares / 2 < threshold < shares):
            raise ValueError(
                f"secagg-reconstruction-threshold = {threshold:g} with secagg-num-shares = {shares:g}; "
                "expected more than half of the shares and fewer than all of them"
            )
        if self.secure_aggregation == "off":
            return self
        if self.central_dp != "off":
            # The wrapper clips each campus's update on the coordinator, which under SecAgg+ sees only the sum.
            raise ValueError(
                f"secure-aggregation = {self.secure_aggregation!r} cannot be combined with "
                f"central-dp = {self.central_dp!r}: the coordinator sees only the sum of the updates, "
                "not the individual updates central DP clips"
            )
        if self.strategy == "fedadam":
            raise ValueError(f"secure-aggregation = {self.secure_aggregation!r} needs strategy fedavg or fedprox, not fedadam")
        return self

    @property
    def schema(self) -> FederationSchema:  # type: ignore[override]  # BaseModel.schema: pydantic 1's, deprecated
        """The run's federation schema (OULAD's when ``federation_schema`` is empty)."""
        return schema_from_text(self.federation_schema)

    def to_flower(self) -> dict[str, int | float | str | bool]:
        """The flat dict with dashed keys that Flower's ConfigRecord and run config use."""
        return {_key(k): v for k, v in self.model_dump().items()}

    @classmethod
    def from_flower(cls, values: Mapping[str, Any]) -> RunConfig:
        """Build from a Flower run config or ConfigRecord (dashed keys; ``server-round`` and
        :data:`~federation.wire.EVALUATE_RECEIVED` are ignored: they are per message).

        Raises
        ------
        ConfigError
            On an unknown key or an invalid value.
        """
        names = {_key(name): name for name in cls.model_fields}
        unknown = sorted(set(values) - set(names) - {"server-round", EVALUATE_RECEIVED})
        if unknown:
            raise ConfigError(f"unknown configuration key(s): {', '.join(unknown)}")
        return cls(**{names[key]: value for key, value in values.items() if key in names})


def _key(name: str) -> str:
    return name.replace("_", "-")


def _problem(error: ErrorDetails) -> str:
    """One validation error as a sentence naming the dashed key, the value and what was expected."""
    if not error["loc"]:  # a combination of settings: the validator's own sentence
        return str(error["ctx"]["error"])
    name = str(error["loc"][0])
    if error["type"] == "extra_forbidden":
        return f"unknown configuration key(s): {_key(name)}"
    field = RunConfig.model_fields[name]
    if error["type"].endswith("_type"):
        kind = field.annotation.__name__ if isinstance(field.annotation, type) else "value"
        expected = f"{'an' if kind[0] in 'aeiou' else 'a'} {kind}"
    elif error["type"] == "value_error":
        expected = str(error["ctx"]["error"])
    else:
        expected = _expected(field)
    return f"{_key(name)} = {error['input']!r}; expected {expected}"


def _expected(field: FieldInfo) -> str:
    """What ``field`` takes, from its type and constraints: e.g. "a whole number from 1 to 10000"."""
    choices = get_args(field.annotation)
    if choices:
        return f"one of {', '.join(choices)}"
    bounds = {name: getattr(m, name) for m in field.metadata for name in ("ge", "gt", "le", "lt") if hasattr(m, name)}
    if field.annotation is int:
        return f"a whole number from {bounds['ge']} to {bounds['le']}"
    if "lt" in bounds:
        return f"a number in ({bounds['gt']:g}, {bounds['lt']:g})"
    if "gt" in bounds:
        return f"a finite number > {bounds['gt']:g}"
    return f"a finite number >= {bounds['ge']:g}"
