"""A store's own threads for its blocking calls, each outcome handed back to the caller's event loop in one hop.

``loop.run_in_executor`` on a ``ThreadPoolExecutor`` wraps each call in a ``concurrent.futures.Future`` (a condition
variable of its own), passes the executor's idle semaphore, and chains an asyncio future to it. Here a call is one
item on a queue, and its outcome one ``call_soon_threadsafe``. Measured on a 2-core machine with a local Redis
(``hatch run bench:store``, one ``EVALSHA`` per call): about 280 µs of CPU per call instead of 330; the same call on
the event loop's own thread, blocking it, costs about 150, and through redis-py's asyncio client about 240.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import weakref
from collections.abc import Callable
from typing import Any, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")

# An item of the queue: the call, and where its outcome goes. None stops the worker that takes it.
_Item = tuple[Callable[[], Any], asyncio.AbstractEventLoop, "asyncio.Future[tuple[Any, Exception | None]]"]


class Workers:
    """``max_workers`` threads running blocking calls for coroutines of any event loop, in the order they came.

    Thread-safety: ``run`` may be called from any thread and event loop at once. Cancellation: cancelling a caller
    stops it waiting; its call, once queued, still runs to its end (a store write whose outcome nobody reads). The
    threads start with the first call. ``close`` lets every call already queued finish, then stops the threads; if a
    store is never closed, its threads are stopped the same way when it is collected or the interpreter exits.
    """

    def __init__(self, max_workers: int, name: str, closed: Callable[[], Exception]) -> None:
        """Threads named ``name_<n>``; ``closed()`` is what a call after ``close`` raises."""
        self._max_workers = max_workers
        self._name = name
        self._closed_error = closed
        self._queue: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._closed = False
        # Not a method of self: the threads must not keep the object alive, or it would never be collected.
        self._finalizer = weakref.finalize(self, _stop, self._queue, self._threads)

    async def run(self, call: Callable[[], T]) -> tuple[T | None, Exception | None]:
        """Run ``call()`` on a worker; its result and None, or None and the ``Exception`` it raised.

        The error comes back as a value rather than raised across the await: a frame resumed by ``throw()`` emits no
        trace ``call`` event on Python 3.11, so coverage would lose every line after the await.

        Raises:
            Exception: ``closed()``: the workers are closed.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[tuple[Any, Exception | None]] = loop.create_future()
        with self._lock:
            # Checked and queued under the lock: a call queued before close's stop items is run, none after them.
            if self._closed:
                raise self._closed_error()
            if not self._threads:
                self._start()
            self._queue.put((call, loop, future))
        return await future

    def _start(self) -> None:
        for number in range(self._max_workers):
            thread = threading.Thread(target=_work, args=(self._queue,), name=f"{self._name}_{number}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def close(self) -> None:
        """Refuse new calls, let the queued ones finish, and stop the threads (waiting for them)."""
        with self._lock:
            self._closed = True
        self._finalizer()


def _stop(work: queue.SimpleQueue[_Item | None], threads: list[threading.Thread]) -> None:
    # Daemon threads, so that a store never closed does not hold up the interpreter's exit; this runs at exit (and
    # when the store is collected) and lets the calls already queued finish first.
    for _ in threads:
        work.put(None)
    for thread in threads:
        if thread is not threading.current_thread():
            thread.join()


def _work(work: queue.SimpleQueue[_Item | None]) -> None:
    while (item := work.get()) is not None:
        call, loop, future = item
        outcome: tuple[Any, Exception | None]
        try:
            outcome = call(), None
        except Exception as e:
            outcome = None, e
        try:
            loop.call_soon_threadsafe(_deliver, future, outcome)
        except RuntimeError:
            # The caller's loop closed meanwhile (an ``asyncio.run`` that ended): nobody is left to tell.
            logger.debug("the event loop of a store call closed before the call ended")
        # Nothing of this call is held while waiting for the next: its partial holds the store, which must stay
        # collectable (its finalizer stops these threads).
        del item, call, loop, future, outcome


def _deliver(future: asyncio.Future[tuple[Any, Exception | None]], outcome: tuple[Any, Exception | None]) -> None:
    if not future.cancelled():
        future.set_result(outcome)
