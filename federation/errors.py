"""The errors edufl reports to its user, each with the exit status its commands end with.

Every command catches :class:`EduflError` alone, prints its message (no
traceback) and exits with its :attr:`~EduflError.exit_code`: 1 when a run, a
coordinator or a campus could not go on (the base class's own code), 2 for a
user mistake (a bad option, file or value), 3 when campuses refused, 4 when
campuses failed. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

__all__ = ["CampusesFailed", "CampusesRefused", "EduflError", "UserError"]


class EduflError(Exception):
    """An error meant for the user; its message says what went wrong and what to do (exit status 1,
    unless a subclass says otherwise)."""

    exit_code = 1


class UserError(EduflError, ValueError):
    """A user mistake: an option, file or value that cannot be used (exit status 2)."""

    exit_code = 2


class CampusesRefused(EduflError):
    """One or more campuses refused the run, or blocked its replies (exit status 3)."""

    exit_code = 3


class CampusesFailed(EduflError):
    """One or more campuses failed a request, or did not reply (exit status 4)."""

    exit_code = 4
