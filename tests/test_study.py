"""Studies: grid expansion, reproducibility, resuming, reports from saved rows; the bench's measurement."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from edufl.experiments.bench import measure
from edufl.experiments.simulate import Engine, simulate
from edufl.experiments.study import Study, run
from edufl.federation.runconfig import ConfigError

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


@pytest.mark.parametrize(
    "change, named, why",
    [
        (('name = "tiny"\n', ""), "study.name", "Field required"),
        (("seeds = [0]", "seeds = 5"), "study.seeds", "Value error, expected a list, e.g. [5], not 5"),
        (("rounds = 1", "rounds = 1\nroundz = 2"), "study.roundz", "Extra inputs are not permitted"),
        (("[study]", "[studdy]"), "study", "Field required; studdy: Extra inputs are not permitted"),
        (("seeds = [0]", 'seeds = ["0"]'), "study.seeds.0", "Input should be a valid integer"),
        (("seeds = [0]", "seeds = [0, 1, 0]"), "study.seeds", "Value error, 0 listed more than once"),
        (("seeds = [0]", "seeds = []"), "study.seeds", "Value should have at least 1 item after validation, not 0"),
        (("seeds = [0]", "seeds = [-1]"), "study.seeds.0", "Input should be greater than or equal to 0"),
        (("rounds = 1", "rounds = 1.0"), "study.rounds", "Input should be a valid integer"),
        (("rounds = 1", "rounds = 10001"), "study.rounds", "Input should be less than or equal to 10000"),
        (("rounds = 1", 'rounds = "1"'), "study.rounds", "Input should be a valid integer"),
        (('name = "tiny"', 'name = "../tiny"'), "study.name", "Value error, '../tiny' is not a safe folder name"),
        (('name = "tiny"', "name = 7"), "study.name", "Input should be a valid string"),
        (
            ("epsilons = [3]", "epsilons = [0]"),
            "study.epsilons.0",
            'Value error, epsilons holds 0; expected numbers > 0 or "none"',
        ),
        (("epsilons = [3]", 'epsilons = ["3"]'), "study.epsilons.0", "Value error, epsilons holds '3'"),
        (("epsilons = [3]", "epsilons = [3, 3.0]"), "study.epsilons", "Value error, 3, 3.0 listed more than once"),
        (
            ('modes = ["local", "federated"]', 'modes = ["local", "fedrated"]'),
            "study.modes.1",
            "Input should be 'federated', 'centralized' or 'local'",
        ),
        (
            ('model = "logistic"', 'model = "logistic"\ntask = "withdrawl"'),
            "study.task",
            "Input should be 'withdrawal', 'at_risk', 'final_result' or 'term1_dropout'",
        ),
        (
            ('model = "logistic"', 'model = "logistic"\nsettings = {learning-rate = "0.3"}'),
            "study.settings",
            "Value error, learning-rate = '0.3'; expected a float",
        ),
        (
            ('model = "logistic"', 'model = "logistic"\nsettings = {learnin-rate = 0.3}'),
            "study.settings",
            "Value error, unknown configuration key(s): learnin-rate",
        ),
        (
            ('model = "logistic"', 'model = "logistic"\nsettings = {"reproducible-noise" = "yes"}'),
            "study.settings",
            "Value error, reproducible-noise = 'yes'; expected a bool",
        ),
        (
            ('model = "logistic"', 'model = "logistic"\nsettings = {num-rounds = 5}'),
            "study.settings",
            "Value error, num-rounds is set by the study key rounds, not in settings",
        ),
        (
            ('model = "logistic"', 'model = "logistic"\nschema = "absent.toml"'),
            "study.schema",
            "Value error, {folder}/absent.toml: federation schema not found",
        ),
        (
            ('model = "logistic"', 'model = "logistic"\nsettings = {federation-schema = ""}'),
            "study.settings",
            "Value error, federation-schema is set by the study key schema (a schema file), not in settings",
        ),
        (
            ('model = "logistic"', 'model = "logistic"\ncampuses = ["north"]'),
            "study.campuses",
            "Value error, 'north': expected NAME=DIR or NAME=DIR:MAPPING",
        ),
        (
            ('model = "logistic"', 'model = "logistic"\ncampuses = []'),
            "study.campuses",
            "Value error, empty; list the campus folders, or leave the key out to run on --data",
        ),
        (
            ('model = "logistic"', 'model = "logistic"\ncampuses = ["a=x", "a=y"]'),
            "study.campuses",
            "Value error, campus names given more than once: ['a']",
        ),
        (
            ('model = "logistic"', 'model = "logistic"\ncampuses = ["a=x"]\ncampus_by = ["region"]'),
            "study",
            "Value error, campuses gives the study's campuses: leave out campus_by",
        ),
        (
            ('model = "logistic"', 'model = "logistic"\nstrategies = ["fedadam"]\nsettings = {central-dp = "fixed"}'),
            "study",
            "Value error, cell module-d60-federated-fedadam-eps3-s0: central-dp = 'fixed' needs strategy fedavg or fedprox",
        ),
    ],
)
def test_bad_study_config_names_file_and_key(tmp_path, change, named, why):
    path = tmp_path / "bad.toml"
    path.write_text(TINY.replace(*change))
    assert path.read_text() != TINY
    with pytest.raises(ConfigError) as err:
        Study.load(path)
    assert str(err.value).startswith(f"{path}: {named}: {why.format(folder=tmp_path)}")


def test_study_config_that_is_missing_or_not_toml(tmp_path):
    with pytest.raises(ConfigError, match=f"^{tmp_path / 'none.toml'}: study config not found$"):
        Study.load(tmp_path / "none.toml")
    (tmp_path / "broken.toml").write_text("[study\n")
    with pytest.raises(ConfigError, match=f"^{tmp_path / 'broken.toml'}: not a TOML file"):
        Study.load(tmp_path / "broken.toml")


def test_study_keeps_values_as_written_and_its_defaults(tmp_path):
    path = tmp_path / "tiny.toml"
    path.write_text(TINY.replace("epsilons = [3]", 'epsilons = [3, 1.5, "none"]'))
    study = Study.load(path)
    assert study.epsilons == (3, 1.5, "none") and type(study.epsilons[0]) is int  # so ids, rows and plots say "3"
    assert [c.id for c in study.cells()][:3] == [
        "module-d60-local-eps3-s0",
        "module-d60-local-eps1.5-s0",
        "module-d60-local-nodp-s0",
    ]
    assert study.cells()[0].keys()["epsilon"] == "3"
    assert (study.name, study.modes, study.seeds, study.rounds, study.model) == (
        "tiny",
        ("local", "federated"),
        (0,),
        1,
        "logistic",
    )
    default = Study(name="d")
    assert (
        default.task,
        default.campus_by,
        default.cutoff_days,
        default.modes,
        default.strategies,
        default.epsilons,
        default.seeds,
        default.rounds,
        default.local_epochs,
        default.model,
        default.settings,
    ) == ("withdrawal", ("module",), (60,), ("centralized", "local", "federated"), ("fedavg",), (3.0,), (0,), 10, 1, "mlp", {})
    assert len(default.cells()) == 3


def test_a_study_may_ask_for_reproducible_noise_in_its_settings(tmp_path):
    path = tmp_path / "tiny.toml"
    path.write_text(TINY + 'settings = {"reproducible-noise" = true, learning-rate = 0.1}\n')
    study = Study.load(path)
    assert study.settings == {"reproducible-noise": True, "learning-rate": 0.1}
    configs = [c.config(tmp_path) for c in study.cells()]
    assert len(configs) == 2 and all(c.reproducible_noise and c.learning_rate == 0.1 for c in configs)
    assert not any(c.config(tmp_path).reproducible_noise for c in Study.load(_write(tmp_path, TINY)).cells())


def _write(tmp_path: Path, text: str, name: str = "study.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _no_engine(*args, **kwargs):
    raise AssertionError("the engine was started before the bad file was reported")


@pytest.mark.parametrize("out", [None, "given"])
def test_experiment_run_reports_a_bad_config_with_status_2_before_anything_starts(tmp_path, capsys, monkeypatch, out):
    from edufl.experiments import study
    from edufl.experiments.cli import main

    monkeypatch.chdir(tmp_path)  # the default --out is results/<name>, under the working folder
    monkeypatch.setattr(study, "simulate", _no_engine)
    bad = _write(tmp_path, TINY.replace("seeds = [0]", "seeds = 5"), "bad.toml")
    args = ["experiment", "run", str(bad), "--data", str(tmp_path / "no-data")]  # the config is read before the data
    assert main(args + (["--out", str(tmp_path / "given")] if out else [])) == 2
    err = capsys.readouterr().err
    assert err == f"edufl: {bad}: study.seeds: Value error, expected a list, e.g. [5], not 5\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.toml"]  # no results folder, no study folder
    no_name = _write(tmp_path, TINY.replace('name = "tiny"\n', ""), "no-name.toml")
    assert main(["experiment", "run", str(no_name)]) == 2
    assert capsys.readouterr().err == f"edufl: {no_name}: study.name: Field required\n"
    assert not (tmp_path / "results").exists()


def test_simulate_reports_a_bad_policy_file_with_status_2_before_the_engine_starts(tmp_path, capsys, monkeypatch):
    from edufl.experiments import simulate
    from edufl.experiments.cli import main

    monkeypatch.setattr(simulate, "simulate", _no_engine)
    policy = _write(tmp_path, "[privacy]\nmax_epsilon = 3.0\n", "policy.toml")  # a typo'd key
    run = tmp_path / "run"
    args = ["simulate", "--policy", str(policy), "--out", str(run), "--data", str(tmp_path / "no-data")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err == f"edufl: {policy}: privacy.max_epsilon: Extra inputs are not permitted\n"
    assert not run.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["policy.toml"]
    policy.write_text('[training]\nallowed_tasks = ["withdrawl"]\n')
    assert main(args) == 2
    assert capsys.readouterr().err == (
        f"edufl: {policy}: training.allowed_tasks.0: Input should be 'withdrawal', 'at_risk', 'final_result' or 'term1_dropout'\n"
    )
    assert main(["simulate", "--policy", str(tmp_path / "missing.toml"), "--out", str(run)]) == 2
    assert capsys.readouterr().err == f"edufl: {tmp_path / 'missing.toml'}: policy file not found\n"
    assert not run.exists()


@pytest.mark.parametrize("where", [[], ["--superlink", "127.0.0.1:1", "--insecure"]])
def test_analytics_run_reports_a_bad_query_file_with_status_2_before_anything_starts(tmp_path, capsys, monkeypatch, where):
    from edufl.experiments import analytics
    from edufl.experiments.cli import main

    monkeypatch.setattr(analytics, "run_analytics", _no_engine)
    monkeypatch.setattr(analytics, "run_deployed", _no_engine)
    query = _write(tmp_path, 'statistic = "count"\nepsilon = 1\ngroup = ["region"]\n', "query.toml")  # group_by
    assert main(["analytics", "run", str(query), "--out", str(tmp_path / "out"), *where]) == 2
    assert capsys.readouterr().err == f"edufl: {query}: group: Extra inputs are not permitted\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["query.toml"]


@pytest.mark.simulation
def test_same_seed_same_config_identical_metrics_resume_and_report(data_dir, tmp_path, capsys):
    config = tmp_path / "tiny.toml"
    # DP noise and batch sampling are secret unless the study asks for reproducible noise (research only)
    config.write_text(TINY + 'settings = {"reproducible-noise" = true}\n')
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
    done = subprocess.run(
        [sys.executable, "-m", "edufl.experiments.cli", "experiment", "report", str(first)],
        capture_output=True,
        text=True,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    summary = pd.read_csv(first / "summary.csv")
    assert list(summary["mode"]) == ["local", "federated"] and list(summary["seeds"]) == [1, 1]
    assert summary["auc_mean"].tolist() == pytest.approx(rows[0]["auc"].tolist())
    assert "| module | 60 | federated (fedavg) | 3 |" in (first / "summary.md").read_text()
    assert (first / "privacy_utility.png").stat().st_size > 10_000
    assert (first / "manifest.json").read_text().count("data_sha256") == 1
    manifest = json.loads((first / "manifest.json").read_text())
    assert manifest["privacy"]["reproducible_noise"] is True and manifest["config"]["epsilons"] == [3]
    assert manifest["config"]["settings"] == {"reproducible-noise": True} and manifest["seeds"] == [0]


WARM = """
[study]
name = "warm"
cutoff_days = [30, 60]
modes = ["federated"]
epsilons = [3]
seeds = [0]
rounds = 2
model = "logistic"
settings = {"reproducible-noise" = true}
"""


@pytest.mark.simulation
def test_a_study_runs_its_cells_on_one_engine_with_the_results_of_cells_run_alone(data_dir, tmp_path, monkeypatch):
    starts = []
    start = Engine.start
    monkeypatch.setattr(Engine, "start", lambda self: (starts.append(self), start(self))[1])
    config = _write(tmp_path, WARM)
    study_dir = run(config, tmp_path / "study", data_dir)
    assert len(starts) == 1  # Ray, its workers and their campuses: once for both cells
    for cell in Study.load(config).cells():
        simulate(cell.config(tmp_path / "alone"), data_dir, cell.mode)  # a run of its own, on a fresh engine
        warm, alone = study_dir / "cells" / cell.id, tmp_path / "alone" / cell.id
        pd.testing.assert_frame_equal(*(pd.read_csv(d / "rounds.csv").drop(columns="elapsed_s") for d in (warm, alone)))
        models = [torch.load(d / "model.pt", weights_only=True) for d in (warm, alone)]
        assert models[0].keys() == models[1].keys()
        assert all(torch.equal(models[0][k], models[1][k]) for k in models[0]), cell.id
    assert len(starts) == 3


@pytest.mark.simulation
def test_bench_measures_a_whole_process(data_dir, tmp_path):
    result = measure(["--mode", "centralized", "--rounds", "2", "--model", "logistic"], data_dir, tmp_path / "c")
    assert result["campuses"] == 7 and result["wall_s"] > result["first_round_s"] > 0
    assert 100 < result["peak_mb"] < 4000 and 0.5 < result["auc"] < 1


def test_report_needs_saved_rows(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "edufl.experiments.cli", "experiment", "report", str(tmp_path)], capture_output=True, text=True
    )
    assert done.returncode == 2 and "no rows.csv here" in done.stderr
