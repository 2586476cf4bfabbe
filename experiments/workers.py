"""The simulation's ClientApp workers on one machine: processes forked from the driver, not Ray's.

Flower 1.42's simulation engine hands each message to a *backend*, and its only one is Ray's. On one
machine Ray costs more than the training it serves: it starts its service processes (about 3 s), its
workers start as fresh interpreters that import torch, Opacus and Flower again (about 3.5 s of CPU each,
on the same cores as the driver's own imports), and it takes about 1.4 s to stop. Here the workers are
forked from the driver once it has imported the ClientApp, before it reads the tables: they start in
milliseconds with every module loaded, and share the driver's memory pages until they write to them.

A worker serves any campus, as a Ray actor does: it reads the campus's examples and state from the
campus folders and the results folder (:mod:`clients.node`), never from the driver's memory. Messages
and contexts travel to and from it pickled, as they do to Ray's actors. The pool is forked from the main
thread before the ServerApp's thread starts (:meth:`Workers.start`), so no lock another thread holds is
copied into a worker. A worker ends when its driver does, even when the driver is killed outright: it
watches a pipe whose writing end only the driver holds. Ray stays the engine of a Ray cluster
(``--ray-address``); see :mod:`experiments.simulate`.
"""

from __future__ import annotations

import os
import signal
import threading
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from typing import Any

__all__ = ["Workers", "local_backend", "usable_cores"]

_APP: Any = None  # the ClientApp, set in the driver before the workers fork (each inherits it)


def usable_cores() -> int:
    """How many cores this process may run on (its CPU affinity where the system reports one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class Workers:
    """``count`` worker processes forked from this one (by :meth:`start`), each running a ClientApp on the
    messages it gets; ``count`` is how many messages are handled at once (default: :func:`usable_cores`)."""

    def __init__(self, count: int | None = None) -> None:
        self.count = count or usable_cores()
        self._executor: ProcessPoolExecutor | None = None
        self._watch_write: int | None = None

    def start(self, app: Any) -> None:
        """Fork the workers now, from the calling thread, to run the ClientApp ``app`` (``flwr.clientapp.ClientApp``);
        nothing when they run already. Call it while no other thread of this process runs anything: a lock
        held elsewhere at the fork would stay held in every worker."""
        global _APP
        if self._executor is not None:
            return
        import torch._dynamo  # noqa: F401  # what torch loads as a first optimizer is made (about 1 s of CPU): once, here

        _APP = app
        read, self._watch_write = os.pipe()
        self._executor = ProcessPoolExecutor(
            self.count, mp_context=get_context("fork"), initializer=_start_worker, initargs=(read, self._watch_write)
        )
        # With fork, the pool forks all its workers as its first task is submitted (CPython 3.11's
        # ProcessPoolExecutor): submit one here, so that they fork now, from this thread. Not waited for:
        # the workers get ready while this process goes on.
        self._executor.submit(os.getpid)
        os.close(read)

    def run(self, message: Any, context: Any) -> tuple[Any, Any]:
        """Run the ClientApp on ``message`` with the campus's ``context`` in a free worker; its reply and context.

        Raises
        ------
        flwr.clientapp.client_app.ClientAppException
            When the ClientApp raised (Flower turns it into an error reply, as for a Ray actor).
        concurrent.futures.process.BrokenProcessPool
            When a worker died while running it.
        """
        if self._executor is None:
            raise RuntimeError("the workers have not been started")
        return self._executor.submit(_handle, message, context).result()

    def close(self) -> None:
        """Stop the workers (a message being handled is abandoned)."""
        if self._executor is None:
            return
        # The pool's processes (a private attribute of CPython 3.11's ProcessPoolExecutor, which has no public
        # way to stop a worker in the middle of a task before 3.14's terminate_workers).
        for process in list(getattr(self._executor, "_processes", {}).values()):
            process.terminate()
        self._executor.shutdown(wait=True, cancel_futures=True)
        if self._watch_write is not None:
            os.close(self._watch_write)
        self._executor = self._watch_write = None


def _start_worker(read: int, write: int) -> None:
    """In each new worker: the driver's signal handlers off (Ctrl-C and SIGTERM are the driver's to handle),
    one torch thread (the workers share the cores), and an end as soon as the driver's end of the pipe closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    import torch

    torch.set_num_threads(1)
    os.close(write)

    def watch() -> None:
        os.read(read, 1)  # returns when every writing end is closed: the driver has ended
        os._exit(0)

    threading.Thread(target=watch, name="driver-watch", daemon=True).start()


def _handle(message: Any, context: Any) -> tuple[Any, Any]:
    from flwr.clientapp.client_app import ClientAppException

    try:
        return _APP(message=message, context=context), context
    except Exception as err:  # as Flower's Ray actor reports it (flwr/simulation/ray_transport/ray_actor.py)
        raise ClientAppException(str(err)) from err


def local_backend(workers: Workers) -> type:
    """A Flower simulation ``Backend`` class whose instances hand every message to ``workers``; Flower's
    engine makes one per run and builds and ends it, while ``workers`` stay up for the engine's life."""
    from flwr.server.superlink.fleet.vce.backend import Backend

    class LocalBackend(Backend):
        def build(self, app_fn: Any) -> None:
            pass  # the workers run already (started by experiments.simulate.Engine.start), with the ClientApp app_fn returns

        @property
        def num_workers(self) -> int:
            return workers.count

        def is_worker_idle(self) -> bool:
            return True

        def process_message(self, message: Any, context: Any) -> tuple[Any, Any]:
            return workers.run(message, context)

        def terminate(self) -> None:
            pass

    return LocalBackend
