"""The campus side: a Flower ClientApp that trains with DP-SGD on the campus's own rows.

Where a campus's data, state and policy come from:

* deployment: the SuperNode's node config,
  ``--node-config "data-dir='DIR' campus='NAME' state-dir='STATE' policy='FILE' mapping='FILE'"``;
  the ClientApp reads only ``DIR``, through the campus's mapping to the
  learner-record contract (the OULAD layout without one). ``state-dir`` (default ``~/.edufl/campuses/NAME``)
  holds the privacy ledger; ``policy`` is the campus policy file (the safe
  defaults of :class:`federation.policy.CampusPolicy` without one);
* simulation (``edufl simulate``): each virtual SuperNode's ``partition-id``
  picks one campus from the manifest in ``$EDUFL_SIM_DIR``, which holds one
  folder per campus with only that campus's rows (the contract's tables as
  Parquet files, read through ``federation/mappings/contract-parquet.toml``),
  the folder under which each campus keeps its state, and the policy file, if
  the researcher gave one (else the campuses run under
  :data:`federation.policy.RESEARCH_POLICY`).

Privacy is enforced here, not trusted from the coordinator: every requested
configuration is validated and checked against the campus policy, the noise
multiplier is calibrated by the campus for the whole run (never below the
policy's floor), a round whose steps would take the run's ε past its target,
or the dataset's ε past the policy's total budget, is refused before any
training, and every release is written to the privacy ledger before the reply
leaves the campus.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict

from edufl.federation.contract import parse_version, supports, version_text
from edufl.federation.fingerprint import dataset_id
from edufl.federation.ledger import PrivacyLedger, Release
from edufl.federation.mapping import CONTRACT_PARQUET, Mapping, MappingError, load_mapping, parquet_layout
from edufl.federation.metrics import evaluate_metrics, subgroup_keys
from edufl.federation.models import build_model, load_model_arrays, model_arrays
from edufl.federation.privacy import ACCOUNTANT, DPSettings, History, calibrate_noise, epsilon, poisson_plan
from edufl.federation.problems import DataError
from edufl.federation.proto.analytics_pb2 import StatisticQuery
from edufl.federation.proto.audit_pb2 import DpRelease
from edufl.federation.queries import ANSWER, QUERY_KEY, QueryError, check_schema, require_modules
from edufl.federation.randomness import SECRET, Randomness, round_seed
from edufl.federation.runconfig import ConfigError, RunConfig
from edufl.federation.schema import FederationSchema, SchemaError, schema_from_text
from edufl.federation.statistics import answer
from edufl.federation.tables import Tables, load_tables
from edufl.federation.tasks import TaskData, early_warning, feature_names, missing_modules, n_outputs, split
from edufl.federation.training import BOOTSTRAP_RESAMPLES, evaluate, subgroup_metrics, train
from edufl.federation.wire import ARRAYS, CAMPUS, CONFIG, EVALUATE_RECEIVED, EVALUATION, METRICS, NUM_EXAMPLES

from .gate import GuardedClientApp
from .guard import release_guard
from .node import CampusRefusal, CampusSetup, campus_setup, leave_prepared, prepared, run_id
from .query_budget import plan_release
from .secagg import secure_aggregation_mod

__all__ = [
    "Campus",
    "PRIVACY_CONTRACT",
    "QUERY_CONFIG",
    "app",
    "campus_key",
    "campus_mapping",
    "evaluate_handler",
    "load_campus",
    "query_handler",
    "share_examples",
    "train_handler",
]

app = GuardedClientApp(mods=[release_guard])


@dataclass
class Campus:
    name: str
    dataset: str  # SHA-256 over the data files: the identity the privacy ledger is keyed by
    train: TaskData
    test: TaskData


_CAMPUS_CACHE: dict[tuple, Campus] = {}


def campus_mapping(setup: CampusSetup, contract_version: str) -> Mapping:
    """How this campus's export maps to the learner-record contract, checked against the run's version.

    Raises
    ------
    CampusRefusal
        When the mapping cannot be used or maps the data to a learner-record
        contract version the run's ``contract_version`` does not read (checked before any data is read).
    """
    try:  # the simulation's own layout holds a file for each table the campus has
        mapping = parquet_layout(setup.data_dir) if setup.mapping == CONTRACT_PARQUET else load_mapping(setup.mapping)
    except MappingError as err:
        raise CampusRefusal(f"campus {setup.name} cannot join: {err}") from None
    run_version = parse_version(contract_version)
    if not supports(run_version, mapping.version):
        raise CampusRefusal(
            f"campus {setup.name} cannot join: its data are mapped to learner-record contract {mapping.contract_version}, "
            f"and this run reads contract {version_text(run_version)} (contract-version)"
        )
    return mapping


def campus_tables(setup: CampusSetup, mapping: Mapping, schema: FederationSchema) -> Tables:
    """The campus's tables, checked against the run's federation ``schema`` before anything is computed from them.

    Raises
    ------
    CampusRefusal
        When the mapping or the data do not fit ``schema`` (an attribute or label it lacks, a value outside a
        vocabulary or range, any other problem of the data). The reason names the schema only: which rows and
        values do not fit is the refusal's ``detail``, which the release guard writes to the campus's audit log
        only (``edufl campus validate --schema`` shows the same).
    """
    try:
        return load_tables(setup.data_dir, mapping, schema)
    except (MappingError, DataError) as err:
        raise CampusRefusal(
            f"campus {setup.name} cannot join: its data do not fit federation schema {schema.name!r} "
            f"(sha256 {schema.digest[:16]}...); the campus checks them with `edufl campus validate --schema`",
            detail=f"{type(err).__name__}: {err}",
        ) from None


def _files_identity(folder: Path) -> tuple:
    # (name, size, mtime) of every file in the data folder: a changed file is read again.
    return tuple(sorted((p.name, st.st_size, st.st_mtime_ns) for p in folder.iterdir() if (st := p.stat()) and p.is_file()))


def campus_key(data_dir: Path, mapping: Path | None, cfg: RunConfig) -> tuple:
    """What a campus's examples depend on: its data folder and files (name, size, modification time), its
    mapping file, and ``cfg``'s contract version, federation schema, task, cutoff day, split, test fraction and seed."""
    return (
        str(data_dir),
        _files_identity(data_dir),
        str(mapping),
        cfg.contract_version,
        cfg.schema.digest,
        cfg.task,
        cfg.cutoff_day,
        cfg.split,
        cfg.test_fraction,
        cfg.seed,
    )


