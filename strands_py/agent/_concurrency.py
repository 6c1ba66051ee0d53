"""In-process concurrency primitives behind the idempotency gate: no I/O, no threads of their own.

``_InflightInvocation`` carries one invocation's outcome to any number of waiting duplicates, on any threads and
event loops. ``_ConcurrencyController`` is the per-agent THROW-mode invocation lock plus the slot of the token in
flight; ``begin`` decides, atomically, whether a call is the primary, a duplicate, or refused.

Waiting never parks a thread. A duplicate awaits a future owned by its own event loop, and the primary's ``settle``
hops once to each loop that has waiters (``call_soon_threadsafe``) and resolves that loop's futures there. Blocking
waits (``asyncio.to_thread(event.wait)``) were the old design's deadlock: a storm of duplicates filled the loop's
default executor and the primary could no longer get a worker for its own model call.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import threading
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any

from strands.types.agent import ConcurrentInvocationMode

from ..types.exceptions import IdempotencyAbortedError, IdempotencyTokenError

if TYPE_CHECKING:
    from strands.agent.agent_result import AgentResult

logger = logging.getLogger(__name__)

# The invocations whose primary is running code in this context right now (its model call, tools, hooks and
# callback handlers run inside it, and tasks and threads they start copy it). A call that would wait for one of them
# would wait for itself.
_running: contextvars.ContextVar[tuple[_InflightInvocation, ...]] = contextvars.ContextVar(
    "strands_py_running_invocations", default=()
)


def _waits_for_itself(inflight: _InflightInvocation) -> bool:
    """Whether following ``inflight`` from the current context would deadlock (a re-entrant call)."""
    running = _running.get()
    if not running:
        return False
    followed: _InflightInvocation | None = inflight
    while followed is not None:
        # A settled invocation answers at once: following it cannot wait for anything.
        if followed.settled:
            return False
        if followed in running:
            return True
        followed = followed.follows
    return False


def _wake_waiters(waiters: list[asyncio.Future[None]]) -> None:
    """Resolve one event loop's waiters; runs on that loop, scheduled by ``_InflightInvocation.settle``."""
    for waiter in waiters:
        # A waiter whose duplicate was cancelled is already done; skipping it is what keeps a cancellation local.
        if not waiter.done():
            waiter.set_result(None)


def _park(
    by_loop: dict[asyncio.AbstractEventLoop, list[asyncio.Future[None]]],
    loop: asyncio.AbstractEventLoop,
    future: asyncio.Future[None],
) -> None:
    """File ``future`` under its loop, so that one hop to that loop wakes it with its siblings."""
    futures = by_loop.get(loop)
    if futures is None:
        futures = by_loop[loop] = []
    futures.append(future)


def _hop_to_loops(waiters_by_loop: dict[asyncio.AbstractEventLoop, list[asyncio.Future[None]]]) -> None:
    """Wake each loop's waiters with one cross-thread hop per loop."""
    for loop, waiters in waiters_by_loop.items():
        try:
            loop.call_soon_threadsafe(_wake_waiters, waiters)
        except RuntimeError:
            # The waiters' loop was closed before the primary settled: its waiters went with it.
            logger.debug("waiters=<%d> | event loop closed before settle, nothing to wake", len(waiters))


