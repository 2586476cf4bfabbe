"""The protobuf contracts in protos/: generated code is current, and records and statistic messages survive a round trip."""

from __future__ import annotations

import math
from pathlib import Path

from edufl.federation.proto.analytics_pb2 import Cell, StatisticAnswer, StatisticQuery
from edufl.federation.proto.audit_pb2 import ArraySpec, AuditRecord, DpRelease

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
    record = AuditRecord(
        recorded_at="2026-11-30T10:00:00+00:00",
        campus="AAA",
        run_id="r1",
        server_round=3,
        message_type="train",
        sent=True,
        arrays=[ArraySpec(name="0.0.weight", shape=[1, 54], dtype="float32")],
        metric_keys=["epsilon"],
        payload_bytes=220,
        payload_sha256="ab" * 32,
        dp=DpRelease(
            mechanism="none", noise_multiplier=0.0, sample_rate=0.1, steps=9, epsilon=math.inf, delta=1e-5, accountant="rdp"
        ),
        num_examples=563,
    )
    again = AuditRecord.FromString(record.SerializeToString())
    assert again == record and math.isinf(again.dp.epsilon) and list(again.arrays[0].shape) == [1, 54]


def test_statistic_query_and_answer_round_trip():
    query = StatisticQuery(
        name="w",
        statistic="mean",
        value="final_result=Withdrawn",
        low=0.0,
        high=1.0,
        group_by=["imd_band", "age_band"],
        epsilon=1.0,
        delta=1e-5,
    )
    histogram = StatisticQuery(
        name="h", statistic="histogram", value="studied_credits", bin_edges=[30, 60, 660], epsilon=0.5, delta=1e-6
    )
    answer = StatisticAnswer(
        campus="AAA",
        query_name="w",
        noise_multiplier=4.06,
        count_std=5.75,
        sum_std=5.75,
        epsilon=0.995,
        delta=1e-5,
        suppressed_cells=3,
        min_cell_count=10,
        cells=[
            Cell(group=["0-10%", "0-35"], noisy_count=31.4, noisy_sum=12.2),
            Cell(group=["missing", "55<="], bin="", noisy_count=10.5),
        ],
    )
    for message in (query, histogram, answer):
        assert type(message).FromString(message.SerializeToString()) == message
    again = StatisticAnswer.FromString(answer.SerializeToString())
    assert again.cells[0].HasField("noisy_sum") and not again.cells[1].HasField("noisy_sum")  # a sum only where sent
    assert list(StatisticQuery.FromString(histogram.SerializeToString()).bin_edges) == [30.0, 60.0, 660.0]
