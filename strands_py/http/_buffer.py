"""What a run said: its wire events in an append-only, bounded buffer, and the followers that read them.

``EventBuffer`` is the half of a ``Run`` that records (only the run's own task appends) and is followed (from any
event loop and thread): the events so far, the run's tag and lineage, and a version that changes at every event and
state change, so that a follower waits for the next change without holding a thread.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import secrets
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

from ._wire import REPLAY_TAG, WireEvent, dumps, frame

# Events that are always buffered, even past the cap: they are few, and each carries whole content.
_WHOLE_EVENTS = frozenset({"message", "result", "error"})

_Buffer = TypeVar("_Buffer", bound="EventBuffer")


# At most this many frames are joined into one write of a follower that fell behind.
_FRAMES_PER_WRITE = 16


class EventBuffer:
    """The events of one run so far, and where its sequence stands; see the module's documentation.

    Followers (the requests that stream or await a run) may be on any event loop and thread: they read under a lock
    and are woken per loop with one ``call_soon_threadsafe`` hop. Only the run's own task records.

    Attributes:
        decided: The run said something a client sees (its first event, or a failure before it).
        replayed: The run is a replay of a stored result.
        finished: The run has its outcome (a result or a problem).
        finished_at: When it finished (``time.monotonic()``), 0 before.
        finished_wall: When it finished (``time.time()``), 0 before.
        frontier: A journaled run's first live event (the ones before it replayed an earlier owner's), once known.
    """

    def __init__(self, max_buffered_events: int) -> None:
        """An empty buffer keeping at most ``max_buffered_events`` events (past it, whole events only)."""
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
        # Followers of the events (``changed``), woken by every change; and waiters for a state (``wait``: decided,
        # finished, settled...), which an appended event never changes: not woken by events, so a JSON answer waits
        # for its result without a wake-up per event.
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[bool]]] = []
        self._state_waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[bool]]] = []
        self.decided = False
        self.replayed = False
        self.finished = False
        self.finished_at = 0.0
        self.finished_wall = 0.0

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

    def _append(self, name: str, data: dict[str, Any], encoded: str | None = None) -> None:
        """Append one event; ``encoded``: ``dumps(data)``, when the caller has it already."""
        with self._lock:
            self._count += 1
            if len(self._events) < self._max_events or name in _WHOLE_EVENTS:
                text = dumps(data) if encoded is None else encoded
                self._events.append(frame(self._tag, self._count, name, text))
                self._positions.append(self._count)
            # The event and its version change under one lock: a follower that read the version before this event
            # either parked before it (and is taken here) or sees the version changed when it parks (``_changed``).
            self._version += 1
            if not self._waiters:
                return  # nobody waits (a follower catches up in batches): the common case of a streamed run
            waiters, self._waiters = self._waiters, []
        self._wake_followers(waiters)

    def _finish(self) -> None:
        with self._lock:
            self.decided = True
            self.finished = True
            self.finished_at = time.monotonic()
            self.finished_wall = time.time()
        self._notify()

    def _notify(self) -> None:
        """A change of state (an appended event is ``_append``'s): wake every follower and every state waiter."""
        with self._lock:
            self._version += 1
            waiters, self._waiters = self._waiters, []
            if self._state_waiters:
                waiters.extend(self._state_waiters)
                self._state_waiters = []
            if not waiters:
                return
        self._wake_followers(waiters)

    @staticmethod
    def _wake_followers(waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[bool]]]) -> None:
        """Resolve ``waiters``' futures: directly on this loop, with one thread-safe hop per other loop."""
        try:
            here: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            here = None
        elsewhere: dict[asyncio.AbstractEventLoop, list[asyncio.Future[bool]]] = {}
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
        return await self._changed(version, timeout, state=False)

    async def _changed(self, version: int, timeout: float | None, *, state: bool) -> bool:
        """``changed``; with ``state``, only a change of state wakes it (not an appended event)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[bool] = loop.create_future()
        with self._lock:
            if self._version != version:
                return True
            (self._state_waiters if state else self._waiters).append((loop, future))
        # A timeout resolves our own future (False), as a change does (True): one future per wait, nothing cancelled
        # on a timeout (so a cancellation of our caller is never swallowed), and it is the same on every Python.
        timer = None if timeout is None else loop.call_later(timeout, _time_out, future)
        try:
            return await future
        finally:
            if timer is not None:
                timer.cancel()
            if not future.done() or future.cancelled() or not future.result():
                # Cancelled or timed out: leave no waiter behind (a change took it out of the list already).
                with self._lock:
                    with contextlib.suppress(ValueError):
                        (self._state_waiters if state else self._waiters).remove((loop, future))

    async def wait(self: _Buffer, condition: Callable[[_Buffer], bool]) -> None:
        """Wait until ``condition(run)`` holds (``decided``, ``finished``, ``settled``).

        Cancellation: as ``changed``. Thread-safe.
        """
        while True:
            version = self.state()
            if condition(self):
                return
            await self._changed(version, None, state=True)

    async def events(self, start: int, keepalive_seconds: float, seen: int = 0) -> AsyncIterator[bytes]:
        """The SSE frames from index ``start`` to the end of the run, live; a comment every ``keepalive_seconds``.

        ``seen``: the position up to which the client saw an earlier owner's events of this lineage. Those match
        this run's up to its frontier; once the frontier is known and lies before ``seen``, a ``rewind`` to it comes
        first, then this run's events after it.

        Each item is the frames that arrived since the last one (up to 16), joined: a follower that fell behind (a
        run that produced a burst of events while its follower waited for the loop) catches up in few writes.

        Closing the iterator (the client went away) stops following only; the run carries on.
        """
        while True:
            with self._lock:  # the events and the frontier as of one moment
                # At most one write's worth: a follower far behind copies a bounded slice, not the whole backlog, at
                # each step (each write is followed by a turn of the loop, in which a client that went away is
                # noticed before the rest is written: see EventStreamResponse).
                events = self._events[start : start + _FRAMES_PER_WRITE]
                version, finished, frontier = self._version, self.finished, self.frontier
            if seen and frontier is not None and frontier < seen:
                # The client saw events past where this run went live: an earlier owner's, never to be reproduced.
                yield self.rewind_frame(frontier)
                seen = 0
                with self._lock:
                    start = bisect.bisect_right(self._positions, frontier)
                continue
            if len(events) == 1:
                yield events[0].frame
            elif events:
                yield b"".join(event.frame for event in events)
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


def _wake(future: asyncio.Future[bool]) -> None:
    if not future.done():
        future.set_result(True)


def _wake_all(futures: list[asyncio.Future[bool]]) -> None:
    for future in futures:
        _wake(future)


def _time_out(future: asyncio.Future[bool]) -> None:
    if not future.done():
        future.set_result(False)
