"""Secure aggregation (SecAgg+): Flower's SecAggPlusWorkflow and secaggplus_mod around the campus's own handlers.

In process, with a grid that hands each message to the campus ClientApp (fast,
stub handlers): the aggregate is FedAvg's, each stage's reply is checked by
the release guard and logged, tampering with any stage is blocked, requests
that would let the coordinator unmask one campus are refused. On the real
data, on Flower's simulation engine: a SecAgg+ run completes, the coordinator
receives no unmasked update, its aggregate is FedAvg of the campuses' own
updates within the quantization bound, ledgers and audit logs hold every release and stage.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common import bytes_to_ndarray, ndarrays_to_parameters
from flwr.common.secure_aggregation.secaggplus_constants import Key, Stage
from flwr.compat.common.recorddict_compat import parameters_to_arrayrecord
from flwr.serverapp import Grid
from flwr.supercore.primitives.asymmetric import generate_key_pairs, public_key_to_bytes

from edufl.clients.guard import release_guard
from edufl.clients.node import SIM_ENV, SIM_MANIFEST, CampusRefusal
from edufl.clients.secagg import check_stage_request, secure_aggregation_mod
from edufl.clients.secagg_checks import FIT_PARAMETERS, SECAGG
from edufl.federation.audit import AuditLog
from edufl.federation.ledger import PrivacyLedger
from edufl.federation.metrics import TRAIN_METRICS, evaluate_metrics
from edufl.federation.models import build_model, model_arrays
from edufl.federation.partition import campus_names, campus_slices
from edufl.federation.runconfig import RunConfig
from edufl.federation.schema import load_schema
from edufl.federation.secaggplus import named_arrays
from edufl.federation.tasks import feature_names
from edufl.federation.wire import ARRAYS, BLOCKED, CAMPUS, CONFIG, METRICS, NUM_EXAMPLES, REFUSED
from edufl.federation.writers import write_tables
from edufl.server.checkpoint import STOP_FILE
from edufl.server.reporting import ReportingStrategy
from edufl.server.results import Report
from edufl.server.secagg import CampusGrid, run_secaggplus
from edufl.server.strategies import build_strategy
from edufl.server.training import run_federation

OULAD = load_schema()
"""OULAD's federation schema (federation/schemas/oulad.toml)."""

STAGES = [f"secaggplus:{s}" for s in Stage.all()]
QUANTIZATION_STEP = 2 * 8.0 / 2**22  # SecAggPlusWorkflow's defaults: clipping range 8, quantization range 2**22


# --- in process: stub campuses behind the real mods, the real SecAgg+ workflow -------------------------------


class LocalGrid(Grid):
    """Delivers every message, as a copy (as the wire does), to the campus ClientApp of its node in this process;
    keeps every reply the coordinator receives in ``received``."""

    def __init__(self, app: ClientApp, contexts: dict[int, Context]):
        self.app, self.contexts, self.received = app, contexts, []

    def set_run(self, run) -> None:
        pass

    @property
    def run(self):
        return type("Run", (), {"run_id": 5})()

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        return Message(content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id)

    def get_node_ids(self):
        return list(self.contexts)

    def push_messages(self, messages):
        raise NotImplementedError

    def pull_messages(self, message_ids):
        raise NotImplementedError

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for message in messages:
            request = Message(copy.deepcopy(message.content), metadata=copy.deepcopy(message.metadata))
            try:
                reply = self.app(request, self.contexts[message.metadata.dst_node_id])
            except Exception as err:  # as Flower's engines do: the ClientApp's exception becomes an error reply
                reply = Message(Error(code=1, reason=f"{type(err).__name__}: {err}"), reply_to=request)
            replies.append(reply)
        self.received += replies
        return replies


