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
  (``--campus-by shard``), to show how time and memory grow.

The last line printed is one JSON object with ``federated_s``,
``centralized_s`` (medians), ``ratio``, ``per_round_s`` and ``peak_mb``.
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

__all__ = ["SETTLE_S", "bench", "measure"]

# Pause after each run: the simulation engine's processes take a second or two to
# exit after the run's own process, and must not slow down the next measurement.
SETTLE_S = 5.0


def measure(args: list[str], data_dir: Path, out: Path) -> dict:
    """Run ``edufl simulate ARGS --out OUT`` as its own process; wall time, peak memory, summary."""
    command = [sys.executable, "-m", "edufl.experiments.cli", "simulate", "--data", str(data_dir), "--out", str(out), *args]
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
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
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{process.stderr.read()[-2000:]}")
    summary = json.loads((out / "summary.json").read_text())
    ends = [r["elapsed_s"] for r in summary["rounds"]]
    steady = [b - a for a, b in zip(ends, ends[1:], strict=False)]
    return {
        "wall_s": wall,
        "peak_mb": peak / 2**20,
        "first_round_s": ends[0],
        "per_round_s": statistics.median(steady) if steady else ends[0],
        "auc": summary["global"]["auc"],
        "campuses": len(summary["campuses"]),
    }


def _rss(process: psutil.Process) -> int:
    try:
        return process.memory_info().rss
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return 0


def bench(data_dir: Path, rounds: int = 10, shards: tuple[int, ...] = (50, 200), repeats: int = 3) -> dict:
    """Run the measurements, print a table, and return the final JSON object.

    The 7-campus federation and the centralized run alternate ``repeats`` times
    (timings on a shared machine drift); their medians give the ratio.
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
            runs.setdefault(name, []).append(measure(args, data_dir, Path(tmp) / str(i)))
            time.sleep(SETTLE_S)
    print(f"\n{'run':<32} {'campuses':>8} {'wall s':>8} {'1st round s':>12} {'per round s':>12} {'peak MB':>9} {'AUC':>7}")
    for name, measured in runs.items():
        for r in measured:
            print(
                f"{name:<32} {r['campuses']:>8} {r['wall_s']:>8.1f} {r['first_round_s']:>12.2f} {r['per_round_s']:>12.3f} "
                f"{r['peak_mb']:>9.0f} {r['auc']:>7.4f}"
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
            str(n): {k: round(v, 3) for k, v in runs[f"federated, {n} shard campuses"][0].items() if k != "campuses"}
            for n in shards
        },
    }
    print(f"\nfederated / centralized wall time (medians of {repeats}): {result['ratio']:.2f}x")
    print(json.dumps(result))
    return result
