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
ARGS, with three names of that one module replaced: ``time`` by
:class:`PollingClock`, whose ``sleep`` waits :data:`IDLE_WAITS` after a pull
that brought nothing (0.1 s after a message, then longer while the SuperNode
stays idle, at most 0.5 s) and :data:`WAITS` instead of the other polling
value (a reply check every 0.05 s); ``_pull_and_store_message`` by Flower's
own function that also tells the clock when a message arrived; and
``pull_objects`` by Flower's own function retrying after :data:`OBJECT_RETRY_S`
(doubling, at most 0.2 s). Nothing else of Flower changes.

Why idle pulls back off: every pull is an HTTPS request that the SuperLink
(one Python process) answers with several database queries. With 7 campuses on
2 cores the SuperLink used about 8 s of CPU per round, and its largest single
share of samples (py-spy) was the SuperNodes' pulls; the back-off did not
measurably shorten a round on this host, but it stops idle campuses from
loading the SuperLink as their number grows.

Since this reaches into Flower's internals, it is pinned to the Flower release
it was read from (:data:`FLOWER`): with any other it refuses to start.
"""

from __future__ import annotations

import functools
import importlib.metadata
import sys
import time
from collections.abc import Callable

__all__ = ["FLOWER", "IDLE_WAITS", "OBJECT_RETRY_S", "WAITS", "PollingClock", "main"]

FLOWER = "1.42.0"
IDLE_WAITS = (0.1, 0.2, 0.3, 0.5)
"""Seconds waited after the 1st, 2nd, 3rd, 4th and later pull in a row that brought no message (Flower: 3 s each)."""
WAITS = {0.5: 0.05}
"""Seconds of the loop's other polling wait (a check for the ClientApp's reply) -> seconds waited instead."""
OBJECT_RETRY_S = 0.05
"""First wait before the SuperNode asks the SuperLink again for a part of a message it does not have yet."""


class PollingClock:
    """The ``time`` module, except that ``sleep`` waits :data:`IDLE_WAITS` in place of the loop's 3 s idle wait
    (counting the empty pulls since :meth:`received`) and :data:`WAITS` in place of its other polling wait."""

    def __init__(self) -> None:
        self.empty_pulls = 0

    def __getattr__(self, name: str):
        return getattr(time, name)

    def received(self) -> None:
        """A pull brought a message: the next idle wait is the shortest again."""
        self.empty_pulls = 0

    def sleep(self, seconds: float) -> None:
        if seconds == 3:  # the loop's wait after a pull that brought no message
            wait = IDLE_WAITS[min(self.empty_pulls, len(IDLE_WAITS) - 1)]
            self.empty_pulls += 1
        else:
            wait = WAITS.get(seconds, seconds)
        time.sleep(wait)


def _telling(clock: PollingClock, pull_and_store: Callable[..., int | None]) -> Callable[..., int | None]:
    """Flower's ``_pull_and_store_message``, calling ``clock.received()`` when it stored a message (a run id)."""

    @functools.wraps(pull_and_store)
    def pull(*args, **kwargs) -> int | None:
        run_id = pull_and_store(*args, **kwargs)
        if run_id is not None:
            clock.received()
        return run_id

    return pull


def main(argv: list[str] | None = None) -> int:
    """Run ``flower-supernode`` with ``argv`` (default: this process's arguments) and the shortened waits."""
    found = importlib.metadata.version("flwr")
    if found != FLOWER:
        print(f"edufl: the campus SuperNode is built for flwr {FLOWER}, and flwr {found} is installed", file=sys.stderr)
        return 2
    from flwr.supercore.inflatable.inflatable_utils import pull_objects
    from flwr.supernode import start_client_internal
    from flwr.supernode.cli import flower_supernode

    clock = PollingClock()
    start_client_internal.time = clock  # type: ignore[attr-defined]
    start_client_internal._pull_and_store_message = _telling(clock, start_client_internal._pull_and_store_message)
    start_client_internal.pull_objects = functools.partial(pull_objects, initial_backoff=OBJECT_RETRY_S, backoff_cap=0.2)
    sys.argv = ["flower-supernode", *(sys.argv[1:] if argv is None else argv)]
    flower_supernode()
    return 0


if __name__ == "__main__":
    sys.exit(main())
