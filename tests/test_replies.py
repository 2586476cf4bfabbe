"""How the coordinator collects replies (server/replies.py): PollingGrid's pulls over the Grid's public API."""

from __future__ import annotations

from types import SimpleNamespace

from flwr.superlink.grid.inmemory_grid import InMemoryGrid

from edufl.server import replies
from edufl.server.replies import IN_MEMORY_POLL_WAITS, POLL_WAITS, PollingGrid


class ScriptedGrid:
    """A grid whose pulls return, in turn, the replies (to message ids) of ``script``; records what was pulled."""

    def __init__(self, script: list[list[str]]):
        self.script, self.asked = iter(script), []

    def push_messages(self, messages):
        return [m for m in messages]

    def pull_messages(self, message_ids):
        self.asked.append(sorted(message_ids))
        return [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=i)) for i in next(self.script)]


def test_the_grid_pulls_sooner_after_a_reply_and_backs_off_while_none_comes(monkeypatch):
    waited: list[float] = []
    monkeypatch.setattr(replies.time, "sleep", waited.append)
    grid = ScriptedGrid([[], [], [], [], ["a"], [], ["b", "c"]])
    got = PollingGrid(grid).send_and_receive(["a", "b", "c"])
    assert sorted(r.metadata.reply_to_message_id for r in got) == ["a", "b", "c"]
    assert waited == [0.2, 0.3, 0.3, 0.3, 0.1, 0.2] and POLL_WAITS == (0.1, 0.2, 0.3)
    assert grid.asked[-1] == ["b", "c"]  # a reply is never asked for again once it came


class ScriptedInMemoryGrid(ScriptedGrid, InMemoryGrid):
    """A ScriptedGrid that is a Flower InMemoryGrid (the simulation's) by type."""


def test_the_simulations_in_memory_grid_is_pulled_at_shorter_waits(monkeypatch):
    waited: list[float] = []
    monkeypatch.setattr(replies.time, "sleep", waited.append)
    got = PollingGrid(ScriptedInMemoryGrid([[], [], [], [], ["a"], [], ["b"]])).send_and_receive(["a", "b"])
    assert sorted(r.metadata.reply_to_message_id for r in got) == ["a", "b"]
    assert waited == [0.02, 0.05, 0.05, 0.05, 0.01, 0.02] and IN_MEMORY_POLL_WAITS == (0.01, 0.02, 0.05)


def test_the_grid_stops_waiting_at_the_timeout(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(replies.time, "monotonic", lambda: now[0])
    monkeypatch.setattr(replies.time, "sleep", lambda s: now.__setitem__(0, now[0] + s))
    got = PollingGrid(ScriptedGrid([[]] * 100)).send_and_receive(["a"], timeout=1.0)
    assert got == [] and 101.0 <= now[0] <= 101.3  # the last wait is cut to the deadline
