"""Leases without clocks: an owner's heartbeat (``_Lease``), and a waiter's judgement of another owner (``LeaseWatch``).

Every renewal gives the record a new version. A waiter takes a record over only after it has seen the *same* version
for a whole ``lease_seconds`` on its own monotonic clock, and then with a compare-and-set on that version
(``IdempotencyStore.take_over``). The owner, for its part, counts its lease from when its last successful renewal was
*sent*, on its own monotonic clock. The renewal that wrote the version a waiter saw was sent before the waiter read it,
so the owner's lease always ends before the waiter's judgement does. No host ever compares its wall clock with
another's: a host whose clock runs minutes ahead or behind, or steps, takes over exactly as any other. What this
assumes is only that monotonic clocks advance at about the same rate everywhere (they do, to parts per million).

Under a pause (a VM or process stopped past its lease), the owner finds its lease expired locally when it resumes and
stops before doing more; its writes are fenced on its owner id anyway. A paused waiter resumes with a judgement that
the compare-and-set refuses if the owner renewed meanwhile.

While the primary runs, a task on its own event loop (no thread; started when the first renewal is due, so a short
run starts none) renews every ``lease_seconds / 3``, so a crashed owner is taken over about one lease after its last
renewal (plus one poll), and no invocation is too long for its lease. The lease is lost when a renewal is fenced off
(someone took the claim over) or when no renewal succeeded for a whole lease (the store is unreachable, or this process
was paused): the owner must then stop before doing more.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from ..types.exceptions import IdempotencyLeaseLostError, InvocationCancelledError
from ._calls import _store
from .base import IdempotencyStore
from .record import IdempotencyRecord, new_version

logger = logging.getLogger(__name__)

# A renewal that failed (not fenced: an error or a timeout) is retried this often, within the lease.
_RETRY_FRACTION = 0.1
_RETRY_MIN_SECONDS = 0.05


class _Lease:
    """One owner's lease on one key, renewed by a task on the owner's event loop.

    ``valid_until`` is kept on the monotonic clock, from when the last successful renewal was *sent* (the store
    may have applied it at any moment after that), so the local view never outlives the stored lease.

    Thread-safety: use from the owner's event loop only. Cancellation: ``stop()`` cancels and awaits the renewal
    task; nothing is left running after it returns.
    """

    def __init__(
        self,
        store: IdempotencyStore,
        key: str,
        owner: str,
        lease_seconds: float,
        *,
        expires_after_seconds: float,
        claimed_at: float,
        on_lost: Callable[[IdempotencyLeaseLostError], None] | None = None,
    ) -> None:
        """Create a lease that was taken at ``claimed_at`` (``time.monotonic()`` before the claim was sent).

        Args:
            store: The store holding the claim.
            key: The claimed key.
            owner: The claim's owner id.
            lease_seconds: Length of the lease; renewals every third of it.
            expires_after_seconds: How long after each renewal the store may collect the record if it hears no more.
            claimed_at: Monotonic time the claim was sent.
            on_lost: Called once, on the loop, when the lease is lost (e.g. to cancel the run).
        """
        self.store = store
        self.key = key
        self.owner = owner
        self.lease_seconds = lease_seconds
        self.expires_after_seconds = expires_after_seconds
        self.valid_until = claimed_at + lease_seconds
        self.lost: IdempotencyLeaseLostError | None = None
        self.renewals = 0
        self._on_lost = on_lost
        self._task: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._first_due = 0.0
        self._renewals: Callable[[], Coroutine[Any, Any, None]] = self._renew_forever
        self._stopping = False

    def start(self) -> None:
        """Start renewing on the running loop: the first renewal a third of a lease from now."""
        if self._task is None and self._timer is None:
            self._stopping = False
            interval = self.lease_seconds / 3
            self._first_due = time.monotonic() + interval
            self._renewals = self._renew_forever  # the heartbeat as it is at the start, even if it starts later
            # The renewal task is started only when the first renewal is due: most runs end before it, and a task
            # started and cancelled for each of them would cost more than the rest of the run's bookkeeping.
            self._timer = asyncio.get_running_loop().call_later(interval, self._begin)

    def _begin(self) -> None:
        self._timer = None
        if not self._stopping and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._renewals(), name="strands-py-heartbeat")

    async def stop(self) -> None:
        """Stop renewing; returns once the renewal task (if it started) has ended. Safe to call several times."""
        timer, self._timer = self._timer, None
        if timer is not None:
            timer.cancel()
        task, self._task = self._task, None
        if task is None or task.done():
            return
        self._stopping = True
        task.cancel()
        # If our own caller is cancelled meanwhile, that propagates; the renewal task is cancelled regardless (and
        # ``_stopping`` ends it at its next step even if a library swallowed the cancellation).
        await asyncio.wait([task])

    def expired_locally(self) -> bool:
        """Whether no renewal has succeeded for a whole lease (the stored claim may already be someone else's)."""
        return time.monotonic() >= self.valid_until

    def check(self) -> None:
        """Raise ``IdempotencyLeaseLostError`` if the lease is lost, or has expired without a renewal."""
        if self.lost is None and self.expired_locally():
            self._lose("no renewal succeeded for a whole lease")
        if self.lost is not None:
            raise self.lost

    async def renew_now(self, checkpoint: str | None = None) -> None:
        """Renew once, now, optionally attaching ``checkpoint`` to the claim; raise if the lease is lost.

        Raises:
            IdempotencyLeaseLostError: The renewal was fenced off, or the lease had already expired.
            IdempotencyStoreError: The store failed (the lease is not lost by that alone).
        """
        self.check()
        sent = time.monotonic()
        if not await _store(self._renew(self.lease_seconds, checkpoint)):
            await self._fenced_off()
            self.check()
        self._renewed(sent)

    def _renew(self, lease_seconds: float, checkpoint: str | None) -> Awaitable[bool]:
        """One renewal: a new version, the lease, and the collection horizon moved past it."""
        return self.store.renew(
            self.key,
            self.owner,
            version=new_version(),
            lease_seconds=lease_seconds,
            expires_at=time.time() + self.lease_seconds + self.expires_after_seconds,
            checkpoint=checkpoint,
        )

    def _renewed(self, sent: float) -> None:
        self.renewals += 1
        self.valid_until = max(self.valid_until, sent + self.lease_seconds)

    def _lose(self, reason: str, *, cancelled: bool = False) -> None:
        if self.lost is not None:
            return
        if cancelled:
            logger.info("key=<%s> | invocation cancelled: stopping", self.key)
            self.lost = InvocationCancelledError(self.key, reason)
        else:
            logger.warning("key=<%s> | lease lost: %s", self.key, reason)
            self.lost = IdempotencyLeaseLostError(self.key, reason)
        if self._on_lost is not None:
            self._on_lost(self.lost)

    async def _fenced_off(self) -> None:
        """A renewal was refused: the claim was taken over, or is ours but marked cancelled. Lose it either way."""
        if await was_cancelled(self.store, self.key, self.owner):
            self._lose("the invocation was cancelled", cancelled=True)
        else:
            self._lose("the renewal was fenced off: another caller took the claim over")

    @property
    def cancelled(self) -> bool:
        """Whether the lease was lost to a cancel (the owner leaves a ``CANCELLED`` tombstone, not a yielded claim)."""
        return isinstance(self.lost, InvocationCancelledError)

    async def _renew_forever(self) -> None:
        interval = self.lease_seconds / 3
        delay = max(0.0, self._first_due - time.monotonic())
        while not self._stopping:
            await asyncio.sleep(delay)
            remaining = self.valid_until - time.monotonic()
            if remaining <= 0:
                self._lose("no renewal succeeded for a whole lease")
                return
            sent = time.monotonic()
            renewal = asyncio.ensure_future(self._renew(self.lease_seconds, None))
            try:
                # asyncio.wait, not wait_for: wait_for can swallow the cancellation of ``stop()`` when it arrives as
                # the renewal completes (3.10, 3.11), and the heartbeat would go on (and ``stop()`` wait) forever;
                # asyncio.timeout does not exist on 3.10. A renewal still running at the deadline is abandoned.
                await asyncio.wait([renewal], timeout=remaining)
                if not renewal.done():
                    raise TimeoutError(f"renewal took longer than the {remaining:.3f}s left of the lease")
                renewed = renewal.result()
            except asyncio.CancelledError:
                renewal.cancel()
                raise
            except Exception as e:  # noqa: BLE001 - any failure is transient until the lease runs out
                renewal.cancel()
                # Not lost yet: the stored lease still runs. Try again soon, within what is left of it.
                logger.debug("key=<%s>, error=<%s> | lease renewal failed, retrying", self.key, type(e).__name__)
                delay = min(interval, max(_RETRY_MIN_SECONDS, self.lease_seconds * _RETRY_FRACTION))
                continue
            if not renewed:
                await self._fenced_off()
                return
            self._renewed(sent)
            delay = interval


async def was_cancelled(store: IdempotencyStore, key: str, owner: str) -> bool:
    """After a write of ``owner`` on ``key`` was refused: whether because its claim was marked cancelled.

    Never raises: a read that fails says nothing, so the refusal counts as a claim lost to another owner.
    """
    try:
        record = await _store(store.get(key))
    except Exception:  # noqa: BLE001 - refused is refused: only the reason is unknown
        return False
    return record is not None and record.owner == owner and record.cancelled


def lost_claim(key: str, cancelled: bool, reason: str) -> IdempotencyLeaseLostError:
    """The error of a run whose write was refused: ``InvocationCancelledError`` when it was cancelled."""
    if cancelled:
        return InvocationCancelledError(key, "the invocation was cancelled")
    return IdempotencyLeaseLostError(key, reason)


class LeaseWatch:
    """A waiter's judgement of the ``IN_PROGRESS`` records it meets on one key, on this host's monotonic clock only.

    Feed it every record read (``remaining``); it answers how long until the record may be taken over: a whole
    ``lease_seconds`` after the read that first showed its current version, or at once for a yielded record. A new
    version (the owner renewed, or another owner took over) starts the count again.

    Thread-safety: one waiter's; not shared.
    """

    __slots__ = ("_since", "_version")

    def __init__(self) -> None:
        """Watch nothing yet."""
        self._version: str | None = None
        self._since = 0.0

    def remaining(self, record: IdempotencyRecord, read_at: float) -> float:
        """Seconds until ``record`` may be taken over (0: now), given the monotonic time its read returned."""
        if record.yielded:
            return 0.0
        if record.version != self._version:
            # Counted from when the read *returned*: the renewal that wrote this version was sent before that, so the
            # owner's own lease (counted from its send) ends before ours does.
            self._version, self._since = record.version, read_at
        return max(0.0, self._since + record.lease_seconds - time.monotonic())
