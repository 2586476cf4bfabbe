"""``edufl bench``: how much a federation costs next to training the same model centrally.

Each measurement is one whole ``edufl simulate`` process, timed from launch to
exit, with its peak memory taken as the largest sum of resident set sizes over
the process and all its children (the simulation engine's workers included),
sampled every 50 ms. Measured, in one run on one machine:

* a DP federation of the 7 module campuses (FedAvg, ``--rounds`` rounds);
* centralized DP-SGD training of the same model on the same rows (the union
  of the campuses' training rows) for the same number of epochs;
  these two alternate ``--repeats`` times and their medians are compared;
* the same federation with OULAD split into more, smaller campuses
  (``--campus-by shard``, 50, 200 and 1,000 by default), to show how time and memory grow;
* the study of ``experiments/configs/quick.toml``, end to end (``edufl experiment run``, one
  process, its cells on one simulation engine);
* with ``--deployment N``: the same run on Flower's deployment engine, a
  coordinator and the first N module campuses as separate processes on this
  host (:mod:`experiments.localdeploy`: TLS, campus authentication, code
  approval, each campus reading its own export), timed from ``edufl
  coordinator start`` to the end of ``edufl coordinator run``, with its
  per-round time against the simulation's.

The last line printed is one JSON object with ``federated_s``,
``centralized_s`` (medians), ``ratio``, ``per_round_s``, ``peak_mb``, ``shards``
(per count), ``study`` (and ``deployment``, per N).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

__all__ = ["BENCH_POLICY", "QUICK_STUDY", "SETTLE_S", "bench", "deployment", "measure", "study"]

BENCH_POLICY = "[privacy]\ntotal_epsilon_budget = 20.0\n"
"""Every benchmark campus's policy (the defaults, and room for one run); the bench approves the app's bundle in it."""

QUICK_STUDY = Path(__file__).with_name("configs") / "quick.toml"
"""The study ``edufl bench`` runs end to end."""

# Pause after each run: the simulation engine's processes take a second or two to
# exit after the run's own process, and must not slow down the next measurement.
SETTLE_S = 5.0


def _watch(args: list[str], accepted: tuple[int, ...] = (0,)) -> tuple[float, float]:
    """Run ``edufl ARGS`` as its own process: (wall seconds from launch to exit, peak MiB of its process tree).

    Raises
    ------
    RuntimeError
        When it exits with a status not in ``accepted`` (with the end of its stderr).
    """
    command = [sys.executable, "-m", "edufl.experiments.cli", *args]
    # stderr goes to a file, not a pipe: a pipe read only after exit blocks a child that writes more than it holds
    with tempfile.TemporaryFile("w+") as stderr:
        started = time.perf_counter()
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr, text=True)
        root = psutil.Process(process.pid)
        peak = 0
        while process.poll() is None:
            try:
                tree = [root, *root.children(recursive=True)]
                peak = max(peak, sum(_rss(p) for p in tree))
            except psutil.NoSuchProcess:
                pass
            time.sleep(0.05)
        wall = time.perf_counter() - started
        if process.returncode not in accepted:
            stderr.seek(0)
            raise RuntimeError(f"{' '.join(command)} failed:\n{stderr.read()[-2000:]}")
    return wall, peak / 2**20


def measure(args: list[str], data_dir: Path, out: Path, refusals: bool = False) -> dict:
    """Run ``edufl simulate ARGS --out OUT`` as its own process; wall time, peak memory, summary.

    With ``refusals``, a run that some campuses refused (exit status 3: e.g. 1,000 shards of OULAD leave many
    campuses fewer test rows than the release threshold, so they withhold their metrics) is measured too, and
    ``refused`` counts the campuses (SuperNodes) that refused; the AUC is then over the campuses that released
    (None when none did).
    """
    wall, peak = _watch(["simulate", "--data", str(data_dir), "--out", str(out), *args], (0, 3) if refusals else (0,))
    summary = json.loads((out / "summary.json").read_text())
    return {
        "wall_s": wall,
        "peak_mb": peak,
        **_rounds(summary),
        "auc": summary["global"]["auc"],
        "campuses": len(summary["config"]["campuses"]),  # in the run; summary["campuses"] holds those that released
        "refused": len({f["reason"].partition(":")[0] for f in summary["failures"] if f["refused"]}),
    }


def _rounds(summary: dict) -> dict:
    """First-round and median later-round seconds of a results folder's summary."""
    ends = [r["elapsed_s"] for r in summary["rounds"]]
    steady = [b - a for a, b in zip(ends, ends[1:], strict=False)]
    return {"first_round_s": ends[0], "per_round_s": statistics.median(steady) if steady else ends[0]}