class _InflightInvocation:
    """One invocation's outcome, broadcast to every duplicate waiting for it.

    ``register_waiter()`` returns a future of the caller's running event loop; it resolves (to ``None``) once the
    primary has settled, after which ``result`` / ``error`` hold the outcome (``outcome()`` returns or raises it).
    Waiters are grouped by loop, so waking them costs one cross-thread hop per loop, not one per waiter, and no
    thread is ever parked on a wait.

    Thread-safety: every method may be called from any thread. ``settle`` is first-wins and idempotent; the
    outcome is published before any waiter is woken.

    Cancellation: each waiter owns its future, so cancelling one waiting duplicate cancels only that future; the
    shared outcome and the other waiters are untouched.

    Streaming: the primary ``append_event``s what it yields into an append-only buffer of at most
    ``max_buffered_events`` events; ``stream_events()`` replays the buffer to a duplicate and then follows it live.
    The primary never waits for a reader: it hops to a loop only when a reader there has caught up and parked.
    """

    __slots__ = (
        "result",
        "error",
        "key",
        "fingerprint",
        "follows",
        "_error_traceback",
        "_mutex",
        "_settled",
        "_waiters_by_loop",
        "_waiter_count",
        "_events",
        "_events_capped",
        "_max_buffered_events",
        "_readers_by_loop",
    )

    def __init__(self, max_buffered_events: int = 0, *, key: str | None = None, fingerprint: str | None = None) -> None:
        """Create an unsettled invocation with no waiters.

        Args:
            max_buffered_events: How many of the primary's events are kept for streaming duplicates (0: none).
            key: The durable key of the invocation, when it has one (for errors and the in-process registry).
            fingerprint: The request fingerprint, when payloads are validated: a duplicate whose request has
                another fingerprint must not receive this invocation's outcome.
        """
        self.key = key
        self.fingerprint = fingerprint
        # The invocation this one relays, when its primary follows another agent's primary of the same durable key.
        self.follows: _InflightInvocation | None = None
        self.result: AgentResult | None = None
        self.error: BaseException | None = None
        self._error_traceback: TracebackType | None = None
        self._mutex = threading.Lock()
        self._settled = False
        self._waiters_by_loop: dict[asyncio.AbstractEventLoop, list[asyncio.Future[None]]] = {}
        self._waiter_count = 0
        self._events: list[Any] = []
        self._events_capped = max_buffered_events <= 0
        self._max_buffered_events = max_buffered_events
        # Readers that have caught up with the buffer, parked until the next event or the outcome.
        self._readers_by_loop: dict[asyncio.AbstractEventLoop, list[asyncio.Future[None]]] = {}

    @property
    def settled(self) -> bool:
        """Whether the primary has published its outcome."""
        return self._settled

    @property
    def waiter_count(self) -> int:
        """How many duplicates started waiting or reading before the outcome was published (cancelled included)."""
        return self._waiter_count

    def register_waiter(self) -> asyncio.Future[None]:
        """Return a future of the running event loop that resolves once the primary has settled.

        Must be called from a coroutine (it needs the running loop). If the primary has already settled, the
        returned future is already resolved: registering after settling cannot miss the outcome.

        Returns:
            A future owned by the caller's loop. Cancelling it (or the task awaiting it) affects no other waiter.
        """
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        with self._mutex:
            if not self._settled:
                _park(self._waiters_by_loop, loop, waiter)
                self._waiter_count += 1
                return waiter
        # Register-after-settle: the outcome is already published, so resolve here without any hop.
        waiter.set_result(None)
        return waiter

    def append_event(self, event: Any) -> None:
        """Buffer one of the primary's events for streaming duplicates, and wake the readers that caught up.

        Dropped once the invocation settled or the buffer is full (readers then get the outcome only). Never blocks.
        """
        with self._mutex:
            if self._settled or self._events_capped:
                return
            if len(self._events) >= self._max_buffered_events:
                self._events_capped = True
                return
            self._events.append(event)
            if not self._readers_by_loop:
                return
            readers_by_loop, self._readers_by_loop = self._readers_by_loop, {}
        _hop_to_loops(readers_by_loop)

    async def stream_events(self) -> AsyncGenerator[Any, None]:
        """Yield the primary's buffered events, then its live ones, until it settles; then take ``outcome()``.

        A reader that starts after the buffer filled up gets no events (only the outcome); one that started before
        gets the events up to the cap. Must be iterated from a coroutine.

        Cancellation: cancelling the reader cancels only its own future. Thread-safety: any thread and loop.
        """
        with self._mutex:
            self._waiter_count += 1
            position: int | None = None if self._events_capped else 0  # joined after the cap: outcome only
        loop = asyncio.get_running_loop()
        while True:
            with self._mutex:
                fresh = self._events[position:] if position is not None else []
                done = self._settled
                parked: asyncio.Future[None] | None = None
                if not fresh and not done:
                    parked = loop.create_future()
                    _park(self._readers_by_loop, loop, parked)
            if fresh:
                assert position is not None
                position += len(fresh)
                for event in fresh:
                    yield event
            elif done:
                return
            elif parked is not None:
                await parked

    def settle(self, result: AgentResult | None, error: BaseException | None) -> bool:
        """Publish the outcome and wake every waiter. First call wins; later calls change nothing.

        Args:
            result: The primary's result.
            error: The primary's exception; takes precedence over ``result``. With neither, waiters get
                ``IdempotencyAbortedError``.

        Returns:
            Whether this call settled the invocation (False if it was already settled).
        """
        if error is None and result is None:
            error = IdempotencyAbortedError("the primary invocation ended without a result")
        with self._mutex:
            if self._settled:
                return False
            # Publish before waking: a woken waiter reads result/error without taking the mutex.
            self.result = None if error is not None else result
            self.error = error
            # Kept apart because every duplicate re-raises the same exception object; each raise would otherwise
            # prepend its frames to the shared traceback, which then grows with every duplicate.
            self._error_traceback = error.__traceback__ if error is not None else None
            self._settled = True
            waiters_by_loop, self._waiters_by_loop = self._waiters_by_loop, {}
            readers_by_loop, self._readers_by_loop = self._readers_by_loop, {}
        for loop, readers in readers_by_loop.items():
            waiters_by_loop.setdefault(loop, []).extend(readers)
        _hop_to_loops(waiters_by_loop)
        return True

    def outcome(self) -> AgentResult:
        """Return the primary's result or raise its exception. Call only once settled.

        Returns:
            The primary's ``AgentResult``.

        Raises:
            BaseException: The primary's exception (the same object), with the primary's traceback.
        """
        error = self.error
        if error is not None:
            raise error.with_traceback(self._error_traceback)
        if self.result is None:
            raise RuntimeError("outcome() called before the invocation settled")
        return self.result


