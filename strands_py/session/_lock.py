"""The session lock: one turn of a conversation at a time, on every host that shares the idempotency store.

The lock is a record in the idempotency store (an ``IN_PROGRESS`` claim under the session's key), taken with the
store's atomic ``claim``, kept alive by a heartbeat, and handed back with the fenced ``release``. A holder that dies
leaves its record behind until its lease lapses; whoever takes the lock over then reads it (its checkpoint says where
the dead turn began).

Within one process, callers waiting for the same session line up in arrival order and hold no thread: only the head
of the line polls the store (capped backoff, waking when the holder's lease lapses); the others wait on a future of
their own loop until the head is served. Across processes the store decides, by polling.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import threading
import time
import weakref
from collections import deque

from ..idempotency._durable import _store
from ..idempotency.base import IdempotencyStore
from ..idempotency.record import IdempotencyRecord, RecordState
from ..types.exceptions import SessionBusyError
from ..types.session import SessionInvocationMode

logger = logging.getLogger(__name__)

_POLL_FIRST_SECONDS = 0.02
_POLL_MAX_SECONDS = 1.0


class _Ticket:
    __slots__ = ("loop", "turn")

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.turn: asyncio.Future[None] = self.loop.create_future()


def _serve(ticket: _Ticket) -> None:
    """Tell ``ticket`` it is at the head of the line; runs on the ticket's loop."""
    if not ticket.turn.done():
        ticket.turn.set_result(None)


class _Line:
    """Callers of one process waiting for one session, in arrival order.

    Thread-safety: every method runs under the module's ``_lines_mutex``, which also guards the map of lines, so a
    line is dropped from the map exactly when it empties and a caller never joins a line that was dropped.
    """

    __slots__ = ("tickets",)

    def __init__(self) -> None:
        self.tickets: deque[_Ticket] = deque()


_lines: weakref.WeakKeyDictionary[IdempotencyStore, dict[str, _Line]] = weakref.WeakKeyDictionary()
_lines_mutex = threading.Lock()


def _join(store: IdempotencyStore, key: str) -> _Ticket:
    ticket = _Ticket()
    with _lines_mutex:
        line = _lines.setdefault(store, {}).setdefault(key, _Line())
        line.tickets.append(ticket)
        first = line.tickets[0] is ticket
    if first:
        ticket.turn.set_result(None)
    return ticket


def _leave(store: IdempotencyStore, key: str, ticket: _Ticket) -> None:
    while True:
        with _lines_mutex:
            lines = _lines.get(store, {})
            line = lines.get(key)
            if line is None or ticket not in line.tickets:
                return
            was_head = line.tickets[0] is ticket
            line.tickets.remove(ticket)
            head = line.tickets[0] if was_head and line.tickets else None
            if not line.tickets:
                del lines[key]
        if head is None:
            return
        try:
            head.loop.call_soon_threadsafe(_serve, head)
            return
        except RuntimeError:
            # That caller's loop is gone, and the caller with it: serve the one after it.
            ticket = head


def _busy(store: IdempotencyStore, key: str) -> bool:
    with _lines_mutex:
        return key in _lines.get(store, {})


def _token_of(record: IdempotencyRecord) -> str | None:
    """The token key a lock record names, if any."""
    try:
        document = json.loads(record.checkpoint or "{}")
    except ValueError:
        return None
    token = document.get("token") if isinstance(document, dict) else None
    return token if isinstance(token, str) else None


