"""The ``edufl`` command line: picks the side whose commands the first argument names, and runs them.

Each side declares its commands in its own typer app (:data:`SIDES`): a campus
machine running ``edufl campus ...`` loads the campus's commands alone, never
the research code, the simulation engine or torch. ``edufl --help`` (or no
command, or an unknown one) loads every side, to list every command.

Exit status: 0 on success; an :class:`~edufl.federation.errors.EduflError`'s
``exit_code`` (its message printed, no traceback): 1 when a run, the coordinator
or a campus could not go on, 2 for a user mistake (bad data, option or policy
file; also a command line that does not parse), 3 when campuses refused a run,
4 when campuses failed (an error on the campus, or no reply).
"""

from __future__ import annotations

import atexit
import importlib
import os
import sys
from typing import NoReturn

import click
from typer.core import TyperGroup
from typer.main import get_command

from edufl.federation.deploy import FLWR_ENV
from edufl.federation.errors import EduflError

__all__ = ["SIDES", "main", "run"]

SIDES = {
    "simulate": "edufl.experiments.commands",
    "campus": "edufl.clients.cli",
    "coordinator": "edufl.server.cli",
    "certs": "edufl.server.cli",
    "analytics": "edufl.experiments.commands",
    "data": "edufl.experiments.commands",
    "bench": "edufl.experiments.commands",
    "experiment": "edufl.experiments.commands",
    "audit-privacy": "edufl.experiments.commands",
}
"""Each ``edufl`` command (in the order ``edufl --help`` lists them) -> the module whose typer ``app`` defines it."""


def _command_line(argv: list[str]) -> click.Group:
    """The ``edufl`` group holding the command ``argv`` names, or every command when it names none."""
    names = [argv[0]] if argv and argv[0] in SIDES else list(SIDES)
    sides = {module: get_command(importlib.import_module(module).app) for module in dict.fromkeys(SIDES[n] for n in names)}
    return TyperGroup(
        name="edufl",
        help="Federated, differentially private learning analytics",
        no_args_is_help=True,
        commands={name: sides[SIDES[name]].commands[name] for name in names},
    )


def main(argv: list[str] | None = None) -> int:
    """Run the ``edufl`` command line ``argv`` (default: this process's arguments) and return its exit status.

    A usage error prints click's usage message and returns 2; an
    :class:`~edufl.federation.errors.EduflError` prints ``edufl: <message>`` on
    stderr and returns its ``exit_code``; any other exception propagates.
    """
    for name, value in FLWR_ENV.items():  # a campus tool must not phone home (the user may turn these on)
        os.environ.setdefault(name, value)
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        status = _command_line(argv).main(args=argv, prog_name="edufl", standalone_mode=False)
    except click.ClickException as err:
        err.show()
        return err.exit_code
    except EduflError as err:
        print(f"edufl: {err}", file=sys.stderr)
        return err.exit_code
    return status if isinstance(status, int) else 0


def run() -> NoReturn:
    """The ``edufl`` program: :func:`main`, then exit at once with its status, after the exit handlers.

    The interpreter's own teardown is skipped: with a simulation's tables and torch loaded, freeing every
    object one by one took about 1.5 s after the work was done. Everything edufl writes is closed by then
    (its files in ``with`` blocks, its databases committed), and the standard streams are flushed here.
    """
    status = main()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


if __name__ == "__main__":
    run()