def deployment(data_dir: Path, campuses: int, rounds: int, root: Path) -> dict:
    """One run of ``rounds`` rounds (default settings otherwise) of a coordinator and the first ``campuses`` module
    campuses deployed on this host under ``root``: wall time from ``coordinator start`` to the run's end
    (seconds; the campuses' exports are written before), first-round and per-round seconds, AUC.

    Raises
    ------
    RuntimeError
        When the run does not complete.
    """
    from edufl.federation.partition import campus_names, campus_slice
    from edufl.federation.tables import load_tables
    from edufl.federation.writers import write_tables

    from .localdeploy import edufl, local_federation

    tables = load_tables(data_dir)
    names = campus_names(tables, "module")[:campuses]
    for name in names:
        write_tables(campus_slice(tables, "module", name), root / f"campus-{name}")
    policy = root / "policy.toml"
    policy.write_text(BENCH_POLICY)
    approved = edufl("campus", "approve", "--policy", str(policy))
    if approved.returncode != 0:
        raise RuntimeError(f"edufl campus approve failed: {approved.stderr[-2000:]}")
    started = time.perf_counter()
    with local_federation(root, {n: (root / f"campus-{n}", policy) for n in names}) as (superlink, _):
        run = edufl(
            "coordinator", "run", "--superlink", superlink, "--pki", str(root / "pki"), "--rounds", str(rounds),
            "--min-campuses", str(len(names)), "--out", str(root / "run"), timeout=3600,
        )  # fmt: skip
    wall = time.perf_counter() - started
    if run.returncode != 0:
        raise RuntimeError(f"edufl coordinator run failed ({run.returncode}):\n{(run.stdout + run.stderr)[-3000:]}")
    summary = json.loads((root / "run" / "summary.json").read_text())
    return {"wall_s": wall, **_rounds(summary), "auc": summary["global"]["auc"], "campuses": len(summary["campuses"])}


