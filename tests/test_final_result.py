"""The final_result task (four classes) and the per-subgroup (fairness) metrics, on the real data."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from campus_contexts import campus_context
from flwr.app import ConfigRecord, Context, Message, RecordDict
from processes import simulate
from sklearn.metrics import accuracy_score, f1_score, log_loss, roc_auc_score

from edufl.clients.app import evaluate_handler, train_handler
from edufl.clients.guard import release_guard
from edufl.experiments.splits import campus_splits
from edufl.federation.audit import AuditLog
from edufl.federation.metrics import SUBGROUPS, evaluate_metrics, subgroup_keys
from edufl.federation.models import build_model, load_model_arrays, model_arrays
from edufl.federation.partition import campus_slice
from edufl.federation.policy import CampusPolicy
from edufl.federation.runconfig import TASKS, RunConfig
from edufl.federation.schema import load_schema
from edufl.federation.tables import Tables
from edufl.federation.tasks import TASK_MODULES, early_warning, feature_names, n_outputs, split
from edufl.federation.training import evaluate, predict, subgroup_metrics, train
from edufl.federation.wire import BLOCKED, CONFIG, EVALUATE_RECEIVED, EVALUATION, METRICS
from edufl.server.results import primary_metric

OULAD = load_schema()
"""OULAD's federation schema (federation/schemas/oulad.toml)."""

KEY = ["course", "presentation", "student_id"]
D = 60
FINAL_RESULTS = tuple(OULAD.outcomes)
FOUR_CLASS = {"macro_f1", "accuracy", "macro_auc", *(f"f1_{c}" for c in FINAL_RESULTS)}


def test_labels_are_the_learners_final_results_in_contract_order(tables):
    campus = campus_slice(tables, "module", "CCC")
    four, withdrawn = early_warning(campus, D, "final_result"), early_warning(campus, D, "withdrawal")
    assert np.array_equal(four.x, withdrawn.x) and four.rows.equals(withdrawn.rows)  # same population and features
    learners = campus["learners"].set_index(KEY)
    own = learners.loc[list(four.rows[KEY].itertuples(index=False, name=None))]
    assert [FINAL_RESULTS[int(c)] for c in four.y] == own["final_result"].tolist()
    assert four.y.dtype == np.float32 and n_outputs("final_result", OULAD) == 4
    assert np.array_equal(withdrawn.y, (four.y == FINAL_RESULTS.index("Withdrawn")).astype(np.float32))
    assert own["final_result"].value_counts().to_dict() == {"Pass": 1180, "Fail": 781, "Withdrawn": 761, "Distinction": 498}
    # each example carries its subgroup attributes, as the learner record holds them
    pd.testing.assert_frame_equal(
        four.rows[["gender", "age_band", "disability", "imd_band"]],
        own[["gender", "age_band", "disability", "imd_band"]].reset_index(drop=True),
    )


def test_stratified_split_keeps_the_four_class_shares(tables):
    data = early_warning(campus_slice(tables, "module", "BBB"), D, "final_result")
    train_part, test_part = split(data, "stratified", 0.2, seed=3)
    assert len(train_part) + len(test_part) == len(data)
    assert set(map(tuple, train_part.rows[KEY].to_numpy())).isdisjoint(map(tuple, test_part.rows[KEY].to_numpy()))
    for c in range(4):
        assert (test_part.y == c).sum() == round(0.2 * (data.y == c).sum())
        assert abs((train_part.y == c).mean() - (test_part.y == c).mean()) < 0.002


def _majority_macro_f1(train_part, test_part) -> float:
    """Macro-F1 of predicting the training rows' most frequent final result for every test row."""
    majority = np.bincount(train_part.y.astype(int)).argmax()
    return f1_score(test_part.y.astype(int), np.full(len(test_part), majority), average="macro")