def _stub_campus(tamper=None) -> ClientApp:
    """The campus ClientApp's mod chain around stub handlers: the model plus 0.01 x node id, on 100 x node id rows.

    ``tamper(stage, node, reply)`` may change a SecAgg+ stage reply before the release guard sees it."""
    app = ClientApp(mods=[release_guard])

    def tampering(msg, context, call_next):
        stage = msg.content.config_records[SECAGG][Key.STAGE] if SECAGG in msg.content.config_records else None
        reply = call_next(msg, context)
        if tamper and stage and not reply.has_error():
            tamper(stage, msg.metadata.dst_node_id, reply)
        return reply

    @app.train(mods=[tampering, secure_aggregation_mod])
    def train(msg: Message, context: Context) -> Message:
        node = msg.metadata.dst_node_id
        arrays = ArrayRecord({k: Array(v.numpy() + 0.01 * node) for k, v in msg.content[ARRAYS].items()})
        metrics = MetricRecord({k: 0.5 for k in TRAIN_METRICS} | {NUM_EXAMPLES: 100 * node, "steps": 1})
        return Message(RecordDict({ARRAYS: arrays, METRICS: metrics, CAMPUS: ConfigRecord({"name": f"C{node}"})}), reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        node = msg.metadata.dst_node_id
        metrics = MetricRecord({k: 0.5 for k in evaluate_metrics("withdrawal", OULAD)} | {NUM_EXAMPLES: 100})
        return Message(RecordDict({METRICS: metrics, CAMPUS: ConfigRecord({"name": f"C{node}"})}), reply_to=msg)

    return app


def _contexts(root: Path, nodes=(1, 2, 3)) -> dict[int, Context]:
    return {
        n: Context(
            run_id=5,
            node_id=n,
            node_config={"data-dir": str(root / f"C{n}"), "campus": f"C{n}", "state-dir": str(root / "state" / f"C{n}")},
            state=RecordDict(),
            run_config={},
        )
        for n in nodes
    }


def _run(root: Path, tamper=None, **settings):
    cfg = RunConfig(
        model="logistic", num_rounds=1, min_campuses=3, round_timeout=30.0, secure_aggregation="secaggplus", **settings
    )
    grid = LocalGrid(_stub_campus(tamper), _contexts(root))
    report = Report(config=cfg.to_flower(), dp=True, delta=cfg.delta)
    reporting = ReportingStrategy(build_strategy(cfg), report, cfg.num_rounds, cfg.min_campuses, cfg.round_timeout)
    initial = model_arrays(build_model(cfg.model, len(feature_names(OULAD)), seed=0))
    context = Context(run_id=5, node_id=0, node_config={}, state=RecordDict(), run_config={})
    aggregated = run_secaggplus(grid, context, cfg, reporting, initial)
    return grid, report, reporting, initial, aggregated


def _assert_fedavg(arrays: ArrayRecord, initial: ArrayRecord, nodes) -> None:
    """``arrays`` is FedAvg of the stub updates of ``nodes`` (model + 0.01 n on 100 n rows) within the
    quantization bound: each campus's weighted update is rounded to a step of the quantization grid."""
    weights = {n: 100 * n for n in nodes}
    ratios = sum(w / 100000.0 for w in weights.values())  # the campuses' weights / secagg-max-weight
    for name, array in arrays.items():
        fedavg = initial[name].numpy() + sum(w * 0.01 * n for n, w in weights.items()) / sum(weights.values())
        assert np.abs(array.numpy() - fedavg).max() <= len(nodes) * QUANTIZATION_STEP / ratios + 1e-6


def _audit(root: Path, node: int):
    return AuditLog(root / "state" / f"C{node}").records()


def test_secaggplus_aggregate_is_fedavg_and_every_stage_is_guarded_and_logged(tmp_path, task_identity):
    grid, report, reporting, initial, aggregated = _run(tmp_path)
    assert aggregated and not report.failures and len(report.rounds) == 1
    _assert_fedavg(reporting.arrays, initial, (1, 2, 3))
    # the coordinator received no model array, only masked vectors
    assert not any(len(r) for reply in grid.received for r in reply.content.array_records.values())
    for node in (1, 2, 3):
        records = _audit(tmp_path, node)
        assert [r.message_type for r in records] == [*STAGES, "evaluate"] and all(r.sent for r in records)
        assert [r.campus for r in records] == [f"C{node}"] * 5 and {r.server_round for r in records} == {1}
        masked = records[2]
        # the masked weight, then the model's one array
        assert [a.dtype for a in masked.arrays] == ["int64"] * 2 and masked.num_examples == 100 * node
    # what the coordinator received is exactly what the campuses logged as sent
    logged = {(r.server_round, r.message_type, r.campus, r.payload_sha256) for n in (1, 2, 3) for r in _audit(tmp_path, n)}
    assert logged == {(r["round"], r["phase"], r["campus"], r["payload_sha256"]) for r in report.receipts}
    assert {c: t["n_train"] for c, t in report.train.items()} == {"C1": 100, "C2": 200, "C3": 300}


def test_secaggplus_run_pauses_at_a_checkpoint_and_resumes_with_the_next_round(tmp_path, task_identity):
    cfg = RunConfig(
        model="logistic",
        num_rounds=2,
        min_campuses=3,
        round_timeout=30.0,
        out=str(tmp_path / "run"),
        run_name="run-1",
        secure_aggregation="secaggplus",
    )
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / STOP_FILE).touch()
    context = Context(run_id=5, node_id=0, node_config={}, state=RecordDict(), run_config={})
    assert run_federation(LocalGrid(_stub_campus(), _contexts(tmp_path)), cfg, cfg.to_flower(), context) is None
    summary = run_federation(LocalGrid(_stub_campus(), _contexts(tmp_path)), cfg, cfg.to_flower(), context)
    assert [r["round"] for r in summary["rounds"]] == [1, 2] and not summary["failures"]
    for node in (1, 2, 3):
        records = _audit(tmp_path, node)
        assert [(r.server_round, r.message_type) for r in records] == [(1, t) for t in [*STAGES, "evaluate"]] + [
            (2, t) for t in [*STAGES, "evaluate"]
        ]
        assert {r.run_id for r in records} == {"run-1"}
    assert {(r["round"], r["phase"]) for r in summary["receipts"]} == {(n, t) for n in (1, 2) for t in [*STAGES, "evaluate"]}
    assert (tmp_path / "run" / "model.pt").is_file()


