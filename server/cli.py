"""The coordinator's commands: ``edufl coordinator start|run|dashboard`` and ``edufl certs`` (:data:`app`).

They parse options and call :mod:`edufl.server.coordinator` and
:mod:`edufl.server.pki`; errors reach the user through ``edufl``'s ``main``
(:mod:`edufl.experiments.cli`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from edufl.federation.deploy import InsecureOption, PkiOption, RootCertOption
from edufl.federation.runconfig import ConfigError, RunConfig
from edufl.federation.web import AllowRemoteOption, HostOption

from . import coordinator
from .pki import make_pki
from .run_options import run_config, run_settings

__all__ = ["app"]

_DEFAULTS = RunConfig()

app = typer.Typer(add_completion=False)
"""Every coordinator-side command of ``edufl``."""
_coordinator = typer.Typer(help="the coordinator: a Flower SuperLink, and federation runs on it", no_args_is_help=True)
app.add_typer(_coordinator, name="coordinator")


@app.command(help="make a private CA, a SuperLink certificate and campus key pairs (demos and tests)")
def certs(
    out: Annotated[Path, typer.Option(help="folder for the files (existing files are kept)")],
    campuses: Annotated[str, typer.Option(help="comma-separated campus names, e.g. AAA,BBB,CCC")],
    host: Annotated[
        list[str] | None,
        typer.Option(
            help="a DNS name or IP address campuses use to reach the coordinator "
            "(repeatable); localhost, 127.0.0.1 and ::1 are always included"
        ),
    ] = None,
) -> None:
    for path in make_pki(out, [c.strip() for c in campuses.split(",") if c.strip()], host or []):
        print(f"wrote {path}")
    print(f"{out}: give each campus ca.crt and its own campus-NAME.key; superlink.key and ca.key stay with the coordinator")


@_coordinator.command(help="start the SuperLink (TLS, campus authentication) and its SuperExec in the foreground")
def start(
    port: Annotated[int, typer.Option(help="the one port for campuses, `flwr` and the ServerApp")] = 9200,
    host: Annotated[str, typer.Option(help="address to listen on (0.0.0.0 for campuses on other hosts)")] = "127.0.0.1",
    state: Annotated[
        Path | None,
        typer.Option(
            help="the coordinator's state folder: the SuperLink's database (registered campuses, runs) and "
            "the SuperExec secret [default: edufl-state/coordinator]"
        ),
    ] = None,
    pki: PkiOption = None,
    root_cert: RootCertOption = None,
    cert: Annotated[Path | None, typer.Option(help="SuperLink TLS certificate (PEM)")] = None,
    key: Annotated[Path | None, typer.Option(help="SuperLink TLS private key (PEM)")] = None,
    insecure: InsecureOption = False,
) -> None:
    coordinator.start(port=port, host=host, state=state, pki=pki, root_cert=root_cert, cert=cert, key=key, insecure=insecure)


@_coordinator.command(help="run a federation on a started coordinator and write its results folder")
@run_settings
def run(
    superlink: Annotated[str, typer.Option(help="the coordinator's HOST:PORT")],
    pki: PkiOption = None,
    root_cert: RootCertOption = None,
    insecure: InsecureOption = False,
    min_campuses: Annotated[int, typer.Option(help="campuses needed for each round")] = _DEFAULTS.min_campuses,
    round_timeout: Annotated[
        float, typer.Option(help="seconds a round waits for replies, and for --min-campuses to be connected")
    ] = _DEFAULTS.round_timeout,
    wait: Annotated[float, typer.Option(help="seconds to wait for --min-campuses to be online before starting")] = 60.0,
    resume: Annotated[
        Path | None,
        typer.Option(
            metavar="RUN_DIR",
            help="continue the run of this results folder after its "
            "last finished round, with its own settings and run name (give no run "
            "options)",
        ),
    ] = None,
    *,
    settings: dict[str, Any],
) -> None:
    cfg = run_config(settings, min_campuses=min_campuses, round_timeout=round_timeout)
    if resume and cfg != _DEFAULTS:
        raise ConfigError(
            f"--resume {resume} continues that run with the settings in its checkpoint: "
            "drop the run options (--rounds, --out, --min-campuses, ...)"
        )
    coordinator.raise_for_failures(
        coordinator.run(cfg, superlink=superlink, pki=pki, root_cert=root_cert, insecure=insecure, wait=wait, resume=resume)
    )


@_coordinator.command(help="a local, read-only web page of training runs, from their results folders as they are written")
def dashboard(
    run_dirs: Annotated[list[Path], typer.Argument(metavar="RUN_DIR...", help="results folders of training runs")],
    port: Annotated[int, typer.Option(help="port to listen on")] = 8766,
    host: HostOption = "127.0.0.1",
    allow_remote: AllowRemoteOption = False,
    refresh: Annotated[float, typer.Option(help="seconds between reloads of a page showing an unfinished run")] = 5.0,
) -> None:
    from .dashboard import dashboard as serve  # Starlette and uvicorn: loaded by this command alone

    serve(run_dirs, host, port, allow_remote, refresh)
