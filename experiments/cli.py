"""The ``edufl`` command line.

Exit status: 0 on success, 2 for a user mistake (bad data, bad option, bad
policy file), 3 when campuses refused a run, 4 when campuses failed (an error
on the campus, or no reply); each with a message and no traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

# A campus tool must not phone home: Flower telemetry, update checks and
# per-run dependency installs are off unless the user turns them on.
for _var, _value in (
    ("FLWR_TELEMETRY_ENABLED", "0"),
    ("FLWR_DISABLE_UPDATE_CHECK", "1"),
    ("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1"),
):
    os.environ.setdefault(_var, _value)

# Only light modules here: `edufl simulate` starts the simulation engine before torch loads.
from edufl.federation.data import DataError, download, load_tables, resolve_data_dir  # noqa: E402
from edufl.federation.mapping import MappingError  # noqa: E402
from edufl.federation.policy import CampusPolicy, PolicyError  # noqa: E402
from edufl.federation.runconfig import (CAMPUS_BY, CENTRAL_DP, MODELS, SECURE_AGGREGATION, SPLITS, STRATEGIES, TASKS,  # noqa: E402
                                  ConfigError, RunConfig)

DEFAULTS = RunConfig()


class CampusesRefused(RuntimeError):
    """One or more campuses refused the run, or blocked its replies (exit status 3)."""


class CampusesFailed(RuntimeError):
    """One or more campuses failed a request, or did not reply (exit status 4)."""


def _simulate_parser(sub) -> None:
    p = sub.add_parser("simulate", help="run a federation (or a baseline) on one machine",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", help="folder with the OULAD tables (default: $EDUFL_DATA, then the user cache)")
    p.add_argument("--mode", choices=("federated", "centralized", "local"), default="federated",
                   help="federated (Flower simulation engine), centralized (pooled rows, research only) or local (each campus alone)")
    _run_settings(p)
    p.add_argument("--campus-by", choices=CAMPUS_BY, default=DEFAULTS.campus_by,
                   help="campuses: module (7), region (13) or shard (--shards campuses by student hash)")
    p.add_argument("--shards", type=int, default=DEFAULTS.shards, help="number of campuses with --campus-by shard")
    p.add_argument("--policy", help="campus policy file (TOML) every virtual campus enforces (default: none, research settings run as asked)")


def _run_settings(p: argparse.ArgumentParser) -> None:
    """The run settings shared by `simulate` and `coordinator run`."""
    p.add_argument("--task", choices=TASKS, default=DEFAULTS.task,
                   help="prediction task at the cutoff day: withdrawal, at_risk (Fail or Withdrawn) or final_result "
                        "(Distinction, Fail, Pass, Withdrawn)")
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
    p.add_argument("--central-dp", choices=CENTRAL_DP, default=DEFAULTS.central_dp,
                   help="client-level DP on the coordinator: clip each campus's update, equal-weight mean, Gaussian noise")
    p.add_argument("--central-noise-multiplier", type=float, default=DEFAULTS.central_noise_multiplier,
                   help="central DP noise standard deviation / clipping norm")
    p.add_argument("--central-clipping-norm", type=float, default=DEFAULTS.central_clipping_norm,
                   help="central DP: L2 norm each campus's update is clipped to")
    p.add_argument("--secure-aggregation", choices=SECURE_AGGREGATION, default=DEFAULTS.secure_aggregation,
                   help="secaggplus: train through Flower's SecAgg+ protocol; the coordinator learns only the sum of the updates")
    p.add_argument("--secagg-num-shares", type=float, default=DEFAULTS.secagg_num_shares,
                   help="SecAgg+: shares of each campus's secrets (<= 1: that fraction of the campuses; > 1: that many, >= 3)")
    p.add_argument("--secagg-reconstruction-threshold", type=float, default=DEFAULTS.secagg_reconstruction_threshold,
                   help="SecAgg+: shares that rebuild a secret (<= 1: that fraction of the shares, > 0.5; > 1: that many)")
    p.add_argument("--secagg-max-weight", type=float, default=DEFAULTS.secagg_max_weight,
                   help="SecAgg+: the largest campus weight (training rows) the masked sum holds without clipping")
    p.add_argument("--cutoff-day", type=int, default=DEFAULTS.cutoff_day, help="early-warning day D")
    p.add_argument("--split", choices=SPLITS, default=DEFAULTS.split,
                   help="stratified held-out test rows per campus, or temporal (train 2013, test 2014)")
    p.add_argument("--test-fraction", type=float, default=DEFAULTS.test_fraction, help="share of each campus's rows held out")
    p.add_argument("--seed", type=int, default=DEFAULTS.seed,
                   help="seed for data splits and initial weights (DP noise and batch sampling are secret on each campus)")
    p.add_argument("--reproducible-noise", action="store_true",
                   help="research only: DP noise and batch sampling follow --seed too, so runs repeat exactly; "
                        "NOT private against the coordinator, and every campus policy refuses it")
    p.add_argument("--out", default=DEFAULTS.out, help="results folder")


def _run_simulate(args: argparse.Namespace) -> None:
    from .simulate import simulate

    cfg = _run_config(args, campus_by=args.campus_by, shards=args.shards)
    if args.central_dp != "off" and args.mode != "federated":
        raise ConfigError(f"--central-dp is applied by the coordinator, in federated runs only (not --mode {args.mode})")
    if args.secure_aggregation != "off" and args.mode != "federated":
        raise ConfigError(f"--secure-aggregation is a federation protocol, for federated runs only (not --mode {args.mode})")
    if args.policy and args.mode != "federated":
        raise ConfigError(f"--policy is enforced by campuses, in federated runs only (not --mode {args.mode})")
    if args.policy:  # a bad policy file is the user's mistake (exit 2), reported before the engine starts
        CampusPolicy.load(Path(args.policy))
    started = time.perf_counter()
    summary = simulate(cfg, resolve_data_dir(args.data), args.mode, policy=args.policy and Path(args.policy))
    print(f"total wall time {time.perf_counter() - started:.1f} s (start-up included)")
    _check_refusals(summary)


def _check_refusals(summary: dict) -> None:
    """Raise CampusesRefused listing each campus's refusal (its reason names the campus and the policy key), or,
    when none refused, CampusesFailed listing each failure (a campus's error, or a missing reply)."""
    refusals = sorted({f["reason"] for f in summary["failures"] if f["refused"]})
    failures = sorted({f["reason"] for f in summary["failures"] if not f["refused"]})
    if refusals:
        raise CampusesRefused("campuses refused the run:\n  " + "\n  ".join(refusals + failures))
    if failures:
        raise CampusesFailed("campuses failed during the run:\n  " + "\n  ".join(failures))


def _run_config(args: argparse.Namespace, **extra) -> RunConfig:
    """The RunConfig of the `_run_settings` options (and ``extra`` fields); errors name the option typed."""
    try:
        return RunConfig(
            task=args.task, num_rounds=args.rounds, local_epochs=args.local_epochs, batch_size=args.batch_size,
            learning_rate=args.learning_rate, model=args.model, strategy=args.strategy, proximal_mu=args.proximal_mu,
            dp=not args.no_dp, target_epsilon=args.target_epsilon, delta=args.delta, max_grad_norm=args.max_grad_norm,
            central_dp=args.central_dp, central_noise_multiplier=args.central_noise_multiplier,
            central_clipping_norm=args.central_clipping_norm, secure_aggregation=args.secure_aggregation,
            secagg_num_shares=args.secagg_num_shares, secagg_reconstruction_threshold=args.secagg_reconstruction_threshold,
            secagg_max_weight=args.secagg_max_weight,
            cutoff_day=args.cutoff_day, split=args.split, test_fraction=args.test_fraction, seed=args.seed, out=args.out,
            reproducible_noise=args.reproducible_noise, **extra,
        )
    except ConfigError as err:
        key, _, rest = str(err).partition(" ")
        raise ConfigError(f"--{'rounds' if key == 'num-rounds' else key} {rest}") from None


def _certs_parser(sub) -> None:
    p = sub.add_parser("certs", help="make a private CA, a SuperLink certificate and campus key pairs (demos and tests)")
    p.add_argument("--out", required=True, help="folder for the files (existing files are kept)")
    p.add_argument("--campuses", required=True, help="comma-separated campus names, e.g. AAA,BBB,CCC")
    p.add_argument("--host", action="append", default=[],
                   help="a DNS name or IP address campuses use to reach the coordinator (repeatable); "
                        "localhost, 127.0.0.1 and ::1 are always included")


def _run_certs(args: argparse.Namespace) -> None:
    from pathlib import Path

    from edufl.federation.pki import make_pki

    written = make_pki(Path(args.out), [c.strip() for c in args.campuses.split(",") if c.strip()], args.host)
    for path in written:
        print(f"wrote {path}")
    print(f"{args.out}: give each campus ca.crt and its own campus-NAME.key; superlink.key and ca.key stay with the coordinator")


def _tls_options(p: argparse.ArgumentParser, *, cert: bool, key: str | None) -> None:
    p.add_argument("--pki", help="folder written by `edufl certs` (the flags below override its files)")
    p.add_argument("--root-cert", help="CA certificate (PEM) that signed the SuperLink's certificate")
    if cert:
        p.add_argument("--cert", help="SuperLink TLS certificate (PEM)")
    if key:
        p.add_argument("--key", help=key)
    p.add_argument("--insecure", action="store_true", help="plaintext, no authentication: local experiments only")


def _coordinator_parser(sub) -> None:
    coord = sub.add_parser("coordinator", help="the coordinator: a Flower SuperLink, and federation runs on it")
    c_sub = coord.add_subparsers(dest="coordinator_command", required=True)
    s = c_sub.add_parser("start", help="start the SuperLink (TLS, campus authentication) in the foreground",
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    s.add_argument("--port", type=int, default=9200, help="the one port for campuses, `flwr` and the ServerApp")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for campuses on other hosts)")
    _tls_options(s, cert=True, key="SuperLink TLS private key (PEM)")
    r = c_sub.add_parser("run", help="run a federation on a started coordinator and write its results folder",
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    r.add_argument("--superlink", required=True, help="the coordinator's HOST:PORT")
    _tls_options(r, cert=False, key=None)
    r.add_argument("--min-campuses", type=int, default=DEFAULTS.min_campuses, help="campuses needed for each round")
    r.add_argument("--round-timeout", type=float, default=DEFAULTS.round_timeout,
                   help="seconds a round waits for replies, and for --min-campuses to be connected")
    r.add_argument("--wait", type=float, default=60.0, help="seconds to wait for --min-campuses to be online before starting")
    r.add_argument("--resume", metavar="RUN_DIR",
                   help="continue the run of this results folder after its last finished round, with its own settings "
                        "and run name (give no run options)")
    _run_settings(r)


def _run_coordinator(args: argparse.Namespace) -> None:
    from pathlib import Path

    from edufl.server.coordinator import RunFailed, run, start

    pki, root_cert = args.pki and Path(args.pki), args.root_cert and Path(args.root_cert)
    try:
        if args.coordinator_command == "start":
            start(port=args.port, host=args.host, pki=pki, root_cert=root_cert, cert=args.cert and Path(args.cert),
                  key=args.key and Path(args.key), insecure=args.insecure)
        else:
            cfg = _run_config(args, min_campuses=args.min_campuses, round_timeout=args.round_timeout)
            if args.resume and cfg != DEFAULTS:
                raise ConfigError(f"--resume {args.resume} continues that run with the settings in its checkpoint: "
                                  "drop the run options (--rounds, --out, --min-campuses, ...)")
            _check_refusals(run(cfg, superlink=args.superlink, pki=pki, root_cert=root_cert, insecure=args.insecure,
                                wait=args.wait, resume=args.resume and Path(args.resume)))
    except RunFailed as err:
        raise SystemExit(f"edufl: {err}") from None


def _campus_parser(sub) -> None:
    campus = sub.add_parser("campus", help="a campus: check or export its data, start its SuperNode, show its budget and audit log")
    c_sub = campus.add_subparsers(dest="campus_command", required=True)
    s = c_sub.add_parser("start", help="start this campus's SuperNode in the foreground (its ClientApp reads only --data)")
    s.add_argument("--data", required=True, help="the campus's own export (OULAD layout, or any layout with --mapping)")
    s.add_argument("--mapping", help="mapping file (TOML) of the export to the learner-record contract (default: OULAD layout)")
    s.add_argument("--superlink", required=True, help="the coordinator's HOST:PORT")
    s.add_argument("--campus", help="campus name (default: the --data folder's name); picks campus-NAME.key in --pki")
    s.add_argument("--state", help="folder for this campus's privacy ledger and audit log (default: edufl-state/CAMPUS)")
    s.add_argument("--policy", help="campus policy file (TOML); default: the safe defaults")
    _tls_options(s, cert=False, key="campus private key (OpenSSH format), registered on the coordinator")
    s.add_argument("--rejoin-wait", type=float, default=75.0,
                   help="seconds to keep retrying when the coordinator refuses this campus (after an unclean stop "
                        "it holds the campus online for up to a minute)")
    e = c_sub.add_parser("export-oulad", help="write one campus's slice of OULAD, as that campus's own export")
    e.add_argument("--campus", required=True, help="campus name, e.g. AAA (a module code with --campus-by module)")
    e.add_argument("--out", required=True, help="new folder for the campus's tables")
    e.add_argument("--campus-by", choices=CAMPUS_BY, default=DEFAULTS.campus_by, help="how OULAD is split into campuses")
    e.add_argument("--shards", type=int, default=DEFAULTS.shards, help="number of campuses with --campus-by shard")
    e.add_argument("--data", help="folder with the full OULAD tables (default: $EDUFL_DATA, then the user cache)")
    v = c_sub.add_parser("validate", help="check a campus folder before it joins and report every problem")
    v.add_argument("--data", required=True, help="the campus's folder")
    v.add_argument("--mapping", help="mapping file (TOML) of the export to the learner-record contract (default: OULAD layout)")
    ap = c_sub.add_parser("approve", help="the SHA-256 of an app bundle the data steward reviewed; with --policy, approve it there")
    ap.add_argument("bundle", metavar="FAB_OR_APP_DIR", nargs="?",
                    help="a .fab file (`flwr build`), or an app folder, built as `flwr run` builds it (default: the bundle "
                         "this installed edufl submits)")
    ap.add_argument("--policy", help="the campus policy file to add the hash to (created if missing; the rest is kept as written)")
    b = c_sub.add_parser("budget", help="ε spent per dataset over all runs, from the campus's privacy ledger")
    b.add_argument("--state", required=True, help="the campus's state folder")
    b.add_argument("--policy", help="the campus's policy file: its δ, and the total budget left (default: the safe defaults' δ)")
    a = c_sub.add_parser("audit", help="what the campus sent, blocked or refused, from its audit log")
    a.add_argument("--state", required=True, help="the campus's state folder")
    a.add_argument("--run", help="only this run (its run name, or Flower's run id)")
    a.add_argument("--format", choices=("table", "json"), default="table", help="a table, or one JSON object per line")


def _run_campus(args: argparse.Namespace) -> None:
    from pathlib import Path

    from edufl.clients.campus import CampusRefused, approve, audit, budget, export_oulad, start, validate

    if args.campus_command == "validate":
        validate(Path(args.data), args.mapping and Path(args.mapping))
    elif args.campus_command == "approve":
        approve(args.bundle and Path(args.bundle), args.policy and Path(args.policy))
    elif args.campus_command == "budget":
        budget(Path(args.state), args.policy and Path(args.policy))
    elif args.campus_command == "audit":
        audit(Path(args.state), args.run, args.format)
    elif args.campus_command == "export-oulad":
        export_oulad(args.campus, Path(args.out), resolve_data_dir(args.data), args.campus_by, args.shards)
    else:
        try:
            start(data=Path(args.data), superlink=args.superlink, campus=args.campus, insecure=args.insecure,
                  state=args.state and Path(args.state), policy=args.policy and Path(args.policy),
                  pki=args.pki and Path(args.pki), root_cert=args.root_cert and Path(args.root_cert),
                  key=args.key and Path(args.key), rejoin_wait=args.rejoin_wait,
                  mapping=args.mapping and Path(args.mapping))
        except CampusRefused as err:
            raise SystemExit(f"edufl: {err}") from None


def _analytics_parser(sub) -> None:
    analytics = sub.add_parser("analytics", help="DP federated statistics: counts, means, histograms and quantiles per group")
    a_sub = analytics.add_subparsers(dest="analytics_command", required=True)
    r = a_sub.add_parser("run", help="answer a query (TOML) on the simulation engine, or on a deployment with --superlink, "
                                     "and write a table, a chart and summary.json",
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    r.add_argument("query", metavar="QUERY.toml", help="the query, e.g. experiments/queries/withdrawal_by_imd.toml")
    r.add_argument("--data", help="simulation: folder with the OULAD tables (default: $EDUFL_DATA, then the user cache)")
    r.add_argument("--campus-by", choices=("module", "region"), default="module", help="simulation: campuses, module (7) or region (13)")
    r.add_argument("--policy", help="simulation: campus policy file (TOML) every virtual campus enforces (default: none; k = 10)")
    r.add_argument("--superlink", help="deployment: the coordinator's HOST:PORT (campuses answer with their own data and policy)")
    _tls_options(r, cert=False, key=None)
    r.add_argument("--min-campuses", type=int, default=DEFAULTS.min_campuses, help="deployment: campuses that must be online")
    r.add_argument("--wait", type=float, default=60.0, help="deployment: seconds to wait for --min-campuses to be online")
    r.add_argument("--round-timeout", type=float, default=DEFAULTS.round_timeout, help="deployment: seconds to wait for the answers")
    r.add_argument("--out", default="results/analytics", help="results folder (reuse it to keep spending the same simulated campus budgets)")


def _run_analytics(args: argparse.Namespace) -> None:
    from edufl.federation.statistics import load_query

    # A bad query file is the user's mistake (exit 2), reported before anything starts, in both paths
    # (experiments.analytics reads it again when it builds the run).
    load_query(Path(args.query))
    from .analytics import run_analytics, run_deployed

    if args.superlink:
        stray = [flag for flag, given in (("--data", args.data), ("--policy", args.policy), ("--campus-by", args.campus_by != "module"))
                 if given]
        if stray:
            raise ConfigError(f"{', '.join(stray)}: simulation options; with --superlink each campus answers from its own data under its own policy")
        from edufl.server.coordinator import RunFailed

        try:
            summary = run_deployed(Path(args.query), superlink=args.superlink, pki=args.pki and Path(args.pki),
                                   root_cert=args.root_cert and Path(args.root_cert), insecure=args.insecure,
                                   min_campuses=args.min_campuses, wait=args.wait, round_timeout=args.round_timeout,
                                   out=Path(args.out))
        except RunFailed as err:
            raise SystemExit(f"edufl: {err}") from None
    else:
        stray = [flag for flag, given in (("--pki", args.pki), ("--root-cert", args.root_cert), ("--insecure", args.insecure))
                 if given]
        if stray:
            raise ConfigError(f"{', '.join(stray)}: deployment options; give --superlink HOST:PORT too")
        summary = run_analytics(Path(args.query), resolve_data_dir(args.data), args.campus_by,
                                args.policy and Path(args.policy), Path(args.out))
    if summary["refusals"]:
        raise CampusesRefused("campuses refused the query:\n  " + "\n  ".join(r["reason"] for r in summary["refusals"]))


def _run_experiment(args: argparse.Namespace) -> None:
    from pathlib import Path

    from .study import Study, report, run

    if args.experiment_command == "report":
        if not (Path(args.dir) / "rows.csv").is_file():
            raise ConfigError(f"{args.dir}: no rows.csv here; run `edufl experiment run CONFIG --out {args.dir}` first")
        report(Path(args.dir))
        return
    config = Path(args.config)
    study = Study.load(config)  # a bad config is the user's mistake (exit 2), reported before any data or engine
    out = Path(args.out) if args.out else Path("results") / study.name
    run(config, out, resolve_data_dir(args.data))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="edufl", description="Federated, differentially private learning analytics")
    sub = parser.add_subparsers(dest="command", required=True)
    _simulate_parser(sub)
    _certs_parser(sub)
    _coordinator_parser(sub)
    _campus_parser(sub)
    _analytics_parser(sub)
    data = sub.add_parser("data", help="get or check the OULAD tables").add_subparsers(dest="data_command", required=True)
    dl = data.add_parser("download", help="download the official OULAD release into the user cache folder")
    dl.add_argument("--url", default=None, help="alternative address of anonymisedData.zip")
    check = data.add_parser("validate", help="check a folder of OULAD tables and report every problem")
    check.add_argument("--data")
    b = sub.add_parser("bench", help="time a DP federation against centralized DP-SGD, and at 50 and 200 campuses")
    b.add_argument("--data")
    b.add_argument("--rounds", type=int, default=10)
    b.add_argument("--shards", default="50,200", help="comma-separated campus counts for the scaling runs ('' for none)")
    b.add_argument("--repeats", type=int, default=3, help="alternating federated/centralized runs; medians are compared")
    exp = sub.add_parser("experiment", help="run a study from a TOML config, or rebuild its report")
    exp_sub = exp.add_subparsers(dest="experiment_command", required=True)
    exp_run = exp_sub.add_parser("run", help="run every cell of the study not yet done (resumable)")
    exp_run.add_argument("config", help="study config (TOML), e.g. experiments/configs/quick.toml")
    exp_run.add_argument("--out", help="study folder (default: results/<study name>)")
    exp_run.add_argument("--data")
    exp_report = exp_sub.add_parser("report", help="rebuild tables and plots from a study folder's saved rows")
    exp_report.add_argument("dir")
    audit = sub.add_parser("audit-privacy", help="membership-inference attack AUC per campus against a run's final model")
    audit.add_argument("run_dir", metavar="RUN_DIR", help="results folder of `edufl simulate` (with summary.json and model.pt)")
    audit.add_argument("--data", help="the tables the run used (default: the folder recorded in summary.json)")
    audit.add_argument("--seed", type=int, default=0, help="seed for subsampling members to the number of non-members")
    args = parser.parse_args(argv)
    try:
        if args.command == "simulate":
            _run_simulate(args)
        elif args.command == "experiment":
            _run_experiment(args)
        elif args.command == "certs":
            _run_certs(args)
        elif args.command == "coordinator":
            _run_coordinator(args)
        elif args.command == "campus":
            _run_campus(args)
        elif args.command == "analytics":
            _run_analytics(args)
        elif args.command == "audit-privacy":
            from .privacy_audit import audit, print_audit

            print_audit(audit(Path(args.run_dir), args.data and Path(args.data), args.seed))
        elif args.command == "bench":
            from .bench import bench

            bench(resolve_data_dir(args.data), args.rounds, tuple(int(n) for n in args.shards.split(",") if n), args.repeats)
        elif args.data_command == "download":
            print(f"OULAD tables saved in {download(**({'url': args.url} if args.url else {}))}")
        else:
            tables = load_tables(resolve_data_dir(args.data))
            print(f"{tables.source}: OK ({', '.join(f'{k} {len(v)} rows' for k, v in tables.frames.items())})")
            for note in tables.notes:
                print(f"note: {note}")
    except (DataError, ConfigError, PolicyError, MappingError) as err:
        print(f"edufl: {err}", file=sys.stderr)
        return 2
    except CampusesRefused as err:
        print(f"edufl: {err}", file=sys.stderr)
        return 3
    except CampusesFailed as err:
        print(f"edufl: {err}", file=sys.stderr)
        return 4
    return 0


if __name__ == "__main__":
    sys.exit(main())
