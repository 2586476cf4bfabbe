"""The simulation's loop handing messages to the actors asks the LinkState only for nodes that wait for one."""

from __future__ import annotations

import queue
import threading
from types import SimpleNamespace

from edufl.experiments.simulate import _add_messages_to_queue


class LinkState:
    """The three members of Flower's InMemoryLinkState the loop uses; each ask is recorded, and delivers as Flower's
    does (marks the message delivered). The loop's stop event is set once ``stop_after`` asks were made."""

    def __init__(self, destinations: dict[str, int], stop: threading.Event, stop_after: int):
        self.lock = threading.RLock()
        self.message_ins_store = {
            mid: SimpleNamespace(id=mid, metadata=SimpleNamespace(dst_node_id=node, delivered_at=""))
            for mid, node in destinations.items()
        }
        self.asked: list[int] = []
        self.stop, self.stop_after = stop, stop_after

    def get_message_ins(self, node_id: int, limit: int) -> list:
        self.asked.append(node_id)
        found = [m for m in self.message_ins_store.values() if m.metadata.dst_node_id == node_id and not m.metadata.delivered_at]
        for m in found[:limit]:
            m.metadata.delivered_at = "now"
        if len(self.asked) == self.stop_after:
            self.stop.set()
        return found[:limit]


def test_only_nodes_with_an_undelivered_message_are_asked_in_flowers_node_order():
    stop = threading.Event()
    state = LinkState({"m1": 30, "m2": 10, "m3": 30}, stop, stop_after=3)  # node 30 has two messages
    state.message_ins_store["m0"] = SimpleNamespace(id="m0", metadata=SimpleNamespace(dst_node_id=20, delivered_at="earlier"))
    handed: queue.Queue = queue.Queue()
    loop = threading.Thread(target=_add_messages_to_queue, args=(state, handed, {10: 0, 20: 1, 30: 2, 40: 3}, stop))
    loop.start()
    loop.join(timeout=30)
    assert not loop.is_alive()
    # Tick 1 asks nodes 10 and 30 (20's message was delivered, 40 has none); tick 2 asks 30 for its second message.
    assert state.asked == [10, 30, 30]
    assert [handed.get_nowait().id for _ in range(3)] == ["m2", "m1", "m3"] and handed.empty()
