"""The simulation's forked ClientApp workers (experiments/workers.py): they run the app they were forked
with, in other processes, report its errors as Flower's Ray actor does, and end with their driver."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import psutil
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp.client_app import ClientAppException

from edufl.experiments.workers import Workers


class EchoApp:
    """A stand-in ClientApp: replies with the process it ran in and the node's partition id."""

    def __call__(self, message: Message, context: Context) -> Message:
        if message.content["config"]["fail"]:
            raise ValueError("campus-side failure")
        reply = RecordDict({"ran": ConfigRecord({"pid": os.getpid(), "partition": context.node_config["partition-id"]})})
        return Message(reply, reply_to=message)


def _message(fail: bool = False) -> Message:
    return Message(RecordDict({"config": ConfigRecord({"fail": fail})}), dst_node_id=1, message_type="train")


def _context(partition: int) -> Context:
    return Context(run_id=1, node_id=1, node_config={"partition-id": partition}, state=RecordDict(), run_config={})


@pytest.fixture
def workers(task_identity):
    pool = Workers(2)
    pool.start(EchoApp())
    yield pool
    pool.close()


def test_workers_run_the_app_in_other_processes_and_return_its_reply_and_context(workers):
    pids = set()
    for partition in range(6):
        reply, context = workers.run(_message(), _context(partition))
        ran = reply.content["ran"]
        assert ran["partition"] == partition and context.node_config["partition-id"] == partition
        pids.add(ran["pid"])
    assert os.getpid() not in pids
    assert pids <= {p.pid for p in psutil.Process().children()}


def test_an_error_in_the_app_comes_back_as_flowers_client_app_exception(workers):
    with pytest.raises(ClientAppException, match="campus-side failure"):
        workers.run(_message(fail=True), _context(0))
    reply, _ = workers.run(_message(), _context(1))  # the worker goes on serving
    assert reply.content["ran"]["partition"] == 1


def test_close_ends_every_worker(workers):
    workers.run(_message(), _context(0))
    children = psutil.Process().children()
    workers.close()
    gone, alive = psutil.wait_procs(children, timeout=30)
    assert not alive


DRIVER = """
import sys
sys.path.insert(0, sys.argv[1])
from flwr.supercore.task_identity import TaskIdentity
from test_workers import EchoApp, _context, _message
from edufl.experiments.workers import Workers
TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
pool = Workers(2)
pool.start(EchoApp())
pids = {pool.run(_message(), _context(i))[0].content["ran"]["pid"] for i in range(4)}
print(" ".join(map(str, sorted(pids))), flush=True)
sys.stdin.read()  # until killed
"""


def test_workers_end_when_their_driver_is_killed_outright():
    driver = subprocess.Popen(
        [sys.executable, "-c", DRIVER, os.path.dirname(__file__)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        line = driver.stdout.readline()
        forked = [psutil.Process(int(pid)) for pid in line.split()]
        assert forked, "the driver reported no worker"
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=30)
        gone, alive = psutil.wait_procs(forked, timeout=30)
        assert not alive, f"workers outlived their driver: {[p.pid for p in alive]}"
    finally:
        driver.kill()
