"""The coordinator as an attacker: everything it sees (run config, round, campus name, replies) used against a campus.

Each test plays a curious or malicious coordinator against the real ClientApp (``clients.app.app``, release guard
included) on campus AAA's real rows, and checks the attack fails; where an attack needs a campus to have opted out of
a protection (reproducible noise), the same attack is shown to succeed there, so the test can tell the two apart.
"""

from __future__ import annotations

import io
import json
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from campus_contexts import campus_context
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from opacus.data_loader import DPDataLoader
from rich.console import Console
from torch.utils.data import DataLoader, TensorDataset

from edufl.clients.app import app
from edufl.clients.node import SIM_ENV, SIM_MANIFEST
from edufl.federation.audit import AuditLog
from edufl.federation.errors import CampusesRefused
from edufl.federation.ledger import PrivacyLedger
from edufl.federation.models import build_model, model_arrays
from edufl.federation.privacy import DPSettings, calibrate_noise, epsilon, poisson_plan
from edufl.federation.queries import QUERY_KEY
from edufl.federation.randomness import Randomness, gaussian, round_seed
from edufl.federation.runconfig import RunConfig
from edufl.federation.schema import load_schema
from edufl.federation.tables import Tables
from edufl.federation.tasks import early_warning, feature_names, split
from edufl.federation.training import train
from edufl.federation.wire import ARRAYS, CONFIG, METRICS, REFUSED
from edufl.server.coordinator import raise_for_failures
from edufl.server.reporting import ReportingStrategy
from edufl.server.results import Report
from edufl.server.strategies import build_strategy

OULAD = load_schema()
"""OULAD's federation schema (federation/schemas/oulad.toml)."""


def _request(cfg: RunConfig, server_round: int = 1, kind: str = "train", arrays: ArrayRecord | None = None) -> Message:
    arrays = arrays or model_arrays(build_model(cfg.model, len(feature_names(OULAD)), seed=cfg.seed))
    config = ConfigRecord({**cfg.to_flower(), "server-round": server_round})
    return Message(RecordDict({ARRAYS: arrays, CONFIG: config}), dst_node_id=1, message_type=kind)


def _flat(state: dict) -> torch.Tensor:
    return torch.cat([t.flatten() for t in state.values()])


# --- 1. predicting and subtracting the DP-SGD noise ------------------------------------------------------------------

# One full-batch step (batch 1024 > AAA's 563 training rows: q = 1, every row in the batch), so that the update is
# -lr * (clipped gradient sum + noise) / n and a coordinator that knew the noise would get the clipped sum exactly.
ATTACK = RunConfig(model="logistic", num_rounds=1, batch_size=1024, learning_rate=0.3, target_epsilon=3.0)


def _recovered_sum(cfg: RunConfig, start: dict, reply: Message, seed: int | None) -> torch.Tensor:
    """The coordinator's estimate of the campus's clipped gradient sum: the update, rescaled, minus the noise it
    predicts from the public seed by replaying the campus's code (the sampler's draw, then each parameter's noise)."""
    metrics = reply.content[METRICS]
    n, sigma = int(metrics["num-examples"]), float(metrics["noise-multiplier"])
    after = reply.content[ARRAYS].to_torch_state_dict()
    noisy_sum = (_flat(start) - _flat(after)) * n / cfg.learning_rate
    rng = Randomness(seed).generator()
    rng.integers(2**63)  # the Poisson sampler's seed
    noises = gaussian(rng, sigma * cfg.max_grad_norm, [tuple(t.shape) for t in start.values()])
    predicted = torch.cat([torch.from_numpy(noise).float().flatten() for noise in noises])
    return noisy_sum - predicted