def _swap_ciphertexts(reply):
    values = reply.content[SECAGG]
    values[Key.CIPHERTEXT_LIST] = list(reversed(values[Key.CIPHERTEXT_LIST]))


def _leak_update(reply):
    reply.content[FIT_PARAMETERS]["leak"] = Array(np.ones(3, dtype=np.float32))


def _extra_share(reply):
    values = reply.content[SECAGG]
    values[Key.NODE_ID_LIST] = [*values[Key.NODE_ID_LIST], 2]
    values[Key.SHARE_LIST] = [*values[Key.SHARE_LIST], values[Key.SHARE_LIST][0]]


def _foreign_key(reply):
    reply.content[SECAGG][Key.PUBLIC_KEY_1] = public_key_to_bytes(generate_key_pairs()[1])


@pytest.mark.parametrize(
    "stage, tamper, reason",
    [
        (Stage.SETUP, _foreign_key, "not the public halves of this campus's own SecAgg\\+ key pairs"),
        (Stage.SHARE_KEYS, _swap_ciphertexts, "is not encrypted under this campus's pairwise key"),
        (Stage.COLLECT_MASKED_VECTORS, _leak_update, "plain model arrays \\['leak'\\] next to the masked vector"),
        (Stage.UNMASK, _extra_share, "other shares than the one share asked for each node"),
    ],
)
def test_guard_blocks_a_tampered_stage_reply_and_the_round_goes_on_without_that_campus(
    tmp_path, task_identity, stage, tamper, reason
):
    def tampered(at, node, reply):
        if (at, node) == (stage, 2):
            tamper(reply)

    grid, report, reporting, initial, aggregated = _run(tmp_path, tampered)
    [blocked] = [r for r in _audit(tmp_path, 2) if not r.sent]
    assert blocked.message_type == f"secaggplus:{stage}" and re.search(reason, blocked.reason), blocked.reason
    [failure] = report.failures
    assert failure["phase"] == f"secaggplus:{stage}" and failure["refused"] and "release guard blocked" in failure["reason"]
    assert [r.error.code for r in grid.received if r.has_error()] == [BLOCKED]  # and none of the content
    assert not any(len(r) for reply in grid.received if reply.has_content() for r in reply.content.array_records.values())
    # The round goes on without campus 2 (the threshold is 2 of 3 shares). Blocked at unmask, after its masked
    # vector went into the sum, its mask seed is rebuilt from the other two campuses' shares: its update counts.
    assert aggregated
    _assert_fedavg(reporting.arrays, initial, (1, 2, 3) if stage == Stage.UNMASK else (1, 3))


