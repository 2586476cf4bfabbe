"""Secure aggregation on the campus: Flower's SecAgg+ client mod around the campus's own train handler.

A run with ``secure-aggregation = "secaggplus"`` trains through Flower's
``SecAggPlusWorkflow`` (:mod:`server.secagg`). Each round is four ``train``
messages, one per stage of the protocol (Bell et al., CCS 2020), handled by
Flower's ``secaggplus_mod``:

1. ``setup``: the campus makes two key pairs and sends their public halves;
2. ``share_keys``: it splits its mask seed and its masking key into Shamir
   shares and sends each neighbour its shares, encrypted for that neighbour;
3. ``collect_masked_vectors``: it trains (the ordinary train handler: campus
   policy, DP-SGD, privacy ledger, all unchanged) and sends the weighted,
   quantized update with masks added that cancel only in the sum;
4. ``unmask``: it sends the shares the coordinator needs to remove the masks
   of the sum: of the mask seed of each campus that sent its vector, of the
   masking key of each that dropped out.

:func:`secure_aggregation_mod` (a mod on the train handler only, inside the
release guard) refuses stage requests that would let the coordinator unmask
one campus's update, then runs ``secaggplus_mod``, with
:func:`legacy_fit_adapter` between it and the train handler: the mod speaks
Flower's legacy FitIns/FitRes, the handler the Message API. The release guard
(:mod:`clients.guard`) checks and logs every stage's reply.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_STATE, Key, Stage
from flwr.compat.common.recorddict_compat import fitres_to_recorddict

from edufl.federation.runconfig import ConfigError, RunConfig
from edufl.federation.secaggplus import doubly_named, named_arrays
from edufl.federation.wire import ARRAYS, CAMPUS, CONFIG, METRICS, NUM_EXAMPLES

from .node import CampusRefusal, campus_setup
from .reply_checks import expected_arrays
from .secagg_checks import FIT_OK, SECAGG, secagg_stage

__all__ = ["check_stage_request", "legacy_fit_adapter", "secure_aggregation_mod"]

FITINS_PARAMETERS = "fitins.parameters"  # the global model in Flower's legacy FitIns (unnamed arrays)


def secure_aggregation_mod(msg: Message, context: Context, call_next: Callable[[Message, Context], Message]) -> Message:
    """Flower client mod: run a SecAgg+ stage request through ``secaggplus_mod``; pass any other message on.

    Every stage reply names the campus (as every other reply does).

    Raises
    ------
    CampusRefusal
        Before the stage runs, when the request would let the coordinator
        rebuild this campus's secrets (:func:`check_stage_request`); for a
        plain training request in a run whose configuration says it runs under
        secure aggregation.
    """
    stage = secagg_stage(msg)
    name = campus_setup(context.node_config).name
    if stage is None:
        if msg.content.config_records.get(CONFIG, {}).get("secure-aggregation", "off") != "off":
            raise CampusRefusal(f"campus {name} refuses to send a plain model update in a run under secure aggregation")
        return call_next(msg, context)
    check_stage_request(name, stage, dict(msg.content.config_records[SECAGG]), msg.metadata.dst_node_id)
    reply = secaggplus_mod(msg, context, lambda m, c: legacy_fit_adapter(m, c, call_next))
    if not reply.has_error() and CAMPUS not in reply.content:
        reply.content[CAMPUS] = ConfigRecord({"name": name})
    return reply


def check_stage_request(campus: str, stage: str, values: dict, node_id: int) -> None:
    """Refuse a SecAgg+ stage request that would weaken what the protocol hides from the coordinator.

    * ``setup`` with fewer than 3 shares, or a reconstruction threshold of half
      the shares or fewer. Each holder of a share of this campus's secrets gives
      the coordinator at most one of the two shares it holds (of the mask seed
      if the coordinator says the campus is active, of the masking key if it says
      the campus dropped out); with a threshold t <= shares / 2, a coordinator
      telling one half of the holders one thing and the other half the other
      could collect t of each and unmask this campus's update alone.
    * ``unmask`` naming a node both active and dropped, or this campus dropped
      (it asks for both shares of one campus's secrets).

    Raises
    ------
    CampusRefusal
        Naming the campus, the stage and the reason.
    """
    if stage == Stage.SETUP:
        shares, threshold = values.get(Key.SHARE_NUMBER), values.get(Key.THRESHOLD)
        if not (isinstance(shares, int) and isinstance(threshold, int) and shares >= 3 and 2 * threshold > shares):
            raise CampusRefusal(
                f"campus {campus} refuses SecAgg+ setup with {shares} shares and reconstruction threshold {threshold}: "
                "it needs at least 3 shares and a threshold above half of them, or the coordinator could rebuild "
                "this campus's secrets and unmask its update"
            )
    elif stage == Stage.UNMASK:
        both = doubly_named(values.get(Key.ACTIVE_NODE_ID_LIST, []), values.get(Key.DEAD_NODE_ID_LIST, []), node_id)
        if both:
            raise CampusRefusal(
                f"campus {campus} refuses SecAgg+ unmask: nodes {both} are named both active and "
                "dropped out, which would reveal both shares of their secrets"
            )


def legacy_fit_adapter(msg: Message, context: Context, call_next: Callable[[Message, Context], Message]) -> Message:
    """Serve a legacy fit request (what ``secaggplus_mod`` passes on) with the Message-API train handler.

    The request's unnamed FitIns arrays become the run model's named
    parameters, and the run configuration comes from its ``config`` record
    (the coordinator adds one to every stage message); the handler's reply
    (arrays, metrics, campus) becomes Flower's legacy FitRes, the format
    ``secaggplus_mod`` masks. Any other record of the reply is passed on as is,
    for the release guard to block.

    Raises
    ------
    ConfigError
        When the request has no run configuration, or its arrays are not the run model's parameters.
    CampusRefusal
        When this campus's weight (its training rows) exceeds the setup's
        maximum weight: quantization would clip its weighted update.
    """
    if CONFIG not in msg.content.config_records:
        raise ConfigError("a SecAgg+ training request without the run configuration")
    config = msg.content.config_records[CONFIG]
    cfg = RunConfig.from_flower(dict(config))
    request = Message(
        RecordDict({ARRAYS: _named(cfg, msg.content.array_records[FITINS_PARAMETERS]), CONFIG: config}),
        metadata=copy.copy(msg.metadata),
    )
    reply = call_next(request, context).content
    metrics = reply.metric_records[METRICS]
    n = int(metrics[NUM_EXAMPLES])
    max_weight = float(context.state.config_records[RECORD_KEY_STATE]["max_weight"])
    if n > max_weight:
        raise CampusRefusal(
            f"campus {campus_setup(context.node_config).name}: its {n} training rows exceed the SecAgg+ "
            f"maximum weight {max_weight:g}, so its masked update would be clipped; "
            f"the coordinator must set secagg-max-weight >= {n}"
        )
    parameters = ndarrays_to_parameters([array.numpy() for array in reply.array_records[ARRAYS].values()])
    status = Status(code=Code(FIT_OK["code"]), message=FIT_OK["message"])
    content = fitres_to_recorddict(FitRes(status, parameters, n, dict(metrics)), keep_input=True)
    for name, record in reply.items():
        if name not in (ARRAYS, METRICS):
            content[name] = record
    return Message(content, reply_to=msg)


def _named(cfg: RunConfig, record: ArrayRecord) -> ArrayRecord:
    specs = expected_arrays(cfg)
    try:
        return named_arrays(record, specs)
    except ValueError:
        raise ConfigError(f"the SecAgg+ training request's arrays are not the {cfg.model} model's parameters") from None