def test_four_class_metrics_match_scikit_learn_and_beat_the_majority_class(tables):
    train_part, test_part = split(early_warning(campus_slice(tables, "module", "CCC"), D, "final_result"), "stratified", 0.2, 0)
    model = build_model("logistic", len(feature_names(OULAD)), outputs=4)
    train(model, train_part, epochs=3, batch_size=64, learning_rate=0.3, seed=0)
    scores = evaluate(model, train_part, test_part, "final_result", OULAD)
    p, y = predict(model, test_part.x), test_part.y.astype(int)
    assert p.shape == (len(test_part), 4) and np.allclose(p.sum(axis=1), 1)
    pred = p.argmax(axis=1)
    assert scores["macro_f1"] == pytest.approx(f1_score(y, pred, average="macro"))
    assert [scores[f"f1_{c}"] for c in FINAL_RESULTS] == pytest.approx(f1_score(y, pred, labels=range(4), average=None))
    assert scores["accuracy"] == pytest.approx(accuracy_score(y, pred))
    assert scores["macro_auc"] == pytest.approx(roc_auc_score(y, p, multi_class="ovr", average="macro"))
    assert scores["loss"] == pytest.approx(log_loss(y, p / p.sum(axis=1, keepdims=True), labels=range(4)), rel=1e-4)
    assert scores["macro_f1"] > _majority_macro_f1(train_part, test_part) + 0.1


# --- per-subgroup metrics, sent by a campus through its release guard ------------------------------------------------


def _evaluate_request(cfg: RunConfig, seed: int = 1) -> Message:
    model = build_model(cfg.model, len(feature_names(OULAD)), seed=seed, outputs=n_outputs(cfg.task, OULAD))
    config = ConfigRecord({**cfg.to_flower(), "server-round": 1})
    return Message(RecordDict({"arrays": model_arrays(model), CONFIG: config}), dst_node_id=1, message_type="evaluate")


def _recomputed(task: str, y: np.ndarray, p: np.ndarray) -> float:
    if task == "final_result":
        return f1_score(y.astype(int), p.argmax(axis=1), average="macro")
    return roc_auc_score(y, p) if 0 < y.sum() < len(y) else math.nan


@pytest.mark.parametrize("task, policy_k", [("final_result", None), ("withdrawal", None), ("final_result", 30)])
def test_campus_sends_subgroup_metrics_only_for_groups_of_k_rows_equal_to_a_recomputation(
    aaa: Tables, aaa_dir: Path, tmp_path: Path, task_identity, task: str, policy_k: int | None
):
    # The default policy allows the withdrawal task only: a campus answering final_result lists it.
    (tmp_path / "policy.toml").write_text(
        f'[training]\nallowed_tasks = ["{task}"]\n' + (f"[release]\nmin_cohort_size = {policy_k}\n" if policy_k else "")
    )
    node_config = {"policy": str(tmp_path / "policy.toml")}
    request = _evaluate_request(RunConfig(task=task, model="logistic"))
    reply = release_guard(request, campus_context(aaa_dir, **node_config), evaluate_handler)
    assert not reply.has_error(), reply.error.reason
    sent = reply.content[METRICS]
    k = policy_k or CampusPolicy().release.min_cohort_size  # no [release] in the policy: the default, 10
    test_part = split(early_warning(aaa, D, task), "stratified", 0.2, 0)[1]
    model = build_model("logistic", len(feature_names(OULAD)), outputs=n_outputs(task, OULAD))
    load_model_arrays(model, request.content["arrays"])
    p = predict(model, test_part.x)
    released, outside = [], {attribute: len(test_part) for attribute in SUBGROUPS}
    for (attribute, value), (count, metric, low, high) in subgroup_keys(task, OULAD).items():
        rows = np.flatnonzero(test_part.rows[attribute].to_numpy(object) == value)
        if count not in sent:
            assert not {metric, low, high} & set(sent)
            continue
        released.append(f"{attribute}={value}")
        outside[attribute] -= len(rows)
        assert sent[count] == len(rows) >= k
        assert sent[metric] == pytest.approx(_recomputed(task, test_part.y[rows], p[rows]), nan_ok=True)
        assert not sent[low] > sent[high]  # the bootstrap interval, NaN where the metric is undefined on resamples
    # No smaller group's size follows by subtraction: per attribute, 0 or at least k test rows lie outside the groups sent.
    assert all(n == 0 or n >= k for n in outside.values()), outside
    if (task, policy_k) == ("final_result", None):  # AAA's 140 test rows: 9 with a disability, so neither N nor Y is sent
        assert released == [
            "gender=F",
            "gender=M",
            "age_band=0-35",
            "age_band=35-55",
            "age_band=55<=",
            "imd_band=30-40%",
            "imd_band=40-50%",
            "imd_band=50-60%",
            "imd_band=70-80%",
            "imd_band=80-90%",
            "imd_band=90-100%",
        ]
    assert 0 < len(released) < len(subgroup_keys(task, OULAD))
    assert len(sent) == len(evaluate_metrics(task, OULAD)) + 4 * len(released)
    [record] = AuditLog(aaa_dir.parent / "state").records()
    assert record.sent and sorted(record.metric_keys) == sorted(sent)