def _true_sum(aaa: Tables, cfg: RunConfig, start: dict) -> torch.Tensor:
    """What the campus really summed (known to this test, not to the coordinator): the same step without noise."""
    rows = split(early_warning(aaa, cfg.cutoff_day, cfg.task), cfg.split, cfg.test_fraction, cfg.seed)[0]
    model = build_model(cfg.model, len(feature_names(OULAD)))
    model.load_state_dict(start)
    train(
        model,
        rows,
        epochs=1,
        batch_size=cfg.batch_size,
        learning_rate=cfg.learning_rate,
        seed=0,
        noise_multiplier=0.0,
        max_grad_norm=cfg.max_grad_norm,
    )
    return (_flat(start) - _flat(model.state_dict())) * len(rows) / cfg.learning_rate


def test_coordinator_cannot_recompute_and_subtract_a_campus_noise(
    aaa: Tables, aaa_dir: Path, tmp_path: Path, task_identity, capsys, monkeypatch
):
    initial = build_model(ATTACK.model, len(feature_names(OULAD)), seed=ATTACK.seed)
    start = initial.state_dict()
    replies = [
        app(_request(ATTACK, arrays=model_arrays(initial)), campus_context(aaa_dir, tmp_path / f"state-{i}")) for i in (1, 2)
    ]
    assert not any(r.has_error() for r in replies)
    updates = [_flat(r.content[ARRAYS].to_torch_state_dict()) for r in replies]
    assert not torch.equal(updates[0], updates[1])  # two runs of one config: different noise

    truth = _true_sum(aaa, ATTACK, start)
    sigma = float(replies[0].content[METRICS]["noise-multiplier"])
    noise_norm = sigma * ATTACK.max_grad_norm * math.sqrt(len(truth))  # the norm of one noise draw, about
    public_seed = round_seed(ATTACK.seed, "AAA", 1)  # everything the old derivation used is known to the coordinator
    residual = [float((_recovered_sum(ATTACK, start, r, public_seed) - truth).norm()) for r in replies]

    # The control: a virtual campus of a research simulation without a policy, asked for reproducible noise (the only
    # place it is allowed), is fully exposed by the same attack.
    research = RunConfig(**{**ATTACK.__dict__, "reproducible_noise": True})
    manifest = {"campuses": ["AAA"], "state-root": str(tmp_path / "sim"), "policy": None}
    (aaa_dir.parent / SIM_MANIFEST).write_text(json.dumps(manifest))
    monkeypatch.setenv(SIM_ENV, str(aaa_dir.parent))
    simulated = Context(run_id=9, node_id=1, node_config={"partition-id": 0}, state=RecordDict(), run_config={})
    exposed = app(_request(research, arrays=model_arrays(initial)), simulated)
    assert not exposed.has_error()
    control = float((_recovered_sum(research, start, exposed, public_seed) - truth).norm())
    with capsys.disabled():
        print(
            f"\nnoise-subtraction attack, ‖recovered − true clipped sum‖ (one noise draw ≈ {noise_norm:.2f}): "
            f"secret noise {residual[0]:.3f}, {residual[1]:.3f}; reproducible noise (control) {control:.2e}"
        )
    assert control < 1e-3 * noise_norm  # the attack itself works when the noise is predictable
    assert min(residual) > 0.5 * noise_norm  # and removes nothing of the secret noise (the residual is ~√2 draws)


def test_every_campus_policy_refuses_reproducible_noise(aaa_dir: Path, tmp_path: Path, task_identity):
    cfg = RunConfig(model="logistic", reproducible_noise=True)
    reply = app(_request(cfg), campus_context(aaa_dir, tmp_path / "state", policy=str(_write(tmp_path / "p.toml", ""))))
    assert reply.error.code == REFUSED and "reproducible-noise" in reply.error.reason
    assert PrivacyLedger(tmp_path / "state").releases() == []


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# --- 2. data in error replies ----------------------------------------------------------------------------------------


