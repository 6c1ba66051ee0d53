"""One turn of a locked conversation: lock, re-read (or roll back a crashed turn), checkpoint, run, commit or undo.

The order is what makes a crash at any point leave one clean turn:

1. (durable) the token is claimed first, so a retry of the same request joins or replays and never queues;
2. the session lock is taken (or waited for); if its previous holder died mid-turn and that turn does not count
   (its token's result was not stored by it), the conversation is rolled back to the dead turn's checkpoint (the
   verdict is made by the lock: see ``_lock.py``); every deletion of that rollback first checks the lock's lease, so
   a holder paused between taking the lock and rolling back never deletes a turn the next holder wrote meanwhile;
3. the conversation is re-read under the lock, and the checkpoint (where it stands now) written into the lock record;
   the call is checked against the interrupts the conversation waits for (``_interrupts.py``): a call that does not
   fit them raises ``InterruptStateError`` here, before anything of it ran;
4. the agent runs; strands' session hooks persist the turn as it goes;
5. the lock's heartbeat stops (``seal``), the token's result is stored, and only then the lock is released. A crash
   between 5 and the release leaves a lock whose token is completed: the next holder keeps that turn. A crash before
   5 leaves a lock whose token is not completed: the next holder (any request, or the retry of this one) rolls the
   turn back.

Lifetimes are tied so that the verdict of step 2 never reads an expired record as "not stored": a lock record may
be collected ``lease_seconds + expires_after_seconds`` after its last write, and its heartbeat stops before the
token's result is written; that result is kept ``expires_after_seconds + 2 * lease_seconds`` (``RESULT_MARGIN``), so
it outlives the lock record that names it, on every store's clock.

A turn that ends without a stored result (failure, cancellation, abort) is rolled back before the lock is released,
so its retry starts from the same conversation.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from ..idempotency._calls import _store
from ..idempotency._heartbeat import LeaseWatch, _Lease
from ..idempotency.config import IdempotencyConfig
from ..idempotency.keys import session_lock_key
from ..idempotency.record import RecordState
from ..types.exceptions import IdempotencyLeaseLostError, InterruptStateError
from ..types.session import SessionInvocationMode
from ._conversation import _Conversation
from ._interrupts import check_interrupts
from ._lock import SessionLock

logger = logging.getLogger(__name__)

# The session manager's writes, fenced on the turn's leases while the turn runs.
_FENCED_WRITES = ("append_message", "sync_agent", "redact_latest_message")


class SessionTurn:
    """The session side of one invocation. Use ``begin``, then exactly one of ``commit`` / ``abort``.

    Thread-safety: one turn is driven by one task. Cancellation: ``begin`` cancelled while waiting holds nothing.
    """

    def __init__(
        self,
        agent: Any,
        config: IdempotencyConfig,
        scope: str,
        session_id: str,
        owner: str,
        on_lost: Callable[[IdempotencyLeaseLostError], None],
        *,
        prompt: Any = None,
    ) -> None:
        """Prepare the turn of ``agent`` in ``session_id`` for ``owner`` (the token claim's owner, if any).

        ``prompt`` is the call's, checked against the conversation's pending interrupts once it is read under the lock.
        """
        self.agent = agent
        self.prompt = prompt
        self.config = config
        self.key = session_lock_key(scope, session_id, config.hmac_key)
        self.conversation = _Conversation(agent)
        self.lock = SessionLock(
            config.store,
            self.key,
            owner,
            lease_seconds=config.lease_seconds,
            expires_after_seconds=config.expires_after_seconds,
        )
        self.lease: _Lease | None = None
        self.checkpoint: str | None = None
        # Watches the lock's holder from before ``begin`` (while the token's owner is waited for): see watch_lock.
        self._watch = LeaseWatch()
        self._on_lost = on_lost
        self._held = False
        self._fenced = False
        self._unfinished: dict[str, str] | None = None
        self._token_key: str | None = None
        self._closing = False
        # Set when ``begin`` refused the call (it does not fit the conversation's interrupts): nothing of it ran.
        self.refused: InterruptStateError | None = None

    async def begin(
        self,
        token_key: str | None,
        writable: Callable[[], bool] | None = None,
        stop: Callable[[], BaseException | None] | None = None,
    ) -> None:
        """Take the lock, roll back a crashed turn if there was one, re-read the conversation, write the checkpoint.

        From then until ``commit`` / ``abort``, the session manager writes only while this turn still holds its
        leases (the lock's, and whatever ``writable`` says, e.g. the token claim's): a primary that lost the session
        to another host can never write into the conversation that host now owns. ``stop``: see
        ``SessionLock.acquire`` (a turn whose token claim is lost or cancelled stops waiting for the session).

        Raises:
            SessionBusyError: The session is busy (per ``session_invocation_mode``).
            IdempotencyStoreError: The store failed.
            IdempotencyLeaseLostError: The lock was lost before the turn could start.
            InterruptStateError: The call does not fit the conversation's pending interrupts (see
                ``check_interrupts``); the lock is still held: the caller aborts the turn, which releases it.
        """
        config = self.config
        previous = await self.lock.acquire(
            SessionInvocationMode(config.session_invocation_mode),
            config.wait_timeout_seconds,
            token_key,
            self._watch,
            stop,
        )
        self._held = True
        self.lease = _Lease(
            config.store,
            self.key,
            self.lock.owner,
            config.lease_seconds,
            expires_after_seconds=config.expires_after_seconds,
            claimed_at=self.lock.claimed_at,
            on_lost=self._on_lost,
        )
        self.lease.start()
        # Until our own checkpoint replaces it below, the lock record carries the verdict on the dead turn: if
        # anything fails before then (the store, the rollback, this host), the next holder still rolls it back.
        self._unfinished = previous
        if previous is not None:
            logger.info("key=<%s> | the previous turn's owner died mid-turn, rolling the conversation back", self.key)
            # Checked before every write of the rollback, not only here: a holder paused between taking the lock and
            # rolling back (a stopped VM, a store answer slower than the lease) may resume after the next holder
            # rolled the same turn back and wrote its own turn at the very message ids this rollback deletes.
            self.conversation.rollback(previous["checkpoint"], self.check)
        else:
            self.conversation.reload()
        self._token_key = token_key
        checkpoint = self.conversation.checkpoint(token_key)
        await self.lease.renew_now(checkpoint)
        self._unfinished = None
        # The conversation as it stands now decides whether this call fits its interrupts (the agent may have been
        # built, or last used, before another turn answered them). A refused call leaves no checkpoint to roll back
        # to: nothing of it ran, and the abort that follows only releases the lock, writing nothing.
        try:
            check_interrupts(self.agent, self.prompt)
        except InterruptStateError as e:
            self.refused = e
            raise
        self.checkpoint = checkpoint
        self._fence_writes(writable)

    def _fence_writes(self, writable: Callable[[], bool] | None) -> None:
        manager = self.conversation.manager
        if manager is None:
            return
        turn = self

        def fenced(name: str) -> Callable[..., Any]:
            write = getattr(manager, name)

            def guarded(*args: Any, **kwargs: Any) -> Any:
                # strands' session hooks call these through the instance, so the guard sits in their path.
                turn.check()
                if writable is not None and not writable():
                    raise IdempotencyLeaseLostError(turn.key, "this turn lost its claim to another caller")
                return write(*args, **kwargs)

            return guarded

        for name in _FENCED_WRITES:
            setattr(manager, name, fenced(name))
        self._fenced = True

    def _unfence_writes(self) -> None:
        manager = self.conversation.manager
        if manager is None or not self._fenced:
            return
        self._fenced = False
        for name in _FENCED_WRITES:
            manager.__dict__.pop(name, None)

    async def watch_lock(self) -> None:
        """Read the lock's record into this turn's watch, before ``begin``; never raises.

        Called while the turn's token is held by another owner: a dead owner's token claim and session lock went
        silent together, so watching both at once judges both gone in one lease, not one after the other.
        """
        try:
            record = await _store(self.config.store.get(self.key))
        except Exception:  # noqa: BLE001 - only a head start: begin() reads the lock again anyway
            return
        if record is not None and record.state is RecordState.IN_PROGRESS:
            self._watch.remaining(record, time.monotonic())

    def check(self) -> None:
        """Raise ``IdempotencyLeaseLostError`` if the lock's lease is lost."""
        if self.lease is not None:
            self.lease.check()

    async def seal(self) -> None:
        """Stop the lock's heartbeat before the token's result is stored, and check the lock is still ours.

        From here the lock record is written only to be released (or yielded), so its lifetime is fixed before the
        result's begins: see the module docstring.

        Raises:
            IdempotencyLeaseLostError: The lock was lost.
        """
        if self.lease is not None:
            await self.lease.stop()
        self.check()

    async def commit(self) -> None:
        """The turn counts: release the lock (after the token's result was stored).

        A turn without a token has no record saying it counts but the lock's own: its lock record is marked
        committed (and its lease ended) in one fenced write, instead of being deleted, so a lost release can never
        make the next holder roll back a turn whose caller got its answer.

        Raises:
            IdempotencyStoreError: Without a token: the mark could not be written (the caller aborts the turn).
            IdempotencyLeaseLostError: Without a token: the lock was lost before the mark.
        """
        if not self._held or self._closing:
            return
        self._closing = True
        marked = False
        try:
            if self._token_key is None:
                if self.lease is not None:
                    await self.lease.stop()
                self.check()
                if not await self.lock.mark_committed():
                    raise IdempotencyLeaseLostError(self.key, "the session lock was taken over before the turn ended")
                marked = True
        except BaseException:
            self._closing = False  # the turn is not committed: the caller's abort rolls it back
            raise
        await self._finish(rollback=False, handed_back=marked)

    async def abort(self) -> None:
        """The turn does not count: roll the conversation back (if we still hold the lock), release the lock.

        A no-op once ``commit`` has started (it finishes even if its caller is cancelled meanwhile).
        """
        if self._closing:
            return
        await self._finish(rollback=True)

    async def suspend(self) -> None:
        """Leave the turn for the next holder to judge: whether it counts is unknown (its result may have landed).

        The lock record is kept and its lease ended; the next holder reads the token's record and keeps the turn or
        rolls it back.
        """
        if self._closing:
            return
        await self._finish(rollback=False, keep_record=True)

    async def _finish(self, *, rollback: bool, keep_record: bool = False, handed_back: bool = False) -> None:
        if not self._held:
            return
        self._held = False
        lease = self.lease
        # A turn taken over but not yet rolled back keeps its lock record: it names that turn for the next holder.
        release = self._unfinished is None and not keep_record
        self._unfence_writes()
        try:
            if lease is not None:
                await lease.stop()
            still_ours = lease is not None and lease.lost is None and not lease.expired_locally()
            if rollback and self.checkpoint is not None:
                if not still_ours:
                    # Not rolled back by us (our lease lapsed or was taken over): keep the record and its checkpoint
                    # (a fenced expire does nothing if the lock is someone else's), so the next holder rolls back.
                    release = False
                else:
                    try:
                        self.conversation.rollback(self.checkpoint, self.check)
                    except Exception:
                        # Keep the lock record (with its checkpoint) instead of deleting it: the next holder finds a
                        # turn whose token was not completed and rolls it back.
                        logger.exception("key=<%s> | could not roll back the turn; the next holder will", self.key)
                        release = False
        finally:
            if handed_back:
                self.lock.abandon()
            elif release:
                await self.lock.release()
            else:
                # Expired, not deleted: the next holder takes it over at once and decides about the turn.
                await self.lock.expire()
