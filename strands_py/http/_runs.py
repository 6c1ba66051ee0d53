"""Detached runs: an invocation belongs to the app, not to the request that started it.

A ``Run`` is the task that drives ``agent.stream_async`` for one key and records its wire events (``EventBuffer``).
Requests only *follow* runs: a client that disconnects stops following, the run carries on (bounded by the app's run
timeout), and a retry follows it again from where it left off. ``RunRegistry`` (``_registry.py``) finds the run of a
key while it is live, and keeps finished runs for a short, bounded time so that a reconnect resumes exactly.

A run can be cancelled on purpose (``request_cancel``, HTTP ``DELETE``): through its agent's ``cancel()``, so that
the turn ends through the normal cancelled path (the turn rolled back, a ``CANCELLED`` tombstone left), or, before
its agent exists (queued behind another turn of its session, or its agent still being built), by cancelling its task,
which has claimed nothing yet.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from typing import Any, Protocol

from .._events import result_of
from ..idempotency.record import ReplayedAgentResult
from ._buffer import EventBuffer
from ._problems import CANCELLED, LEASE_LOST, Problem, aborted_problem, cancelled_problem, problem_for
from ._wire import EventTranslator, dumps, result_body

logger = logging.getLogger(__name__)


class Place(Protocol):
    """Where a run of a session stands in this server's line of that session's turns."""

    @property
    def session_id(self) -> str:
        """The session's id, as the caller named it."""

    def position(self) -> int:
        """Turns ahead of the run known to this server (0: its turn has come)."""

    def leave(self) -> None:
        """The run ended: leave the line, letting the next turn start."""


