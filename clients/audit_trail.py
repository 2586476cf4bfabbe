"""What the campus writes to its audit log about each outgoing reply (:mod:`federation.audit`).

A record names the request's kind, says what the reply held (its arrays'
names, shapes and dtypes, its metric keys, its size and SHA-256), the DP
parameters the privacy ledger recorded for the release, and whether it left.
"""

from __future__ import annotations

from pathlib import Path

from flwr.app import Message

from edufl.federation.audit import AuditLog, array_specs, payload_digest
from edufl.federation.ledger import PrivacyLedger
from edufl.federation.proto.audit_pb2 import AuditRecord, DpRelease
from edufl.federation.wire import EVALUATION, METRICS, NUM_EXAMPLES

from .secagg_checks import FIT_METRICS, masked_specs, secagg_stage

__all__ = ["describe_reply", "ledger_release", "message_kind", "write_record"]


def message_kind(msg: Message) -> str:
    """The request's kind as the audit log names it: its message type, or ``secaggplus:<stage>``."""
    stage = secagg_stage(msg)
    return msg.metadata.message_type if stage is None else f"secaggplus:{stage}"


def describe_reply(record: AuditRecord, reply: Message) -> None:
    """Fill ``record`` in place with what ``reply`` holds: array specs (a SecAgg+ masked vector's too),
    metric keys (those of an evaluation sent with a train reply prefixed ``evaluation:``), the number of
    records its metrics were computed on (0 when not an integer), and the payload's size (bytes) and SHA-256."""
    record.arrays.extend(array_specs(reply.content) + masked_specs(reply))
    metrics = reply.content.metric_records.get(METRICS, reply.content.config_records.get(FIT_METRICS))
    if metrics is not None:
        record.metric_keys.extend(sorted(metrics))
        n = metrics.get(NUM_EXAMPLES, 0)
        record.num_examples = int(n) if isinstance(n, int) else 0
    if EVALUATION in reply.content.metric_records:
        record.metric_keys.extend(f"{EVALUATION}:{key}" for key in sorted(reply.content.metric_records[EVALUATION]))
    record.payload_bytes, record.payload_sha256 = payload_digest(reply.content)


def ledger_release(state_dir: Path, run: str, server_round: int) -> DpRelease:
    """The DP parameters of the last release the privacy ledger in ``state_dir`` recorded for round
    ``server_round`` of ``run``; an empty ``DpRelease`` when it recorded none."""
    with PrivacyLedger(state_dir) as ledger:
        mine = [r for r in ledger.releases(run_id=run) if r.server_round == server_round]
    return mine[-1].dp if mine else DpRelease()


def write_record(state_dir: Path, record: AuditRecord) -> None:
    """Append ``record`` to the audit log in ``state_dir``, committed before this returns."""
    with AuditLog(state_dir) as log:
        log.append(record)
