"""The protobuf contracts in protos/: generated code is current, and records survive a round trip."""

from __future__ import annotations

import math
from pathlib import Path

from federation.proto.audit_pb2 import ArraySpec, AuditRecord, DpRelease

ROOT = Path(__file__).parents[1]


def test_generated_code_is_current(tmp_path: Path):
    # The README's command ("Protobuf contracts"), written to a scratch folder and compared with the committed files.
    from grpc_tools import protoc

    protos = sorted(p.name for p in (ROOT / "protos").glob("*.proto"))
    args = ["protoc", f"-I{ROOT / 'protos'}", f"--python_out={tmp_path}", f"--pyi_out={tmp_path}", *protos]
    assert protoc.main(args) == 0, "protoc failed"
    generated = sorted(p.name for p in tmp_path.iterdir())
    assert generated == sorted(p.name for p in (ROOT / "federation" / "proto").glob("*_pb2.py*")), generated
    for name in generated:
        assert (tmp_path / name).read_text() == (ROOT / "federation" / "proto" / name).read_text(), (
            f"federation/proto/{name} is stale: regenerate it with the README's command"
        )


def test_audit_record_round_trip():
    record = AuditRecord(recorded_at="2026-11-30T10:00:00+00:00", campus="AAA", run_id="r1", server_round=3,
                         message_type="train", sent=True, arrays=[ArraySpec(name="0.0.weight", shape=[1, 54], dtype="float32")],
                         metric_keys=["epsilon"], payload_bytes=220, payload_sha256="ab" * 32,
                         dp=DpRelease(mechanism="none", noise_multiplier=0.0, sample_rate=0.1, steps=9, epsilon=math.inf,
                                      delta=1e-5, accountant="rdp"), num_examples=563)
    again = AuditRecord.FromString(record.SerializeToString())
    assert again == record and math.isinf(again.dp.epsilon) and list(again.arrays[0].shape) == [1, 54]