def _campus(name: str, data_dir: Path, mapping: Mapping, cfg: RunConfig, data: TaskData) -> Campus:
    train_part, test_part = split(data, cfg.split, cfg.test_fraction, cfg.seed, cfg.schema)
    return Campus(name, dataset_id(data_dir, mapping), train_part, test_part)


def load_campus(setup: CampusSetup, cfg: RunConfig) -> Campus:
    """This campus's train/test examples for ``cfg``'s task, cutoff and split (cached per process, shared by
    a simulation's workers through :func:`~clients.node.prepared`, and read again when a data file's size or
    modification time changes).

    Raises CampusRefusal as :func:`campus_mapping`, as :func:`campus_tables` when the data do not fit the run's
    federation schema, and when a presentation matches both patterns of the schema's ``temporal_split`` (split
    temporal; the refusal's detail names it)."""
    key = campus_key(setup.data_dir, setup.mapping, cfg)
    if key not in _CAMPUS_CACHE:
        mapping = campus_mapping(setup, cfg.contract_version)
        if why := missing_modules(cfg.task, mapping.modules, cfg.schema):  # refused before any record is read
            raise CampusRefusal(f"campus {setup.name} refuses the run: {why}")

        def build() -> Campus:
            examples = early_warning(campus_tables(setup, mapping, cfg.schema), cfg.cutoff_day, cfg.task)
            try:
                return _campus(setup.name, setup.data_dir, mapping, cfg, examples)
            except SchemaError as err:
                raise CampusRefusal(
                    f"campus {setup.name} cannot join: its presentations do not fit the temporal_split of federation "
                    f"schema {cfg.schema.name!r} (sha256 {cfg.schema.digest[:16]}...)",
                    detail=str(err),
                ) from None

        _CAMPUS_CACHE[key] = prepared(setup.cache_dir, key, build)  # a simulation's workers prepare each campus once
    return _CAMPUS_CACHE[key]


def share_examples(name: str, data_dir: Path, cache_dir: Path, cfg: RunConfig, examples: Callable[[], TaskData]) -> bool:
    """Simulation only: leave in ``cache_dir`` what :func:`load_campus` prepares for campus ``name`` from its
    contract-layout Parquet folder ``data_dir`` under ``cfg``, built from ``examples()``: the simulation's
    own early-warning examples of the tables it wrote to ``data_dir`` (the same rows, features and labels
    the campus would compute). Returns False, building nothing, when they are there already or the folder
    lacks a module the task needs (the campus then refuses the run, :func:`load_campus`)."""
    mapping = parquet_layout(data_dir)
    if missing_modules(cfg.task, mapping.modules, cfg.schema):
        return False
    key = campus_key(data_dir, CONTRACT_PARQUET, cfg)
    return leave_prepared(cache_dir, key, lambda: _campus(name, data_dir, mapping, cfg, examples()))