def test_the_evaluation_in_a_train_reply_is_the_evaluate_replys_without_the_bootstrap_intervals(aaa_dir: Path, task_identity):
    # Only the evaluate request (the final model's evaluation) gets the subgroups' bootstrap intervals: the
    # coordinator keeps the latest evaluation's subgroups only, and every interval is an exact statistic of the rows.
    cfg = RunConfig(model="logistic")
    evaluated = release_guard(_evaluate_request(cfg), campus_context(aaa_dir), evaluate_handler).content[METRICS]
    request = _evaluate_request(cfg)
    request.content[CONFIG][EVALUATE_RECEIVED] = True
    request.metadata.__dict__["_message_type"] = "train"
    reply = release_guard(request, campus_context(aaa_dir), train_handler)
    assert not reply.has_error(), reply.error.reason
    fused = reply.content[EVALUATION]
    assert sorted(fused) == sorted(evaluated)
    bounds = [k for k in evaluated if k.endswith(("-low", "-high"))]
    assert any(math.isfinite(evaluated[k]) for k in bounds) and all(math.isnan(fused[k]) for k in bounds)
    assert {k: v for k, v in fused.items() if k not in bounds} == pytest.approx(
        {k: v for k, v in evaluated.items() if k not in bounds}, rel=0, abs=0, nan_ok=True
    )


@pytest.mark.parametrize(
    "tamper, reason",
    [
        (lambda m: m.__setitem__("group:region=Wales:macro-f1", 0.3), "metric keys"),  # an attribute not declared
        (lambda m: m.__setitem__("group:gender=F:accuracy", 0.5), "metric keys"),  # a metric not declared per subgroup
        (lambda m: m.pop("group:gender=M:num-examples"), "metric keys"),  # a metric without its count
        (
            lambda m: m.update({"group:age_band=55<=:num-examples": 8, "group:age_band=55<=:macro-f1": 0.4}),
            "subgroup age_band=55<=: metrics computed on 8 records, fewer than 10",
        ),
        (
            lambda m: m.update({"group:disability=N:num-examples": 131, "group:disability=N:macro-f1": 0.4}),  # 9 with Y
            "subgroup disability: 9 test records outside the groups sent, fewer than 10",
        ),
    ],
)
def test_guard_blocks_undeclared_or_too_small_subgroup_metrics(aaa_dir: Path, task_identity, tamper, reason: str, schema=OULAD):
    def leaky_handler(msg: Message, context: Context) -> Message:
        reply = evaluate_handler(msg, context)
        tamper(reply.content[METRICS])
        return reply

    policy = aaa_dir.parent / "policy.toml"
    policy.write_text('[training]\nallowed_tasks = ["final_result"]\n')  # the default policy allows withdrawal only
    reply = release_guard(
        _evaluate_request(RunConfig(task="final_result", model="logistic")),
        campus_context(aaa_dir, policy=str(policy)),
        leaky_handler,
    )
    assert reply.has_error() and reply.error.code == BLOCKED and "release guard blocked" in reply.error.reason
    assert not reply.has_content() and not re.search(reason, reply.error.reason)  # the details stay on the campus
    [record] = AuditLog(aaa_dir.parent / "state").records()
    assert not record.sent and re.search(reason, record.reason)


# --- end to end: `edufl simulate`, as a user runs it ------------------------------------------------------------------


def _weighted_majority_macro_f1(splits: dict) -> float:
    return sum(len(test) * _majority_macro_f1(train_part, test) for train_part, test in splits.values()) / sum(
        len(test) for _, test in splits.values()
    )


