"""A token's claim: take it, or wait for its owner and replay, or take it over from an owner judged gone.

No clock of another host is trusted: an owner is judged gone only after this process has seen the same version of its
claim for a whole lease on its own monotonic clock (``LeaseWatch``), and the takeover is a compare-and-set on that
version (``take_over``). A claim whose caller gave up while its write was in flight is handed back.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import os
import random
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from opentelemetry.trace import Span
from pydantic import BaseModel

from .. import telemetry
from ..idempotency._calls import _store, claim_or_hand_back, release_quietly
from ..idempotency._heartbeat import LeaseWatch, was_cancelled
from ..idempotency.config import IdempotencyConfig
from ..idempotency.record import IdempotencyRecord, RecordState, new_version
from ..types.exceptions import IdempotencyKeyMismatchError, IdempotencyWaitTimeoutError

logger = logging.getLogger(__name__)

# Polling another process's invocation: capped exponential backoff with jitter, never a parked thread.
_POLL_FIRST_SECONDS = 0.05
_POLL_MAX_SECONDS = 1.0

# Owner ids: unique across processes (a random prefix per process) and calls (a counter), cheaper than a uuid each.
_OWNER_PREFIX = uuid.uuid4().hex[:20]
_owner_counter = itertools.count()


def _redraw_owner_prefix() -> None:
    # A process forked after this module was imported (gunicorn --preload, multiprocessing's fork) would otherwise
    # claim with its parent's owner ids: two processes would each take the other's claim for its own.
    global _OWNER_PREFIX
    _OWNER_PREFIX = uuid.uuid4().hex[:20]


os.register_at_fork(after_in_child=_redraw_owner_prefix)


def new_owner() -> str:
    """A fresh owner id, unique across processes and calls."""
    return f"{_OWNER_PREFIX}{next(_owner_counter):012x}"


@dataclass
class DurableCall:
    """One call's durable identity: what the gate computed before deciding anything.

    Attributes:
        config: The agent's idempotency configuration.
        key: The durable key (scope and keyed digest of the token).
        fingerprint: The request fingerprint, or None when payloads are not validated.
        structured_output_model: The model a replay rebuilds ``structured_output`` with (the call's, else the
            agent's default).
        owner: A fresh random owner id for this call's claim.
    """

    config: IdempotencyConfig
    key: str
    fingerprint: str | None
    structured_output_model: type[BaseModel] | None
    owner: str = field(default_factory=new_owner)

    def claim_record(self, now: float) -> IdempotencyRecord:
        """This call's claim, written at ``now`` (``time.time()``): leased, and collectable a window after its lease."""
        config = self.config
        return IdempotencyRecord(
            key=self.key,
            state=RecordState.IN_PROGRESS,
            owner=self.owner,
            version=new_version(),
            lease_seconds=config.lease_seconds,
            expires_at=now + config.lease_seconds + config.expires_after_seconds,
            fingerprint=self.fingerprint,
        )

    def owns(self, record: IdempotencyRecord) -> bool:
        """Whether ``record`` is this call's own claim (a write retried after its response was lost)."""
        return record.owner == self.owner and record.state is RecordState.IN_PROGRESS

    def check_request(self, record: IdempotencyRecord) -> None:
        """Refuse a record of the same key made for another request.

        Raises:
            IdempotencyKeyMismatchError: The fingerprints differ.
        """
        if self.fingerprint is not None and record.fingerprint is not None and record.fingerprint != self.fingerprint:
            raise IdempotencyKeyMismatchError(self.key)

    async def release(self) -> None:
        """Release this call's claim (and its journal) so that a retry runs afresh at once; never raises."""
        await release_quietly(self.config.store, self.key, self.owner)

    async def end_cancelled(self) -> None:
        """End this call's cancelled claim with a ``CANCELLED`` tombstone: a retry runs afresh. Never raises.

        The tombstone says how the run ended (to whoever asks about the key) until it expires, and frees the key for a
        fresh claim at once, dropping the journal. Where it cannot be written, the claim is released instead.
        """
        config = self.config
        now = time.time()
        tombstone = IdempotencyRecord(
            key=self.key,
            state=RecordState.CANCELLED,
            owner=self.owner,
            version=new_version(),
            lease_seconds=0.0,
            expires_at=now + config.expires_after_seconds,
            fingerprint=self.fingerprint,
        )
        try:
            if await _store(config.store.complete(tombstone)):
                return
        except Exception:  # noqa: BLE001 - the release below frees the key as well
            logger.debug("key=<%s> | could not leave a cancelled tombstone, releasing", self.key)
        await self.release()

    async def yield_claim(self) -> None:
        """Yield this call's claim, keeping its journal: a retry takes it over at once and resumes from it.

        For a run that ended without a result but not by a deliberate cancel (it failed, lost its lease, was aborted):
        whatever steps it completed stay journaled, so the retry does not pay for them, or run their tools, again.
        Never raises (a claim that cannot be yielded is taken over after a lease of silence anyway).
        """
        config = self.config
        try:
            yielded = await _store(
                config.store.renew(
                    self.key,
                    self.owner,
                    version=new_version(),
                    lease_seconds=0.0,
                    expires_at=time.time() + config.lease_seconds + config.expires_after_seconds,
                )
            )
        except Exception:
            logger.exception("key=<%s> | could not yield the claim; it is taken over after a lease", self.key)
            return
        if yielded:
            return
        if await was_cancelled(config.store, self.key, self.owner):
            # Refused because a cancel was asked for meanwhile (stopped by a shutdown or a timeout right after a
            # DELETE, say): end it as the cancelled run it is.
            await self.end_cancelled()
            return
        logger.debug("key=<%s> | claim was no longer ours to yield", self.key)


async def claim_or_wait(
    call: DurableCall,
    span: Span,
    seen: IdempotencyRecord | None = None,
    while_waiting: Callable[[], Awaitable[None]] | None = None,
) -> tuple[IdempotencyRecord | None, float, bool]:
    """Claim the key (returns None) or return its completed record, waiting while another owner runs it.

    ``seen``: a claim was already attempted and met this record; start by waiting on it. ``while_waiting``: called
    at every poll while another owner holds the claim (a session turn watches its session's lock meanwhile, so that
    a dead owner's lock is judged in the same lease as its claim, not one lease later).

    Returns:
        The completed record (or None when we claimed it), the monotonic time our winning write was sent, and
        whether the claim may have been taken over from another owner (then it carries that owner's journal).

    Raises:
        IdempotencyKeyMismatchError: The key's record is another request's.
        IdempotencyWaitTimeoutError: The other owner did not finish within ``wait_timeout_seconds``.
        IdempotencyStoreError: The store failed (a claim of ours that may have landed was handed back).
    """
    config, key, store = call.config, call.key, call.config.store
    started = time.monotonic()
    delay = _POLL_FIRST_SECONDS
    watch = LeaseWatch()
    existing: IdempotencyRecord | None = seen
    read_at = time.monotonic()
    # Set once a takeover of ours was sent: from then on, a record of ours that a claim meets may be that takeover,
    # landed although its answer said otherwise (a client's retry of the write met the write itself and failed its
    # version condition: botocore and redis-py retry after a dropped connection). It carries the dead owner's
    # journal, which must be read, or the resumed run pays for its steps, and runs its tools, again.
    took_over = False
    while True:
        if existing is None:
            sent = time.monotonic()
            existing = await claim_or_hand_back(
                store.claim(call.claim_record(time.time()), time.time()),
                lambda found: found is None or found.owner == call.owner,
                call.yield_claim if took_over else call.release,
            )
            read_at = time.monotonic()
            if existing is None or call.owns(existing):
                # A store answers a claim that meets our own record either way (claimed, or that record).
                logger.debug("key=<%s>, took_over=<%s> | claimed", key, took_over)
                return None, sent, took_over
            logger.debug("key=<%s>, state=<%s> | token already claimed", key, existing.state.value)
            if existing.state is RecordState.IN_PROGRESS:
                telemetry.add_event(span, telemetry.EVENT_WAITING_FOR_OWNER, {"key": key})
        call.check_request(existing)
        if existing.state is RecordState.COMPLETED and not existing.expired(time.time()):
            return existing, read_at, False
        if existing.state is not RecordState.IN_PROGRESS:
            existing = None  # an expired result, or a cancelled run's tombstone: the claim decides (atomically)
            continue
        wait = watch.remaining(existing, read_at)
        if wait <= 0 and existing.cancelled:
            # Its run was cancelled and its owner is gone without leaving the tombstone: leave it ourselves (by a
            # compare-and-set on what we judged), then claim afresh over it (a cancelled run is not resumed).
            tombstone = dataclasses.replace(
                existing, state=RecordState.CANCELLED, version=new_version(), lease_seconds=0.0, cancelled=False
            )
            await _store(store.take_over(tombstone, existing.version))
            existing = None
            continue
        if wait <= 0:
            sent = time.monotonic()
            took_over = True
            # A takeover that may have landed unused is yielded, not released: a release would delete the dead
            # owner's journal with the record, and the next retry would run its completed steps again.
            won = await claim_or_hand_back(
                store.take_over(call.claim_record(time.time()), existing.version), lambda won: won, call.yield_claim
            )
            if won:
                logger.debug("key=<%s> | previous owner judged gone, took its claim over", key)
                telemetry.add_event(span, telemetry.EVENT_LEASE_TAKEN_OVER, {"key": key})
                return None, sent, True
            existing = None  # it changed under our judgement: decide again from a fresh claim
            continue
        waited = time.monotonic() - started
        timeout = config.wait_timeout_seconds
        if timeout is not None and waited >= timeout:
            raise IdempotencyWaitTimeoutError(key, waited)
        pause = random.uniform(delay / 2, delay)
        if timeout is not None:
            pause = min(pause, timeout - waited)
        # Wake up when the owner could be judged gone, not a whole backoff step later.
        await asyncio.sleep(min(pause, wait + 0.01))
        delay = min(delay * 2, _POLL_MAX_SECONDS)
        if while_waiting is not None:
            await while_waiting()
        existing = await _store(store.get(key))
        read_at = time.monotonic()
        if existing is None:
            continue  # released after a failure, or collected: claim it
