"""A store's own threads for its blocking calls, each outcome handed back to the caller's event loop in one hop.

``loop.run_in_executor`` on a ``ThreadPoolExecutor`` wraps each call in a ``concurrent.futures.Future`` (a condition
variable of its own), passes the executor's idle semaphore, and chains an asyncio future to it. Here a call is one
item on a queue, and its outcome one ``call_soon_threadsafe``. Measured on a 2-core machine with a local Redis
(``hatch run bench:store``, one ``EVALSHA`` per call, median CPU per call): 563 µs instead of 598 with calls 2 ms
apart as in a turn, 312 instead of 371 back to back. The same call on the event loop's own thread, blocking it, costs
284 and 152; through redis-py's asyncio client, 428 and 296. Waking an idle thread is most of a call's cost.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import threading
import weakref
from collections.abc import Callable
from typing import Any, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")

_Outcome = tuple[Any, BaseException | None]
# An item of the queue: the call, and where its outcome goes. None stops the worker that takes it.
_Item = tuple[Callable[[], Any], asyncio.AbstractEventLoop, "asyncio.Future[_Outcome]"]

# Every instance, so that a forked child starts afresh (the parent's threads do not exist there).
_instances: weakref.WeakSet[Workers] = weakref.WeakSet()


class Workers:
    """``max_workers`` threads running blocking calls for coroutines of any event loop, in the order they came.

    Thread-safety: ``run`` may be called from any thread and event loop at once. Cancellation: a call whose caller
    was cancelled before a worker took it is not run (as an executor skips a cancelled future); once running, it
    runs to its end and its outcome is dropped. The threads start with the first call. ``close`` lets every call
    already queued finish, then stops the threads, and every ``close`` waits for them (a second one too, or one
    retried after an interrupted first). A store never closed has its threads stopped the same way when it is
    collected or the interpreter exits; a call after that is refused as after ``close``. A forked child starts with
    an empty queue and no threads: they start with its first call.
    """

    def __init__(self, max_workers: int, name: str, closed: Callable[[], Exception]) -> None:
        """Threads named ``name_<n>``; ``closed()`` is what a call after ``close`` raises."""
        self._max_workers = max_workers
        self._name = name
        self._closed_error = closed
        self._closed = False
        self._reset()
        _instances.add(self)

    def _reset(self) -> None:
        """An empty queue, no threads, and a finalizer stopping them: at creation, and in a forked child."""
        self._queue: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        # Not a method of self: the threads must not keep the object alive, or it would never be collected.
        self._finalizer = weakref.finalize(self, _stop, self._queue, self._threads)

    async def run(self, call: Callable[[], T]) -> tuple[T | None, BaseException | None]:
        """Run ``call()`` on a worker; its result and None, or None and what it raised.

        The error comes back as a value rather than raised across the await: a frame resumed by ``throw()`` emits no
        trace ``call`` event on Python 3.11, so coverage would lose every line after the await.

        Raises:
            Exception: ``closed()``: the workers were closed, or stopped by the interpreter's exit.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[_Outcome] = loop.create_future()
        with self._lock:
            # Checked and queued under the lock: a call queued before the stop items is run, none after them. The
            # finalizer is spent once the threads were told to stop: by close, or by the exit (an atexit hook of an
            # application that runs after weakref's), when the store itself was never closed.
            if self._refuses():
                raise self._closed_error()
            if not self._threads:
                self._start()
            self._queue.put((call, loop, future))
        return await future

    def _refuses(self) -> bool:
        return self._closed or not self._finalizer.alive

    def _start(self) -> None:
        for number in range(self._max_workers):
            thread = threading.Thread(target=_work, args=(self._queue,), name=f"{self._name}_{number}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def close(self) -> None:
        """Refuse new calls, let the queued ones finish, and stop the threads, waiting for them."""
        with self._lock:
            self._closed = True
        self._finalizer()  # tells the threads to stop, once
        _join(self._threads)  # and every close waits for them: a second one too, and one retried after an interrupt

    def _after_fork(self) -> None:
        # The parent's threads do not run in the child, and its queue may hold the parent's calls: start afresh.
        self._finalizer.detach()
        self._reset()


def _after_fork_in_child() -> None:
    for workers in list(_instances):
        workers._after_fork()


if hasattr(os, "register_at_fork"):  # pragma: no branch - every POSIX Python we support has it
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _stop(work: queue.SimpleQueue[_Item | None], threads: list[threading.Thread]) -> None:
    # Daemon threads, so that a store never closed does not hold up the interpreter's exit; this runs at exit (and
    # when the store is collected) and lets the calls already queued finish first.
    for _ in threads:
        work.put(None)
    _join(threads)


def _join(threads: list[threading.Thread]) -> None:
    for thread in threads:
        if thread is not threading.current_thread():  # close from one of the store's own calls: not itself
            thread.join()


def _work(work: queue.SimpleQueue[_Item | None]) -> None:
    while (item := work.get()) is not None:
        call, loop, future = item
        outcome: _Outcome = None, None
        # A caller cancelled before its call was taken: not run, as an executor skips a cancelled future (reading the
        # state from this thread races only with a cancel that comes now, and then the call runs, as it would there).
        if not future.cancelled():
            try:
                outcome = call(), None
            except BaseException as e:  # noqa: B036 - even SystemExit: it is the caller's, and this thread must live on
                outcome = None, e
            try:
                loop.call_soon_threadsafe(_deliver, future, outcome)
            except RuntimeError:
                # The caller's loop closed meanwhile (an ``asyncio.run`` that ended): nobody is left to tell.
                logger.debug("the event loop of a store call closed before the call ended")
            except Exception as e:  # pragma: no cover - call_soon_threadsafe raises nothing else but in extremis
                logger.warning("error=<%s> | could not hand a store call's outcome back", type(e).__name__)
        # Nothing of this call is held while waiting for the next: its partial holds the store, which must stay
        # collectable (its finalizer stops these threads).
        del item, call, loop, future, outcome


def _deliver(future: asyncio.Future[_Outcome], outcome: _Outcome) -> None:
    if not future.cancelled():
        future.set_result(outcome)
