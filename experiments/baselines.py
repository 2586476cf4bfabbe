"""The research baselines of ``edufl simulate`` (no Flower, no network).

* ``centralized``: one model trained on all campuses' training rows pooled
  (research only: pooling is what federation avoids), evaluated on every
  campus's test rows; with DP, ε is that of the pooled dataset.
* ``local``: every campus trains alone and is evaluated on its own test rows.

Both train with the federated run's features, splits, model, optimizer and
DP-SGD code (noise and sampling secret unless ``reproducible-noise``), for
``num_rounds * local_epochs`` epochs, evaluating after each round's worth of
epochs (subgroup metrics on groups of at least the research policy's
``release.min_cohort_size`` test rows per campus, as a federated campus
simulated without ``--policy`` sends), and write the same results folder.
"""

from __future__ import annotations

import time
from pathlib import Path

from edufl.federation.models import build_model
from edufl.federation.partition import Campuses
from edufl.federation.policy import RESEARCH_POLICY
from edufl.federation.privacy import DPSettings, calibrate_noise, epsilon
from edufl.federation.randomness import SECRET, Randomness
from edufl.federation.runconfig import RunConfig
from edufl.federation.tables import Tables
from edufl.federation.tasks import TaskData, classes, feature_names, n_outputs
from edufl.federation.training import evaluate, subgroup_metrics, train
from edufl.server.results import Report

from .simulate import data_provenance, provenance
from .splits import campus_splits

__all__ = ["baseline"]


def baseline(cfg: RunConfig, tables: Tables | Campuses, names: list[str], mode: str) -> dict:
    """Train the ``centralized`` or ``local`` baseline on campuses ``names`` of ``tables``.

    Returns the summary dict written to ``cfg.out/summary.json``.
    """
    started = time.perf_counter()
    campuses = campus_splits(tables, cfg)
    report_config = provenance(mode, cfg, data_provenance(tables), names)
    report = Report(config=report_config, dp=cfg.dp, delta=cfg.delta)
    if mode == "centralized":
        pooled = TaskData.concat([train_part for train_part, _ in campuses.values()])
        groups = {"pooled": (pooled, list(campuses))}
    else:
        groups = {name: (train_part, [name]) for name, (train_part, _) in campuses.items()}
    width, outputs = len(feature_names(cfg.schema)), n_outputs(cfg.task, cfg.schema)
    models = {g: build_model(cfg.model, width, seed=cfg.seed, outputs=outputs) for g in groups}
    group_k = RESEARCH_POLICY.release.min_cohort_size
    histories = {g: [] for g in groups}
    steps_done = {g: 0 for g in groups}
    sigmas = {}
    for g, (train_part, _) in groups.items():
        if cfg.dp and len(train_part):
            sigmas[g] = calibrate_noise(
                DPSettings(cfg.target_epsilon, cfg.delta, cfg.max_grad_norm),
                len(train_part),
                cfg.batch_size,
                cfg.num_rounds * cfg.local_epochs,
            )
    for server_round in range(1, cfg.num_rounds + 1):
        for g, (train_part, members) in groups.items():
            if not len(train_part):
                continue
            seed = cfg.seed * 1_000_003 + server_round  # public: orders plain SGD's batches only
            result = train(
                models[g],
                train_part,
                epochs=cfg.local_epochs,
                batch_size=cfg.batch_size,
                learning_rate=cfg.learning_rate,
                seed=seed,
                noise_multiplier=sigmas.get(g),
                max_grad_norm=cfg.max_grad_norm,
                history=histories[g],
                randomness=Randomness(seed) if cfg.reproducible_noise else SECRET,
            )
            histories[g] = result.history
            steps_done[g] += result.steps
            eps = epsilon(result.history, cfg.delta) if cfg.dp else float("inf")
            for name in members:
                report.add_train(
                    name,
                    n_train=len(campuses[name][0]),
                    loss=result.loss,
                    epsilon=eps,
                    noise_multiplier=sigmas.get(g, float("nan")),
                    sample_rate=result.sample_rate,
                    steps=steps_done[g],
                )
            for name in members:
                train_part_c, test_part = campuses[name]
                report.add_evaluation(
                    name,
                    n_test=len(test_part),
                    metrics=evaluate(models[g], train_part_c, test_part, cfg.task, cfg.schema),
                    groups=subgroup_metrics(models[g], test_part, cfg.task, group_k, schema=cfg.schema),
                    base_rate=None if classes(cfg.task, cfg.schema) or not len(test_part) else float(test_part.y.mean()),
                )
        report.end_round(server_round, cfg.num_rounds)
    state = models["pooled"].state_dict() if mode == "centralized" else None
    return report.write(Path(cfg.out), state, time.perf_counter() - started)
