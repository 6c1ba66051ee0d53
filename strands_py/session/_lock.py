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
from collections import deque
from typing import Any

from ..idempotency._durable import _store, claim_or_hand_back
from ..idempotency._identity import _PerObject
from ..idempotency.base import IdempotencyStore
from ..idempotency.record import IdempotencyRecord, RecordState
from ..types.exceptions import SessionBusyError
from ..types.session import SessionInvocationMode

logger = logging.getLogger(__name__)

_POLL_FIRST_SECONDS = 0.02
_POLL_MAX_SECONDS = 1.0
# The checkpoint of a turn without a token that ended and counts: neither "messages" nor "pending".
_COMMITTED = json.dumps({"v": 1, "token": None, "committed": True}, separators=(",", ":"))


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


# Per store object, by identity (a user's store may be unhashable).
_lines: _PerObject[dict[str, _Line]] = _PerObject()
_lines_mutex = threading.Lock()


def _join(store: IdempotencyStore, key: str) -> _Ticket:
    ticket = _Ticket()
    with _lines_mutex:
        line = _lines.setdefault(store, dict).setdefault(key, _Line())
        line.tickets.append(ticket)
        first = line.tickets[0] is ticket
    if first:
        ticket.turn.set_result(None)
    return ticket


def _leave(store: IdempotencyStore, key: str, ticket: _Ticket) -> None:
    while True:
        with _lines_mutex:
            lines = _lines.get(store)
            line = lines.get(key) if lines is not None else None
            if lines is None or line is None or ticket not in line.tickets:
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
        lines = _lines.get(store)
        return lines is not None and key in lines


def _document(checkpoint: str | None) -> dict[str, Any]:
    """A lock record's checkpoint as a JSON object (empty when absent or malformed)."""
    try:
        document = json.loads(checkpoint or "{}")
    except ValueError:
        return {}
    return document if isinstance(document, dict) else {}


def _token_of_checkpoint(checkpoint: str) -> str | None:
    """The token key a lock checkpoint names, if any."""
    token = _document(checkpoint).get("token")
    return token if isinstance(token, str) else None


def _token_of(record: IdempotencyRecord) -> str | None:
    """The token key a lock record names, if any."""
    return _token_of_checkpoint(record.checkpoint or "")


def _unfinished_turn(record: IdempotencyRecord) -> dict[str, str] | None:
    """The turn a lock record says may need rolling back: ``{"owner", "checkpoint"}``, or None.

    Its own turn if its holder got as far as checkpointing the conversation (and so may have written to it);
    otherwise the dead turn it took over and had not rolled back yet (``pending``), carried from holder to holder
    until someone rolls it back.
    """
    document = _document(record.checkpoint)
    if "messages" in document and record.checkpoint is not None:
        return {"owner": record.owner, "checkpoint": record.checkpoint}
    pending = document.get("pending")
    if (
        isinstance(pending, dict)
        and isinstance(pending.get("owner"), str)
        and isinstance(pending.get("checkpoint"), str)
    ):
        return {"owner": pending["owner"], "checkpoint": pending["checkpoint"]}
    return None


class SessionLock:
    """The lock of one session in one store; one instance per turn.

    Thread-safety: any thread and loop. Cancellation: a cancelled ``acquire`` leaves the line and holds nothing (a
    claim that may still land is handed back once it has: see ``claim_or_hand_back``).
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
    ) -> dict[str, str] | None:
        """Take the lock, waiting per ``mode``.

        The lock record names the turn's token (``token_key``) from the start. A lock held under the caller's own
        token is a dead run of the very same request (the caller holds the token's claim, so that run lost it): the
        caller waits for its lease to lapse even in THROW mode, since that is no other request.

        Returns:
            The turn a holder whose lease lapsed left unfinished (``{"owner", "checkpoint"}``: to be rolled back
            unless that owner stored its token's result), or None. Until this lock's holder writes a checkpoint of
            its own, the lock record carries that turn forward, so a holder that fails before rolling it back
            leaves it to the next one.

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
                    # asyncio.timeout, not wait_for (which on Python 3.11 can swallow our caller's cancellation).
                    async with asyncio.timeout(remaining):
                        await asyncio.shield(ticket.turn)
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

    async def _try(self, token_key: str | None) -> tuple[IdempotencyRecord | None, dict[str, str] | None]:
        """One attempt: (the live holder, None) if busy; (None, the unfinished turn to roll back or None) if taken."""
        now = time.time()
        current = await _store(self.store.get(self.key))
        if current is not None and current.is_live(now) and current.owner != self.owner:
            return current, None
        unfinished = None
        if current is not None and current.state is RecordState.IN_PROGRESS:
            # A lapsed holder (or our own claim, retried): keep what it left unfinished in the record we write, so
            # that the dead turn's checkpoint is never lost before someone has rolled it back.
            unfinished = _unfinished_turn(current)
        document: dict[str, Any] = {"v": 1, "token": token_key}
        if unfinished is not None:
            document["pending"] = unfinished
        self.claimed_at = time.monotonic()
        record = IdempotencyRecord(
            key=self.key,
            state=RecordState.IN_PROGRESS,
            owner=self.owner,
            lease_expires_at=now + self.lease_seconds,
            expires_at=now + self.lease_seconds + self.expires_after_seconds,
            checkpoint=json.dumps(document, separators=(",", ":")),
        )
        existing = await claim_or_hand_back(self.store, record, now, lambda: self._hand_back(record))
        if existing is not None and existing.owner != self.owner:
            return existing, None
        if existing is not None:
            # Our own earlier claim (its response was lost): it carries what we must roll back.
            unfinished = _unfinished_turn(existing)
        if unfinished is not None:
            logger.debug("key=<%s> | took over a session lock whose holder left a turn unfinished", self.key)
        return None, unfinished

    async def _hand_back(self, record: IdempotencyRecord) -> None:
        """Give up a lock record we will not use; never raises. One carrying an unfinished turn is only expired."""
        await (self.expire() if _unfinished_turn(record) is not None else self.release())

    async def mark_committed(self) -> bool:
        """End our lease and mark the record's turn as one that counts (nothing to roll back), in one fenced write.

        Returns:
            False if the lock is no longer ours.

        Raises:
            IdempotencyStoreError: The store failed.
        """
        return await _store(self.store.renew(self.key, self.owner, time.time(), _COMMITTED))

    async def expire(self) -> None:
        """End our lease now but keep the record (and the unfinished turn it names) for the next holder to roll back.

        Fenced like ``release``; never raises (on failure the lease lapses by itself).
        """
        try:
            await _store(self.store.renew(self.key, self.owner, time.time()))
        except Exception:
            logger.exception(
                "key=<%s> | could not expire the session lock; it frees itself when its lease lapses", self.key
            )
        finally:
            ticket, self._ticket = self._ticket, None
            if ticket is not None:
                _leave(self.store, self.key, ticket)

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
