"""The campus's SuperNode: Flower's ``flower-supernode``, with its polling waits shortened.

flwr 1.42's SuperNode loop (``flwr/supernode/start_client_internal.py``) sleeps
3 s after each pull from the SuperLink that brings no message, checks its own
state every 0.5 s for a reply to push, and, fetching a message's content from the
SuperLink, waits 1 s (then 2, 4, ...) before asking again for a part that is not
there yet. In a training round these waits lie on the round's path: a campus
that has just pushed its reply pulls at once, finds no next message yet (the
coordinator is still collecting the others) and then sleeps the full 3 s; the
next message's content is often still being uploaded when it is first asked for.
None of the waits can be set from outside.

``python -m edufl.clients.supernode ARGS`` runs Flower's own entry point with
ARGS, with two names of that one module replaced: ``time`` by
:class:`PollingClock`, whose ``sleep`` waits :data:`WAITS` instead of those
polling values (an idle pull every 0.2 s, a reply check every 0.05 s), and
``pull_objects`` by Flower's own function retrying after :data:`OBJECT_RETRY_S`
(doubling, at most 0.2 s). Nothing else of Flower changes.
Since this reaches into Flower's internals, it is pinned to the Flower release
it was read from (:data:`FLOWER`): with any other it refuses to start.
"""

from __future__ import annotations

import functools
import importlib.metadata
import sys
import time

__all__ = ["FLOWER", "OBJECT_RETRY_S", "WAITS", "PollingClock", "main"]

FLOWER = "1.42.0"
WAITS = {3: 0.2, 0.5: 0.05}
"""Seconds of each polling wait of Flower's SuperNode loop -> seconds waited instead."""
OBJECT_RETRY_S = 0.05
"""First wait before the SuperNode asks the SuperLink again for a part of a message it does not have yet."""


class PollingClock:
    """The ``time`` module, except that ``sleep`` waits :data:`WAITS` in place of the loop's polling waits."""

    def __getattr__(self, name: str):
        return getattr(time, name)

    @staticmethod
    def sleep(seconds: float) -> None:
        time.sleep(WAITS.get(seconds, seconds))


def main(argv: list[str] | None = None) -> int:
    """Run ``flower-supernode`` with ``argv`` (default: this process's arguments) and the shortened waits."""
    found = importlib.metadata.version("flwr")
    if found != FLOWER:
        print(f"edufl: the campus SuperNode is built for flwr {FLOWER}, and flwr {found} is installed", file=sys.stderr)
        return 2
    from flwr.supercore.inflatable.inflatable_utils import pull_objects
    from flwr.supernode import start_client_internal
    from flwr.supernode.cli import flower_supernode

    start_client_internal.time = PollingClock()  # type: ignore[attr-defined]
    start_client_internal.pull_objects = functools.partial(pull_objects, initial_backoff=OBJECT_RETRY_S, backoff_cap=0.2)
    sys.argv = ["flower-supernode", *(sys.argv[1:] if argv is None else argv)]
    flower_supernode()
    return 0


if __name__ == "__main__":
    sys.exit(main())