def test_a_round_with_fewer_campuses_than_the_threshold_halts_and_keeps_the_global_model(tmp_path, task_identity):
    def refuse_two(at, node, reply):
        if at == Stage.SETUP and node in (2, 3):
            _foreign_key(reply)

    grid, report, reporting, initial, aggregated = _run(tmp_path, refuse_two)
    assert not aggregated
    assert [f["phase"] for f in report.failures] == ["secaggplus:setup"] * 2 + ["train"]
    assert "secure aggregation halted" in report.failures[-1]["reason"]
    assert all(np.array_equal(reporting.arrays[k].numpy(), initial[k].numpy()) for k in initial)
    assert [r.message_type for r in _audit(tmp_path, 1)] == ["secaggplus:setup", "evaluate"]


def _setup_request(share_num: int, threshold: int) -> Message:
    values = {
        Key.STAGE: Stage.SETUP,
        Key.SAMPLE_NUMBER: share_num,
        Key.SHARE_NUMBER: share_num,
        Key.THRESHOLD: threshold,
        Key.CLIPPING_RANGE: 8.0,
        Key.TARGET_RANGE: 2**22,
        Key.MOD_RANGE: 2**32,
        Key.MAX_WEIGHT: 1e5,
    }
    config = ConfigRecord({**RunConfig(secure_aggregation="secaggplus").to_flower(), "server-round": 1})
    return Message(RecordDict({SECAGG: ConfigRecord(values), CONFIG: config}), dst_node_id=1, message_type="train")


@pytest.mark.parametrize(
    "share_num, threshold, refused", [(3, 2, False), (4, 2, True), (5, 2, True), (2, 2, True), (7, 4, False)]
)
def test_campus_refuses_a_setup_whose_threshold_would_let_the_coordinator_unmask_it(
    tmp_path, task_identity, share_num, threshold, refused
):
    context = _contexts(tmp_path, (1,))[1]
    reply = release_guard(
        _setup_request(share_num, threshold),
        context,
        lambda m, c: secure_aggregation_mod(m, c, lambda *_: pytest.fail("setup never trains")),
    )
    [record] = _audit(tmp_path, 1)
    assert record.message_type == "secaggplus:setup"
    if refused:
        assert reply.error.code == REFUSED and "threshold above half" in reply.error.reason
        assert not record.sent and record.reason.startswith("refused: campus C1 refuses SecAgg+ setup")
    else:
        assert not reply.has_error() and record.sent and set(reply.content[SECAGG]) == {Key.PUBLIC_KEY_1, Key.PUBLIC_KEY_2}


def test_campus_refuses_a_plain_update_in_a_run_under_secure_aggregation(tmp_path, task_identity):
    cfg = RunConfig(model="logistic", secure_aggregation="secaggplus")
    arrays = model_arrays(build_model(cfg.model, len(feature_names(OULAD))))
    plain = Message(
        RecordDict({ARRAYS: arrays, CONFIG: ConfigRecord({**cfg.to_flower(), "server-round": 1})}),
        dst_node_id=1,
        message_type="train",
    )
    reply = release_guard(
        plain, _contexts(tmp_path, (1,))[1], lambda m, c: secure_aggregation_mod(m, c, lambda *_: pytest.fail("never trains"))
    )
    assert reply.error.code == REFUSED and "plain model update in a run under secure aggregation" in reply.error.reason
    [record] = _audit(tmp_path, 1)
    assert (record.message_type, record.sent) == ("train", False)


