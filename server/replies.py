"""What the coordinator waits for and keeps of the campuses' replies, in training rounds and statistic queries alike.

It collects replies every 0.1-0.3 s (:data:`POLL_WAITS`; in a simulation every 0.01-0.05 s, :class:`PollingGrid`,
around the grid Flower gives the ServerApp), waits, with a limit, for enough
campuses to be connected (:func:`await_connected_nodes`), and sorts the replies to what it asked
(:func:`collect`) into answers, with the size and digest of what each campus
sent, and failures: an error reply, with only the reason a campus's release
guard gave (:func:`error_reason`), or no reply at all.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from flwr.app import Message, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid

from edufl.federation.audit import payload_digest
from edufl.federation.wire import BLOCKED, CAMPUS, FAILED, REFUSED

__all__ = [
    "CAMPUS_CODES",
    "NO_REPLY",
    "IN_MEMORY_POLL_WAITS",
    "POLL_WAITS",
    "Answered",
    "CampusesMissing",
    "DelegatingGrid",
    "Failed",
    "PollingGrid",
    "await_connected_nodes",
    "collect",
    "error_reason",
    "in_campus_order",
]

NO_REPLY = "node {node}: no reply (disconnected, or past round-timeout)"
CAMPUS_CODES = (REFUSED, BLOCKED, FAILED)
"""Error codes set by a campus's release guard, whose reasons it builds without data (:mod:`clients.guard`)."""


POLL_WAITS = (0.1, 0.2, 0.3)
"""Seconds before the next pull of replies: after a pull that brought replies, after the 1st, and after
the 2nd and later pulls in a row that brought none; the first pull follows the push at once (Flower's
deployment grid waits 3 s, ``superlink/grid/http_grid.py``). Each pull is a request the SuperLink answers with database queries,
competing with the campuses' transfers: the wait grows while no reply comes."""

IN_MEMORY_POLL_WAITS = (0.01, 0.02, 0.05)
""":data:`POLL_WAITS` for Flower's in-memory grid (the simulation's: ServerApp and LinkState in one process),
where a pull is a lookup in memory: about 0.15 s less wait per round than :data:`POLL_WAITS` (measured)."""


class DelegatingGrid(Grid):
    """A Grid that passes every call to ``grid``, for wrappers that change one step (subclass and override it)."""

    def __init__(self, grid: Grid):
        self.grid = grid

    def set_run(self, run_id: int) -> None:
        self.grid.set_run(run_id)

    @property
    def run(self) -> Any:
        return self.grid.run

    def create_message(
        self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None
    ) -> Message:
        return self.grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def get_nodes(self) -> Any:
        return self.grid.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.grid.send_and_receive(messages, timeout=timeout)


def _in_memory(grid: Grid) -> bool:
    # Its module is loaded wherever such a grid exists; a deployed ServerApp does not import it (about 1 s).
    module = sys.modules.get("flwr.superlink.grid.inmemory_grid")
    return module is not None and isinstance(grid, module.InMemoryGrid)