def _require_rows(campus: Campus, cfg: RunConfig, part: Literal["train", "test"], doing: str) -> None:
    """Refuse ``doing`` when split temporal left ``campus`` no ``part`` rows: none of its presentations matches
    the schema's ``temporal_split`` pattern for that part."""
    rule = cfg.schema.temporal_split
    if cfg.split != "temporal" or rule is None or len(getattr(campus, part)):
        return
    raise CampusRefusal(
        f"campus {campus.name} refuses {doing}: split temporal leaves it no {part} rows, since none of its "
        f"presentations matches temporal_split.{part} {getattr(rule, part)!r} of federation schema {cfg.schema.name!r}"
    )


def _model(cfg: RunConfig, msg: Message):
    model = build_model(cfg.model, len(feature_names(cfg.schema)), outputs=n_outputs(cfg.task, cfg.schema))
    return load_model_arrays(model, msg.content[ARRAYS])


def _campus_record(name: str) -> ConfigRecord:
    return ConfigRecord({"name": name})


# Settings that fix this campus's privacy guarantee for a run: pinned in the ledger by the run's
# first request (of its run name) and never changed by a later one, in any Flower run.
PRIVACY_CONTRACT = (
    "dp",
    "target-epsilon",
    "delta",
    "max-grad-norm",
    "num-rounds",
    "local-epochs",
    "batch-size",
    "reproducible-noise",
)


def _check_contract(cfg: RunConfig, ledger: PrivacyLedger, campus: Campus, run: str, server_round: int) -> None:
    values = cfg.to_flower()
    changed = ledger.pin(campus.dataset, run, {k: values[k] for k in PRIVACY_CONTRACT})
    if changed:
        detail = ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changed.items())
        raise CampusRefusal(f"campus {campus.name} refuses round {server_round}: the run's privacy settings changed ({detail})")


def _check_policy(setup: CampusSetup, cfg: RunConfig, server_round: int) -> None:
    found = setup.policy.check(cfg)
    if found:
        detail = "; ".join(f"{key}: {why}" for key, why in found)
        raise CampusRefusal(f"campus {setup.name} refuses round {server_round}: the request breaks its policy ({detail})")


def _check_budget(
    setup: CampusSetup,
    cfg: RunConfig,
    campus: Campus,
    ledger: PrivacyLedger,
    run_history: History,
    planned: tuple[float, float, int],
    server_round: int,
) -> None:
    projected = epsilon([*run_history, planned], cfg.delta)
    if projected > cfg.target_epsilon:
        raise CampusRefusal(
            f"campus {campus.name} refuses round {server_round}: its ε would reach {projected:.3f}, "
            f"above target-epsilon {cfg.target_epsilon} (spent so far {epsilon(run_history, cfg.delta):.3f})"
        )
    if why := setup.policy.over_budget(ledger.history(campus.dataset), planned):
        raise CampusRefusal(f"campus {campus.name} refuses round {server_round}: {why}")


