"""``edufl audit-privacy RUN_DIR``: membership-inference attack AUC per campus against a run's final model.

The researcher's side of the empirical privacy check: it rebuilds every
campus's train/test split exactly as the run did (same tables, task, cutoff,
split, test fraction and seed, recorded in ``summary.json``), runs the
loss-threshold attack of :mod:`experiments.membership` against ``model.pt``, and
writes ``privacy_audit.json`` and ``privacy_audit.csv`` into the run folder. In
a deployment each campus runs the same attack on its own rows and releases only
its AUC.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import torch

from edufl.federation.fingerprint import file_hashes
from edufl.federation.models import build_model
from edufl.federation.runconfig import ConfigError, RunConfig
from edufl.federation.tables import load_tables
from edufl.federation.tasks import feature_names, n_outputs
from edufl.server.results import primary_metric, weighted

from .membership import loss_attack_auc
from .splits import campus_splits

__all__ = ["ATTACK", "audit", "print_audit"]

ATTACK = (
    "loss threshold (Yeom et al., CSF 2018): score = -per-example training loss; members = campus training rows, "
    "non-members = campus test rows, both subsampled to the smaller group's size"
)


def audit(run_dir: Path, data_dir: Path | None = None, seed: int = 0) -> dict:
    """Attack ``run_dir``'s ``model.pt`` on every campus; write and return the audit.

    ``data_dir`` overrides the data folder recorded in ``summary.json`` (needed
    for deployment runs, whose coordinator holds no data); its tables must have
    the SHA-256 hashes the run recorded. ``seed`` drives the subsampling.
    Returns a dict with ``model_metric`` and ``model_score`` (the run's weighted primary metric),
    ``campuses`` (one row each: ``campus``, ``n_train``,
    ``n_test``, ``n_attack`` rows per group, ``attack_auc``, ``epsilon``) and
    ``weighted_attack_auc`` (weighted by ``n_attack``).

    Raises
    ------
    ConfigError
        When ``run_dir`` is not a results folder, has no ``model.pt`` (the
        ``local`` mode writes none), names no data folder, or when the tables or
        the rebuilt splits differ from the run's.
    DataError
        When the tables fail validation.
    """
    summary_path, model_path = run_dir / "summary.json", run_dir / "model.pt"
    if not summary_path.is_file():
        raise ConfigError(f"{run_dir}: no summary.json; expected a results folder written by `edufl simulate`")
    summary = json.loads(summary_path.read_text())
    config = summary["config"]
    if not model_path.is_file():
        raise ConfigError(
            f"{run_dir}: no model.pt to audit (mode {config.get('mode')!r}; "
            "the local mode trains one model per campus and keeps none)"
        )
    known = RunConfig().to_flower().keys()
    cfg = RunConfig.from_flower({k: v for k, v in config.items() if k in known})
    if data_dir is None:
        if "data" not in config:
            raise ConfigError(f"{run_dir}: the run recorded no data folder; pass --data with the tables it used")
        data_dir = Path(config["data"])
    tables = load_tables(data_dir, schema=cfg.schema)
    if "data_sha256" in config and file_hashes(data_dir) != config["data_sha256"]:
        raise ConfigError(f"{data_dir}: the tables differ from those the run used (SHA-256 recorded in summary.json)")
    model = build_model(cfg.model, len(feature_names(cfg.schema)), outputs=n_outputs(cfg.task, cfg.schema))
    model.load_state_dict(torch.load(model_path), strict=True)
    reported = {c["campus"]: c for c in summary["campuses"]}
    rows = []
    splits = campus_splits(tables, cfg)
    for name in config.get("campuses") or sorted(reported):
        train_part, test_part = splits[name]
        run_row = reported.get(name, {})
        if run_row and (run_row["n_train"], run_row["n_test"]) != (len(train_part), len(test_part)):
            raise ConfigError(
                f"campus {name}: rebuilt split has {len(train_part)} train / {len(test_part)} test rows, "
                f"the run had {run_row['n_train']} / {run_row['n_test']}"
            )
        auc, k = loss_attack_auc(model, train_part, test_part, seed)
        rows.append(
            dict(
                campus=name,
                n_train=len(train_part),
                n_test=len(test_part),
                n_attack=k,
                attack_auc=auc if k else None,
                epsilon=run_row.get("epsilon"),
            )
        )
    result = {
        "run": str(run_dir.resolve()),
        "attack": ATTACK,
        "seed": seed,
        "dp": summary["privacy"]["dp"],
        "epsilon": summary["privacy"]["epsilon"],
        "model_metric": primary_metric(cfg.task),
        "model_score": summary["global"][primary_metric(cfg.task)],
        "campuses": rows,
        "weighted_attack_auc": weighted(rows, "attack_auc", weight="n_attack"),
    }
    (run_dir / "privacy_audit.json").write_text(json.dumps(result, indent=2) + "\n")
    pd.DataFrame(rows).to_csv(run_dir / "privacy_audit.csv", index=False)
    return result


def print_audit(result: dict) -> None:
    """The audit as a per-campus table and a weighted line."""
    print(f"membership inference, {result['attack']}")
    print(f"{'campus':<10}{'n_train':>9}{'n_test':>8}{'pairs':>7}{'attack AUC':>12}{'ε':>8}")
    for r in result["campuses"]:
        eps = "-" if r["epsilon"] is None else f"{r['epsilon']:.3f}"
        auc = "-" if r["attack_auc"] is None else f"{r['attack_auc']:.4f}"
        print(f"{r['campus']:<10}{r['n_train']:>9}{r['n_test']:>8}{r['n_attack']:>7}{auc:>12}{eps:>8}")
    privacy = f"DP, ε = {result['epsilon']:.3f}" if result["dp"] else "NO DP"
    print(
        f"weighted attack AUC {result['weighted_attack_auc']:.4f} (0.5 = no membership signal), "
        f"model {result['model_metric']} {result['model_score']:.4f}, {privacy} -> {Path(result['run']) / 'privacy_audit.json'}"
    )
