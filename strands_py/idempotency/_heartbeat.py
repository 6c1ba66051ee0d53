"""Heartbeats: a running primary keeps its lease alive, and learns at once when it has lost it.

A claim is honoured for ``lease_seconds`` after its last renewal. While the primary runs, a task on the primary's
own event loop (no thread) renews it every ``lease_seconds / 3``, so a crashed owner is taken over about one lease
after it died, and no invocation is too long for its lease. The lease is lost when a renewal is fenced off (someone
took the claim over) or when no renewal succeeded for a whole lease (the store is unreachable, or this process was
paused): the owner must then stop before doing more, because another caller may already be running the token.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from ..types.exceptions import IdempotencyLeaseLostError
from ._calls import _store
from .base import IdempotencyStore

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
        claimed_at: float,
        on_lost: Callable[[IdempotencyLeaseLostError], None] | None = None,
    ) -> None:
        """Create a lease that was taken at ``claimed_at`` (``time.monotonic()`` before the claim was sent).

        Args:
            store: The store holding the claim.
            key: The claimed key.
            owner: The claim's owner id.
            lease_seconds: Length of the lease; renewals every third of it.
            claimed_at: Monotonic time the claim was sent.
            on_lost: Called once, on the loop, when the lease is lost (e.g. to cancel the run).
        """
        self.store = store
        self.key = key
        self.owner = owner
        self.lease_seconds = lease_seconds
        self.valid_until = claimed_at + lease_seconds
        self.lost: IdempotencyLeaseLostError | None = None
        self.renewals = 0
        self._on_lost = on_lost
        self._task: asyncio.Task[None] | None = None
        self._checkpoint: str | None = None
        self._stopping = False

    def start(self) -> None:
        """Start renewing on the running loop."""
        if self._task is None:
            self._stopping = False
            self._task = asyncio.get_running_loop().create_task(self._renew_forever(), name="strands-py-heartbeat")

    async def stop(self) -> None:
        """Stop renewing; returns once the renewal task has ended. Safe to call several times."""
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
        if checkpoint is not None:
            self._checkpoint = checkpoint
        sent = time.monotonic()
        if not await _store(self.store.renew(self.key, self.owner, time.time() + self.lease_seconds, checkpoint)):
            self._lose("the renewal was fenced off: another caller took the claim over")
            self.check()
        self._renewed(sent)

    def _renewed(self, sent: float) -> None:
        self.renewals += 1
        self.valid_until = max(self.valid_until, sent + self.lease_seconds)

    def _lose(self, reason: str) -> None:
        if self.lost is not None:
            return
        logger.warning("key=<%s> | lease lost: %s", self.key, reason)
        self.lost = IdempotencyLeaseLostError(self.key, reason)
        if self._on_lost is not None:
            self._on_lost(self.lost)

    async def _renew_forever(self) -> None:
        interval = self.lease_seconds / 3
        delay = interval
        while not self._stopping:
            await asyncio.sleep(delay)
            remaining = self.valid_until - time.monotonic()
            if remaining <= 0:
                self._lose("no renewal succeeded for a whole lease")
                return
            sent = time.monotonic()
            try:
                # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow the cancellation of ``stop()``
                # when it arrives as the renewal completes, and the heartbeat would go on (and ``stop()`` wait) forever.
                async with asyncio.timeout(remaining):
                    renewed = await self.store.renew(self.key, self.owner, time.time() + self.lease_seconds, None)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - any failure is transient until the lease runs out
                # Not lost yet: the stored lease still runs. Try again soon, within what is left of it.
                logger.debug("key=<%s>, error=<%s> | lease renewal failed, retrying", self.key, type(e).__name__)
                delay = min(interval, max(_RETRY_MIN_SECONDS, self.lease_seconds * _RETRY_FRACTION))
                continue
            if not renewed:
                self._lose("the renewal was fenced off: another caller took the claim over")
                return
            self._renewed(sent)
            delay = interval
