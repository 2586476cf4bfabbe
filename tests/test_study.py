"""Studies: grid expansion, reproducibility, resuming, reports from saved rows; the bench's measurement."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from experiments.bench import measure
from experiments.study import Study, run
from federation.runconfig import ConfigError

TINY = """
[study]
name = "tiny"
cutoff_days = [60]
modes = ["local", "federated"]
epsilons = [3]
seeds = [0]
rounds = 1
model = "logistic"
"""


def test_grid_expansion_and_cell_configs(tmp_path):
    path = tmp_path / "standard.toml"
    path.write_text((Path(__file__).parents[1] / "experiments" / "configs" / "standard.toml").read_text())
    study = Study.load(path)
    cells = study.cells()
    assert len(cells) == 5 * 3 * 4 * 3 == 180
    assert len({c.id for c in cells}) == 180
    cfg = next(c for c in cells if c.id == "module-d60-federated-fedavg-eps8-s2").config(tmp_path)
    assert (cfg.cutoff_day, cfg.seed, cfg.target_epsilon, cfg.dp, cfg.strategy) == (60, 2, 8.0, True, "fedavg")
    assert next(c for c in cells if c.id == "module-d0-local-nodp-s0").config(tmp_path).dp is False


def test_bad_study_config_names_file_and_key(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text(TINY.replace("rounds = 1", "rounds = 1\nroundz = 2"))
    with pytest.raises(ConfigError, match=r"bad.toml: unknown key\(s\) in \[study\]: roundz"):
        Study.load(path)
    path.write_text(TINY.replace("epsilons = [3]", "epsilons = [0]"))
    with pytest.raises(ConfigError, match="epsilons holds 0"):
        Study.load(path)


def test_same_seed_same_config_identical_metrics_resume_and_report(data_dir, tmp_path, capsys):
    config = tmp_path / "tiny.toml"
    config.write_text(TINY)
    first, second = run(config, tmp_path / "a", data_dir), run(config, tmp_path / "b", data_dir)
    rows = [pd.read_csv(d / "rows.csv").drop(columns="wall_time_s") for d in (first, second)]
    assert len(rows[0]) == 2
    pd.testing.assert_frame_equal(rows[0], rows[1])  # bit-identical metrics
    pd.testing.assert_frame_equal(pd.read_csv(first / "campus_rows.csv"), pd.read_csv(second / "campus_rows.csv"))

    capsys.readouterr()
    run(config, first, data_dir)  # resumed: nothing left to do
    assert capsys.readouterr().out.count("done before, skipped") == 2
    pd.testing.assert_frame_equal(pd.read_csv(first / "rows.csv").drop(columns="wall_time_s"), rows[0])

    for name in ("summary.md", "summary.csv", "privacy_utility.png", "auc_vs_cutoff.png", "campus_auc_eps3.png"):
        (first / name).unlink()
    env = {k: v for k, v in os.environ.items() if k != "EDUFL_DATA"}
    done = subprocess.run([sys.executable, "-m", "experiments.cli", "experiment", "report", str(first)],
                          capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    summary = pd.read_csv(first / "summary.csv")
    assert list(summary["mode"]) == ["local", "federated"] and list(summary["seeds"]) == [1, 1]
    assert summary["auc_mean"].tolist() == pytest.approx(rows[0]["auc"].tolist())
    assert "| module | 60 | federated (fedavg) | 3 |" in (first / "summary.md").read_text()
    assert (first / "privacy_utility.png").stat().st_size > 10_000
    assert (first / "manifest.json").read_text().count("data_sha256") == 1


def test_bench_measures_a_whole_process(data_dir, tmp_path):
    result = measure(["--mode", "centralized", "--rounds", "2", "--model", "logistic"], data_dir, tmp_path / "c")
    assert result["campuses"] == 7 and result["wall_s"] > result["first_round_s"] > 0
    assert 100 < result["peak_mb"] < 4000 and 0.5 < result["auc"] < 1


def test_report_needs_saved_rows(tmp_path):
    done = subprocess.run([sys.executable, "-m", "experiments.cli", "experiment", "report", str(tmp_path)],
                          capture_output=True, text=True)
    assert done.returncode == 2 and "no rows.csv here" in done.stderr