def test_campus_refuses_to_unmask_a_node_named_both_active_and_dropped():
    check_stage_request("C1", Stage.UNMASK, {Key.ACTIVE_NODE_ID_LIST: [1, 2, 3], Key.DEAD_NODE_ID_LIST: []}, 1)
    with pytest.raises(CampusRefusal, match="nodes \\[3\\] are named both active and dropped out"):
        check_stage_request("C1", Stage.UNMASK, {Key.ACTIVE_NODE_ID_LIST: [1, 2, 3], Key.DEAD_NODE_ID_LIST: [3]}, 1)
    with pytest.raises(CampusRefusal, match="nodes \\[1\\]"):  # itself dropped, after it sent its masked vector
        check_stage_request("C1", Stage.UNMASK, {Key.ACTIVE_NODE_ID_LIST: [2, 3], Key.DEAD_NODE_ID_LIST: [1]}, 1)


def test_legacy_arrays_get_the_model_names_back_and_other_shapes_are_refused():
    model = build_model("logistic", len(feature_names(OULAD)), seed=0).state_dict()
    specs = [(name, list(t.shape), "float32") for name, t in model.items()]
    unnamed = [t.numpy().astype(np.float64) for t in model.values()]  # as Flower's legacy aggregation returns them
    named = named_arrays(parameters_to_arrayrecord(ndarrays_to_parameters(unnamed), keep_input=True), specs)
    assert list(named) == list(model) and {a.dtype for a in named.values()} == {"float32"}
    assert all(np.array_equal(named[k].numpy(), model[k].numpy()) for k in model)
    with pytest.raises(ValueError, match="expected"):
        named_arrays(parameters_to_arrayrecord(ndarrays_to_parameters(unnamed[::-1]), keep_input=True), specs)


def test_secure_aggregation_options_are_checked():
    from edufl.federation.runconfig import ConfigError

    for bad, match in [
        (dict(strategy="fedadam"), "fedavg or fedprox"),
        (dict(central_dp="fixed"), "central-dp"),
        (dict(secagg_reconstruction_threshold=0.5), "a majority"),
        (dict(secagg_num_shares=2.0), ">= 3"),
        (dict(secagg_num_shares=5.0, secagg_reconstruction_threshold=2.0), "more than half"),
    ]:
        with pytest.raises(ConfigError, match=match):
            RunConfig(secure_aggregation="secaggplus", **bad)


# --- on the real data, on Flower's simulation engine --------------------------------------------------------


