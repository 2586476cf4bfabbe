"""The release guard: a Flower client-side mod that checks, and logs, everything leaving the campus.

Every reply of the ClientApp passes :func:`release_guard` on its way out. It
is let through only when it holds exactly what the protocol declares: for
``train``, ``evaluate`` and ``query`` as :mod:`clients.reply_checks` checks;
for the four stages of secure aggregation (SecAgg+, :mod:`clients.secagg`;
each a ``train`` message, logged as ``secaggplus:<stage>``) as
:mod:`clients.secagg_checks` checks. Anything else (an extra array or
record, a string, a list of per-student values, a metric on too few records)
is blocked: the coordinator gets an error reply (code ``BLOCKED``) saying it
was blocked, and nothing of the content. A request the ClientApp refuses (its
policy, its privacy budget, an invalid configuration, a message type it does
not answer, data that do not fit the run's federation schema or no longer
validate) is answered with an error reply (code ``REFUSED``) carrying only
the reason; a refusal's detail (which rows, which values) goes to the audit
log only. Any other failure (an exception while handling the message) is answered with an error reply (code
``FAILED``) carrying a fixed sentence, never the exception's text, which may
quote a student's record. Every outcome, sent, blocked, refused or failed, is
written to the campus's audit log (:mod:`clients.audit_trail`) with its details
before the mod returns.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from flwr.app import Context, Error, Message
from flwr.common.secure_aggregation.secaggplus_constants import Stage

from edufl.federation.policy import PolicyError
from edufl.federation.proto.audit_pb2 import AuditRecord
from edufl.federation.runconfig import ConfigError
from edufl.federation.store import now
from edufl.federation.wire import BLOCKED, CONFIG, FAILED, REFUSED

from .audit_trail import describe_reply, ledger_release, message_kind, write_record
from .node import CampusRefusal, CampusSetup, campus_setup, run_id
from .reply_checks import violations
from .secagg_checks import SECAGG, secagg_stage, secagg_violations

__all__ = ["release_guard"]

logger = logging.getLogger(__name__)


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
    record = AuditRecord(
        recorded_at="", campus=str(context.node_config.get("campus", "")), message_type=msg.metadata.message_type
    )
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
            write_record(state_dir, record)
        logger.exception("campus %s: the %s message failed", record.campus, record.message_type)
        return Message(Error(code=FAILED, reason=_fault_reason(record.campus, record.message_type)), reply_to=msg)


def _fault_reason(campus: str, message_type: str) -> str:
    """The fixed reason of a ``FAILED`` reply: which campus, which message, where the details are."""
    return f"campus {campus}: the {message_type} message failed on the campus (details in its audit log)"


def _guarded(
    msg: Message, context: Context, call_next: Callable[[Message, Context], Message], setup: CampusSetup, record: AuditRecord
) -> Message:
    stage = secagg_stage(msg)
    asked = None if stage is None else dict(msg.content.config_records[SECAGG])  # as it arrived: the mod consumes it
    try:
        reply = call_next(msg, context)
    except (CampusRefusal, ConfigError, PolicyError) as err:
        detail = f" (on this campus only: {err.detail})" if isinstance(err, CampusRefusal) and err.detail else ""
        record.sent, record.reason, record.recorded_at = False, f"refused: {err}{detail}", now()
        write_record(setup.state_dir, record)
        return Message(Error(code=REFUSED, reason=str(err)), reply_to=msg)
    min_cohort = setup.policy.release.min_cohort_size
    problems = (
        violations(msg, reply, min_cohort) if stage is None else secagg_violations(stage, asked, msg, reply, context, min_cohort)
    )
    record.sent = not problems
    record.reason = "; ".join(problems)
    describe_reply(record, reply)
    if record.sent and record.message_type in ("train", "query", f"secaggplus:{Stage.COLLECT_MASKED_VECTORS}"):
        record.dp.CopyFrom(ledger_release(setup.state_dir, record.run_id, record.server_round))
    record.recorded_at = now()
    write_record(setup.state_dir, record)
    if problems:
        return Message(
            Error(
                code=BLOCKED,
                reason=f"campus {setup.name}: release guard blocked the {record.message_type} reply (details in its audit log)",
            ),
            reply_to=msg,
        )
    return reply