@app.train(mods=[secure_aggregation_mod])  # a SecAgg+ stage (secure-aggregation = "secaggplus"), inside the guard
def train_handler(msg: Message, context: Context) -> Message:
    """Train the received global model locally; reply with weights, counts, loss and the run's ε so far.

    The release is recorded in the campus's privacy ledger before the reply is returned. When the
    request's config sets :data:`~federation.wire.EVALUATE_RECEIVED`, the received model is first
    evaluated as :func:`evaluate_handler` does, and those metrics travel in the reply under
    :data:`~federation.wire.EVALUATION` (left out when the campus has fewer test rows than its
    ``release.min_cohort_size``).

    Raises
    ------
    CampusRefusal
        Before any training, when the request breaks the campus policy, changes
        the run's privacy settings, or would take an ε past its limit, or split
        temporal leaves the campus no training rows (Flower sends the coordinator
        an error reply with the message).
    ConfigError
        On an unknown or invalid configuration key.
    """
    cfg = RunConfig.from_flower(dict(msg.content[CONFIG]))
    server_round = int(msg.content[CONFIG]["server-round"])
    setup = campus_setup(context.node_config)
    _check_policy(setup, cfg, server_round)
    campus = load_campus(setup, cfg)
    _require_rows(campus, cfg, "train", f"round {server_round}")
    model = _model(cfg, msg)
    k = setup.policy.release.min_cohort_size
    evaluation = (
        _evaluation(cfg, campus, model, k, intervals=False)
        if msg.content[CONFIG].get(EVALUATE_RECEIVED) and len(campus.test) >= k
        else None
    )
    run = run_id(msg.content[CONFIG], context)
    n, loss, sigma, q = len(campus.train), math.nan, math.nan, math.nan
    seed = round_seed(cfg.seed, campus.name, server_round)
    with PrivacyLedger(setup.state_dir) as ledger:
        _check_contract(cfg, ledger, campus, run, server_round)
        history = ledger.history(campus.dataset, run)
        if n > 0:
            q, steps = poisson_plan(n, cfg.batch_size)
            if cfg.dp:
                # σ is fixed for the run by its first round: calibrated so that all of the
                # run's steps spend at most target-epsilon, never below the policy's floor.
                sigma = (
                    history[0][0]
                    if history
                    else calibrate_noise(
                        DPSettings(cfg.target_epsilon, cfg.delta, cfg.max_grad_norm),
                        n,
                        cfg.batch_size,
                        cfg.num_rounds * cfg.local_epochs,
                    )
                )
                sigma = setup.policy.noise_multiplier(sigma)
                _check_budget(setup, cfg, campus, ledger, history, (sigma, q, cfg.local_epochs * steps), server_round)
            result = train(
                model,
                campus.train,
                epochs=cfg.local_epochs,
                batch_size=cfg.batch_size,
                learning_rate=cfg.learning_rate,
                seed=seed,
                noise_multiplier=sigma if cfg.dp else None,
                max_grad_norm=cfg.max_grad_norm,
                proximal_mu=cfg.proximal_mu if cfg.strategy == "fedprox" else 0.0,
                randomness=Randomness(seed) if cfg.reproducible_noise else SECRET,
            )
            loss = result.loss
            release = DpRelease(
                mechanism="dp-sgd" if cfg.dp else "none",
                noise_multiplier=sigma if cfg.dp else 0.0,
                sample_rate=result.sample_rate,
                steps=result.steps,
                delta=cfg.delta,
                accountant=ACCOUNTANT,
            )
            released = (release.noise_multiplier, release.sample_rate, release.steps)  # as the sampler ran it
            release.epsilon = epsilon([*history, released], cfg.delta)
            if cfg.dp and release.epsilon > cfg.target_epsilon:  # fail closed: never released
                raise CampusRefusal(f"campus {campus.name}: accounted ε exceeds the target after round {server_round}")
            ledger.record(Release(campus.dataset, campus.name, run, server_round, cfg.task, release))
            history.append(released)
    metrics = MetricRecord(
        {
            NUM_EXAMPLES: n,
            "train-loss": loss,
            "epsilon": epsilon(history, cfg.delta),
            "delta": cfg.delta,
            "noise-multiplier": sigma,
            "sample-rate": q,
            "steps": int(sum(h[2] for h in history)),
        }
    )
    content = RecordDict({ARRAYS: model_arrays(model), METRICS: metrics, CAMPUS: _campus_record(campus.name)})
    if evaluation is not None:
        content[EVALUATION] = evaluation
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate_handler(msg: Message, context: Context) -> Message:
    """Evaluate the received global model on this campus's held-out test rows.

    The reply holds the task's declared metrics (:func:`~federation.metrics.evaluate_metrics`) and, for
    each subgroup (``SUBGROUPS``: a gender, age band, disability or IMD band) of
    at least the policy's ``release.min_cohort_size`` test rows, its row count
    and the task's primary metric (``subgroup_keys``); smaller groups are not sent, nor groups whose sizes would give theirs away
    by subtraction (:func:`federation.training.subgroup_metrics`).

    Raises
    ------
    CampusRefusal
        When the request breaks the campus policy, split temporal leaves the campus
        no test rows, or there are fewer test rows than its ``release.min_cohort_size``.
    """
    cfg = RunConfig.from_flower(dict(msg.content[CONFIG]))
    setup = campus_setup(context.node_config)
    _check_policy(setup, cfg, int(msg.content[CONFIG]["server-round"]))
    campus = load_campus(setup, cfg)
    _require_rows(campus, cfg, "test", "to release metrics")
    k = setup.policy.release.min_cohort_size
    if len(campus.test) < k:  # the reason does not say how many: a count below k is what k withholds
        raise CampusRefusal(
            f"campus {campus.name} refuses to release metrics: it has fewer test rows than release.min_cohort_size ({k})"
        )
    metrics = _evaluation(cfg, campus, _model(cfg, msg), k, intervals=True)
    return Message(content=RecordDict({METRICS: metrics, CAMPUS: _campus_record(campus.name)}), reply_to=msg)