def test_data_corrupted_mid_run_reaches_no_reply_summary_or_coordinator_log(
    aaa: Tables, aaa_dir: Path, tmp_path: Path, task_identity
):
    cfg = RunConfig(model="logistic", num_rounds=2)
    context, state = campus_context(aaa_dir, tmp_path / "state"), tmp_path / "state"
    first = app(_request(cfg, 1), context)
    assert not first.has_error()

    # A student's record breaks after the run started: an impossible gender for one learner.
    info = pd.read_csv(aaa_dir / "studentInfo.csv", dtype=str, keep_default_na=False)
    victim = info.iloc[17]
    info.loc[17, "gender"] = "Q7Z"
    info.to_csv(aaa_dir / "studentInfo.csv", index=False)
    secrets_ = {"Q7Z", victim["id_student"], *info["id_student"]}

    request = _request(cfg, 2, arrays=first.content[ARRAYS])
    second = app(request, context)
    assert second.has_error() and second.error.code == REFUSED  # its data no longer fit the run's federation schema
    assert "AAA" in second.error.reason and not _leaks(second.error.reason, secrets_)
    [*_, record] = AuditLog(state).records()  # the detail stays on the campus
    assert not record.sent and record.reason.startswith("refused: campus AAA cannot join") and "Q7Z" in record.reason
    assert "DataError" in record.reason

    # The coordinator side: the strategy records the failure, writes summary.json and prints its log lines.
    log = io.StringIO()
    report = Report(
        config={"mode": "federated", **cfg.to_flower()}, dp=True, delta=cfg.delta, console=Console(file=log, width=200)
    )
    strategy = ReportingStrategy(build_strategy(cfg), report, cfg.num_rounds, 1, 5.0)
    strategy.ask([request])
    strategy.received(2, "train", [second])
    report.end_round(2, 2)
    summary = report.write(tmp_path / "results", None, 0.0)
    written = (tmp_path / "results" / "summary.json").read_text()
    assert not _leaks(written, secrets_) and not _leaks(log.getvalue(), secrets_)
    with pytest.raises(CampusesRefused, match="campus AAA"):  # the run ends non-zero, naming the campus
        raise_for_failures(summary)


def _leaks(text: str, values: set[str]) -> list[str]:
    tokens = set(re.findall(r"[A-Za-z0-9_]+", text))
    return sorted(v for v in values if v and v in tokens)


def test_a_flower_error_reason_is_not_kept_by_the_coordinator(tmp_path: Path, task_identity):
    from flwr.app import Error

    from edufl.server.replies import error_reason

    request = Message(RecordDict(), dst_node_id=3, message_type="train")
    crash = Message(Error(code=2, reason="ValueError: student 2645731 in AAA 2014J"), reply_to=request)
    assert error_reason(crash) == "node 3: Flower error 2 (CLIENT_APP_RAISED_EXCEPTION); its reason is not kept"


# --- 3. messages and keys the campus does not answer -----------------------------------------------------------------


def test_unknown_message_type_is_refused_and_audited(aaa_dir: Path, tmp_path: Path, task_identity):
    reply = app(_request(RunConfig(model="logistic"), kind="train.other"), campus_context(aaa_dir, tmp_path / "state"))
    assert reply.error.code == REFUSED and "train.other" in reply.error.reason
    [record] = AuditLog(tmp_path / "state").records()
    assert (record.message_type, record.sent) == ("train.other", False) and record.reason.startswith("refused")


def test_query_with_an_unknown_config_key_is_refused(aaa_dir: Path, tmp_path: Path, task_identity):
    config = ConfigRecord({QUERY_KEY: b"", "contract-version": "1.1", "server-round": 1, "seed": 4})
    reply = app(
        Message(RecordDict({CONFIG: config}), dst_node_id=1, message_type="query"), campus_context(aaa_dir, tmp_path / "state")
    )
    assert reply.error.code == REFUSED and "unknown configuration key(s) of a statistic query: seed" in reply.error.reason


# --- 4. a new Flower run under the same run name ---------------------------------------------------------------------


