"""The campus SuperNode (clients/supernode.py): Flower's own, with its two polling waits shortened, pinned to flwr 1.42.0."""

from __future__ import annotations

import importlib.metadata
import inspect
import re
import time

from flwr.supernode import start_client_internal

from edufl.clients import supernode
from edufl.clients.campus import supernode_command


def test_the_clock_shortens_exactly_the_loops_polling_waits(monkeypatch):
    waited = []
    monkeypatch.setattr(time, "sleep", waited.append)
    clock = supernode.PollingClock()
    for seconds in (3, 0.5, 1.7, 3, 3, 3, 3):
        clock.sleep(seconds)
    assert waited == [0.1, 0.05, 1.7, 0.2, 0.3, 0.5, 0.5] and clock.monotonic is time.monotonic
    clock.received()  # a message came: the idle wait starts short again
    clock.sleep(3)
    assert waited[-1] == 0.1


def test_the_clock_hears_of_each_message_the_loop_stores(monkeypatch):
    clock, runs = supernode.PollingClock(), iter([None, 7])
    pull = supernode._telling(clock, lambda **kwargs: next(runs))
    clock.empty_pulls = 3
    assert pull(state=None) is None and clock.empty_pulls == 3  # no message: the wait keeps growing
    assert pull(state=None) == 7 and clock.empty_pulls == 0


def test_the_waits_replaced_are_the_ones_the_pinned_flower_release_sleeps():
    # Read from the installed Flower: the module's only uses of `time` are these sleeps.
    source = inspect.getsource(start_client_internal)
    assert importlib.metadata.version("flwr") == supernode.FLOWER
    assert sorted(float(s) for s in re.findall(r"time\.sleep\(([\d.]+)\)", source)) == [0.5, 0.5, 3.0]
    assert set(re.findall(r"\btime\.(\w+)", source)) == {"sleep"}
    assert {float(k) for k in supernode.WAITS} | {3.0} == {0.5, 3.0}  # 3 s: the idle wait, IDLE_WAITS
    assert callable(start_client_internal._pull_and_store_message)  # the function the clock is told through
    # the loop fetches a message's content with Flower's pull_objects, imported by name, at its default waits
    assert start_client_internal.pull_objects.__module__ == "flwr.supercore.inflatable.inflatable_utils"
    assert "initial_backoff" not in source


def test_another_flower_release_is_refused(monkeypatch, capsys):
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "1.43.0")
    assert supernode.main(["--help"]) == 2
    assert "built for flwr 1.42.0, and flwr 1.43.0 is installed" in capsys.readouterr().err


def test_a_campus_runs_the_installed_edufls_supernode(tmp_path):
    command = supernode_command("AAA", tmp_path, tmp_path, None, "127.0.0.1:9200", None, None, 9301, tmp_path / "secret")
    assert command[1:4] == ["-I", "-m", "edufl.clients.supernode"]  # -I: never a folder named edufl in the working folder
