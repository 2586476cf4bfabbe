"""What a campus's ``train``, ``evaluate`` and ``query`` replies may hold, and everything else found in one.

* ``train``: the model's parameter arrays (the names, shapes and dtypes of the
  run's model), the declared training metrics, and the campus name; when the
  request asked for it (``evaluate-received``), also the evaluation of the
  received model, held to the rules of an ``evaluate`` reply's metrics;
* ``evaluate``: the task's declared evaluation metrics, the declared
  per-subgroup count, metric and metric interval of any subgroup with at least
  ``release.min_cohort_size`` test rows, and the campus name;
* ``query``: one serialized ``StatisticAnswer`` (``protos/analytics.proto``)
  holding only cells the query declares, each with a noisy count of at least
  ``release.min_cohort_size`` times the query's
  ``max_rows_per_registration`` (submission statistics), and the campus name;

with every metric a single number computed on at least the campus policy's
``release.min_cohort_size`` records.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

from flwr.app import Message
from google.protobuf.message import DecodeError

from edufl.federation.audit import array_specs
from edufl.federation.metrics import SUBGROUPS, TRAIN_METRICS, evaluate_metrics, subgroup_keys
from edufl.federation.models import WEIGHTS, build_model, n_weights
from edufl.federation.proto.analytics_pb2 import StatisticAnswer, StatisticQuery
from edufl.federation.queries import ANSWER, QUERY_KEY
from edufl.federation.runconfig import RunConfig
from edufl.federation.schema import schema_from_text
from edufl.federation.statistics import answer_problems
from edufl.federation.tasks import feature_names, n_outputs
from edufl.federation.wire import ARRAYS, CAMPUS, CONFIG, EVALUATE_RECEIVED, EVALUATION, METRICS, NUM_EXAMPLES

__all__ = ["expected_arrays", "metric_problems", "violations"]


def expected_arrays(cfg: RunConfig) -> list[tuple[str, list[int], str]]:
    """(name, shape, dtype) of each array of a train reply for ``cfg``'s task and model under its federation
    schema: its one flat weights array (:func:`~federation.models.model_arrays`; built once per model, width and
    outputs per process). Raises ValueError for an unknown model or task."""
    return _weights(cfg.model, len(feature_names(cfg.schema)), n_outputs(cfg.task, cfg.schema))


@functools.cache
def _weights(model_name: str, width: int, outputs: int) -> list[tuple[str, list[int], str]]:
    return [(WEIGHTS, [n_weights(build_model(model_name, width, outputs=outputs))], "float32")]


def violations(msg: Message, reply: Message, min_cohort: int) -> list[str]:
    """Everything in ``reply`` (to the ``train``, ``evaluate`` or ``query`` request ``msg``) that the protocol
    does not declare, one sentence each; empty if it may leave. ``min_cohort`` is the policy's
    ``release.min_cohort_size``."""
    kind = msg.metadata.message_type
    content = reply.content
    expected = {"train": {ARRAYS, METRICS, CAMPUS}, "evaluate": {METRICS, CAMPUS}, "query": {ANSWER, CAMPUS}}.get(kind)
    if expected is None:
        return [f"message type {kind!r} is not released by this campus"]
    evaluated = kind == "train" and bool(msg.content[CONFIG].get(EVALUATE_RECEIVED))
    found = []
    if evaluated and EVALUATION in content:  # may be left out: a campus with too few test rows sends none
        expected = {*expected, EVALUATION}
    if set(content) != expected:
        found.append(f"records {sorted(content)}; expected {sorted(expected)}")
    if kind == "train" and ARRAYS in content.array_records:
        cfg = RunConfig.from_flower(dict(msg.content[CONFIG]))
        sent = [(s.name, list(s.shape), s.dtype) for s in array_specs(content)]
        if sent != expected_arrays(cfg):
            found.append(f"arrays {sent} are not the {cfg.model} model's parameters")
    if METRICS in content.metric_records:
        metrics = content.metric_records[METRICS]
        found += (
            metric_problems(metrics, TRAIN_METRICS, min_cohort)
            if kind == "train"
            else _evaluatemetric_problems(msg, metrics, min_cohort)
        )
    if evaluated and EVALUATION in content.metric_records:
        found += _evaluatemetric_problems(msg, content.metric_records[EVALUATION], min_cohort)
    if CAMPUS in content.config_records and set(content.config_records[CAMPUS]) != {"name"}:
        found.append(f"campus record keys {sorted(content.config_records[CAMPUS])}; expected ['name']")
    if kind == "query" and ANSWER in content.config_records:
        found += _answer_violations(msg, reply, min_cohort)
    return found


def metric_problems(metrics: Mapping[str, Any], keys: tuple[str, ...], min_cohort: int) -> list[str]:
    """What in a metrics record is not the declared ``keys`` with single numbers computed on >= ``min_cohort``
    records (counted by its ``num-examples``); empty when it may leave."""
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


def _evaluatemetric_problems(msg: Message, metrics, k: int) -> list[str]:
    """What in an evaluate reply's metrics is not the task's declared metrics plus, for each subgroup sent, its
    declared count, metric and interval (:func:`federation.metrics.subgroup_keys`) on at least ``k`` records,
    with, per attribute, 0 or at least k test rows outside the groups sent (else a
    smaller group's size follows by subtraction)."""
    cfg = RunConfig.from_flower(dict(msg.content[CONFIG]))
    sent = {group: keys for group, keys in subgroup_keys(cfg.task, cfg.schema).items() if set(keys) & set(metrics)}
    declared = evaluate_metrics(cfg.task, cfg.schema)
    found = metric_problems(metrics, (*declared, *(key for keys in sent.values() for key in keys)), k)
    counts = {group: metrics.get(count) for group, (count, *_) in sent.items()}
    if any(type(n) not in (int, float) for n in [*counts.values(), metrics.get(NUM_EXAMPLES)]):
        return found  # a missing count, or not a single number: reported above
    for (attribute, value), n in counts.items():
        if n < k:
            found.append(f"subgroup {attribute}={value}: metrics computed on {n} records, fewer than {k}")
    for attribute in SUBGROUPS:
        rest = metrics[NUM_EXAMPLES] - sum(n for (a, _), n in counts.items() if a == attribute)
        if any(a == attribute for a, _ in counts) and 0 < rest < k:
            found.append(
                f"subgroup {attribute}: {rest} test records outside the groups sent, fewer than {k} "
                "(their count follows by subtraction)"
            )
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
    config = msg.content[CONFIG]
    schema = schema_from_text(str(config.get("federation-schema", "")))
    found = answer_problems(StatisticQuery.FromString(config[QUERY_KEY]), answer, k, schema)
    campus = reply.content.config_records.get(CAMPUS, {}).get("name")
    if answer.campus != campus:
        found.append(f"answer of campus {answer.campus!r} in the reply of campus {campus!r}")
    return found