class SessionLock:
    """The lock of one session in one store; one instance per turn.

    Thread-safety: any thread and loop. Cancellation: a cancelled ``acquire`` leaves the line and holds nothing
    (a claim that may still land is handed back by the store-level claim's own cleanup once its lease lapses).
    """

    def __init__(
        self,
        store: IdempotencyStore,
        key: str,
        owner: str,
        *,
        lease_seconds: float,
        expires_after_seconds: float,
    ) -> None:
        """Create the lock ``key`` for ``owner``."""
        self.store = store
        self.key = key
        self.owner = owner
        self.lease_seconds = lease_seconds
        self.expires_after_seconds = expires_after_seconds
        self.claimed_at = 0.0
        self._ticket: _Ticket | None = None

    async def acquire(
        self, mode: SessionInvocationMode, wait_timeout_seconds: float | None, token_key: str | None = None
    ) -> IdempotencyRecord | None:
        """Take the lock, waiting per ``mode``.

        The lock record names the turn's token (``token_key``) from the start. A lock held under the caller's own
        token is a dead run of the very same request (the caller holds the token's claim, so that run lost it): the
        caller waits for its lease to lapse even in THROW mode, since that is no other request.

        Returns:
            The record of a holder whose lease had lapsed (a crashed turn, to be rolled back), or None.

        Raises:
            SessionBusyError: Another request holds the session (at once in THROW mode; after
                ``wait_timeout_seconds`` in ENQUEUE mode).
            IdempotencyStoreError: The store failed.
        """
        started = time.monotonic()
        if mode is SessionInvocationMode.THROW and _busy(self.store, self.key):
            raise SessionBusyError("another request of this process is running a turn of this session")
        ticket = self._ticket = _join(self.store, self.key)
        acquired = False
        try:
            delay = _POLL_FIRST_SECONDS
            while True:
                remaining = (
                    None if wait_timeout_seconds is None else wait_timeout_seconds - (time.monotonic() - started)
                )
                if not ticket.turn.done():
                    if mode is SessionInvocationMode.THROW or (remaining is not None and remaining <= 0):
                        raise SessionBusyError("another request is running a turn of this session")
                    await asyncio.wait_for(asyncio.shield(ticket.turn), remaining)
                    continue
                held, previous = await self._try(token_key)
                if held is None:
                    acquired = True
                    return previous
                same_request = token_key is not None and _token_of(held) == token_key
                if (mode is SessionInvocationMode.THROW and not same_request) or (
                    remaining is not None and remaining <= 0
                ):
                    raise SessionBusyError("another request is running a turn of this session")
                pause = random.uniform(delay / 2, delay)
                # Wake when the holder's lease lapses (a crashed holder), not a whole backoff step later.
                pause = min(pause, max(0.0, held.lease_expires_at - time.time() + 0.01))
                if remaining is not None:
                    pause = min(pause, remaining)
                await asyncio.sleep(pause)
                delay = min(delay * 2, _POLL_MAX_SECONDS)
        except asyncio.TimeoutError:
            raise SessionBusyError(f"waited {wait_timeout_seconds}s for the session, in vain") from None
        finally:
            if not acquired:
                _leave(self.store, self.key, ticket)
                self._ticket = None

    async def _try(self, token_key: str | None) -> tuple[IdempotencyRecord | None, IdempotencyRecord | None]:
        """One attempt: (the live holder, None) if busy; (None, the lapsed holder's record or None) if taken."""
        now = time.time()
        current = await _store(self.store.get(self.key))
        if current is not None and current.is_live(now) and current.owner != self.owner:
            return current, None
        self.claimed_at = time.monotonic()
        record = IdempotencyRecord(
            key=self.key,
            state=RecordState.IN_PROGRESS,
            owner=self.owner,
            lease_expires_at=now + self.lease_seconds,
            expires_at=now + self.lease_seconds + self.expires_after_seconds,
            checkpoint=json.dumps({"v": 1, "token": token_key}, separators=(",", ":")),
        )
        existing = await _store(self.store.claim(record, now))
        if existing is not None and existing.owner != self.owner:
            return existing, None
        lapsed = current if current is not None and current.state is RecordState.IN_PROGRESS else None
        if lapsed is not None and lapsed.owner != self.owner:
            logger.debug("key=<%s> | took over a session lock whose holder's lease lapsed", self.key)
            return None, lapsed
        return None, None

    def abandon(self) -> None:
        """Leave the line without touching the store: the record stays until its lease lapses."""
        ticket, self._ticket = self._ticket, None
        if ticket is not None:
            _leave(self.store, self.key, ticket)

    async def release(self) -> None:
        """Hand the lock back (fenced: a lock taken over meanwhile is not touched), and serve the next in line."""
        try:
            await _store(self.store.release(self.key, self.owner))
        except Exception:
            logger.exception(
                "key=<%s> | could not release the session lock; it frees itself when its lease lapses", self.key
            )
        finally:
            ticket, self._ticket = self._ticket, None
            if ticket is not None:
                _leave(self.store, self.key, ticket)