def study(data_dir: Path, out: Path, config: Path = QUICK_STUDY) -> dict:
    """``edufl experiment run CONFIG --out OUT`` end to end as its own process: wall seconds, peak MiB, cells run."""
    wall, peak = _watch(["experiment", "run", str(config), "--data", str(data_dir), "--out", str(out)])
    return {"wall_s": wall, "peak_mb": peak, "cells": len(list((out / "cells").iterdir()))}


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def _auc(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _rss(process: psutil.Process) -> int:
    try:
        return process.memory_info().rss
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return 0


def bench(
    data_dir: Path,
    rounds: int = 10,
    shards: tuple[int, ...] = (50, 200, 1000),
    repeats: int = 3,
    deployments: tuple[int, ...] = (),
    quick_study: bool = True,
) -> dict:
    """Run the measurements, print a table, and return the final JSON object.

    The 7-campus federation and the centralized run alternate ``repeats`` times
    (timings on a shared machine drift); their medians give the ratio. With
    ``quick_study``, the study of ``experiments/configs/quick.toml`` runs end to
    end (:func:`study`). Each of ``deployments`` adds a deployed run with that
    many campuses (:func:`deployment`).
    """
    common = ["--rounds", str(rounds)]
    plan = [
        *[
            (name, args)
            for _ in range(repeats)
            for name, args in (
                ("federated, 7 campuses", ["--mode", "federated", *common]),
                ("centralized DP-SGD", ["--mode", "centralized", *common]),
            )
        ],
        *[(f"federated, {n} shard campuses", ["--campus-by", "shard", "--shards", str(n), *common]) for n in shards],
    ]
    runs: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="edufl-bench-") as tmp:
        for i, (name, args) in enumerate(plan):
            print(f"measuring {name} ...", flush=True)
            runs.setdefault(name, []).append(measure(args, data_dir, Path(tmp) / str(i), refusals="--shards" in args))
            time.sleep(SETTLE_S)
        quick = None
        if quick_study:
            print(f"measuring the study {QUICK_STUDY.name} ...", flush=True)
            quick = study(data_dir, Path(tmp) / "study")
            time.sleep(SETTLE_S)
        for n in deployments:
            print(f"measuring deployment, {n} campuses ...", flush=True)
            (Path(tmp) / f"deploy-{n}").mkdir()
            runs[f"deployment, {n} campuses"] = [deployment(data_dir, n, rounds, Path(tmp) / f"deploy-{n}")]
            time.sleep(SETTLE_S)
    columns = ("campuses", 8), ("wall s", 8), ("1st round s", 12), ("per round s", 12), ("peak MB", 9), ("AUC", 7), ("refused", 8)
    print(f"\n{'run':<32} " + " ".join(f"{name:>{width}}" for name, width in columns))
    for name, measured in runs.items():
        for r in measured:
            print(
                f"{name:<32} {r['campuses']:>8} {r['wall_s']:>8.1f} {r['first_round_s']:>12.2f} {r['per_round_s']:>12.3f} "
                f"{r['peak_mb'] if 'peak_mb' in r else float('nan'):>9.0f} {_auc(r['auc']):>7} {r.get('refused', 0):>8}"
            )
    fed, central = runs["federated, 7 campuses"], runs["centralized DP-SGD"]
    fed_s, central_s = (statistics.median(r["wall_s"] for r in rs) for rs in (fed, central))
    result = {
        "federated_s": round(fed_s, 2),
        "centralized_s": round(central_s, 2),
        "ratio": round(fed_s / central_s, 3),
        "per_round_s": round(statistics.median(r["per_round_s"] for r in fed), 3),
        "peak_mb": round(max(r["peak_mb"] for r in fed), 1),
        "centralized_peak_mb": round(max(r["peak_mb"] for r in central), 1),
        "rounds": rounds,
        "repeats": repeats,
        "federated_runs_s": [round(r["wall_s"], 2) for r in fed],
        "centralized_runs_s": [round(r["wall_s"], 2) for r in central],
        "shards": {
            str(n): {k: _rounded(v) for k, v in runs[f"federated, {n} shard campuses"][0].items() if k != "campuses"}
            for n in shards
        },
    }
    if quick is not None:
        result["study"] = {"config": QUICK_STUDY.name, **{k: round(v, 2) for k, v in quick.items()}}
        print(f"study {QUICK_STUDY.name}: {quick['cells']} cells in {quick['wall_s']:.1f} s, peak {quick['peak_mb']:.0f} MB")
    for n in deployments:
        d = runs[f"deployment, {n} campuses"][0]
        result.setdefault("deployment", {})[str(n)] = {
            **{k: round(v, 3) for k, v in d.items() if k != "campuses"},
            "per_round_vs_simulation": round(d["per_round_s"] / result["per_round_s"], 2),
        }
        print(
            f"deployment, {n} campuses: {d['per_round_s']:.2f} s per round, "
            f"{d['per_round_s'] / result['per_round_s']:.2f}x the 7-campus simulation's {result['per_round_s']:.2f} s"
        )
    print(f"\nfederated / centralized wall time (medians of {repeats}): {result['ratio']:.2f}x")
    print(json.dumps(result))
    return result
