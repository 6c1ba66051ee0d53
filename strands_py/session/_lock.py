"""The session lock: one turn of a conversation at a time, on every host that shares the idempotency store.

The lock is a record in the idempotency store (an ``IN_PROGRESS`` claim under the session's key), taken with the
store's atomic ``claim``, kept alive by a heartbeat, and handed back with the fenced ``release``. A holder that dies
leaves its record behind; a waiter takes it over only after seeing the same version of it for a whole lease on its
own monotonic clock (no wall clock decides: see ``idempotency/_heartbeat.py``).

Taking over is where a conversation can be lost, so it is done in one order. The waiter first *judges* the dead
holder's turn from the record it read: the turn counts if its token's result was stored by that holder; otherwise it
must be rolled back, and if the holder still owns its token's claim, that claim is revoked first (replaced, by a
compare-and-set on its version, with a yielded claim of no living owner, which keeps its journal for the retry), so a
holder that was only paused can never store its result after its turn was judged void. Then the waiter replaces
exactly the record it judged (``take_over``, a compare-and-set on its version), carrying the verdict in its own
record ("pending": the checkpoint to roll back to) until it has rolled back, or starts over if the record changed.
A verdict is therefore made once, from one read, and never depends on records that may have expired since.

Within one process, callers waiting for the same session line up in arrival order and hold no thread: only the head
of the line polls the store (capped backoff, waking when the holder's lease could have lapsed); the others wait on a
future of their own loop until the head is served. Across processes the store decides, by polling.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any

from ..idempotency._calls import _store, claim_or_hand_back
from ..idempotency._heartbeat import LeaseWatch
from ..idempotency.base import IdempotencyStore
from ..idempotency.record import IdempotencyRecord, RecordState, new_version
from ..types.exceptions import IdempotencyStoreError, SessionBusyError
from ..types.session import SessionInvocationMode
from ._checkpoint import COMMITTED, pending_of, read_checkpoint, token_of
from ._line import Ticket, busy, join, leave

logger = logging.getLogger(__name__)

_POLL_FIRST_SECONDS = 0.02
_POLL_MAX_SECONDS = 1.0
# A token's record is read again after a revocation that was fenced off (the token changed meanwhile): at most this
# many times, since the only change that fences it off is its owner completing it, after which it no longer changes.
_JUDGE_ATTEMPTS = 3
# The send time of a record of ours whose write we do not know (none should be): its lease counts as long over.
_NEVER = float("-inf")


def _waited_in_vain(wait_timeout_seconds: float | None) -> SessionBusyError:
    return SessionBusyError(f"waited {wait_timeout_seconds}s for the session, in vain")


class _Attempt:
    """What one attempt at the lock found.

    Taken (and the turn to roll back), held (and how long until it may be judged abandoned), or neither: the record
    changed under our judgement, so the caller starts over from a fresh read.
    """

    __slots__ = ("held", "pending", "taken", "wait")

    def __init__(
        self,
        *,
        taken: bool = False,
        pending: dict[str, str] | None = None,
        held: IdempotencyRecord | None = None,
        wait: float = 0.0,
    ) -> None:
        self.taken = taken
        self.pending = pending
        self.held = held
        self.wait = wait


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
        # When each record this lock wrote was sent (monotonic), by version: a record of ours met again is held from
        # its own send, whichever attempt wrote it.
        self._sent: dict[str, float] = {}
        self._ticket: Ticket | None = None

    async def acquire(
        self,
        mode: SessionInvocationMode,
        wait_timeout_seconds: float | None,
        token_key: str | None = None,
        watch: LeaseWatch | None = None,
        stop: Callable[[], BaseException | None] | None = None,
    ) -> dict[str, str] | None:
        """Take the lock, waiting per ``mode``.

        The lock record names the turn's token (``token_key``) from the start. A lock held under the caller's own
        token is a dead run of the very same request (the caller holds the token's claim, so that run lost it): the
        caller waits for it to be judged abandoned even in THROW mode, since that is no other request.

        Returns:
            The turn a dead holder left unfinished and that does not count (``{"owner", "checkpoint"}``: to be
            rolled back), or None. Until this lock's holder writes a checkpoint of its own, the lock record carries
            that verdict forward, so a holder that fails before rolling back leaves it to the next one.

        ``watch``: the caller's judgement of the lock's holder so far, if it watched the lock before calling.
        ``stop``: checked while waiting: an error it returns (the caller's token claim lost, or cancelled) ends the
        wait with that error, instead of waiting for a session the caller can no longer use.

        Raises:
            SessionBusyError: Another request holds the session (at once in THROW mode; after
                ``wait_timeout_seconds`` in ENQUEUE mode).
            IdempotencyStoreError: The store failed.
        """
        started = time.monotonic()
        if mode is SessionInvocationMode.THROW and busy(self.store, self.key):
            raise SessionBusyError("another request of this process is running a turn of this session")
        ticket = self._ticket = join(self.store, self.key)
        watch = watch if watch is not None else LeaseWatch()
        acquired = False
        try:
            delay = _POLL_FIRST_SECONDS
            while True:
                remaining = (
                    None if wait_timeout_seconds is None else wait_timeout_seconds - (time.monotonic() - started)
                )
                stopped = stop() if stop is not None else None
                if stopped is not None:
                    raise stopped
                if not ticket.turn.done():
                    if mode is SessionInvocationMode.THROW:
                        raise SessionBusyError("another request is running a turn of this session")
                    if remaining is not None and remaining <= 0:
                        raise _waited_in_vain(wait_timeout_seconds)
                    # asyncio.wait: cancels nothing on a timeout, so it never swallows our caller's cancellation (as
                    # wait_for can on 3.10 and 3.11), and exists on every supported Python (asyncio.timeout: 3.11+).
                    wait = remaining if stop is None else min(remaining or _POLL_MAX_SECONDS, _POLL_MAX_SECONDS)
                    await asyncio.wait([ticket.turn], timeout=wait)
                    continue
                attempt = await self._try(token_key, watch)
                if attempt.taken:
                    acquired = True
                    return attempt.pending
                held = attempt.held
                if held is None:
                    continue  # the record changed under our judgement: start over from a fresh read
                same_request = token_key is not None and token_of(held) == token_key
                if mode is SessionInvocationMode.THROW and not same_request:
                    raise SessionBusyError("another request is running a turn of this session")
                if remaining is not None and remaining <= 0:
                    raise _waited_in_vain(wait_timeout_seconds)
                pause = random.uniform(delay / 2, delay)
                # Wake when the holder could be judged gone (a crashed holder), not a whole backoff step later.
                pause = min(pause, attempt.wait + 0.01)
                if remaining is not None:
                    pause = min(pause, remaining)
                await asyncio.sleep(pause)
                delay = min(delay * 2, _POLL_MAX_SECONDS)
        finally:
            if not acquired:
                leave(self.store, self.key, ticket)
                self._ticket = None

    async def _try(self, token_key: str | None, watch: LeaseWatch) -> _Attempt:
        """One attempt at the lock: see ``_Attempt``."""
        current = await _store(self.store.get(self.key))
        read_at = time.monotonic()
        if current is None:
            record = self._record(token_key, None)
            existing = await claim_or_hand_back(
                self.store.claim(record, time.time()),
                lambda existing: existing is None or existing.owner == self.owner,
                lambda: self._hand_back(record),
            )
            if existing is None:
                return _Attempt(taken=True)
            current, read_at = existing, time.monotonic()
        if current.owner == self.owner and current.state is RecordState.IN_PROGRESS:
            # Our own earlier write (its answer was lost: redis-py and botocore send a write again after a dropped
            # connection, and the retry meets the write itself): it carries the verdict we wrote into it, if any. Our
            # lease counts from when that write was sent, not from now: a waiter may have watched its version since
            # it landed, and may take it over a lease after that, however late its answer reached us.
            self.claimed_at = self._sent.get(current.version, _NEVER)
            return _Attempt(taken=True, pending=pending_of(current))
        wait = watch.remaining(current, read_at)
        if wait > 0:
            return _Attempt(held=current, wait=wait)
        pending = await self._judge(current)
        record = self._record(token_key, pending)
        won = await claim_or_hand_back(
            self.store.take_over(record, current.version), lambda won: won, lambda: self._hand_back(record)
        )
        if not won:
            return _Attempt()
        if pending is not None:
            logger.debug("key=<%s> | took over a session lock whose holder left a turn that does not count", self.key)
        return _Attempt(taken=True, pending=pending)

    def _record(self, token_key: str | None, pending: dict[str, str] | None) -> IdempotencyRecord:
        """Our lock record, naming our token and carrying the verdict on the turn we took over."""
        document: dict[str, Any] = {"v": 1, "token": token_key}
        if pending is not None:
            document["pending"] = pending
        now = time.time()
        version = new_version()
        self.claimed_at = self._sent[version] = time.monotonic()
        return IdempotencyRecord(
            key=self.key,
            state=RecordState.IN_PROGRESS,
            owner=self.owner,
            version=version,
            lease_seconds=self.lease_seconds,
            expires_at=now + self.lease_seconds + self.expires_after_seconds,
            checkpoint=json.dumps(document, separators=(",", ":")),
        )

    async def _judge(self, dead: IdempotencyRecord) -> dict[str, str] | None:
        """The verdict on the turn of the lock record ``dead`` (abandoned or yielded): the turn to roll back, or None.

        A verdict the record already carries (its holder took over a turn and died before rolling it back) stands.
        Otherwise the holder's own turn: nothing to do if it never checkpointed (it wrote nothing) or marked it
        committed; a turn without a token does not count; a turn with a token counts exactly when its holder stored
        the token's result. A result that is absent was never stored: a completed token record outlives every lock
        record that names it (see ``SessionTurn``), so it cannot have expired while this record stands.
        """
        carried = pending_of(dead)
        if carried is not None:
            return carried
        document = read_checkpoint(dead.checkpoint)
        if "messages" not in document or dead.checkpoint is None:
            return None
        turn = {"owner": dead.owner, "checkpoint": dead.checkpoint}
        token_key = document.get("token")
        if not isinstance(token_key, str) or not token_key:
            return turn
        for _ in range(_JUDGE_ATTEMPTS):
            token = await _store(self.store.get(token_key))
            if token is None or token.owner != dead.owner:
                # Never stored, or released, or claimed by someone else since: its owner can no longer complete it.
                return turn
            if token.state is RecordState.COMPLETED:
                return None
            # Its owner still holds the token's claim: it may be paused rather than dead. Revoke the claim before
            # judging the turn void, so its result can never land after we roll the turn back: replace exactly that
            # claim with a yielded one of no living owner. Not a release: the claim's journal stays for the retry,
            # which takes the yielded claim over at once and resumes from it.
            revoked = dataclasses.replace(
                token, owner=f"revoked-{self.owner}", version=new_version(), lease_seconds=0.0
            )
            if await _store(self.store.take_over(revoked, token.version)):
                logger.debug("key=<%s> | revoked the dead holder's token claim", self.key)
                return turn
        raise IdempotencyStoreError("the dead session holder's token record kept changing while it was judged")

    async def _hand_back(self, record: IdempotencyRecord) -> None:
        """Give up a lock record we will not use; never raises. One carrying a verdict is only yielded."""
        await (self.expire() if pending_of(record) is not None else self.release())

    async def mark_committed(self) -> bool:
        """Yield the lock, marking the record's turn as one that counts (nothing to roll back), in one fenced write.

        Returns:
            False if the lock is no longer ours.

        Raises:
            IdempotencyStoreError: The store failed.
        """
        return await _store(self._renew(lease_seconds=0.0, checkpoint=COMMITTED))

    def _renew(self, *, lease_seconds: float, checkpoint: str | None) -> Awaitable[bool]:
        return self.store.renew(
            self.key,
            self.owner,
            version=new_version(),
            lease_seconds=lease_seconds,
            expires_at=time.time() + self.lease_seconds + self.expires_after_seconds,
            checkpoint=checkpoint,
        )

    async def expire(self) -> None:
        """Yield the lock but keep the record (and the turn it names) for the next holder to judge, at once.

        Fenced like ``release``; never raises (on failure, the record is taken over after a lease).
        """
        try:
            await _store(self._renew(lease_seconds=0.0, checkpoint=None))
        except Exception:
            logger.exception("key=<%s> | could not yield the session lock; it is taken over after a lease", self.key)
        finally:
            ticket, self._ticket = self._ticket, None
            if ticket is not None:
                leave(self.store, self.key, ticket)

    def abandon(self) -> None:
        """Leave the line without touching the store: the record stays until taken over."""
        ticket, self._ticket = self._ticket, None
        if ticket is not None:
            leave(self.store, self.key, ticket)

    async def release(self) -> None:
        """Hand the lock back (fenced: a lock taken over meanwhile is not touched), and serve the next in line."""
        try:
            await _store(self.store.release(self.key, self.owner))
        except Exception:
            logger.exception("key=<%s> | could not release the session lock; it is taken over after a lease", self.key)
        finally:
            ticket, self._ticket = self._ticket, None
            if ticket is not None:
                leave(self.store, self.key, ticket)
