"""What the campus and coordinator dashboards share: a read-only Starlette app, Jinja2 pages, local serving.

A dashboard is a Starlette application whose pages are Jinja2 templates
(autoescaped) extending ``federation/templates/base.html``; every script and
style a page loads ships in ``federation/static`` (Chart.js 4.6.1, MIT licence in
``chart.js-LICENSE.md`` beside it), so a page needs no network. It is served by
uvicorn on 127.0.0.1 unless the user asks for another address and says so
(``--allow-remote``), which prints a warning: the pages show a campus's privacy
records or a run's results to whoever can reach the port.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from .errors import UserError

if TYPE_CHECKING:
    from starlette.applications import Starlette
    from starlette.routing import BaseRoute
    from starlette.templating import Jinja2Templates

__all__ = ["AllowRemoteOption", "BindError", "HostOption", "listen", "serve", "templates", "web_app"]

_HERE = Path(__file__).resolve().parent
STATIC = _HERE / "static"

HostOption = Annotated[
    str, typer.Option(help="address to listen on; anything but 127.0.0.1, localhost or ::1 needs --allow-remote")
]
AllowRemoteOption = Annotated[
    bool, typer.Option("--allow-remote", help="let --host be an address other hosts can reach (prints a warning)")
]


class BindError(UserError):
    """A dashboard address that cannot or may not be used (exit status 2)."""


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def listen(host: str, port: int, allow_remote: bool) -> tuple[socket.socket, str | None]:
    """A socket listening on ``host``:``port`` for a dashboard, and the warning to print for a
    non-loopback ``host`` (None on loopback).

    Raises
    ------
    BindError
        Naming ``--host`` when it is not a loopback address and ``allow_remote`` is False,
        and ``--port`` when the port is out of range or cannot be listened on.
    """
    remote = not _loopback(host)
    if remote and not allow_remote:
        raise BindError(f"--host {host}: not a loopback address; a dashboard listens on 127.0.0.1 unless you add --allow-remote")
    if not 1 <= port <= 65535:
        raise BindError(f"--port {port}: expected a port number from 1 to 65535")
    try:
        sock = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
    except OSError as err:
        raise BindError(f"--port {port}: cannot listen on {host}:{port} ({err.strerror}); choose another --port") from None
    warning = (
        f"WARNING: --host {host} --allow-remote: anyone who can reach {host}:{port} sees this dashboard "
        "(no login, no TLS); use 127.0.0.1 unless the network is trusted"
    )
    return sock, warning if remote else None


def templates(folder: Path) -> Jinja2Templates:
    """The Jinja2 templates of ``folder``, autoescaped, which may extend ``base.html``."""
    import jinja2
    from starlette.templating import Jinja2Templates

    loader = jinja2.ChoiceLoader([jinja2.FileSystemLoader(folder), jinja2.FileSystemLoader(_HERE / "templates")])
    return Jinja2Templates(env=jinja2.Environment(loader=loader, autoescape=True, undefined=jinja2.StrictUndefined))


def web_app(routes: Sequence[BaseRoute]) -> Starlette:
    """A Starlette application of ``routes`` (GET only) with ``/static`` serving ``federation/static``."""
    from starlette.applications import Starlette
    from starlette.routing import Mount
    from starlette.staticfiles import StaticFiles

    return Starlette(routes=[*routes, Mount("/static", StaticFiles(directory=STATIC), name="static")])


def serve(app: Starlette, what: str, host: str, port: int, allow_remote: bool) -> None:
    """Serve ``app`` on ``host``:``port`` until interrupted; prints ``what`` and the address once it listens.

    Raises
    ------
    BindError
        As :func:`listen` does.
    """
    import uvicorn

    sock, warning = listen(host, port, allow_remote)
    if warning:
        print(warning, flush=True)
    shown = f"[{host}]" if ":" in host else host
    print(f"{what}: serving at http://{shown}:{port}/ (read-only; Ctrl-C stops it)", flush=True)
    uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])