def _evaluation(cfg: RunConfig, campus: Campus, model, k: int, intervals: bool) -> MetricRecord:
    """``model``'s declared metrics on the campus's test rows, and those of each subgroup that may be sent, with
    the subgroup's bootstrap interval when ``intervals`` (an evaluate request), else NaN (the evaluation in a
    train reply: the coordinator keeps only the latest evaluation's subgroups, and the final model's
    comes in an evaluate request; each interval is an exact statistic of the rows, not covered by ε)."""
    scores = evaluate(model, campus.train, campus.test, cfg.task, cfg.schema)
    declared = evaluate_metrics(cfg.task, cfg.schema)[1:]
    metrics = MetricRecord({NUM_EXAMPLES: len(campus.test), **{key: scores[key.replace("-", "_")] for key in declared}})
    keys = subgroup_keys(cfg.task, cfg.schema)
    resamples = BOOTSTRAP_RESAMPLES if intervals else 0
    for group, subgroup in subgroup_metrics(model, campus.test, cfg.task, k, resamples, schema=cfg.schema).items():
        metrics.update(zip(keys[group], subgroup, strict=True))
    return metrics


QUERY_CONFIG = frozenset({QUERY_KEY, "contract-version", "federation-schema", "run-name", "server-round"})
"""The config keys a statistic query may carry."""


@app.query()
def query_handler(msg: Message, context: Context) -> Message:
    """Answer a DP statistic query (:mod:`federation.statistics`) over this campus's registrations or submissions.

    The query arrives serialized under ``config[statistic-query]``; the answer
    leaves as a serialized ``StatisticAnswer`` in the ``answer`` record. The
    release is recorded in the privacy ledger (mechanism ``gaussian``, the
    noise multiplier, q = 1, one step) before the noise is drawn and the reply
    returned; cells with a noisy count below the policy's
    ``release.min_cohort_size``, times the query's rows per registration, are
    not sent.

    Raises
    ------
    CampusRefusal
        Before any record is read: an invalid query (a field outside the data
        contract or not groupable, a mean, histogram or quantile without finite
        bounds, a submission statistic without a bound on rows per registration),
        or one the campus policy or its remaining ε budget does not allow.
    """
    config = msg.content[CONFIG]
    unknown = sorted(set(config) - QUERY_CONFIG)
    if unknown:
        raise ConfigError(f"unknown configuration key(s) of a statistic query: {', '.join(unknown)}")
    setup = campus_setup(context.node_config)
    run, server_round = run_id(config, context), int(config.get("server-round", 1))
    query = StatisticQuery.FromString(config[QUERY_KEY])
    try:
        schema = schema_from_text(str(config.get("federation-schema", "")))
    except SchemaError as err:
        raise CampusRefusal(f"campus {setup.name} refuses query {query.name!r}: {err}") from None
    if why := setup.policy.schema_refusal(schema):  # before any record is read
        raise CampusRefusal(f"campus {setup.name} refuses query {query.name!r}: data.approved_schemas: {why}")
    mapping = campus_mapping(setup, str(config["contract-version"]))
    dataset = dataset_id(setup.data_dir, mapping)
    with PrivacyLedger(setup.state_dir) as ledger:
        try:
            z, run_eps = plan_release(query, setup.policy, ledger.history(dataset, run), ledger.history(dataset))
            require_modules(query, mapping.modules)  # before any record is read or any ε charged
            check_schema(query, schema)
        except QueryError as err:
            raise CampusRefusal(f"campus {setup.name} refuses query {query.name!r}: {err}") from None
        tables = campus_tables(setup, mapping, schema)
        ledger.record(
            Release(
                dataset,
                setup.name,
                run,
                server_round,
                f"statistic:{query.name}",
                DpRelease(
                    mechanism="gaussian",
                    noise_multiplier=z,
                    sample_rate=1.0,
                    steps=1,
                    epsilon=run_eps,
                    delta=query.delta,
                    accountant=ACCOUNTANT,
                ),
            )
        )
    k = setup.policy.release.min_cohort_size
    reply = answer(query, tables, setup.name, z, k, schema=schema)
    content = RecordDict({ANSWER: ConfigRecord({ANSWER: reply.SerializeToString()}), CAMPUS: _campus_record(setup.name)})
    return Message(content=content, reply_to=msg)
