"""Client-level (central) DP on the coordinator, and the membership-inference audit, on the real data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from opacus.accountants import RDPAccountant

from edufl.experiments.membership import loss_attack_auc, per_example_loss
from edufl.federation.models import build_model
from edufl.federation.privacy import DPSettings, calibrate_noise, epsilon
from edufl.federation.schema import load_schema
from edufl.federation.tasks import early_warning, feature_names, split
from edufl.federation.training import train

OULAD = load_schema()
"""OULAD's federation schema (federation/schemas/oulad.toml)."""


def _edufl(data_dir: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "EDUFL_DATA": str(data_dir)}
    return subprocess.run(
        [sys.executable, "-m", "edufl.experiments.cli", *args], capture_output=True, text=True, env=env, timeout=1200
    )


def _ok(done: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.mark.simulation
def test_central_dp_run_reports_the_client_level_epsilon_of_its_rounds(data_dir, tmp_path):
    out = tmp_path / "central"
    done = _ok(
        _edufl(
            data_dir,
            "simulate",
            "--out",
            str(out),
            "--rounds",
            "2",
            "--model",
            "logistic",
            "--central-dp",
            "fixed",
            "--central-noise-multiplier",
            "4",
            "--central-clipping-norm",
            "0.5",
        )
    )
    summary = json.loads((out / "summary.json").read_text())
    central = summary["privacy"]["client_level"]
    # Independent recomputation: Opacus's RDP accountant, every campus in each of the 2 rounds (q = 1), σ = 4.
    accountant = RDPAccountant()
    accountant.history = [(4.0, 1.0, 2)]
    assert central["epsilon"] == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-9)
    assert (central["noise_multiplier"], central["clipping_norm"], central["rounds"]) == (4.0, 0.5, 2)
    assert 0 < summary["privacy"]["epsilon"] <= 3.0  # each campus's own DP-SGD guarantee is still reported
    assert len(summary["campuses"]) == 7 and not summary["failures"] and len(summary["rounds"]) == 2
    assert f"client-level ε = {central['epsilon']:.3f}" in done.stdout


def test_central_dp_refuses_fedadam_and_baselines(data_dir, tmp_path):
    for extra, says in (
        (["--strategy", "fedadam"], "needs strategy fedavg or fedprox"),
        (["--mode", "local"], "federated runs only"),
    ):
        done = _edufl(data_dir, "simulate", "--out", str(tmp_path / "x"), "--central-dp", "fixed", *extra)
        assert done.returncode == 2 and says in done.stderr and "Traceback" not in done.stderr


@pytest.mark.simulation
def test_audit_of_a_run_without_a_global_model_exits_2(data_dir, tmp_path):
    out = tmp_path / "local"
    _ok(_edufl(data_dir, "simulate", "--out", str(out), "--mode", "local", "--rounds", "1", "--model", "logistic"))
    done = _edufl(data_dir, "audit-privacy", str(out))
    assert done.returncode == 2 and "no model.pt" in done.stderr and "Traceback" not in done.stderr
    done = _edufl(data_dir, "audit-privacy", str(tmp_path / "nowhere"))
    assert done.returncode == 2 and "no summary.json" in done.stderr


@pytest.mark.simulation
def test_audit_privacy_reports_the_attack_auc_of_every_campus(data_dir, tmp_path):
    out = tmp_path / "fed"
    _ok(_edufl(data_dir, "simulate", "--out", str(out), "--rounds", "1", "--model", "logistic"))
    done = _ok(_edufl(data_dir, "audit-privacy", str(out)))
    audit = json.loads((out / "privacy_audit.json").read_text())
    assert "weighted attack AUC" in done.stdout and (out / "privacy_audit.csv").stat().st_size > 0
    assert len(audit["campuses"]) == 7 and all(0.3 < c["attack_auc"] < 0.7 for c in audit["campuses"])


def test_membership_attack_auc_of_a_dp_model_is_closer_to_chance_than_without_dp(aaa):
    # One small campus trained alone for many epochs: without DP the MLP memorises its 563 training
    # rows (attack AUC 0.575 on this data); DP-SGD at ε = 3 keeps the attack near chance (0.489).
    # With the default federation neither model leaks measurably (README, "Empirical privacy check").
    train_part, test_part = split(early_warning(aaa, 60, "withdrawal"), "stratified", 0.2, 0)
    attack = {}
    for name, dp in (("dp", True), ("nodp", False)):
        model = build_model("mlp", len(feature_names(OULAD)), seed=0)
        sigma = calibrate_noise(DPSettings(3.0, 1e-5, 1.0), len(train_part), 16, 100) if dp else None
        result = train(
            model, train_part, epochs=100, batch_size=16, learning_rate=0.3, seed=1, noise_multiplier=sigma, max_grad_norm=1.0
        )
        assert not dp or epsilon(result.history, 1e-5) <= 3.0
        attack[name], pairs = loss_attack_auc(model, train_part, test_part)
        assert pairs == len(test_part) == 140
    assert attack["nodp"] > 0.55, attack
    assert abs(attack["dp"] - 0.5) < abs(attack["nodp"] - 0.5), attack


def test_the_attack_scores_a_four_class_model_by_its_cross_entropy(aaa):
    import torch
    from torch.nn import functional as F

    from edufl.federation.tasks import n_outputs

    data = early_warning(aaa, 60, "final_result")
    model = build_model("mlp", len(feature_names(OULAD)), outputs=n_outputs("final_result", OULAD))
    losses = per_example_loss(model, data)
    with torch.no_grad():
        expected = F.cross_entropy(model(torch.from_numpy(data.x)), torch.from_numpy(data.y).long(), reduction="none")
    assert losses.shape == (len(data),) and n_outputs("final_result", OULAD) == 4
    assert losses == pytest.approx(expected.numpy(), rel=1e-6)
    auc, k = loss_attack_auc(model, *split(data, "stratified", 0.2, seed=0))
    assert k == min(len(s) for s in split(data, "stratified", 0.2, seed=0)) and 0.3 < auc < 0.7  # untrained: no signal