@pytest.mark.simulation
def test_federated_dp_final_result_reports_four_class_metrics_and_a_fairness_table(tables, data_dir, tmp_path):
    out = tmp_path / "fed"
    done = simulate(data_dir, out, "--task", "final_result", "--rounds", "2")
    summary = json.loads((out / "summary.json").read_text())
    splits = campus_splits(tables, RunConfig(task="final_result", num_rounds=2))
    assert FOUR_CLASS | {"worst_campus_macro_f1"} <= set(summary["global"])
    assert FOUR_CLASS <= set(pd.read_csv(out / "rounds.csv").columns) and FOUR_CLASS <= set(
        pd.read_csv(out / "campuses.csv").columns
    )
    for row in summary["campuses"]:
        assert FOUR_CLASS <= set(row) and 0 < row["epsilon"] <= 3.0
        assert row["n_test"] == len(splits[row["campus"]][1]) and 0 <= row["macro_f1"] <= 1
    assert summary["global"]["macro_f1"] > _weighted_majority_macro_f1(splits) + 0.05
    assert "round   2/2" in done.stdout and "done: weighted macro-F1" in done.stdout and "macro-F1 by gender: F" in done.stdout
    # The fairness table equals the campuses' subgroup metrics of the final model, recomputed and combined.
    model = build_model("mlp", len(feature_names(OULAD)), outputs=4)
    model.load_state_dict(torch.load(out / "model.pt"))
    k = CampusPolicy().release.min_cohort_size
    per_campus = [subgroup_metrics(model, test, "final_result", k, schema=OULAD) for _, test in splits.values()]
    fairness = pd.read_csv(out / "fairness.csv", dtype={"value": str})
    assert summary["fairness"]["metric"] == "macro_f1" and len(summary["fairness"]["groups"]) == len(fairness)
    assert len(fairness) == len(set().union(*per_campus))
    for r in fairness.itertuples():
        reported = [groups[(r.attribute, r.value)] for groups in per_campus if (r.attribute, r.value) in groups]
        assert r.campuses == len(reported) and r.withheld_by == 7 - len(reported) and r.n_test == sum(g.n for g in reported)
        assert r.macro_f1 == pytest.approx(sum(g.n * g.value for g in reported) / r.n_test)
    assert fairness.set_index(["attribute", "value"]).loc[("age_band", "55<="), "campuses"] < 7  # suppressed somewhere


@pytest.mark.simulation
@pytest.mark.parametrize("task", [t for t in TASKS if t not in TASK_MODULES])  # OULAD has no module terms
def test_each_task_end_to_end_centralized(tables, data_dir, tmp_path, task):
    out = tmp_path / task
    done = simulate(data_dir, out, "--mode", "centralized", "--no-dp", "--task", task, "--rounds", "2", "--model", "logistic")
    summary = json.loads((out / "summary.json").read_text())
    key = primary_metric(task)
    assert summary["config"]["task"] == task and summary["fairness"]["metric"] == key
    assert f"done: weighted {'AUC' if key == 'auc' else 'macro-F1'}" in done.stdout
    if task == "final_result":
        splits = campus_splits(tables, RunConfig(task=task, num_rounds=2))
        assert FOUR_CLASS <= set(summary["global"])
        assert summary["global"]["macro_f1"] > _weighted_majority_macro_f1(splits) + 0.1
    else:
        assert summary["global"]["auc"] > 0.65
    fairness = pd.read_csv(out / "fairness.csv", dtype={"value": str})
    assert list(fairness.columns) == ["attribute", "value", "campuses", "withheld_by", "n_test", key, f"{key}_low", f"{key}_high"]
    assert set(fairness["attribute"]) == {"gender", "age_band", "disability", "imd_band"}
    assert fairness.groupby("attribute")["n_test"].sum()["gender"] == sum(c["n_test"] for c in summary["campuses"])


@pytest.mark.simulation
def test_a_final_result_study_reports_macro_f1(data_dir, tmp_path):
    from edufl.experiments.study import run

    config = tmp_path / "four.toml"
    config.write_text(
        '[study]\nname = "four"\ntask = "final_result"\nmodes = ["centralized"]\nepsilons = ["none"]\n'
        'rounds = 1\nmodel = "logistic"\n'
    )
    out = run(config, tmp_path / "four", data_dir)
    rows = pd.read_csv(out / "rows.csv")
    assert rows["task"].tolist() == ["final_result"] and {"macro_f1", "worst_campus_macro_f1", "f1_Withdrawn"} <= set(
        rows.columns
    )
    assert (
        (out / "summary.md")
        .read_text()
        .splitlines()[0]
        .startswith("| campuses | day | mode | ε target | macro_f1 | worst_campus_macro_f1 |")
    )
    for name in ("privacy_utility.png", "macro_f1_vs_cutoff.png", "campus_macro_f1_nodp.png"):
        assert (out / name).stat().st_size > 10_000