@pytest.mark.simulation
def test_secaggplus_simulation_on_real_data_sums_the_campus_updates_without_seeing_one(
    tables, data_dir, tmp_path, monkeypatch, task_identity
):
    import ray

    from edufl.clients.app import train_handler
    from edufl.experiments.simulate import simulate

    seen: list[tuple[list[Message], list[Message]]] = []
    forward = CampusGrid.send_and_receive

    def spy(self, messages, *, timeout=None):  # everything the coordinator sends and receives
        messages = list(messages)
        replies = list(forward(self, messages, timeout=timeout))
        seen.append((messages, replies))
        return replies

    monkeypatch.setattr(CampusGrid, "send_and_receive", spy)
    monkeypatch.setenv(SIM_ENV, "")  # the engine sets it; restored afterwards
    out = tmp_path / "run"
    # Reproducible noise (research only) so that the campuses' updates can be recomputed below.
    cfg = RunConfig(
        campus_by="shard", shards=3, num_rounds=2, out=str(out), secure_aggregation="secaggplus", reproducible_noise=True
    )
    try:
        summary = simulate(cfg, data_dir, "federated", tables=tables)
    finally:
        ray.shutdown()

    campuses = campus_names(tables, "shard", 3)  # partition-id i is campus i
    assert sorted(c["campus"] for c in summary["campuses"]) == sorted(campuses)
    assert len(campuses) == 3 and [r["round"] for r in summary["rounds"]] == [1, 2] and not summary["failures"]
    assert summary["global"]["auc"] > 0.55 and summary["config"]["secure-aggregation"] == "secaggplus"

    # The coordinator never received an unmasked update: no reply holds a model array, and every masked
    # vector's entries are spread over the modulus 2**32, far outside the quantized update's [0, 2**22].
    replies = [r for _, rs in seen for r in rs]
    assert all(r.has_content() for r in replies)
    assert not any(len(record) for r in replies for record in r.content.array_records.values())
    masked = [
        [bytes_to_ndarray(b) for b in r.content[SECAGG][Key.MASKED_PARAMETERS]]
        for r in replies
        if Key.MASKED_PARAMETERS in r.content.config_records.get(SECAGG, {})
    ]
    assert len(masked) == 6  # 3 campuses x 2 rounds
    for vector in masked:
        entries = np.concatenate([a.ravel() for a in vector[1:]])
        assert entries.dtype == np.int64 and (entries > 2**22).mean() > 0.99

    # Round 1's aggregate (the model the coordinator sends to evaluation) is FedAvg of the campuses'
    # own round-1 updates, recomputed here by their train handler, within the quantization bound.
    round1 = next(m[0].content[ARRAYS] for m, _ in seen if m[0].metadata.message_type == "evaluate")
    sim = tmp_path / "campuses"
    for name, own in campus_slices(tables, "shard", 3).items():
        write_tables(own, sim / name)
    (sim / SIM_MANIFEST).write_text(json.dumps({"campuses": campuses, "state-root": str(tmp_path / "again"), "policy": None}))
    monkeypatch.setenv(SIM_ENV, str(sim))
    initial = model_arrays(build_model(cfg.model, len(feature_names(OULAD)), seed=cfg.seed))
    ran = RunConfig.from_flower({k: v for k, v in summary["config"].items() if k in cfg.to_flower()})
    run_config = ConfigRecord({**ran.to_flower(), "server-round": 1})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the engine's workers
    try:
        updates = []
        for i, _ in enumerate(campuses):
            context = Context(run_id=0, node_id=i + 1, node_config={"partition-id": i}, state=RecordDict(), run_config={})
            msg = Message(RecordDict({ARRAYS: initial, CONFIG: run_config}), dst_node_id=i + 1, message_type="train")
            reply = train_handler(msg, context).content
            updates.append((reply[METRICS][NUM_EXAMPLES], reply[ARRAYS]))
    finally:
        torch.set_num_threads(threads)
    total = sum(n for n, _ in updates)
    bound = len(updates) * QUANTIZATION_STEP / (total / cfg.secagg_max_weight) + 1e-6
    for name in initial:
        fedavg = sum(n * a[name].numpy().astype(np.float64) for n, a in updates) / total
        assert np.abs(round1[name].numpy() - fedavg).max() <= bound, name

    # Each campus's ledger holds its two releases; its audit log every stage message, all sent, and the
    # masked vector's record carries the release. The coordinator's receipts match the campus logs.
    logged = set()
    for name in campuses:
        releases = PrivacyLedger(out / "campuses" / name).releases()
        assert [(r.server_round, r.dp.mechanism) for r in releases] == [(1, "dp-sgd"), (2, "dp-sgd")]
        records = AuditLog(out / "campuses" / name).records()
        assert [r.message_type for r in records] == [*STAGES, "evaluate"] * 2 and all(r.sent for r in records)
        for release, record in zip(releases, [r for r in records if r.message_type == STAGES[2]], strict=True):
            assert (record.dp.epsilon, record.dp.noise_multiplier) == (release.dp.epsilon, release.dp.noise_multiplier)
        logged |= {(r.server_round, r.message_type, name, r.payload_sha256) for r in records}
    assert logged == {(r["round"], r["phase"], r["campus"], r["payload_sha256"]) for r in summary["receipts"]}