class PollingGrid(DelegatingGrid):
    """``grid`` with :meth:`send_and_receive` built on its public ``push_messages``/``pull_messages``, pulling
    after the waits of :data:`POLL_WAITS` (a reply is collected within 0.3 s of its arrival at the SuperLink),
    or of :data:`IN_MEMORY_POLL_WAITS` when ``grid`` is Flower's ``InMemoryGrid``."""

    def __init__(self, grid: Grid) -> None:
        super().__init__(grid)
        self.waits = IN_MEMORY_POLL_WAITS if _in_memory(grid) else POLL_WAITS

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Push ``messages``; return the replies that arrived within ``timeout`` seconds (None: wait for all)."""
        waiting = set(self.grid.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        empty = 0  # pulls in a row that brought no reply
        while waiting:
            pulled = list(self.grid.pull_messages(waiting))
            replies += pulled
            waiting -= {m.metadata.reply_to_message_id for m in pulled}
            if not waiting or (deadline is not None and time.monotonic() >= deadline):
                break
            empty = 0 if pulled else empty + 1
            wait = self.waits[min(empty, len(self.waits) - 1)]
            time.sleep(wait if deadline is None else max(0.0, min(wait, deadline - time.monotonic())))
        return replies


class CampusesMissing(RuntimeError):
    """Fewer than ``min-campuses`` campuses were connected when a round had to start."""


def await_connected_nodes(grid: Grid, needed: int, timeout: float, server_round: int) -> None:
    """Return once ``needed`` SuperNodes are connected to ``grid``; poll once a second.

    Flower's strategies wait for their minimum number of nodes without a limit;
    a run must never wait forever.

    Raises
    ------
    CampusesMissing
        When fewer than ``needed`` are connected after ``timeout`` seconds; names the connected node ids.
    """
    deadline = time.monotonic() + timeout
    while len(connected := sorted(grid.get_node_ids())) < needed:
        if time.monotonic() >= deadline:
            raise CampusesMissing(
                f"round {server_round}: only {len(connected)} of the {needed} campuses needed (min-campuses) were "
                f"connected after {timeout:g} s (connected node ids: {', '.join(map(str, connected)) or 'none'})"
            )
        time.sleep(1.0)


def error_reason(reply: Message) -> str:
    """What the coordinator keeps of an error reply: the campus guard's reason for its own codes; for any other
    code (Flower's, e.g. a ClientApp that crashed outside the guard) only the code, since Flower's reason may
    carry an exception's text."""
    node, code = reply.metadata.src_node_id, reply.error.code
    if code in CAMPUS_CODES:
        return f"node {node}: {reply.error.reason}"
    name = next((k for k, v in vars(ErrorCode).items() if v == code and not k.startswith("_")), "UNKNOWN")
    return f"node {node}: Flower error {code} ({name}); its reason is not kept"


def in_campus_order(replies: Iterable[Message]) -> list[Message]:
    """``replies`` sorted by campus name, error replies first, then by node id.

    Replies arrive in completion order; aggregating in campus order makes the
    floating-point sums, and so a run, reproducible."""
    return sorted(replies, key=lambda r: ("" if r.has_error() else str(r.content[CAMPUS]["name"]), r.metadata.src_node_id))


@dataclass(frozen=True)
class Answered:
    """A campus's reply: its name, its content, and the size (bytes) and SHA-256 of its payload
    (:func:`federation.audit.payload_digest`, what the campus's audit log records as sent)."""

    campus: str
    content: RecordDict
    payload_bytes: int
    payload_sha256: str


@dataclass(frozen=True)
class Failed:
    """A node asked that replied with an error (``code``) or, ``code`` None, not at all; ``reason`` as kept."""

    node: int
    code: int | None
    reason: str

    @property
    def refused(self) -> bool:
        """Whether the campus declined by its own rules (refused or blocked), as opposed to a fault."""
        return self.code in (REFUSED, BLOCKED)


def collect(asked: Iterable[int], replies: Iterable[Message]) -> tuple[list[Answered], list[Failed]]:
    """Sort the ``replies`` to a message sent to the nodes ``asked``: the answers, in campus order, and the
    failures, error replies then silent nodes, each in node order.

    An error reply from a node not asked (the SuperLink's, for a message it could
    not deliver) is not a failure of its own: the node it was for counts as silent.
    """
    asked, replies = set(asked), in_campus_order(replies)
    answered = [
        Answered(str(r.content[CAMPUS]["name"]), r.content, *payload_digest(r.content)) for r in replies if not r.has_error()
    ]
    failed = [
        Failed(r.metadata.src_node_id, r.error.code, error_reason(r))
        for r in replies
        if r.has_error() and r.metadata.src_node_id in asked
    ]
    failed += [
        Failed(node, None, NO_REPLY.format(node=node)) for node in sorted(asked - {r.metadata.src_node_id for r in replies})
    ]
    return answered, failed
