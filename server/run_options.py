"""The command-line options of a federation run's settings, shared by ``edufl coordinator run`` and ``edufl simulate``.

:func:`run_settings` adds one option per :data:`RUN_OPTIONS` entry to a typer
command, each defaulting to :class:`~edufl.federation.runconfig.RunConfig`'s
value; the command receives them as ``settings``, the keyword arguments of a
``RunConfig``, and builds its run config with :func:`run_config`.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

import click
import typer

from edufl.federation.runconfig import CENTRAL_DP, MODELS, SECURE_AGGREGATION, SPLITS, STRATEGIES, TASKS, ConfigError, RunConfig
from edufl.federation.schema import load_schema

__all__ = ["RUN_OPTIONS", "RunOption", "run_config", "run_settings"]


def _schema_text(path: str) -> str:
    """The run config's ``federation-schema`` of the schema file ``path`` ("": OULAD's); SchemaError if unusable."""
    return load_schema(path).text() if path else ""


@dataclass(frozen=True)
class RunOption:
    """The option ``flag`` setting the RunConfig attribute ``field`` (of type ``kind``, one of ``choices``
    when given); an ``inverted`` flag sets a true-by-default attribute to False; ``read`` turns a given value
    (a file name) into the attribute's."""

    field: str
    flag: str
    kind: type
    help: str
    choices: tuple[str, ...] = ()
    inverted: bool = False
    read: Callable[[Any], Any] | None = None

    def parameter(self, defaults: RunConfig) -> inspect.Parameter:
        """This option as a keyword-only parameter of a typer command, with ``defaults``' value as its default."""
        default = getattr(defaults, self.field)
        option = typer.Option(self.flag, help=self.help, click_type=click.Choice(self.choices) if self.choices else None)
        return inspect.Parameter(
            self.field,
            inspect.Parameter.KEYWORD_ONLY,
            annotation=Annotated[self.kind, option],
            default=not default if self.inverted else default,
        )

    def value(self, given: Any) -> Any:
        """The RunConfig value of the option's value ``given``."""
        if self.read is not None:
            return self.read(given)
        return not given if self.inverted else given


RUN_OPTIONS = (
    RunOption(
        "task",
        "--task",
        str,
        "prediction task at the cutoff day: withdrawal, at_risk (Fail or Withdrawn) or "
        "final_result (Distinction, Fail, Pass, Withdrawn)",
        TASKS,
    ),
    RunOption("num_rounds", "--rounds", int, "federation rounds"),
    RunOption("local_epochs", "--local-epochs", int, "epochs of local training per round"),
    RunOption("batch_size", "--batch-size", int, "expected batch size (Poisson sampling rate = batch/n)"),
    RunOption("learning_rate", "--learning-rate", float, "SGD learning rate on each campus"),
    RunOption("model", "--model", str, "MLP (64-32) or logistic regression", MODELS),
    RunOption("strategy", "--strategy", str, "Flower aggregation strategy", STRATEGIES),
    RunOption("proximal_mu", "--proximal-mu", float, "FedProx proximal term weight"),
    RunOption("target_epsilon", "--target-epsilon", float, "each campus's ε for the whole run"),
    RunOption("delta", "--delta", float, "δ of each campus's (ε, δ) guarantee"),
    RunOption("max_grad_norm", "--max-grad-norm", float, "per-example clipping norm"),
    RunOption("dp", "--no-dp", bool, "turn differential privacy OFF (research baselines only)", inverted=True),
    RunOption(
        "evaluate_in_train",
        "--separate-evaluation",
        bool,
        "evaluate in an exchange of its own after every round, instead of in the next round's training reply",
        inverted=True,
    ),
    RunOption(
        "central_dp",
        "--central-dp",
        str,
        "client-level DP on the coordinator: clip each campus's update, equal-weight mean, Gaussian noise",
        CENTRAL_DP,
    ),
    RunOption(
        "central_noise_multiplier", "--central-noise-multiplier", float, "central DP noise standard deviation / clipping norm"
    ),
    RunOption(
        "central_clipping_norm", "--central-clipping-norm", float, "central DP: L2 norm each campus's update is clipped to"
    ),
    RunOption(
        "secure_aggregation",
        "--secure-aggregation",
        str,
        "secaggplus: train through Flower's SecAgg+ protocol; the coordinator learns only the sum of the updates",
        SECURE_AGGREGATION,
    ),
    RunOption(
        "secagg_num_shares",
        "--secagg-num-shares",
        float,
        "SecAgg+: shares of each campus's secrets (<= 1: that fraction of the campuses; > 1: that many, >= 3)",
    ),
    RunOption(
        "secagg_reconstruction_threshold",
        "--secagg-reconstruction-threshold",
        float,
        "SecAgg+: shares that rebuild a secret (<= 1: that fraction of the shares, > 0.5; > 1: that many)",
    ),
    RunOption(
        "secagg_max_weight",
        "--secagg-max-weight",
        float,
        "SecAgg+: the largest campus weight (training rows) the masked sum holds without clipping",
    ),
    RunOption("cutoff_day", "--cutoff-day", int, "early-warning day D"),
    RunOption(
        "split",
        "--split",
        str,
        "stratified held-out test rows per campus, or temporal: train and test on the presentations the federation "
        "schema's [temporal_split] names (OULAD's: train 2013, test 2014)",
        SPLITS,
    ),
    RunOption("test_fraction", "--test-fraction", float, "share of each campus's rows held out"),
    RunOption(
        "seed", "--seed", int, "seed for data splits and initial weights (DP noise and batch sampling are secret on each campus)"
    ),
    RunOption(
        "reproducible_noise",
        "--reproducible-noise",
        bool,
        "research only: DP noise and batch sampling follow --seed "
        "too, so runs repeat exactly; NOT private against the coordinator, and every campus policy refuses it",
    ),
    RunOption(
        "federation_schema",
        "--schema",
        str,
        "federation schema file (TOML): vocabularies, outcomes, attributes and modules every campus's data must fit "
        "(default: OULAD's, federation/schemas/oulad.toml)",
        read=_schema_text,
    ),
    RunOption("out", "--out", str, "results folder"),
)
"""Every run setting a command line sets, in the order its help lists them."""

_FLAGS = {option.field.replace("_", "-"): option.flag for option in RUN_OPTIONS}


def run_settings(command: Callable[..., Any]) -> Callable[..., Any]:
    """``command`` (a typer command function with a ``settings`` parameter) with the options of
    :data:`RUN_OPTIONS` after its own; it is called with their RunConfig keyword arguments as ``settings``."""
    own = [p for p in inspect.signature(command, eval_str=True).parameters.values() if p.name != "settings"]
    defaults = RunConfig()

    @functools.wraps(command)
    def with_settings(**given: Any) -> Any:
        settings = {option.field: option.value(given.pop(option.field)) for option in RUN_OPTIONS}
        return command(settings=settings, **given)

    with_settings.__signature__ = inspect.Signature([*own, *(option.parameter(defaults) for option in RUN_OPTIONS)])
    return with_settings


def run_config(settings: dict[str, Any], **extra: Any) -> RunConfig:
    """The RunConfig of ``settings`` (from :func:`run_settings`) and the ``extra`` attributes.

    Raises
    ------
    ConfigError
        On a value out of range, naming the option typed (``--rounds``, not ``num-rounds``).
    """
    try:
        return RunConfig(**settings, **extra)
    except ConfigError as err:
        key, _, rest = str(err).partition(" ")
        raise ConfigError(f"{_FLAGS.get(key, f'--{key}')} {rest}") from None
