"""The results folder: run names, code version, base rates, subgroup intervals and the run's plot."""

from __future__ import annotations

import json
import math
import re
import subprocess
from io import StringIO
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from rich.console import Console
from sklearn.metrics import average_precision_score, brier_score_loss, f1_score, roc_auc_score
from sklearn.metrics import precision_recall_curve as sklearn_precision_recall_curve

from edufl.federation.models import build_model
from edufl.federation.schema import load_schema
from edufl.federation.tasks import early_warning, feature_names, n_outputs, split
from edufl.federation.training import (
    Subgroup,
    _bootstrap_interval,
    auc,
    average_precision,
    best_f1_threshold,
    binary_scores,
    precision_recall_curve,
    predict,
    subgroup_metrics,
)
from edufl.server.results import Report, code_version, combined_interval

OULAD = load_schema()
"""OULAD's federation schema (federation/schemas/oulad.toml)."""

D = 60


def _report(dp: bool = True, **config) -> tuple[Report, StringIO]:
    text = StringIO()
    cfg = {
        "mode": "federated",
        "task": "withdrawal",
        "campuses": ["A", "B"],
        "campus-by": "module",
        "cutoff-day": D,
        "model": "mlp",
        "strategy": "fedavg",
        "num-rounds": 2,
        "target-epsilon": 3.0,
        "seed": 0,
        **config,
    }
    return Report(config=cfg, dp=dp, delta=1e-5, console=Console(file=text, width=300)), text


def _two_rounds(report: Report) -> None:
    for r, (auc_a, auc_b) in enumerate([(0.60, 0.70), (0.62, 0.74)], start=1):
        for campus, value, n in (("A", auc_a, 100), ("B", auc_b, 300)):
            report.add_train(
                campus, n_train=4 * n, loss=0.5, epsilon=1.4 * r, noise_multiplier=1.1, sample_rate=0.1, steps=10 * r
            )
            groups = {("gender", "F"): Subgroup(n // 2, value, value - 0.1, value + 0.1)}
            if campus == "B":
                groups[("age_band", "55<=")] = Subgroup(12, 0.9, 0.7, 1.0)
            metrics = {"auc": value, "average_precision": 0.3, "f1": 0.4, "brier": 0.1}
            report.add_evaluation(campus, n_test=n, metrics=metrics, groups=groups)
        report.end_round(r, 2)


def test_fairness_table_combines_campus_intervals_and_counts_the_campuses_that_withheld_a_group(tmp_path):
    report, text = _report()
    _two_rounds(report)
    summary = report.write(tmp_path, None, 1.0)
    fairness = pd.read_csv(tmp_path / "fairness.csv", dtype={"value": str}).set_index(["attribute", "value"])
    female = fairness.loc[("gender", "F")]
    assert female["campuses"] == 2 and female["withheld_by"] == 0 and female["n_test"] == 200
    assert female["auc"] == pytest.approx((50 * 0.62 + 150 * 0.74) / 200)
    # Each campus's standard error is its interval's width / 3.92; weights 1/4 and 3/4.
    se = math.sqrt((0.25 * 0.2 / 3.92) ** 2 + (0.75 * 0.2 / 3.92) ** 2)
    assert (female["auc_low"], female["auc_high"]) == pytest.approx((female["auc"] - 1.96 * se, female["auc"] + 1.96 * se))
    old = fairness.loc[("age_band", "55<=")]
    assert old["campuses"] == 1 and old["withheld_by"] == 1 and (old["auc_low"], old["auc_high"]) == (0.7, 1.0)
    assert "55<= 0.900 [0.70, 1.00] (n 12, 1 campus, withheld by 1)" in text.getvalue()
    assert "F 0.710 [" in text.getvalue() and "(n 200, 2 campuses)" in text.getvalue()
    assert summary["fairness"]["groups"][0]["auc_low"] == pytest.approx(female["auc_low"])
    # Federated campuses release no base rate: the column is there, empty, and the summary says why.
    campuses = pd.read_csv(tmp_path / "campuses.csv")
    assert campuses["base_rate"].isna().all() and "releases no count" in summary["base_rate_is"]


def test_combined_interval_of_no_group_or_an_undefined_one_is_nan():
    assert all(math.isnan(v) for v in combined_interval([], "auc"))
    groups = [dict(n_test=10, auc=0.6, low=math.nan, high=math.nan), dict(n_test=20, auc=0.7, low=0.6, high=0.8)]
    assert all(math.isnan(v) for v in combined_interval(groups, "auc"))


def test_summary_records_the_checkout_commit_and_dirty_flag(tmp_path):
    report, _ = _report()
    _two_rounds(report)
    code = report.write(tmp_path, None, 1.0)["code"]
    root = Path(__file__).resolve().parents[1]
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True).stdout.strip())
    assert code == {"commit": head, "dirty": dirty, "source": str(root)}
    assert json.loads((tmp_path / "summary.json").read_text())["code"] == code


