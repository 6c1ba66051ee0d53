"""Detached runs: an invocation belongs to the app, not to the request that started it.

A ``Run`` is the task that drives ``agent.stream_async`` for one key and records its wire events in an append-only,
bounded buffer. Requests only *follow* runs: a client that disconnects stops following, the run carries on (bounded
by the app's run timeout), and a retry follows it again from where it left off. ``RunRegistry`` finds the run of a
key while it is live, and keeps finished runs for a short, bounded time so that a reconnect resumes exactly.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from typing import Any

from .._events import result_of
from ..idempotency.record import ReplayedAgentResult
from ._problems import Problem, aborted_problem, problem_for
from ._wire import REPLAY_TAG, EventTranslator, WireEvent, dumps, frame, result_body

logger = logging.getLogger(__name__)

# Events that are always buffered, even past the cap: they are few, and each carries whole content.
_WHOLE_EVENTS = frozenset({"message", "result", "error"})


class Run:
    """One invocation: its task, its events so far, and its outcome.

    Followers (the requests that stream or await it) may be on any event loop and thread: they read under a lock
    and are woken per loop with one ``call_soon_threadsafe`` hop. Only the run's own task appends.

    Attributes:
        key: The durable key (``scope#digest``), or None for an invocation without an Idempotency-Key.
        fingerprint: Fingerprint of the request that started the run (None when payloads are not validated).
    """

    def __init__(self, key: str | None, fingerprint: str | None, max_buffered_events: int) -> None:
        """A run that has not started."""
        self.key = key
        self.fingerprint = fingerprint
        self._max_events = max_buffered_events
        self._lock = threading.Lock()
        self._events: list[WireEvent] = []
        self._positions: list[int] = []
        self._count = 0
        self._tag = ""
        # A journaled run's lineage (``<lineage>.<run>`` tags): its journal, and where its live part began.
        self._journal_of: Callable[[], Any] | None = None
        self._journal: Any = None
        self._lineage = ""
        self.frontier: int | None = None
        self._version = 0
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._cancel_problem: Problem | None = None
        self.decided = False
        self.replayed = False
        self.finished = False
        self.settled = False
        self.failed_before_start = False
        self.finished_at = 0.0
        self.result_json: str | None = None
        self.problem: Problem | None = None

    @property
    def succeeded(self) -> bool:
        """The run ended with a result."""
        return self.result_json is not None

    @classmethod
    def replay(cls, key: str, result: ReplayedAgentResult) -> Run:
        """A finished run made of a stored result: the events ``message`` and ``result``, tagged ``r``."""
        run = cls(key, None, 2)
        run._decide(replayed=True)
        run._append("message", {"message": result.message})
        run._finish_ok(result_body(result))
        run.settled = True
        return run

    # -- the run's own task ------------------------------------------------------------------------------------

    def start(
        self,
        open_stream: Callable[[], Awaitable[AsyncIterator[Any]]],
        *,
        timeout_problem: Problem,
        timeout_seconds: float,
        retry_after: int,
        on_settled: Callable[[Run], None],
        journal_of: Callable[[], Any] | None = None,
    ) -> None:
        """Start the task that drives ``await open_stream()`` on the running loop, cancelled after the timeout.

        ``journal_of`` gives the run's step journal once it is running (None: not journaled): a journaled run's
        events are named by its journal's lineage, so a client re-attached here after a takeover resumes them.
        """
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._journal_of = journal_of
        self._task = loop.create_task(self._drive(open_stream, retry_after))
        self._timer = loop.call_later(timeout_seconds, self._cancel_now, timeout_problem)

        def settled(_: asyncio.Task[None]) -> None:
            if self._timer is not None:
                self._timer.cancel()
            with self._lock:
                self.settled = True
                self._task = self._timer = None  # a retained run keeps its events only
            self._notify()
            on_settled(self)

        self._task.add_done_callback(settled)

    async def _drive(self, open_stream: Callable[[], Awaitable[AsyncIterator[Any]]], retry_after: int) -> None:
        translator = EventTranslator()
        try:
            stream = await open_stream()
            async with aclosing(stream):  # type: ignore[type-var]
                async for event in stream:
                    wire = list(translator.translate(event))
                    if wire and not self.decided:
                        # Decided by the first event a client would see: until then a failure is a status code.
                        result = result_of(event)
                        self._decide(replayed=isinstance(result, ReplayedAgentResult))
                        if result is not None:
                            # A replay has no events of its own: its sequence is the stored message, then the result.
                            self._append("message", {"message": result.message})
                    self._mark_frontier()
                    for name, data in wire:
                        if name == "result":
                            self._finish_ok(data)
                        else:
                            self._append(name, data)
            if not self.finished:
                raise RuntimeError("the agent's stream ended without a result")
        except asyncio.CancelledError:
            problem = self._cancel_problem or aborted_problem(retry_after)
            logger.debug("key=<%s>, status=<%d> | run cancelled", self.key, problem.status)
            self._finish_error(problem)
            # Our own task, cancelled by us (timeout, shutdown): it ends here, it is not an error of its awaiter.
        except Exception as e:
            problem = problem_for(e, retry_after)
            if problem.status >= 500:
                logger.exception("key=<%s> | run failed", self.key)
            else:
                logger.debug("key=<%s>, status=<%d> | run refused", self.key, problem.status)
            self._finish_error(problem)

    def cancel(self, problem: Problem) -> None:
        """Cancel the run's task (from any thread); its followers get ``problem``. Thread-safe."""
        loop = self._loop
        if loop is None or self._task is None or self._task.done():
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self._cancel_now(problem)
        else:
            try:
                loop.call_soon_threadsafe(self._cancel_now, problem)
            except RuntimeError:  # the run's loop is closed: its task can no longer run anyway
                pass

    def _cancel_now(self, problem: Problem) -> None:
        if self._task is not None and not self._task.done():
            self._cancel_problem = self._cancel_problem or problem
            self._task.cancel()

    # -- recording (the run's task only) -----------------------------------------------------------------------

    def _decide(self, *, replayed: bool) -> None:
        journal = None if replayed or self._journal_of is None else self._journal_of()
        with self._lock:
            self.decided = True
            self.replayed = replayed
            if replayed:
                self._tag = REPLAY_TAG
            elif journal is not None:
                # <lineage>.<run>: the lineage is every owner's of this invocation, the run this server's.
                self._journal, self._lineage = journal, journal.run_tag
                self._tag = f"{journal.run_tag}.{secrets.token_hex(2)}"
            else:
                self._tag = secrets.token_hex(4)
        self._notify()

    def _mark_frontier(self) -> None:
        """Note where the live part of a journaled run began: every event before it replayed an earlier owner's."""
        journal = self._journal
        if journal is not None and self.frontier is None and journal.live:
            with self._lock:
                self.frontier = self._count
            self._notify()

    def _append(self, name: str, data: dict[str, Any]) -> None:
        with self._lock:
            self._count += 1
            if len(self._events) < self._max_events or name in _WHOLE_EVENTS:
                self._events.append(frame(self._tag, self._count, name, dumps(data)))
                self._positions.append(self._count)
        self._notify()

    def _finish_ok(self, body: dict[str, Any]) -> None:
        if self._timer is not None:
            self._timer.cancel()  # the result exists: storing it must not be cut short
        self.result_json = dumps(body)
        self._append("result", body)
        self._finish()

    def _finish_error(self, problem: Problem) -> None:
        if self.finished:
            return  # the result was out before the failure (say, while storing it): the result stands
        if not self.decided:
            self.failed_before_start = True
            with self._lock:
                self._tag = secrets.token_hex(4)
        self.problem = problem
        self._append("error", problem.body())
        self._finish()

    def _finish(self) -> None:
        with self._lock:
            self.decided = True
            self.finished = True
            self.finished_at = time.monotonic()
        self._notify()

    def _notify(self) -> None:
        """Wake every follower: directly on this loop, one thread-safe hop per other loop."""
        with self._lock:
            self._version += 1
            waiters, self._waiters = self._waiters, []
        try:
            here: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            here = None
        elsewhere: dict[asyncio.AbstractEventLoop, list[asyncio.Future[None]]] = {}
        for loop, future in waiters:
            if loop is here:
                _wake(future)
            else:
                elsewhere.setdefault(loop, []).append(future)
        for loop, futures in elsewhere.items():
            try:
                loop.call_soon_threadsafe(_wake_all, futures)
            except RuntimeError:  # that follower's loop closed: nobody is left there to wake
                pass

    # -- following (any loop, any thread) ----------------------------------------------------------------------

    def start_index(self, last_event_id: tuple[str, int] | None) -> int:
        """Index of the first buffered event to send after ``Last-Event-ID`` (0: the whole sequence).

        A ``Last-Event-ID`` of another run (a replay, a re-run after a failure, another invocation) says nothing
        about this sequence, so the whole sequence is sent; a client that sees a new run tag starts over. One of an
        earlier owner of the same journaled invocation (same lineage) names the same events up to this run's
        frontier: the client resumes where it was, and gets a ``rewind`` if it had seen events past the frontier.
        """
        with self._lock:
            if last_event_id is None or not self._continues(last_event_id[0]):
                return 0
            return bisect.bisect_right(self._positions, last_event_id[1])

    def _continues(self, tag: str) -> bool:
        """Whether events tagged ``tag`` are this run's, or an earlier owner's of the same lineage."""
        if tag == self._tag:
            return True
        lineage, dot, _ = tag.partition(".")
        return bool(dot) and bool(self._lineage) and lineage == self._lineage

    def seen_by(self, last_event_id: tuple[str, int] | None) -> int:
        """How far a client re-attached from an earlier owner of this lineage had read (0: not such a client)."""
        with self._lock:
            if last_event_id is None or last_event_id[0] == self._tag or not self._continues(last_event_id[0]):
                return 0
            return last_event_id[1]

    def rewinds(self, seen: int) -> bool:
        """Whether a client that saw an earlier owner's events up to ``seen`` must be sent a ``rewind``."""
        with self._lock:
            return bool(seen) and self.frontier is not None and self.frontier < seen

    def rewind_frame(self, to: int) -> bytes:
        """The ``rewind`` event: events after position ``to`` were an earlier owner's, and are withdrawn."""
        return frame(self._tag, to, "rewind", dumps({"to": to})).frame

    def read(self, start: int) -> tuple[list[WireEvent], int, bool]:
        """The buffered events from index ``start``, the version they are current for, and whether the run finished."""
        with self._lock:
            return self._events[start:], self._version, self.finished

    def state(self) -> int:
        """The current version (changes on every event and state change)."""
        with self._lock:
            return self._version

    async def changed(self, version: int, timeout: float | None = None) -> bool:
        """Wait until the run has changed since ``version``, or ``timeout`` seconds have passed.

        Returns:
            Whether the run changed (False: the timeout passed first).

        Cancellation: only this waiter's own future is cancelled. Thread-safe: any loop may wait.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        with self._lock:
            if self._version != version:
                return True
            self._waiters.append((loop, future))
        try:
            # asyncio.wait, not wait_for or asyncio.timeout: it cancels nothing on a timeout, so it can never swallow
            # a cancellation of our caller (wait_for can on 3.10 and 3.11), and it exists on every supported Python.
            await asyncio.wait([future], timeout=timeout)
            return future.done()
        finally:
            with self._lock:  # cancelled (or timed out): leave no waiter behind; notified: already gone
                with contextlib.suppress(ValueError):
                    self._waiters.remove((loop, future))

    async def wait(self, condition: Callable[[Run], bool]) -> None:
        """Wait until ``condition(run)`` holds (``decided``, ``finished``, ``settled``).

        Cancellation: as ``changed``. Thread-safe.
        """
        while True:
            version = self.state()
            if condition(self):
                return
            await self.changed(version)

    async def events(self, start: int, keepalive_seconds: float, seen: int = 0) -> AsyncIterator[bytes]:
        """The SSE frames from index ``start`` to the end of the run, live; a comment every ``keepalive_seconds``.

        ``seen``: the position up to which the client saw an earlier owner's events of this lineage. Those match
        this run's up to its frontier; once the frontier is known and lies before ``seen``, a ``rewind`` to it comes
        first, then this run's events after it.

        Closing the iterator (the client went away) stops following only; the run carries on.
        """
        while True:
            with self._lock:  # the events and the frontier as of one moment
                events, version, finished, frontier = self._events[start:], self._version, self.finished, self.frontier
            if seen and frontier is not None and frontier < seen:
                # The client saw events past where this run went live: an earlier owner's, never to be reproduced.
                yield self.rewind_frame(frontier)
                seen = 0
                with self._lock:
                    start = bisect.bisect_right(self._positions, frontier)
                continue
            for event in events:
                yield event.frame
            start += len(events)
            if finished and not events:
                return
            if events:
                continue
            if not await self.changed(version, keepalive_seconds):
                yield b": keepalive\n\n"

    def at_end(self, start: int) -> bool:
        """Whether a finished run has nothing left from index ``start``."""
        with self._lock:
            return self.finished and start >= len(self._events)


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _wake_all(futures: list[asyncio.Future[None]]) -> None:
    for future in futures:
        _wake(future)


class RunRegistry:
    """The runs of one app by durable key: live ones, and finished ones for a short, bounded time.

    Memory: at most ``retain_runs`` finished runs, each at most ``max_buffered_events`` events, kept at most
    ``retain_seconds``; live runs are bounded by the app's ``max_concurrent_runs``. Thread-safe.
    """

    def __init__(self, retain_runs: int, retain_seconds: float) -> None:
        """An empty registry."""
        self._retain_runs = retain_runs
        self._retain_seconds = retain_seconds
        self._lock = threading.Lock()
        self._live: dict[str, Run] = {}
        self._finished: OrderedDict[str, Run] = OrderedDict()
        self._active: set[Run] = set()

    def find(self, key: str) -> Run | None:
        """The live run of ``key``, else its retained finished run, else None."""
        with self._lock:
            self._evict()
            return self._live.get(key) or self._finished.get(key)

    def add(self, run: Run) -> None:
        """Register a run that is about to start (a keyed run becomes the key's live run)."""
        with self._lock:
            self._active.add(run)
            if run.key is not None:
                self._live[run.key] = run
                self._finished.pop(run.key, None)

    @property
    def active(self) -> int:
        """Runs whose task has not ended."""
        with self._lock:
            return len(self._active)

    def active_runs(self) -> list[Run]:
        """A snapshot of the runs whose task has not ended."""
        with self._lock:
            return list(self._active)

    def settled(self, run: Run) -> None:
        """A run's task ended: it stops being live and is retained (its events) for reconnects."""
        with self._lock:
            self._active.discard(run)
            if run.key is None or self._live.get(run.key) is not run:
                return
            del self._live[run.key]
            self._finished[run.key] = run
            self._evict()

    def clear(self) -> None:
        """Forget every finished run (the app closed)."""
        with self._lock:
            self._finished.clear()

    def _evict(self) -> None:
        """Drop finished runs beyond the count or past their time; the caller holds the lock."""
        deadline = time.monotonic() - self._retain_seconds
        while self._finished:
            oldest = next(iter(self._finished.values()))
            if len(self._finished) <= self._retain_runs and oldest.finished_at > deadline:
                break
            self._finished.popitem(last=False)