@dataclass
class _BeginResult:
    """What ``_ConcurrencyController.begin`` decided; the caller takes exactly one of three paths.

    - ``waiting_on`` is set: duplicate. Await ``waiting_on.register_waiter()``, then take ``waiting_on.outcome()``.
      No lock is held.
    - ``lock_acquired`` is False: another invocation holds the agent; raise ``ConcurrencyException``.
    - Otherwise: primary. When it ends, call ``complete(registered_token, ...)`` if ``registered_token`` is not
      None (this also releases the lock), else ``release_lock()``.
    """

    waiting_on: _InflightInvocation | None
    registered_token: Any
    lock_acquired: bool
    registered: _InflightInvocation | None = None


def _tokens_match(token: Any, inflight_token: Any) -> bool:
    """Compare two idempotency tokens by ``==``, turning a failing comparison into ``IdempotencyTokenError``."""
    # Identity first, as containers do: an object whose __eq__ raises still matches itself.
    if token is inflight_token:
        return True
    try:
        return bool(token == inflight_token)
    except Exception as e:
        raise IdempotencyTokenError(
            f"idempotency token of type {type(token).__name__} could not be compared with the token in flight: {e!r}"
        ) from e


class _ConcurrencyController:
    """The THROW-mode invocation lock and the slot of the idempotency token in flight, for one agent.

    In THROW mode one invocation runs at a time, so one slot suffices. The lock and the slot live under a single
    ``threading.Lock`` (sync ``Agent.__call__`` runs each call on its own thread and event loop), so ``begin``
    registers a token and takes the lock in one step, and ``complete`` forgets the token and frees the lock in one
    step: no caller ever sees "token forgotten but agent still busy", or "agent busy under a token nobody
    registered". User code (a token's ``__eq__``) never runs under that lock.

    In UNSAFE_REENTRANT mode there is no lock and tokens are ignored: every call is a primary.
    """

    def __init__(
        self, mode: ConcurrentInvocationMode | str = ConcurrentInvocationMode.THROW, max_buffered_events: int = 0
    ) -> None:
        """Create a controller.

        Args:
            mode: ``ConcurrentInvocationMode`` (or its string value).
            max_buffered_events: Events of each primary kept for streaming duplicates (0: none).

        Raises:
            ValueError: ``mode`` is not a ``ConcurrentInvocationMode``, or ``max_buffered_events`` is negative.
        """
        if max_buffered_events < 0:
            raise ValueError(f"max_buffered_events must not be negative, got {max_buffered_events}")
        self._max_buffered_events = max_buffered_events
        self._mode = ConcurrentInvocationMode(mode)
        self._mutex = threading.Lock()
        self._busy = False
        self._inflight_token: Any = None
        self._inflight: _InflightInvocation | None = None

    @property
    def mode(self) -> ConcurrentInvocationMode:
        """The concurrency mode this controller enforces."""
        return self._mode

    @property
    def inflight(self) -> _InflightInvocation | None:
        """The invocation registered under a token right now, if any."""
        return self._inflight

    def begin(self, idempotency_token: Any, *, key: str | None = None, fingerprint: str | None = None) -> _BeginResult:
        """Decide whether this call is the primary, a duplicate, or refused. Never blocks.

        Args:
            idempotency_token: The caller's token, or None. Matched against the token in flight by ``==``.
            key: The call's durable key, kept on the invocation a primary registers.
            fingerprint: The call's request fingerprint, kept on the invocation a primary registers.

        Returns:
            A ``_BeginResult``; see its docstring for the three paths.

        Raises:
            IdempotencyTokenError: Comparing the token with the token in flight raised. Nothing was registered or
                locked; the in-flight invocation is unaffected.
        """
        if self._mode != ConcurrentInvocationMode.THROW:
            return _BeginResult(waiting_on=None, registered_token=None, lock_acquired=True)
        while True:
            with self._mutex:
                inflight, inflight_token = self._inflight, self._inflight_token
                if idempotency_token is None or inflight is None:
                    return self._acquire_locked(idempotency_token, key, fingerprint)
            # The user's __eq__ runs outside the mutex: it may be slow, raise, or even call back into the agent.
            is_duplicate = _tokens_match(idempotency_token, inflight_token)
            with self._mutex:
                if self._inflight is not inflight:
                    # The invocation we compared against ended (or was replaced) meanwhile: decide again.
                    continue
                if is_duplicate:
                    return _BeginResult(waiting_on=inflight, registered_token=None, lock_acquired=False)
                return self._acquire_locked(idempotency_token, key, fingerprint)

    def _acquire_locked(self, idempotency_token: Any, key: str | None, fingerprint: str | None) -> _BeginResult:
        """Take the lock and register the token as in flight; the caller holds ``_mutex``."""
        if self._busy:
            return _BeginResult(waiting_on=None, registered_token=None, lock_acquired=False)
        self._busy = True
        if idempotency_token is not None:
            self._inflight_token = idempotency_token
            self._inflight = _InflightInvocation(self._max_buffered_events, key=key, fingerprint=fingerprint)
        return _BeginResult(
            waiting_on=None, registered_token=idempotency_token, lock_acquired=True, registered=self._inflight
        )

    def publish(self, registered_token: Any, result: AgentResult) -> None:
        """Wake the duplicates with the primary's result while the primary still holds the agent.

        The primary calls this as soon as its result exists, before its own stream has finished: a consumer that
        is slow to drain (or never closes) the primary's stream cannot delay the duplicates. The token stays
        registered, so a retry arriving now still joins and gets the result at once. ``complete`` follows later.

        Args:
            registered_token: The token ``begin`` registered for this primary.
            result: The primary's result.
        """
        with self._mutex:
            inflight = self._inflight if self._inflight_token is registered_token else None
        if inflight is not None:
            inflight.settle(result, None)

    def complete(
        self,
        registered_token: Any,
        *,
        result: AgentResult | None = None,
        error: BaseException | None = None,
    ) -> None:
        """End the primary registered under ``registered_token``: forget the token, free the lock, settle waiters.

        With neither ``result`` nor ``error`` the waiters get ``IdempotencyAbortedError``. If ``publish`` already
        settled the invocation, that outcome stands (first wins). A no-op for None or for a token that is not the
        one in flight; call it once per primary.

        Args:
            registered_token: ``_BeginResult.registered_token`` of the primary (the very object; compared by
                identity).
            result: The primary's result, if it produced one.
            error: The primary's exception, if it raised one.
        """
        if registered_token is None:
            return
        with self._mutex:
            inflight = self._inflight
            if inflight is None or self._inflight_token is not registered_token:
                return
            self._inflight = None
            self._inflight_token = None
            self._busy = False
        inflight.settle(result, error)

    def try_acquire_lock(self) -> bool:
        """Take the invocation lock without a token, if it is free. Never blocks.

        Returns:
            Whether the lock was taken; release it with ``release_lock()``.
        """
        with self._mutex:
            if self._busy:
                return False
            self._busy = True
            return True

    def release_lock(self) -> None:
        """Release a lock taken without a token (``begin(None)`` or ``try_acquire_lock``). Safe to call always.

        A lock held by a registered token is released only by ``complete`` for that token, so a stray call here can
        never free an invocation that is still running under a token.
        """
        with self._mutex:
            if self._inflight is None:
                self._busy = False
