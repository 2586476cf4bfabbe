"""A campus's commands: ``edufl campus start|validate|approve|budget|audit|dashboard|export-oulad`` (:data:`app`).

They parse options and call :mod:`edufl.clients.campus`; errors reach the
user through ``edufl``'s ``main`` (:mod:`edufl.experiments.cli`). Nothing here
loads the research code, the simulation engine or torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import click
import typer

from edufl.federation.deploy import InsecureOption, PkiOption, RootCertOption
from edufl.federation.runconfig import CAMPUS_BY, RunConfig
from edufl.federation.tables import DATA_ENV
from edufl.federation.web import AllowRemoteOption, HostOption

from . import campus as campus_side

__all__ = ["app"]

_DEFAULTS = RunConfig()
_MAPPING_HELP = "mapping file (TOML) of the export to the learner-record contract (default: OULAD layout)"
_SCHEMA_HELP = "the federation's schema file (TOML) the data must fit: vocabularies, outcomes, attributes (default: OULAD's)"

app = typer.Typer(add_completion=False)
"""Every campus-side command of ``edufl``."""
_campus = typer.Typer(
    help="a campus: check or export its data, start its SuperNode, show its budget and audit log", no_args_is_help=True
)
app.add_typer(_campus, name="campus")


@_campus.command(help="start this campus's SuperNode in the foreground (its ClientApp reads only --data)")
def start(
    data: Annotated[Path, typer.Option(help="the campus's own export (OULAD layout, or any layout with --mapping)")],
    superlink: Annotated[str, typer.Option(help="the coordinator's HOST:PORT")],
    mapping: Annotated[Path | None, typer.Option(help=_MAPPING_HELP)] = None,
    campus: Annotated[
        str | None, typer.Option(help="campus name (default: the --data folder's name); picks campus-NAME.key in --pki")
    ] = None,
    state: Annotated[
        Path | None, typer.Option(help="folder for this campus's privacy ledger and audit log (default: edufl-state/CAMPUS)")
    ] = None,
    policy: Annotated[Path | None, typer.Option(help="campus policy file (TOML); default: the safe defaults")] = None,
    pki: PkiOption = None,
    root_cert: RootCertOption = None,
    key: Annotated[Path | None, typer.Option(help="campus private key (OpenSSH format), registered on the coordinator")] = None,
    insecure: InsecureOption = False,
    rejoin_wait: Annotated[
        float,
        typer.Option(
            help="seconds to keep retrying when the coordinator refuses this campus "
            "(after an unclean stop it holds the campus online for up to a "
            "minute)"
        ),
    ] = campus_side.REJOIN_WAIT_S,
    schema: Annotated[Path | None, typer.Option(help=_SCHEMA_HELP)] = None,
) -> None:
    campus_side.start(
        data=data,
        superlink=superlink,
        campus=campus,
        insecure=insecure,
        state=state,
        policy=policy,
        pki=pki,
        root_cert=root_cert,
        key=key,
        rejoin_wait=rejoin_wait,
        mapping=mapping,
        schema=schema,
    )


@_campus.command("export-oulad", help="write one campus's slice of OULAD, as that campus's own export")
def export_oulad(
    campus: Annotated[str, typer.Option(help="campus name, e.g. AAA (a module code with --campus-by module)")],
    out: Annotated[Path, typer.Option(help="new folder for the campus's tables")],
    campus_by: Annotated[
        str, typer.Option(click_type=click.Choice(CAMPUS_BY), help="how OULAD is split into campuses")
    ] = _DEFAULTS.campus_by,
    shards: Annotated[int, typer.Option(help="number of campuses with --campus-by shard")] = _DEFAULTS.shards,
    data: Annotated[Path, typer.Option(envvar=DATA_ENV, help="folder with the full OULAD tables")] = ...,
) -> None:
    campus_side.export_oulad(campus, out, data, campus_by, shards)


@_campus.command(help="check a campus folder before it joins and report every problem")
def validate(
    data: Annotated[Path, typer.Option(help="the campus's folder")],
    mapping: Annotated[Path | None, typer.Option(help=_MAPPING_HELP)] = None,
    schema: Annotated[Path | None, typer.Option(help=_SCHEMA_HELP)] = None,
) -> None:
    campus_side.validate(data, mapping, schema)


@_campus.command(
    help=(
        "the SHA-256 of an app bundle the data steward reviewed; with --policy, approve it there\n\n"
        "FAB_OR_APP_DIR: a .fab file (`flwr build`), or an app folder, built as `flwr run` builds it "
        "(default: the bundle this installed edufl submits)."
    )
)
def approve(
    bundle: Annotated[Path | None, typer.Argument(metavar="FAB_OR_APP_DIR", show_default=False)] = None,
    policy: Annotated[
        Path | None,
        typer.Option(help="the campus policy file to add the hash to (created if missing; the rest is kept as written)"),
    ] = None,
) -> None:
    campus_side.approve(bundle, policy)


@_campus.command(help="ε spent per dataset over all runs, from the campus's privacy ledger")
def budget(
    state: Annotated[Path, typer.Option(help="the campus's state folder")],
    policy: Annotated[
        Path | None,
        typer.Option(help="the campus's policy file: its δ, and the total budget left (default: the safe defaults' δ)"),
    ] = None,
) -> None:
    campus_side.budget(state, policy)


@_campus.command(help="what the campus sent, blocked or refused, from its audit log")
def audit(
    state: Annotated[Path, typer.Option(help="the campus's state folder")],
    run: Annotated[str | None, typer.Option(help="only this run (its run name, or Flower's run id)")] = None,
    fmt: Annotated[
        str, typer.Option("--format", click_type=click.Choice(("table", "json")), help="a table, or one JSON object per line")
    ] = "table",
) -> None:
    campus_side.audit(state, run, fmt)


@_campus.command(help="a local, read-only web page of the campus's privacy budget, outgoing messages and policy")
def dashboard(
    state: Annotated[Path, typer.Option(help="the campus's state folder")],
    policy: Annotated[
        Path | None, typer.Option(help="the campus's policy file: its δ, total budget and approved app bundles")
    ] = None,
    port: Annotated[int, typer.Option(help="port to listen on")] = 8765,
    host: HostOption = "127.0.0.1",
    allow_remote: AllowRemoteOption = False,
) -> None:
    from .dashboard import dashboard as serve  # Starlette and uvicorn: loaded by this command alone

    serve(state, policy, host, port, allow_remote)
