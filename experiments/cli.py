"""The ``edufl`` command line.

Exit status: 0 on success, 2 for a user mistake (bad data, bad option), with a
message and no traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

# A campus tool must not phone home: Flower telemetry, update checks and
# per-run dependency installs are off unless the user turns them on.
for _var, _value in (
    ("FLWR_TELEMETRY_ENABLED", "0"),
    ("FLWR_DISABLE_UPDATE_CHECK", "1"),
    ("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1"),
):
    os.environ.setdefault(_var, _value)

# Only light modules here: `edufl simulate` starts the simulation engine before torch loads.
from federation.data import DataError, download, load_tables, resolve_data_dir  # noqa: E402
from federation.runconfig import CAMPUS_BY, MODELS, SPLITS, STRATEGIES, TASKS, ConfigError, RunConfig  # noqa: E402

DEFAULTS = RunConfig()


def _simulate_parser(sub) -> None:
    p = sub.add_parser("simulate", help="run a federation (or a baseline) on one machine",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", help="folder with the OULAD tables (default: $EDUFL_DATA, then the user cache)")
    p.add_argument("--mode", choices=("federated", "centralized", "local"), default="federated",
                   help="federated (Flower simulation engine), centralized (pooled rows, research only) or local (each campus alone)")
    p.add_argument("--task", choices=TASKS, default=DEFAULTS.task, help="prediction task")
    p.add_argument("--rounds", type=int, default=DEFAULTS.num_rounds, help="federation rounds")
    p.add_argument("--local-epochs", type=int, default=DEFAULTS.local_epochs, help="epochs of local training per round")
    p.add_argument("--batch-size", type=int, default=DEFAULTS.batch_size, help="expected batch size (Poisson sampling rate = batch/n)")
    p.add_argument("--learning-rate", type=float, default=DEFAULTS.learning_rate, help="SGD learning rate on each campus")
    p.add_argument("--model", choices=MODELS, default=DEFAULTS.model, help="MLP (64-32) or logistic regression")
    p.add_argument("--strategy", choices=STRATEGIES, default=DEFAULTS.strategy, help="Flower aggregation strategy")
    p.add_argument("--proximal-mu", type=float, default=DEFAULTS.proximal_mu, help="FedProx proximal term weight")
    p.add_argument("--target-epsilon", type=float, default=DEFAULTS.target_epsilon, help="each campus's ε for the whole run")
    p.add_argument("--delta", type=float, default=DEFAULTS.delta, help="δ of each campus's (ε, δ) guarantee")
    p.add_argument("--max-grad-norm", type=float, default=DEFAULTS.max_grad_norm, help="per-example clipping norm")
    p.add_argument("--no-dp", action="store_true", help="turn differential privacy OFF (research baselines only)")
    p.add_argument("--campus-by", choices=CAMPUS_BY, default=DEFAULTS.campus_by,
                   help="campuses: module (7), region (13) or shard (--shards campuses by student hash)")
    p.add_argument("--shards", type=int, default=DEFAULTS.shards, help="number of campuses with --campus-by shard")
    p.add_argument("--cutoff-day", type=int, default=DEFAULTS.cutoff_day, help="early-warning day D")
    p.add_argument("--split", choices=SPLITS, default=DEFAULTS.split,
                   help="stratified held-out test rows per campus, or temporal (train 2013, test 2014)")
    p.add_argument("--test-fraction", type=float, default=DEFAULTS.test_fraction, help="share of each campus's rows held out")
    p.add_argument("--seed", type=int, default=DEFAULTS.seed, help="seed for splits, initial weights, sampling and noise")
    p.add_argument("--out", default=DEFAULTS.out, help="results folder")


def _run_simulate(args: argparse.Namespace) -> None:
    from .simulate import simulate

    try:
        cfg = _simulate_config(args)
    except ConfigError as err:  # name the option the user typed
        key, _, rest = str(err).partition(" ")
        raise ConfigError(f"--{'rounds' if key == 'num-rounds' else key} {rest}") from None
    started = time.perf_counter()
    simulate(cfg, resolve_data_dir(args.data), args.mode)
    print(f"total wall time {time.perf_counter() - started:.1f} s (start-up included)")


def _simulate_config(args: argparse.Namespace) -> RunConfig:
    return RunConfig(
        task=args.task, num_rounds=args.rounds, local_epochs=args.local_epochs, batch_size=args.batch_size,
        learning_rate=args.learning_rate, model=args.model, strategy=args.strategy, proximal_mu=args.proximal_mu,
        dp=not args.no_dp, target_epsilon=args.target_epsilon, delta=args.delta, max_grad_norm=args.max_grad_norm,
        cutoff_day=args.cutoff_day, split=args.split, campus_by=args.campus_by, shards=args.shards, test_fraction=args.test_fraction,
        seed=args.seed, out=args.out,
    )


def _run_experiment(args: argparse.Namespace) -> None:
    from pathlib import Path

    from .study import Study, report, run

    if args.experiment_command == "report":
        if not (Path(args.dir) / "rows.csv").is_file():
            raise ConfigError(f"{args.dir}: no rows.csv here; run `edufl experiment run CONFIG --out {args.dir}` first")
        report(Path(args.dir))
        return
    config = Path(args.config)
    out = Path(args.out) if args.out else Path("results") / Study.load(config).name
    run(config, out, resolve_data_dir(args.data))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="edufl", description="Federated, differentially private learning analytics")
    sub = parser.add_subparsers(dest="command", required=True)
    _simulate_parser(sub)
    data = sub.add_parser("data", help="get or check the OULAD tables").add_subparsers(dest="data_command", required=True)
    dl = data.add_parser("download", help="download the official OULAD release into the user cache folder")
    dl.add_argument("--url", default=None, help="alternative address of anonymisedData.zip")
    check = data.add_parser("validate", help="check a folder of OULAD tables and report every problem")
    check.add_argument("--data")
    b = sub.add_parser("bench", help="time a DP federation against centralized DP-SGD, and at 50 and 200 campuses")
    b.add_argument("--data")
    b.add_argument("--rounds", type=int, default=10)
    b.add_argument("--shards", default="50,200", help="comma-separated campus counts for the scaling runs ('' for none)")
    exp = sub.add_parser("experiment", help="run a study from a TOML config, or rebuild its report")
    exp_sub = exp.add_subparsers(dest="experiment_command", required=True)
    exp_run = exp_sub.add_parser("run", help="run every cell of the study not yet done (resumable)")
    exp_run.add_argument("config", help="study config (TOML), e.g. experiments/configs/quick.toml")
    exp_run.add_argument("--out", help="study folder (default: results/<study name>)")
    exp_run.add_argument("--data")
    exp_report = exp_sub.add_parser("report", help="rebuild tables and plots from a study folder's saved rows")
    exp_report.add_argument("dir")
    args = parser.parse_args(argv)
    try:
        if args.command == "simulate":
            _run_simulate(args)
        elif args.command == "experiment":
            _run_experiment(args)
        elif args.command == "bench":
            from .bench import bench

            bench(resolve_data_dir(args.data), args.rounds, tuple(int(n) for n in args.shards.split(",") if n))
        elif args.data_command == "download":
            print(f"OULAD tables saved in {download(**({'url': args.url} if args.url else {}))}")
        else:
            tables = load_tables(resolve_data_dir(args.data))
            print(f"{tables.source}: OK ({', '.join(f'{k} {len(v)} rows' for k, v in tables.frames.items())})")
            for note in tables.notes:
                print(f"note: {note}")
    except (DataError, ConfigError) as err:
        print(f"edufl: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
