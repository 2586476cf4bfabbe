"""The release guard: a Flower client-side mod that checks, and logs, everything leaving the campus.

Every reply of the ClientApp passes :func:`release_guard` on its way out. It
is let through only when it holds exactly what the protocol declares:

* ``train``: the model's parameter arrays (the names, shapes and dtypes of the
  run's model), the declared training metrics, and the campus name;
* ``evaluate``: the task's declared evaluation metrics, the declared
  per-subgroup count and metric of any subgroup with at least
  ``release.min_cohort_size`` test rows (10 without a policy), and the campus name;
* ``query``: one serialized ``StatisticAnswer`` (``protos/analytics.proto``)
  holding only cells the query declares, each with a noisy count of at least
  ``release.min_cohort_size`` (10 without a policy) times the query's
  ``max_rows_per_registration`` (submission statistics), and the campus name;
* the four stages of secure aggregation (SecAgg+, :mod:`clients.secagg`; each
  a ``train`` message, logged as ``secaggplus:<stage>``): only the stage's
  declared values and the campus name, each checked against the campus's own
  SecAgg+ state (:func:`secagg_violations`); the masked-vector stage carries
  no plain model array;

with every metric a single number and, under a campus policy, computed on at
least ``release.min_cohort_size`` records. Anything else (an extra array or
record, a string, a list of per-student values, a metric on too few records)
is blocked: the coordinator gets an error reply (code ``BLOCKED``) saying it
was blocked, and nothing of the content. A request the ClientApp refuses (its
policy, its privacy budget, an invalid configuration, a message type it does
not answer) is answered with an error reply (code ``REFUSED``) carrying only
the reason. Any other failure (an exception while handling the message, such
as data that no longer validate) is answered with an error reply (code
``FAILED``) carrying a fixed sentence, never the exception's text, which may
quote a student's record. Every outcome, sent, blocked, refused or failed, is
written to the campus's audit log (:mod:`federation.audit`) with its details
before the mod returns.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from contextlib import closing

import numpy as np
from cryptography.fernet import InvalidToken
from flwr.app import Context, Error, Message
from flwr.app.message_type import MessageType
from flwr.clientapp import ClientApp
from flwr.client.mod.secure_aggregation.secaggplus_mod import SecAggPlusState
from flwr.common import bytes_to_ndarray
from flwr.common.secure_aggregation.crypto.shamir import combine_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import decrypt
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, RECORD_KEY_STATE, Key, Stage
from flwr.common.secure_aggregation.secaggplus_utils import share_keys_plaintext_separate
from flwr.supercore.primitives.asymmetric import bytes_to_private_key, public_key_to_bytes
from google.protobuf.message import DecodeError

from edufl.federation.audit import AuditLog, array_specs, now, payload_digest
from edufl.federation.ledger import PrivacyLedger
from edufl.federation.models import build_model
from edufl.federation.proto.analytics_pb2 import StatisticAnswer, StatisticQuery
from edufl.federation.proto.audit_pb2 import ArraySpec, AuditRecord, DpRelease
from edufl.federation.policy import CampusPolicy, PolicyError
from edufl.federation.runconfig import (ARRAYS, BLOCKED, CAMPUS, CONFIG, EVALUATE_METRICS, FAILED, METRICS, NUM_EXAMPLES, REFUSED,
                                  SUBGROUPS, TRAIN_METRICS, ConfigError, RunConfig, subgroup_keys)
from edufl.federation.statistics import ANSWER, MIN_CELL_COUNT, QUERY_KEY, answer_problems
from edufl.federation.tasks import feature_names, n_outputs

from .node import CampusRefusal, CampusSetup, campus_setup, run_id

logger = logging.getLogger(__name__)

# SecAgg+ (Flower's secaggplus_mod): the record holding each stage's request and reply values, and the
# records of a masked-vector reply, which is Flower's legacy FitRes with its parameters emptied.
SECAGG = RECORD_KEY_CONFIGS
FIT_PARAMETERS, FIT_NUM_EXAMPLES, FIT_METRICS, FIT_STATUS = (
    "fitres.parameters", "fitres.num_examples", "fitres.metrics", "fitres.status")
FIT_OK = {"code": 0, "message": "Success"}

@functools.lru_cache(maxsize=None)
def _expected_arrays(model_name: str, task: str) -> list[tuple[str, list[int], str]]:
    # (name, shape, dtype) of each parameter of the task's model; built once per model and task per process
    model = build_model(model_name, len(feature_names()), outputs=n_outputs(task))
    return [(name, list(t.shape), str(t.dtype).removeprefix("torch.")) for name, t in model.state_dict().items()]


def violations(msg: Message, reply: Message, min_cohort: int) -> list[str]:
    """Everything in ``reply`` (to request ``msg``) that the protocol does not declare; empty if it may leave."""
    kind = msg.metadata.message_type
    content = reply.content
    expected = {"train": {ARRAYS, METRICS, CAMPUS}, "evaluate": {METRICS, CAMPUS}, "query": {ANSWER, CAMPUS}}.get(kind)
    if expected is None:
        return [f"message type {kind!r} is not released by this campus"]
    found = []
    if set(content) != expected:
        found.append(f"records {sorted(content)}; expected {sorted(expected)}")
    if kind == "train" and ARRAYS in content.array_records:
        cfg = RunConfig.from_flower(dict(msg.content[CONFIG]))
        sent = [(s.name, list(s.shape), s.dtype) for s in array_specs(content)]
        if sent != _expected_arrays(cfg.model, cfg.task):
            found.append(f"arrays {sent} are not the {cfg.model} model's parameters")
    if METRICS in content.metric_records:
        metrics = content.metric_records[METRICS]
        found += (_metric_problems(metrics, TRAIN_METRICS, min_cohort) if kind == "train"
                  else _evaluate_metric_problems(msg, metrics, min_cohort))
    if CAMPUS in content.config_records and set(content.config_records[CAMPUS]) != {"name"}:
        found.append(f"campus record keys {sorted(content.config_records[CAMPUS])}; expected ['name']")
    if kind == "query" and ANSWER in content.config_records:
        found += _answer_violations(msg, reply, min_cohort or MIN_CELL_COUNT)  # no policy: the default k
    return found


def _metric_problems(metrics, keys: tuple[str, ...], min_cohort: int) -> list[str]:
    """What in a metrics record is not the declared ``keys`` with single numbers computed on >= ``min_cohort`` records."""
    found = []
    if set(metrics) != set(keys):
        found.append(f"metric keys {sorted(metrics)}; expected {sorted(keys)}")
    lists = sorted(k for k in metrics if isinstance(metrics[k], list))
    if lists:
        found.append(f"metrics {lists} hold lists of values; only single numbers may leave")
    other = sorted(k for k in metrics if not isinstance(metrics[k], (int, float, list)) or isinstance(metrics[k], bool))
    if other:
        found.append(f"metrics {other} are not numbers; only single numbers may leave")
    n = metrics.get(NUM_EXAMPLES, 0)
    if isinstance(n, (int, float)) and n < min_cohort:
        found.append(f"metrics computed on {n} records, fewer than release.min_cohort_size {min_cohort}")
    return found


def _evaluate_metric_problems(msg: Message, metrics, min_cohort: int) -> list[str]:
    """What in an evaluate reply's metrics is not the task's declared metrics plus, for each subgroup sent, its
    declared count and metric (:func:`federation.runconfig.subgroup_keys`) on at least k = ``min_cohort`` records
    (no policy: the default policy's), with, per attribute, 0 or at least k test rows outside the groups sent (else a
    smaller group's size follows by subtraction)."""
    task = RunConfig.from_flower(dict(msg.content[CONFIG])).task
    sent = {group: keys for group, keys in subgroup_keys(task).items() if set(keys) & set(metrics)}
    found = _metric_problems(metrics, (*EVALUATE_METRICS[task], *(k for keys in sent.values() for k in keys)), min_cohort)
    k = min_cohort or CampusPolicy().release.min_cohort_size
    counts = {group: metrics.get(count) for group, (count, _) in sent.items()}
    if any(type(n) not in (int, float) for n in [*counts.values(), metrics.get(NUM_EXAMPLES)]):
        return found  # a missing count, or not a single number: reported above
    for (attribute, value), n in counts.items():
        if n < k:
            found.append(f"subgroup {attribute}={value}: metrics computed on {n} records, fewer than {k}")
    for attribute in SUBGROUPS:
        rest = metrics[NUM_EXAMPLES] - sum(n for (a, _), n in counts.items() if a == attribute)
        if any(a == attribute for a, _ in counts) and 0 < rest < k:
            found.append(f"subgroup {attribute}: {rest} test records outside the groups sent, fewer than {k} "
                         "(their count follows by subtraction)")
    return found


def secagg_stage(msg: Message) -> str | None:
    """The SecAgg+ stage a request asks for (Flower sends every stage as a ``train`` message
    carrying a ``secaggplus_configs`` record), or None for any other request."""
    if msg.metadata.message_type != MessageType.TRAIN or SECAGG not in msg.content.config_records:
        return None
    return str(msg.content.config_records[SECAGG].get(Key.STAGE, ""))


def message_kind(msg: Message) -> str:
    """The request's kind as the audit log names it: its message type, or ``secaggplus:<stage>``."""
    stage = secagg_stage(msg)
    return msg.metadata.message_type if stage is None else f"secaggplus:{stage}"


def secagg_violations(stage: str, asked: dict, msg: Message, reply: Message, context: Context,
                      min_cohort: int) -> list[str]:
    """Everything in the reply to SecAgg+ stage ``stage`` that the protocol does not declare; empty if it may leave.

    ``asked`` holds the request's stage values as they arrived (``secaggplus_mod``
    consumes the stage key). Each reply is checked against the campus's own
    SecAgg+ state (the mod keeps it in the run's context):

    * ``setup``: exactly the two public keys, and they are the public halves of
      the key pairs the campus just made (its private keys stay);
    * ``share_keys``: one ciphertext to each neighbour the coordinator announced;
      each decrypts, under the campus's pairwise key with that neighbour, to this
      campus's share of its mask seed and of its masking key, addressed to that
      neighbour, and the campus's own shares with a threshold's worth of them
      rebuild its seed and key (the coordinator cannot decrypt them);
    * ``collect_masked_vectors``: the masked vector (the weight and one array of
      each of the run model's parameter shapes, integers modulo the protocol's
      modulus), the declared training metrics on at least ``min_cohort`` records,
      the example count (the weight Flower's FitRes carries in the clear), an OK
      status, and no plain model array;
    * ``unmask``: for each node the coordinator asked about, the one share it
      asked for (of the mask seed of a node it calls active, of the masking key of
      one it calls dropped), never both for one node, and no share for this
      campus's own key.
    """
    if stage not in Stage.all():
        return [f"SecAgg+ stage {stage!r} is not released by this campus"]
    content = reply.content
    expected = {SECAGG, CAMPUS} | ({FIT_PARAMETERS, FIT_NUM_EXAMPLES, FIT_METRICS, FIT_STATUS}
                                   if stage == Stage.COLLECT_MASKED_VECTORS else set())
    found = []
    if set(content) != expected:
        found.append(f"records {sorted(content)}; expected {sorted(expected)}")
    if CAMPUS in content.config_records and set(content.config_records[CAMPUS]) != {"name"}:
        found.append(f"campus record keys {sorted(content.config_records[CAMPUS])}; expected ['name']")
    if SECAGG not in content.config_records:  # reported with the records
        return found
    if RECORD_KEY_STATE not in context.state.config_records:
        return [*found, f"no SecAgg+ state on this campus for the {stage} reply"]
    check = {Stage.SETUP: _setup_problems, Stage.SHARE_KEYS: _share_keys_problems,
             Stage.COLLECT_MASKED_VECTORS: _masked_vector_problems, Stage.UNMASK: _unmask_problems}[stage]
    try:
        state = SecAggPlusState(**context.state.config_records[RECORD_KEY_STATE])
        found += check(asked, content, state, msg, min_cohort)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as err:  # malformed: fail closed
        found.append(f"the {stage} reply is not the declared SecAgg+ message ({type(err).__name__}: {err})")
    return found


def _setup_problems(asked, content, state: SecAggPlusState, msg, min_cohort) -> list[str]:
    values = content.config_records[SECAGG]
    if set(values) != {Key.PUBLIC_KEY_1, Key.PUBLIC_KEY_2}:
        return [f"setup reply keys {sorted(values)}; expected the two public keys {Key.PUBLIC_KEY_1}, {Key.PUBLIC_KEY_2}"]
    own = [public_key_to_bytes(bytes_to_private_key(sk).public_key()) for sk in (state.sk1, state.sk2)]
    if [values[Key.PUBLIC_KEY_1], values[Key.PUBLIC_KEY_2]] != own:
        return ["the setup reply's keys are not the public halves of this campus's own SecAgg+ key pairs"]
    return []


def _share_keys_problems(asked, content, state: SecAggPlusState, msg, min_cohort) -> list[str]:
    values = content.config_records[SECAGG]
    if set(values) != {Key.DESTINATION_LIST, Key.CIPHERTEXT_LIST}:
        return [f"share_keys reply keys {sorted(values)}; expected {Key.DESTINATION_LIST}, {Key.CIPHERTEXT_LIST}"]
    dsts, ciphertexts = list(values[Key.DESTINATION_LIST]), list(values[Key.CIPHERTEXT_LIST])
    announced = sorted({int(k) for k in asked if k != Key.STAGE} - {state.nid})
    if sorted(dsts) != announced or len(ciphertexts) != len(dsts):
        return [f"{len(ciphertexts)} ciphertexts to nodes {sorted(dsts)}; expected one to each neighbour the "
                f"coordinator announced ({announced})"]
    seeds, keys = [state.rd_seed_share_dict[state.nid]], [state.sk1_share_dict[state.nid]]
    for dst, ciphertext in zip(dsts, ciphertexts):
        try:
            src, to, seed_share, key_share = share_keys_plaintext_separate(decrypt(state.ss2_dict[dst], ciphertext))
        except InvalidToken:
            return [f"the ciphertext to node {dst} is not encrypted under this campus's pairwise key with it"]
        if (src, to) != (state.nid, dst) or (len(seed_share), len(key_share)) != (len(seeds[0]), len(keys[0])):
            return [f"the ciphertext to node {dst} holds more than this campus's two key shares for that node"]
        seeds.append(seed_share)
        keys.append(key_share)
    t = state.threshold
    if combine_shares(seeds[:t]) != state.rd_seed or combine_shares(keys[:t]) != state.sk1:
        return ["the encrypted shares do not rebuild this campus's own mask seed and masking key"]
    return []


def _masked_vector_problems(asked, content, state: SecAggPlusState, msg, min_cohort) -> list[str]:
    values = content.config_records[SECAGG]
    if set(values) != {Key.MASKED_PARAMETERS}:
        return [f"masked-vector reply keys {sorted(values)}; expected {Key.MASKED_PARAMETERS}"]
    found = []
    cfg = RunConfig.from_flower(dict(msg.content[CONFIG]))
    model = cfg.model
    expected = [[1]] + [shape for _, shape, _ in _expected_arrays(model, cfg.task)]  # the weight, then the parameters
    masked = [bytes_to_ndarray(b) for b in values[Key.MASKED_PARAMETERS]]
    shapes = [list(a.shape) for a in masked]
    if shapes != expected:
        found.append(f"masked arrays of shapes {shapes}; expected the weight and the {model} model's parameters {expected}")
    elif any(a.dtype != np.int64 or a.min() < 0 or a.max() >= state.mod_range for a in masked):
        found.append(f"the masked vector holds values other than integers in [0, {state.mod_range})")
    if len(content.array_records[FIT_PARAMETERS]):
        found.append(f"plain model arrays {sorted(content.array_records[FIT_PARAMETERS])} next to the masked vector")
    metrics = content.config_records[FIT_METRICS]
    found += _metric_problems(metrics, TRAIN_METRICS, min_cohort)
    if dict(content.metric_records[FIT_NUM_EXAMPLES]) != {"num_examples": metrics.get(NUM_EXAMPLES)}:
        found.append(f"the example count {dict(content.metric_records[FIT_NUM_EXAMPLES])} is not the metrics' {NUM_EXAMPLES}")
    if dict(content.config_records[FIT_STATUS]) != FIT_OK:
        found.append(f"status {dict(content.config_records[FIT_STATUS])}; expected {FIT_OK}")
    return found


def _unmask_problems(asked, content, state: SecAggPlusState, msg, min_cohort) -> list[str]:
    values = content.config_records[SECAGG]
    if set(values) != {Key.NODE_ID_LIST, Key.SHARE_LIST}:
        return [f"unmask reply keys {sorted(values)}; expected {Key.NODE_ID_LIST}, {Key.SHARE_LIST}"]
    active, dropped = list(asked[Key.ACTIVE_NODE_ID_LIST]), list(asked[Key.DEAD_NODE_ID_LIST])
    both = sorted(set(active) & set(dropped) | {state.nid} & set(dropped))
    if both:
        return [f"shares of both the mask seed and the masking key of nodes {both}"]
    owed = [state.rd_seed_share_dict[n] for n in active] + [state.sk1_share_dict[n] for n in dropped]
    if list(values[Key.NODE_ID_LIST]) != active + dropped or list(values[Key.SHARE_LIST]) != owed:
        return ["the unmask reply holds other shares than the one share asked for each node"]
    return []


def _answer_violations(msg: Message, reply: Message, k: int) -> list[str]:
    """What in a query reply's answer record is not the declared StatisticAnswer of the query in ``msg``."""
    record = reply.content.config_records[ANSWER]
    data = record.get(ANSWER)
    if set(record) != {ANSWER} or not isinstance(data, bytes):
        return [f"answer record keys {sorted(record)}; expected one serialized StatisticAnswer under {ANSWER!r}"]
    try:
        answer = StatisticAnswer.FromString(data)
    except DecodeError:
        return ["the answer is not a StatisticAnswer"]
    answer.DiscardUnknownFields()
    if answer.SerializeToString() != data:
        return ["the answer holds bytes that are not StatisticAnswer fields"]
    found = answer_problems(StatisticQuery.FromString(msg.content[CONFIG][QUERY_KEY]), answer, k)
    campus = reply.content.config_records.get(CAMPUS, {}).get("name")
    if answer.campus != campus:
        found.append(f"answer of campus {answer.campus!r} in the reply of campus {campus!r}")
    return found


def release_guard(msg: Message, context: Context, call_next: Callable[[Message, Context], Message]) -> Message:
    """Flower client mod: let a reply leave only if :func:`violations` (:func:`secagg_violations` for a
    SecAgg+ stage) finds nothing; log every outcome.

    What the coordinator gets back on anything but a clean reply holds nothing
    computed from the campus's data: a refusal (``REFUSED``) carries the
    refusal's reason, which names the policy key or the setting and is built
    from the request, the policy and the ledger only; a blocked reply
    (``BLOCKED``) and a fault (``FAILED``: any other exception, such as data
    that no longer validate) carry a fixed sentence naming the campus and the
    message type. The details (which record, which value) stay in the
    campus's audit log.
    """
    record = AuditRecord(recorded_at="", campus=str(context.node_config.get("campus", "")),
                         message_type=msg.metadata.message_type)
    state_dir = None
    try:
        setup = campus_setup(context.node_config)
        state_dir, record.campus = setup.state_dir, setup.name
        config = msg.content.config_records.get(CONFIG, {})
        record.run_id, record.server_round = run_id(config, context), int(config.get("server-round", 0))
        record.message_type = message_kind(msg)
        return _guarded(msg, context, call_next, setup, record)
    except Exception as err:  # a fault, not a decision: the reason stays here
        record.sent, record.reason, record.recorded_at = False, f"failed: {type(err).__name__}: {err}", now()
        if state_dir is not None:
            _log(state_dir, record)
        logger.exception("campus %s: the %s message failed", record.campus, record.message_type)
        return Message(Error(code=FAILED, reason=fault_reason(record.campus, record.message_type)), reply_to=msg)


def fault_reason(campus: str, message_type: str) -> str:
    """The fixed reason of a ``FAILED`` reply: which campus, which message, where the details are."""
    return f"campus {campus}: the {message_type} message failed on the campus (details in its audit log)"


def _guarded(msg: Message, context: Context, call_next: Callable[[Message, Context], Message], setup: CampusSetup,
             record: AuditRecord) -> Message:
    stage = secagg_stage(msg)
    asked = None if stage is None else dict(msg.content.config_records[SECAGG])  # as it arrived: the mod consumes it
    try:
        reply = call_next(msg, context)
    except (CampusRefusal, ConfigError, PolicyError) as err:
        record.sent, record.reason, record.recorded_at = False, f"refused: {err}", now()
        _log(setup.state_dir, record)
        return Message(Error(code=REFUSED, reason=str(err)), reply_to=msg)
    min_cohort = setup.policy.release.min_cohort_size if setup.policy else 0
    problems = (violations(msg, reply, min_cohort) if stage is None
                else secagg_violations(stage, asked, msg, reply, context, min_cohort))
    record.sent = not problems
    record.reason = "; ".join(problems)
    record.arrays.extend(array_specs(reply.content) + _masked_specs(reply))
    metrics = reply.content.metric_records.get(METRICS, reply.content.config_records.get(FIT_METRICS))
    if metrics is not None:
        record.metric_keys.extend(sorted(metrics))
        n = metrics.get(NUM_EXAMPLES, 0)
        record.num_examples = int(n) if isinstance(n, int) else 0
    record.payload_bytes, record.payload_sha256 = payload_digest(reply.content)
    if record.sent and record.message_type in ("train", "query", f"secaggplus:{Stage.COLLECT_MASKED_VECTORS}"):
        record.dp.CopyFrom(_dp_release(setup.state_dir, record.run_id, record.server_round))
    record.recorded_at = now()
    _log(setup.state_dir, record)
    if problems:
        return Message(Error(code=BLOCKED, reason=f"campus {setup.name}: release guard blocked the {record.message_type} "
                                                  "reply (details in its audit log)"), reply_to=msg)
    return reply


def _refuse_unknown(msg: Message, context: Context) -> Message:
    raise CampusRefusal(f"campus {campus_setup(context.node_config).name} refuses message type "
                        f"{msg.metadata.message_type!r}: it answers only {', '.join(HANDLED)}")


HANDLED = (MessageType.TRAIN, MessageType.EVALUATE, MessageType.QUERY)
"""The message types a campus answers (each with its default action)."""


class GuardedClientApp(ClientApp):
    """Flower's ClientApp, but a message of a type the campus does not answer (e.g. ``train.other``) is refused
    through :func:`release_guard` and audited, instead of failing before any mod runs."""

    def __call__(self, message: Message, context: Context) -> Message:
        kind = message.metadata.message_type
        if kind in HANDLED or kind in (f"{t}.default" for t in HANDLED):
            return super().__call__(message, context)
        return release_guard(message, context, _refuse_unknown)


def _masked_specs(reply: Message) -> list[ArraySpec]:
    """Shape and dtype of each array of a SecAgg+ masked vector in ``reply`` (none elsewhere)."""
    values = reply.content.config_records.get(SECAGG, {}).get(Key.MASKED_PARAMETERS, [])
    specs = []
    for i, data in enumerate(values if isinstance(values, list) else []):
        try:
            array = bytes_to_ndarray(data)
        except (TypeError, ValueError, EOFError):
            continue  # not an array: the guard blocks the reply
        specs.append(ArraySpec(name=f"{Key.MASKED_PARAMETERS}[{i}]", shape=list(array.shape), dtype=str(array.dtype)))
    return specs


def _dp_release(state_dir, run: str, server_round: int) -> DpRelease:
    with closing(PrivacyLedger(state_dir)) as ledger:
        mine = [r for r in ledger.releases(run_id=run) if r.server_round == server_round]
    if not mine:
        return DpRelease()
    r = mine[-1]
    return DpRelease(mechanism=r.mechanism, noise_multiplier=r.noise_multiplier, sample_rate=r.sample_rate,
                     steps=r.steps, epsilon=r.epsilon, delta=r.delta, accountant=r.accountant)


def _log(state_dir, record: AuditRecord) -> None:
    with closing(AuditLog(state_dir)) as log:
        log.append(record)