def test_run_settings_are_pinned_by_run_name_across_flower_runs_and_restarts(aaa_dir: Path, tmp_path: Path, task_identity):
    state = tmp_path / "state"
    first = RunConfig(model="logistic", num_rounds=3, run_name="study-7")
    assert not app(_request(first, 1), campus_context(aaa_dir, state, run_id=11)).has_error()
    # A new Flower run (new run id, new context: as after a campus restart), the same run name, a smaller batch.
    looser = RunConfig(**{**first.__dict__, "batch_size": 16})
    reply = app(_request(looser, 2), campus_context(aaa_dir, state, run_id=12))
    assert reply.error.code == REFUSED and "batch-size 64 -> 16" in reply.error.reason
    assert len(PrivacyLedger(state).releases()) == 1
    assert not app(_request(first, 2), campus_context(aaa_dir, state, run_id=13)).has_error()  # the agreed settings go on


# --- 5. the ledger records what ran ----------------------------------------------------------------------------------


def test_noise_of_several_tensors_is_the_stream_of_drawing_each_in_turn():
    # One draw for all of a step's parameters must give what drawing (4, *shape) per tensor gave: the stream a
    # reproducible-noise run, and _recovered_sum's replay, depend on.
    shapes = [(64, 45), (64,), (32, 64), (), (0, 3), (1, 32)]
    noises = gaussian(Randomness(7).generator(), 1.5, shapes)
    rng = Randomness(7).generator()
    for noise, shape in zip(noises, shapes, strict=True):
        assert noise.shape == shape and np.array_equal(noise, rng.standard_normal((4, *shape)).sum(axis=0) * 0.75)
    assert gaussian(Randomness(7).generator(), 1.5, []) == []


def test_poisson_plan_equals_what_opacus_samples_for_many_sizes():
    rng = np.random.default_rng(20261202)
    pairs = [(n, b) for n in range(1, 1201) for b in (1, 3, 6, 7, 54, 64, 256, 1024)]
    pairs += [(int(n), int(b)) for n, b in zip(rng.integers(1, 100_000, 400), rng.integers(1, 2_000, 400), strict=True)]
    differ = 0
    for n, b in pairs:
        loader = DPDataLoader.from_data_loader(DataLoader(TensorDataset(torch.empty(n, 0)), batch_size=b))
        assert poisson_plan(n, b) == (loader.sample_rate, len(loader)), (n, b)
        differ += len(loader) != math.ceil(n / b)
    assert differ > 100  # sizes where Opacus runs one batch fewer than ceil(n / b): the plan must follow Opacus


def test_ledger_and_calibration_use_the_steps_opacus_ran(aaa: Tables, aaa_dir: Path, tmp_path: Path, task_identity):
    rows = split(early_warning(aaa, 60, "withdrawal"), "stratified", 0.2, 0)[0].take(np.arange(555))
    q, steps = poisson_plan(555, 6)  # ceil(555 / 6) = 93 batches planned naively; Opacus runs int(1 / (1 / 93)) = 92
    assert (q, steps) == (1 / 93, 92)
    sigma = calibrate_noise(DPSettings(3.0, 1e-5, 1.0), 555, 6, 2)
    result = train(
        build_model("logistic", len(feature_names(OULAD))),
        rows,
        epochs=2,
        batch_size=6,
        learning_rate=0.1,
        seed=0,
        noise_multiplier=sigma,
        max_grad_norm=1.0,
    )
    assert (result.sample_rate, result.steps, result.history) == (q, 2 * steps, [(sigma, q, 2 * steps)])
    assert 2.9 < epsilon(result.history, 1e-5) <= 3.0  # calibrated on exactly those steps: the target, not less

    cfg = RunConfig(model="logistic", num_rounds=2, batch_size=6)  # AAA itself: 563 rows, 94 batches
    reply = app(_request(cfg), campus_context(aaa_dir, tmp_path / "state"))
    with PrivacyLedger(tmp_path / "state") as ledger:
        [release] = ledger.releases()
    assert (release.dp.sample_rate, release.dp.steps) == poisson_plan(563, 6)
    assert release.dp.noise_multiplier == calibrate_noise(DPSettings(3.0, 1e-5, 1.0), 563, 6, 2)
    assert reply.content[METRICS]["steps"] == release.dp.steps and json.dumps(release.dp.epsilon)
