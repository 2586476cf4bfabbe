"""The release guard: a Flower client-side mod that checks, and logs, everything leaving the campus.

Every reply of the ClientApp passes :func:`release_guard` on its way out. It
is let through only when it holds exactly what the protocol declares:

* ``train``: the model's parameter arrays (the names, shapes and dtypes of the
  run's model), the declared training metrics, and the campus name;
* ``evaluate``: the declared evaluation metrics and the campus name;
* ``query``: one serialized ``StatisticAnswer`` (``protos/analytics.proto``)
  holding only cells the query declares, each with a noisy count of at least
  ``release.min_cohort_size`` (10 without a policy), and the campus name;

with every metric a single number and, under a campus policy, computed on at
least ``release.min_cohort_size`` records. Anything else (an extra array or
record, a string, a list of per-student values, a metric on too few records)
is blocked: the coordinator gets an error reply (code ``BLOCKED``) saying it
was blocked, and nothing of the content. A request the ClientApp refuses (its
policy, its privacy budget, an invalid configuration) is answered with an
error reply (code ``REFUSED``) carrying only the reason. Every outcome, sent,
blocked or refused, is written to the campus's audit log
(:mod:`federation.audit`) before the mod returns.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from contextlib import closing

from flwr.app import Context, Error, Message
from google.protobuf.message import DecodeError

from federation.audit import AuditLog, array_specs, now, payload_digest
from federation.ledger import PrivacyLedger
from federation.models import build_model
from federation.proto.analytics_pb2 import StatisticAnswer, StatisticQuery
from federation.proto.audit_pb2 import AuditRecord, DpRelease
from federation.policy import PolicyError
from federation.runconfig import (ARRAYS, BLOCKED, CAMPUS, CONFIG, EVALUATE_METRICS, METRICS, NUM_EXAMPLES, REFUSED,
                                  TRAIN_METRICS, ConfigError, RunConfig)
from federation.statistics import ANSWER, MIN_CELL_COUNT, QUERY_KEY, answer_problems
from federation.tasks import feature_names

from .node import CampusRefusal, campus_setup, run_id

@functools.lru_cache(maxsize=None)
def _expected_arrays(model_name: str) -> list[tuple[str, list[int], str]]:
    # (name, shape, dtype) of each parameter of the model; built once per model per process
    model = build_model(model_name, len(feature_names()))
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
        if sent != _expected_arrays(cfg.model):
            found.append(f"arrays {sent} are not the {cfg.model} model's parameters")
    if METRICS in content.metric_records:
        metrics = content.metric_records[METRICS]
        keys = TRAIN_METRICS if kind == "train" else EVALUATE_METRICS
        if set(metrics) != set(keys):
            found.append(f"metric keys {sorted(metrics)}; expected {sorted(keys)}")
        lists = sorted(k for k in metrics if isinstance(metrics[k], list))
        if lists:
            found.append(f"metrics {lists} hold lists of values; only single numbers may leave")
        n = metrics.get(NUM_EXAMPLES, 0)
        if isinstance(n, (int, float)) and n < min_cohort:
            found.append(f"metrics computed on {n} records, fewer than release.min_cohort_size {min_cohort}")
    if CAMPUS in content.config_records and set(content.config_records[CAMPUS]) != {"name"}:
        found.append(f"campus record keys {sorted(content.config_records[CAMPUS])}; expected ['name']")
    if kind == "query" and ANSWER in content.config_records:
        found += _answer_violations(msg, reply, min_cohort or MIN_CELL_COUNT)  # no policy: the default k
    return found


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
    """Flower client mod: let a reply leave only if :func:`violations` finds nothing; log every outcome."""
    setup = campus_setup(context.node_config)
    config = msg.content.config_records.get(CONFIG, {})
    run = run_id(config, context)
    record = AuditRecord(recorded_at="", campus=setup.name, run_id=run, server_round=int(config.get("server-round", 0)),
                         message_type=msg.metadata.message_type)
    try:
        reply = call_next(msg, context)
    except (CampusRefusal, ConfigError, PolicyError) as err:
        record.sent, record.reason, record.recorded_at = False, f"refused: {err}", now()
        _log(setup.state_dir, record)
        return Message(Error(code=REFUSED, reason=str(err)), reply_to=msg)
    except Exception as err:  # a fault, not a decision: Flower reports it as the ClientApp's exception
        record.sent, record.reason, record.recorded_at = False, f"failed: {type(err).__name__}: {err}", now()
        _log(setup.state_dir, record)
        raise
    problems = violations(msg, reply, setup.policy.release.min_cohort_size if setup.policy else 0)
    record.sent = not problems
    record.reason = "; ".join(problems)
    record.arrays.extend(array_specs(reply.content))
    if METRICS in reply.content.metric_records:
        metrics = reply.content.metric_records[METRICS]
        record.metric_keys.extend(sorted(metrics))
        n = metrics.get(NUM_EXAMPLES, 0)
        record.num_examples = int(n) if isinstance(n, int) else 0
    record.payload_bytes, record.payload_sha256 = payload_digest(reply.content)
    if record.sent and msg.metadata.message_type in ("train", "query"):
        record.dp.CopyFrom(_dp_release(setup.state_dir, run, record.server_round))
    record.recorded_at = now()
    _log(setup.state_dir, record)
    if problems:
        return Message(Error(code=BLOCKED, reason=f"campus {setup.name}: release guard blocked the reply ({record.reason})"), reply_to=msg)
    return reply


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