class Run(EventBuffer):
    """One invocation: its task, its events so far (see ``EventBuffer``), and its outcome.

    Attributes:
        key: The durable key (``scope#digest``), or None for an invocation without an Idempotency-Key.
        fingerprint: Fingerprint of the request that started the run (None when payloads are not validated).
        place: The run's place in its session's line, for a turn of a session (None otherwise).
        agent: The run's agent, once built (``request_cancel`` stops it through its ``cancel()``).
        cancel_requested: Someone asked for the run to be cancelled (``request_cancel``).
        started_wall: When the run started (``time.time()``), 0 before.
        result_json: The result body, once the run ended with one.
        problem: The problem, once the run ended without a result.
    """

    def __init__(self, key: str | None, fingerprint: str | None, max_buffered_events: int) -> None:
        """A run that has not started."""
        super().__init__(max_buffered_events)
        self.key = key
        self.fingerprint = fingerprint
        self.place: Place | None = None
        self.agent: Any = None
        self.cancel_requested = False
        self.started_wall = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._cancel_problem: Problem | None = None
        self.settled = False
        self.failed_before_start = False
        self.result_json: str | None = None
        self.problem: Problem | None = None

    @property
    def phase(self) -> str:
        """``queued``, ``running``, ``cancelling``, ``completed``, ``cancelled`` or ``failed``."""
        if self.finished:
            if self.succeeded:
                return "completed"
            return "cancelled" if self.problem is not None and self.problem.type == CANCELLED else "failed"
        if self.cancel_requested:
            return "cancelling"
        return "queued" if self.position() > 0 else "running"

    def position(self) -> int:
        """Turns of its session ahead of this run, known to this server (0: not waiting in a line)."""
        place = self.place
        return 0 if place is None or self.decided or self.finished else place.position()

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
        self.started_wall = time.time()
        self._journal_of = journal_of
        self._task = loop.create_task(self._drive(open_stream, retry_after))
        self._timer = loop.call_later(timeout_seconds, self._cancel_now, timeout_problem)

        def settled(_: asyncio.Task[None]) -> None:
            if self._timer is not None:
                self._timer.cancel()
            if not self.finished:
                # Cancelled before its first step (a DELETE right after the start): _drive never ran to say so.
                self._finish_error(self._cancel_problem or aborted_problem(retry_after))
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
                    wire = translator.translate(event)
                    if wire and not self.decided:
                        # Decided by the first event a client would see: until then a failure is a status code.
                        result = result_of(event)
                        self._decide(replayed=isinstance(result, ReplayedAgentResult))
                        if result is not None:
                            # A replay has no events of its own: its sequence is the stored message, then the result.
                            self._append("message", {"message": result.message})
                    if self.frontier is None and self._journal is not None:
                        # At every event, those without wire events too: a run that goes live and then fails appends
                        # no other event, and a re-attached client's rewind needs the frontier all the same.
                        self._mark_frontier()
                    if not wire:
                        continue  # most strands events say nothing on the wire
                    for name, data in wire:
                        if name != "result":
                            self._append(name, data)
                        elif data.get("stop_reason") == "cancelled":
                            # Stopped by agent.cancel(): not the key's answer (the turn layer stored none, and left a
                            # tombstone), so followers get the cancel, never a result that a retry would not see.
                            self._finish_error(self._cancel_problem or cancelled_problem())
                        else:
                            self._finish_ok(data)
            if not self.finished:
                raise RuntimeError("the agent's stream ended without a result")
        except asyncio.CancelledError:
            problem = self._cancel_problem or aborted_problem(retry_after)
            logger.debug("key=<%s>, status=<%d> | run cancelled", self.key, problem.status)
            self._finish_error(problem)
            # Our own task, cancelled by us (timeout, shutdown): it ends here, it is not an error of its awaiter.
        except Exception as e:
            problem = problem_for(e, retry_after)
            if self.cancel_requested and problem.type == LEASE_LOST:
                # The cancel's mark in the store fenced this run off (its result, or a heartbeat): it was cancelled.
                problem = self._cancel_problem or cancelled_problem()
            if problem.status >= 500:
                logger.exception("key=<%s> | run failed", self.key)
            else:
                logger.debug("key=<%s>, status=<%d> | run refused", self.key, problem.status)
            self._finish_error(problem)

    def cancel(self, problem: Problem) -> None:
        """Cancel the run's task (from any thread); its followers get ``problem``. Thread-safe."""
        self._on_loop(self._cancel_now, problem)

    def request_cancel(self, problem: Problem) -> None:
        """Stop the run on purpose (from any thread); its followers get ``problem``. Thread-safe.

        A run whose agent exists is stopped through ``agent.cancel()``: strands stops at its next cancellation point
        and the turn ends through its cancelled path (rolled back, a ``CANCELLED`` tombstone left). A run without an
        agent yet (waiting in its session's line, or its agent being built) has claimed nothing: its task is
        cancelled. A finished run is left as it is.
        """
        self._on_loop(self._request_cancel_now, problem)

    def _on_loop(self, action: Callable[[Problem], None], problem: Problem) -> None:
        loop = self._loop
        if loop is None or self._task is None or self._task.done():
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            action(problem)
        else:
            try:
                loop.call_soon_threadsafe(action, problem)
            except RuntimeError:  # the run's loop is closed: its task can no longer run anyway
                pass

    def _cancel_now(self, problem: Problem) -> None:
        if self._task is not None and not self._task.done():
            self._cancel_problem = self._cancel_problem or problem
            self._task.cancel()

    def _request_cancel_now(self, problem: Problem) -> None:
        if self.finished or self._task is None or self._task.done():
            return
        self._cancel_problem = self._cancel_problem or problem
        first = not self.cancel_requested
        self.cancel_requested = True
        self._notify()
        if self.agent is None:
            logger.debug("key=<%s> | cancelling a run that has not started its agent", self.key)
            self._task.cancel()
        elif first:
            logger.debug("key=<%s> | cancelling the run through its agent", self.key)
            self.agent.cancel()  # thread-safe in strands: the agent stops at its next cancellation point

    # -- the outcome (the run's task only) ----------------------------------------------------------------------

    def _finish_ok(self, body: dict[str, Any]) -> None:
        if self._timer is not None:
            self._timer.cancel()  # the result exists: storing it must not be cut short
        self.result_json = dumps(body)
        self._append("result", body, self.result_json)  # encoded once: the JSON body and the event's data
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
