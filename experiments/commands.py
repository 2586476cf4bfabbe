"""The research commands (:data:`app`): ``edufl simulate``, ``analytics``, ``experiment``, ``data``, ``bench``, ``audit-privacy``.

They parse options and call the research runners of :mod:`edufl.experiments`;
errors reach the user through ``edufl``'s ``main`` (:mod:`edufl.experiments.cli`).
Each runner is imported by the command that runs it: ``edufl simulate`` starts
the simulation engine before torch loads, and ``edufl --help`` loads neither.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import click
import typer

from edufl.federation.deploy import InsecureOption, PkiOption, RootCertOption
from edufl.federation.errors import CampusesRefused
from edufl.federation.policy import CampusPolicy
from edufl.federation.runconfig import CAMPUS_BY, ConfigError, RunConfig
from edufl.federation.schema import FederationSchema, load_schema
from edufl.federation.tables import load_tables
from edufl.server.coordinator import raise_for_failures
from edufl.server.run_options import run_config, run_settings

from .oulad import download, resolve_data_dir

__all__ = ["app"]

_DEFAULTS = RunConfig()
_DATA_HELP = "folder with the OULAD tables (default: $EDUFL_DATA, then the user cache)"
_DataOption = Annotated[str | None, typer.Option(help=_DATA_HELP)]
_CampusOption = Annotated[
    list[str] | None,
    typer.Option(
        metavar="NAME=DIR[:MAPPING]",
        help="simulation: a campus folder (repeat for each campus), its export in DIR read with the mapping file "
        "MAPPING (default: the OULAD release); campuses are then these folders, not --data split by --campus-by",
    ),
]
_RayAddressOption = Annotated[
    str | None,
    typer.Option(
        help="attach the simulation engine to this existing Ray cluster (HOST:PORT of its head, or auto) "
        "instead of running its workers on this machine"
    ),
]


def _data_or_campuses(
    data: str | None, campus: list[str] | None, options: str, formed: bool, schema: FederationSchema
) -> tuple[Path | None, dict | None]:
    """What a research command reads: the OULAD folder of ``--data`` (resolved; no campus folders), or
    the ``--campus`` folders, each read and validated against the federation ``schema`` (no data folder).

    Raises
    ------
    ConfigError
        When ``--campus`` comes with ``--data`` or with an option that forms campuses from it (``formed``;
        ``options`` names them for the message).
    MappingError, DataError
        As :func:`~experiments.simulate.load_campuses`.
    """
    if not campus:
        return resolve_data_dir(data), None
    if data or formed:
        raise ConfigError(f"--campus gives the campuses: leave out {options}")
    from .simulate import load_campuses

    return None, load_campuses(campus, schema)


app = typer.Typer(add_completion=False)
"""Every research command of ``edufl``."""
_analytics = typer.Typer(help="DP federated statistics: counts, means, histograms and quantiles per group", no_args_is_help=True)
_experiment = typer.Typer(help="run a study from a TOML config, or rebuild its report", no_args_is_help=True)
_data = typer.Typer(help="get or check the OULAD tables", no_args_is_help=True)
app.add_typer(_analytics, name="analytics")
app.add_typer(_experiment, name="experiment")
app.add_typer(_data, name="data")


@app.command(help="run a federation (or a baseline) on one machine")
@run_settings
def simulate(
    data: _DataOption = None,
    mode: Annotated[
        str,
        typer.Option(
            click_type=click.Choice(("federated", "centralized", "local")),
            help="federated (Flower simulation engine), centralized (pooled rows, research only) or local (each campus alone)",
        ),
    ] = "federated",
    campus_by: Annotated[
        str,
        typer.Option(
            click_type=click.Choice(CAMPUS_BY),
            help="campuses: module (7), region (13) or shard (--shards campuses by student hash)",
        ),
    ] = _DEFAULTS.campus_by,
    shards: Annotated[int, typer.Option(help="number of campuses with --campus-by shard")] = _DEFAULTS.shards,
    policy: Annotated[
        Path | None,
        typer.Option(
            help="campus policy file (TOML) every virtual campus enforces (default: none, research settings run as asked)"
        ),
    ] = None,
    ray_address: _RayAddressOption = None,
    campus: _CampusOption = None,
    *,
    settings: dict[str, Any],
) -> None:
    from .simulate import simulate as run_simulation

    cfg = run_config(settings, campus_by=campus_by, shards=shards)
    if cfg.central_dp != "off" and mode != "federated":
        raise ConfigError(f"--central-dp is applied by the coordinator, in federated runs only (not --mode {mode})")
    if cfg.secure_aggregation != "off" and mode != "federated":
        raise ConfigError(f"--secure-aggregation is a federation protocol, for federated runs only (not --mode {mode})")
    if policy and mode != "federated":
        raise ConfigError(f"--policy is enforced by campuses, in federated runs only (not --mode {mode})")
    if policy:  # a bad policy file is the user's mistake (exit 2), reported before the engine starts
        CampusPolicy.load(policy)
    if ray_address and mode != "federated":
        raise ConfigError(f"--ray-address runs the simulation engine, for federated runs only (not --mode {mode})")
    started = time.perf_counter()
    formed = campus_by != _DEFAULTS.campus_by or shards != _DEFAULTS.shards
    data_dir, campuses = _data_or_campuses(data, campus, "--data, --campus-by and --shards", formed, cfg.schema)
    summary = run_simulation(cfg, data_dir, mode, campuses, policy=policy, ray_address=ray_address)
    print(f"total wall time {time.perf_counter() - started:.1f} s (start-up included)")
    raise_for_failures(summary)


@_analytics.command(
    "run",
    help=(
        "answer a query (TOML) on the simulation engine, or on a deployment with --superlink, "
        "and write a table, a chart and summary.json\n\n"
        "QUERY.toml: the query, e.g. experiments/queries/withdrawal_by_imd.toml."
    ),
)
def analytics_run(
    query: Annotated[Path, typer.Argument(metavar="QUERY.toml", show_default=False)],
    data: Annotated[str | None, typer.Option(help=f"simulation: {_DATA_HELP}")] = None,
    campus_by: Annotated[
        str, typer.Option(click_type=click.Choice(("module", "region")), help="simulation: campuses, module (7) or region (13)")
    ] = "module",
    policy: Annotated[
        Path | None,
        typer.Option(help="simulation: campus policy file (TOML) every virtual campus enforces (default: none; k = 10)"),
    ] = None,
    superlink: Annotated[
        str | None, typer.Option(help="deployment: the coordinator's HOST:PORT (campuses answer with their own data and policy)")
    ] = None,
    pki: PkiOption = None,
    root_cert: RootCertOption = None,
    insecure: InsecureOption = False,
    min_campuses: Annotated[int, typer.Option(help="deployment: campuses that must be online")] = _DEFAULTS.min_campuses,
    wait: Annotated[float, typer.Option(help="deployment: seconds to wait for --min-campuses to be online")] = 60.0,
    round_timeout: Annotated[float, typer.Option(help="deployment: seconds to wait for the answers")] = _DEFAULTS.round_timeout,
    out: Annotated[
        Path, typer.Option(help="results folder (reuse it to keep spending the same simulated campus budgets)")
    ] = Path("results/analytics"),
    campus: _CampusOption = None,
    schema: Annotated[
        Path | None,
        typer.Option(help="federation schema file (TOML) the campuses' data must fit (default: OULAD's)"),
    ] = None,
) -> None:
    from edufl.federation.queries import check_schema, load_query

    # A bad query or schema file is the user's mistake (exit 2), reported before anything starts, in both paths
    # (experiments.analytics reads the query again when it builds the run).
    federation = load_schema(schema)
    check_schema(load_query(query), federation)
    text = federation.text() if schema else ""
    from .analytics import run_analytics, run_deployed

    if superlink:
        stray = [
            flag
            for flag, given in (
                ("--data", data),
                ("--policy", policy),
                ("--campus-by", campus_by != "module"),
                ("--campus", campus),
            )
            if given
        ]
        if stray:
            raise ConfigError(
                f"{', '.join(stray)}: simulation options; with --superlink each campus answers from its own "
                "data under its own policy"
            )
        summary = run_deployed(
            query,
            superlink=superlink,
            pki=pki,
            root_cert=root_cert,
            insecure=insecure,
            min_campuses=min_campuses,
            wait=wait,
            round_timeout=round_timeout,
            out=out,
            federation_schema=text,
        )
    else:
        stray = [flag for flag, given in (("--pki", pki), ("--root-cert", root_cert), ("--insecure", insecure)) if given]
        if stray:
            raise ConfigError(f"{', '.join(stray)}: deployment options; give --superlink HOST:PORT too")
        data_dir, campuses = _data_or_campuses(data, campus, "--data and --campus-by", campus_by != "module", federation)
        summary = run_analytics(query, data_dir, campus_by, policy, out, campuses, federation_schema=text)
    if summary["refusals"]:
        raise CampusesRefused("campuses refused the query:\n  " + "\n  ".join(r["reason"] for r in summary["refusals"]))


@_experiment.command(
    "run",
    help=(
        "run every cell of the study not yet done (resumable)\n\n"
        "CONFIG: the study config (TOML), e.g. experiments/configs/quick.toml."
    ),
)
def experiment_run(
    config: Annotated[Path, typer.Argument(show_default=False)],
    out: Annotated[Path | None, typer.Option(help="study folder (default: results/<study name>)")] = None,
    data: _DataOption = None,
    ray_address: _RayAddressOption = None,
) -> None:
    from .study import Study, run

    study = Study.load(config)  # a bad config is the user's mistake (exit 2), reported before any data or engine
    if study.campuses and data:
        raise ConfigError(f"{config}: study.campuses gives the campuses: leave out --data")
    data_dir = None if study.campuses else resolve_data_dir(data)
    run(config, out or Path("results") / study.name, data_dir, ray_address)


@_experiment.command("report", help="rebuild tables and plots from a study folder's saved rows")
def experiment_report(folder: Annotated[Path, typer.Argument(metavar="DIR", show_default=False)]) -> None:
    from .study import report

    if not (folder / "rows.csv").is_file():
        raise ConfigError(f"{folder}: no rows.csv here; run `edufl experiment run CONFIG --out {folder}` first")
    report(folder)


@_data.command("download", help="download the official OULAD release into the user cache folder")
def data_download(url: Annotated[str | None, typer.Option(help="alternative address of anonymisedData.zip")] = None) -> None:
    print(f"OULAD tables saved in {download(**({'url': url} if url else {}))}")


@_data.command("validate", help="check a folder of OULAD tables and report every problem")
def data_validate(data: _DataOption = None) -> None:
    tables = load_tables(resolve_data_dir(data))
    print(f"{tables.source}: OK ({', '.join(f'{k} {len(v)} rows' for k, v in tables.frames.items())})")
    for note in tables.notes:
        print(f"note: {note}")


@app.command(
    help="time a DP federation against centralized DP-SGD, at 50, 200 and 1,000 campuses, a quick study, "
    "and deployed on this host"
)
def bench(
    data: _DataOption = None,
    rounds: Annotated[int, typer.Option(help="federation rounds")] = 10,
    shards: Annotated[str, typer.Option(help="comma-separated campus counts for the scaling runs ('' for none)")] = "50,200,1000",
    repeats: Annotated[int, typer.Option(help="alternating federated/centralized runs; medians are compared")] = 3,
    deployment: Annotated[
        str,
        typer.Option(
            help="comma-separated campus counts of deployed runs on this host (coordinator + that many module "
            "campuses, TLS and campus authentication; '' for none)"
        ),
    ] = "",
    study: Annotated[bool, typer.Option(help="also run the study experiments/configs/quick.toml end to end")] = True,
) -> None:
    from .bench import bench as run_bench

    deployed = _counts("--deployment", deployment)
    if any(not 1 <= n <= 7 for n in deployed):
        raise ConfigError(f"--deployment {deployment!r}: OULAD has 7 module campuses; expected counts from 1 to 7")
    run_bench(resolve_data_dir(data), rounds, _counts("--shards", shards), repeats, deployed, study)


def _counts(option: str, value: str) -> tuple[int, ...]:
    """``"3,7"`` -> (3, 7); raises ConfigError naming ``option`` otherwise."""
    try:
        return tuple(int(n) for n in value.split(",") if n)
    except ValueError:
        raise ConfigError(f"{option} {value!r}: expected comma-separated whole numbers, e.g. 3,7") from None


@app.command(
    "audit-privacy",
    help=(
        "membership-inference attack AUC per campus against a run's final model\n\n"
        "RUN_DIR: the results folder of `edufl simulate` (with summary.json and model.pt)."
    ),
)
def audit_privacy(
    run_dir: Annotated[Path, typer.Argument(metavar="RUN_DIR", show_default=False)],
    data: Annotated[
        Path | None, typer.Option(help="the tables the run used (default: the folder recorded in summary.json)")
    ] = None,
    seed: Annotated[int, typer.Option(help="seed for subsampling members to the number of non-members")] = 0,
) -> None:
    from .privacy_audit import audit, print_audit

    print_audit(audit(run_dir, data, seed))