def test_code_version_without_git_is_null_and_says_why(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no git executable on the path
    code = code_version()
    assert code["commit"] is None and code["dirty"] is None and "not a git checkout" in code["source"]


def test_run_plot_has_a_metric_panel_with_chance_and_an_epsilon_panel_with_the_target(tmp_path):
    report, _ = _report()
    _two_rounds(report)
    fig = report.figure()
    metric, spent = fig.axes
    assert [line.get_label() for line in metric.lines] == ["weighted AUC", "worst-campus AUC", "chance (AUC 0.5)"]
    assert list(metric.lines[1].get_ydata()) == [0.60, 0.62] and list(metric.lines[2].get_ydata()) == [0.5, 0.5]
    assert [line.get_label() for line in spent.lines] == ["ε spent (max over campuses)", "target ε"]
    assert list(spent.lines[0].get_ydata()) == [1.4, 2.8] and list(spent.lines[1].get_ydata()) == [3.0, 3.0]
    title = fig._suptitle.get_text()
    assert "2 campuses by module, task withdrawal at day 60" in title and "ε ≤ 3, δ = 1e-05" in title
    # Every label lies inside the saved image (constrained layout).
    fig.savefig(tmp_path / "plot.png", dpi=110)
    renderer = fig._get_renderer()
    width, height = fig.bbox.width, fig.bbox.height
    for ax in fig.axes:
        for label in (ax.yaxis.label, ax.xaxis.label, ax.title):
            box = label.get_window_extent(renderer)
            assert box.x0 >= 0 and box.y0 >= 0 and box.x1 <= width and box.y1 <= height, label.get_text()


def test_run_plot_without_dp_says_no_epsilon_applies():
    report, _ = _report(dp=False)
    _two_rounds(report)
    fig = report.figure()
    assert "NO DIFFERENTIAL PRIVACY" in fig._suptitle.get_text()
    assert [t.get_text() for t in fig.axes[1].texts] == ["no DP: no ε applies"]


@pytest.mark.parametrize("task", ["withdrawal", "final_result"])
def test_bootstrap_interval_equals_a_resampling_with_scikit_learn(aaa, task):
    test = split(early_warning(aaa, D, task), "stratified", 0.2, 0)[1]
    model = build_model("logistic", len(feature_names(OULAD)), seed=1, outputs=n_outputs(task, OULAD))
    p = predict(model, test.x)
    low, high = _bootstrap_interval(task == "final_result", test.y, p, np.random.default_rng(7), 50)
    index = np.random.default_rng(7).integers(0, len(test), size=(50, len(test)))
    if task == "final_result":
        values = [f1_score(test.y[i].astype(int), p[i].argmax(axis=1), average="macro") for i in index]
    else:
        values = [roc_auc_score(test.y[i], p[i]) for i in index]
    assert (low, high) == pytest.approx(tuple(np.percentile(values, [2.5, 97.5])))
    groups = subgroup_metrics(model, test, task, 10, resamples=50, seed=3, schema=OULAD)
    again = subgroup_metrics(model, test, task, 10, resamples=50, seed=3, schema=OULAD)  # seeded: the same intervals again
    np.testing.assert_array_equal(np.array(list(groups.values())), np.array(list(again.values())))
    assert all(g.low <= g.high for g in groups.values() if not math.isnan(g.low))


def test_auc_and_brier_equal_scikit_learns_with_ties_and_are_nan_on_one_class():
    rng = np.random.default_rng(11)
    y = rng.integers(0, 2, 300).astype(np.float32)
    p = np.round(rng.random(300), 1).astype(np.float32)  # 11 distinct scores: many ties
    assert auc(y, p) == pytest.approx(roc_auc_score(y, p), abs=1e-12)
    assert binary_scores(y, p, 0.5)["brier"] == pytest.approx(brier_score_loss(y, p), abs=1e-6)  # float32 scores
    assert math.isnan(auc(np.ones(5), p[:5])) and math.isnan(auc(np.zeros(0), p[:0]))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(("n", "distinct"), [(1, None), (7, 2), (300, 11), (2_000, None)])
def test_precision_recall_curve_and_average_precision_are_scikit_learns(seed, n, distinct):
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.3).astype(np.float32)
    y[0] = 1.0  # at least one positive, as both functions require
    p = rng.random(n) if distinct is None else rng.integers(0, distinct, n) / distinct  # with ties, and without
    for mine, theirs in zip(precision_recall_curve(y, p), sklearn_precision_recall_curve(y, p), strict=True):
        np.testing.assert_array_equal(mine, theirs)
    assert average_precision(y, p) == average_precision_score(y, p)
    precision, recall, thresholds = sklearn_precision_recall_curve(y, p)
    f1 = 2 * precision[:-1] * recall[:-1] / np.maximum(precision[:-1] + recall[:-1], 1e-12)
    assert best_f1_threshold(y, p) == thresholds[np.argmax(f1)]
    p[-1] = np.nan  # a diverged model's scores are refused, as scikit-learn refuses them
    with pytest.raises(ValueError, match="NaN or infinity"):
        precision_recall_curve(y, p)


def test_bootstrap_interval_is_nan_when_resamples_leave_auc_undefined():
    y, p = np.array([1.0] + [0.0] * 19), np.linspace(0, 1, 20)  # one positive: about a third of resamples have none
    assert all(math.isnan(v) for v in _bootstrap_interval(False, y, p, np.random.default_rng(0), 200))


def test_every_simulation_mode_gets_a_unique_run_name(monkeypatch, tmp_path):
    from edufl.experiments import simulate as sim
    from edufl.federation.runconfig import RunConfig

    seen = []
    monkeypatch.setattr(sim, "_federated", lambda cfg, *args: seen.append(cfg.run_name) or {})
    for _ in range(2):
        sim.simulate(RunConfig(out=str(tmp_path / "main")), tmp_path)
    named = RunConfig(out=str(tmp_path / "main"), run_name="given-1")
    sim.simulate(named, tmp_path)
    assert all(re.fullmatch(r"main-[0-9a-f]{8}", name) for name in seen[:2]) and seen[0] != seen[1]
    assert seen[2] == "given-1"
