"""The durable pass of an in-process primary: claim, or wait for another process and replay; run under a lease.

Policy lives here, storage in the stores: how a claim is taken (and handed back when its caller gave up while it was
in flight), how another owner is waited for, when a result is stored (never a failure, an abort or a cancelled run),
and what a primary does when it loses its lease.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import time
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from opentelemetry.trace import Span
from pydantic import BaseModel
from strands.agent.agent_result import AgentResult

from .. import telemetry
from .._events import result_of
from ..types.exceptions import (
    IdempotencyKeyMismatchError,
    IdempotencyLeaseLostError,
    IdempotencyWaitTimeoutError,
)
from ._calls import _store
from ._context import _RunContext
from ._heartbeat import _Lease
from .base import IdempotencyStore
from .codec import decode_result, encode_result
from .config import IdempotencyConfig
from .record import IdempotencyRecord, RecordState

if TYPE_CHECKING:
    from ..session._turn import SessionTurn

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Polling another process's invocation: capped exponential backoff with jitter, never a parked thread.
_POLL_FIRST_SECONDS = 0.05
_POLL_MAX_SECONDS = 1.0

# Store work that outlives a cancelled caller (handing back a claim, storing a decided result); referenced until done.
_background: set[asyncio.Future[Any]] = set()


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
    owner: str = field(default_factory=lambda: _new_owner())


# Owner ids: unique across processes (a random prefix per process) and calls (a counter), cheaper than a uuid each.
_OWNER_PREFIX = uuid.uuid4().hex[:20]
_owner_counter = itertools.count()


def _new_owner() -> str:
    return f"{_OWNER_PREFIX}{next(_owner_counter):012x}"


def _forget(task: asyncio.Future[Any]) -> None:
    _background.discard(task)
    if not task.cancelled() and task.exception() is not None:
        # Its caller was cancelled and is gone; what failed was logged where it failed (or is a fenced-off write).
        logger.debug("error=<%s> | store work left behind by a cancelled caller failed", type(task.exception()))


async def _shielded(work: Awaitable[T]) -> T:
    """Await ``work`` to its end even if our caller is cancelled meanwhile (it then finishes in the background).

    For store writes whose outcome is already decided: a cancellation between sending a write and hearing back must
    not leave the other half undone (a result stored but its turn rolled back; a claim nobody will hand back).
    """
    return await asyncio.shield(_keep(work))


def _keep(work: Awaitable[T]) -> asyncio.Future[T]:
    """Run ``work`` as a task referenced until it ends (a task nobody references may be collected mid-way)."""
    task = asyncio.ensure_future(work)
    _background.add(task)
    task.add_done_callback(_forget)
    return task


async def claim_or_hand_back(
    store: IdempotencyStore,
    record: IdempotencyRecord,
    now: float,
    hand_back: Callable[[], Awaitable[None]],
) -> IdempotencyRecord | None:
    """``store.claim(record, now)``, calling ``hand_back`` whenever the write may have landed but will not be used.

    That is: our caller is cancelled while the write is in flight (``hand_back`` runs once the write is done, if it
    landed), or the call fails after the write may have been applied (a read timeout, a connection reset: the write
    is handed back before the error is raised). Either way an ``IN_PROGRESS`` record nobody renews would otherwise
    block every retry for a whole lease. ``hand_back`` must be fenced on ``record.owner`` and must never raise.

    Raises:
        IdempotencyStoreError: The store failed (our claim, if it landed, has been handed back).
    """
    attempt = asyncio.ensure_future(_store(store.claim(record, now)))
    try:
        return await asyncio.shield(attempt)
    except asyncio.CancelledError:
        _keep(_hand_back_when_landed(record, attempt, hand_back))
        raise
    except Exception:
        await _shielded(hand_back())
        raise


async def _hand_back_when_landed(
    record: IdempotencyRecord,
    attempt: asyncio.Future[IdempotencyRecord | None],
    hand_back: Callable[[], Awaitable[None]],
) -> None:
    try:
        existing = await attempt
    except Exception:  # noqa: BLE001 - a failed write may have been applied all the same
        existing = None
    except asyncio.CancelledError:  # the loop is being torn down: nothing can be sent any more
        return
    if existing is None or existing.owner == record.owner:
        logger.debug("key=<%s> | caller gave up during its claim, handing the claim back", record.key)
        await hand_back()


async def durable_stream(
    call: DurableCall,
    callback_handler: Callable[..., Any] | None,
    run_primary: Callable[[_RunContext], AsyncGenerator[Any, None]],
    on_lease_lost: Callable[[IdempotencyLeaseLostError], None],
    session: SessionTurn | None = None,
    *,
    claimed_at: float | None = None,
    seen: IdempotencyRecord | None = None,
) -> AsyncGenerator[Any, None]:
    """Run ``run_primary`` at most once per token and window, across every process sharing ``call.config.store``.

    Yields the primary's events, or for a replay one ``{"result": ReplayedAgentResult}`` event (after firing
    ``callback_handler(result=...)`` once). The primary's result is stored *before* its result event is yielded,
    so whoever sees the result sees the token's result. With ``session``, the turn takes the session lock after the
    token's claim (a retry of the same request joins or replays, it never queues) and releases it after the result
    is stored; a turn whose result is not stored is rolled back first. ``claimed_at`` says the claim was already taken
    (at that monotonic time); ``seen`` is a record another owner holds, met by a claim already attempted.

    Raises:
        IdempotencyKeyMismatchError: The token's record has a different request fingerprint.
        IdempotencyWaitTimeoutError: Another process's invocation did not finish within ``wait_timeout_seconds``.
        IdempotencyRecordCorruptedError: The completed record cannot be decoded.
        IdempotencyResultTooLargeError: The completed result was too large to store.
        IdempotencyStoreError: The store failed before anything ran.
        IdempotencyLeaseLostError: The primary lost its claim while running; nothing was stored.
        SessionBusyError: With ``session``: another request holds the session.
    """
    config, key = call.config, call.key
    span = telemetry.start_span(telemetry.SPAN_CLAIM, {"key": key})
    started = time.monotonic()
    decision = "error"
    error: BaseException | None = None
    try:
        if claimed_at is None:
            completed, claimed_at = await _claim_or_wait(call, span, seen)
        else:
            completed = None
        if completed is None:
            decision = "claimed"
        else:
            result = decode_result(completed, call.structured_output_model)
            decision = "replayed"
            telemetry.add_event(span, telemetry.EVENT_RESULT_REPLAYED, {"key": key})
    except IdempotencyKeyMismatchError as e:
        decision, error = "mismatch", e
        telemetry.add_event(span, telemetry.EVENT_FINGERPRINT_MISMATCH, {"key": key})
        raise
    except IdempotencyWaitTimeoutError as e:
        decision, error = "timeout", e
        telemetry.add_event(span, telemetry.EVENT_WAIT_DEADLINE_EXCEEDED, {"key": key})
        raise
    except BaseException as e:
        error = e
        raise
    finally:
        telemetry.end_span(span, {"decision": decision, "wait_seconds": time.monotonic() - started}, error)

    if completed is not None:
        logger.debug("key=<%s> | completed within the window, replaying stored result", key)
        if callback_handler is not None:
            callback_handler(result=result)
        yield {"result": result}
        return

    lease = _Lease(config.store, key, call.owner, config.lease_seconds, claimed_at=claimed_at, on_lost=on_lease_lost)
    context = _RunContext(key=key, hmac_key=config.hmac_key, leases=[lease])
    settled = False  # the claim was completed or released on the way: nothing is left to hand back
    events: AsyncGenerator[Any, None] | None = None
    lease.start()
    try:
        if session is not None:
            await session.begin(key, lambda: not context.lease_lost())
            if session.lease is not None:
                context.leases.append(session.lease)
        events = run_primary(context)
        try:
            async for event in events:
                result_seen = result_of(event)
                if result_seen is None:
                    _check(lease, session)
                    yield event
                    continue
                await lease.stop()
                _check(lease, session)
                # The outcome is decided: carry it out to the end even if our caller is cancelled meanwhile (a
                # result stored but its turn rolled back, or a claim left to lapse, would break every retry).
                settled = True
                await _shielded(_settle(call, result_seen, session))
                yield event
        except Exception as e:
            # A run that failed after losing its lease failed because of that loss (e.g. a fenced session write).
            try:
                _check(lease, session)
            except IdempotencyLeaseLostError as lost:
                raise lost from e
            raise
    finally:
        try:
            await lease.stop()
        finally:
            try:
                if events is not None:
                    await events.aclose()
            finally:
                # Failed, aborted, closed early, lease lost, or cleanup raised: nothing stored. Undo the turn and
                # release the session first (a retry of this token must not find the session still held), then hand
                # the claim back (fenced: a claim already taken over is not touched) so the next retry runs at once.
                if not settled:
                    try:
                        if session is not None:
                            await _shielded(session.abort())
                    finally:
                        await _shielded(_release(config, key, call.owner))


async def _settle(call: DurableCall, result: AgentResult, session: SessionTurn | None) -> None:
    """Store the primary's result and commit its turn; or, for a cancelled run, undo the turn and release."""
    if result.stop_reason == "cancelled":
        # Stopped by agent.cancel() or a cancel signal (a client that went away): not the token's answer. Undo the
        # turn and release the claim so that a retry runs; this caller still gets what upstream returned.
        logger.debug("key=<%s> | run was cancelled, releasing the claim instead of storing it", call.key)
        try:
            if session is not None:
                await session.abort()
        finally:
            await _release(call.config, call.key, call.owner)
        return
    try:
        await _complete(call, result)
    except asyncio.CancelledError:
        # Torn down mid-write (the loop is closing): whether the result landed is unknown, so the turn is neither
        # kept nor rolled back here; the next holder of the session decides from the token's record.
        if session is not None:
            await session.suspend()
        raise
    except BaseException:
        if session is not None:
            await session.abort()
        raise
    if session is not None:
        await session.commit()


def _check(lease: _Lease, session: SessionTurn | None) -> None:
    lease.check()
    if session is not None:
        session.check()


async def locked_stream(
    session: SessionTurn, run_primary: Callable[[_RunContext], AsyncGenerator[Any, None]]
) -> AsyncGenerator[Any, None]:
    """A turn without a token under the session lock: the same lock, rollback and checkpoint, nothing stored.

    Raises:
        SessionBusyError: Another request holds the session.
        IdempotencyLeaseLostError: The lock was lost while running.
    """
    events: AsyncGenerator[Any, None] | None = None
    committed = False
    try:
        await session.begin(None)
        context = _RunContext(key=None, hmac_key=None, leases=[session.lease] if session.lease is not None else [])
        events = run_primary(context)
        async for event in events:
            session.check()
            result_seen = result_of(event)
            if result_seen is not None and result_seen.stop_reason != "cancelled":
                # The commit finishes even if our caller is cancelled meanwhile (the abort below is then a no-op);
                # if it fails, the turn does not count and the abort below rolls it back.
                await _shielded(session.commit())
                committed = True
            yield event
    finally:
        try:
            if events is not None:
                await events.aclose()
        finally:
            if not committed:
                await _shielded(session.abort())


async def _claim_or_wait(
    call: DurableCall, span: Span, seen: IdempotencyRecord | None = None
) -> tuple[IdempotencyRecord | None, float]:
    """Claim the key (returns None) or return its completed record, waiting while another owner runs it.

    ``seen``: a claim was already attempted and met this record; start by waiting on it.

    Returns:
        The completed record (or None when we claimed it), and the monotonic time our claim was sent.
    """
    config, key, owner, fingerprint = call.config, call.key, call.owner, call.fingerprint
    started = time.monotonic()
    delay = _POLL_FIRST_SECONDS
    claimed_at = time.monotonic()
    while True:
        if seen is not None:
            existing: IdempotencyRecord | None = seen
            seen = None
        else:
            now = time.time()
            claimed_at = time.monotonic()
            claim = IdempotencyRecord(
                key=key,
                state=RecordState.IN_PROGRESS,
                owner=owner,
                lease_expires_at=now + config.lease_seconds,
                expires_at=now + config.lease_seconds + config.expires_after_seconds,
                fingerprint=fingerprint,
            )
            existing = await claim_or_hand_back(config.store, claim, now, lambda: _release(config, key, owner))
        if existing is None:
            logger.debug("key=<%s> | claimed", key)
            return None, claimed_at
        if existing.owner == owner and existing.state is RecordState.IN_PROGRESS:
            # Our own claim: the write landed, its response was lost, and the client's retry met our record.
            logger.debug("key=<%s> | claim found our own record (a retried write), it is ours", key)
            return None, claimed_at
        logger.debug("key=<%s>, state=<%s> | token already claimed", key, existing.state.value)
        if existing.state is RecordState.IN_PROGRESS:
            telemetry.add_event(span, telemetry.EVENT_WAITING_FOR_OWNER, {"key": key})
        while True:
            if fingerprint is not None and existing.fingerprint is not None and existing.fingerprint != fingerprint:
                raise IdempotencyKeyMismatchError(key)
            if existing.state is RecordState.COMPLETED:
                return existing, claimed_at
            waited = time.monotonic() - started
            timeout = config.wait_timeout_seconds
            if timeout is not None and waited >= timeout:
                raise IdempotencyWaitTimeoutError(key, waited)
            pause = random.uniform(delay / 2, delay)
            if timeout is not None:
                pause = min(pause, timeout - waited)
            # Wake up when the lease lapses, not a whole backoff step later.
            pause = max(0.0, min(pause, existing.lease_expires_at - time.time() + 0.01))
            await asyncio.sleep(pause)
            delay = min(delay * 2, _POLL_MAX_SECONDS)
            current = await _store(config.store.get(key))
            if current is None or not current.is_live(time.time()):
                # Completed-and-expired, released after a failure, or the owner's lease lapsed: claim it ourselves.
                if current is not None and current.state is RecordState.IN_PROGRESS:
                    logger.debug("key=<%s> | lease of the previous owner lapsed, taking over", key)
                    telemetry.add_event(span, telemetry.EVENT_LEASE_TAKEN_OVER, {"key": key})
                break
            existing = current


async def _complete(call: DurableCall, result: AgentResult) -> None:
    """Store the result for replay.

    Raises:
        IdempotencyLeaseLostError: The claim is no longer ours: another owner took it over, so this result is not
            the token's result (the new owner's will be).

    A store failure is logged and the claim handed back; the caller still gets its result.
    """
    config, key, owner = call.config, call.key, call.owner
    try:
        now = time.time()
        record = IdempotencyRecord(
            key=key,
            state=RecordState.COMPLETED,
            owner=owner,
            lease_expires_at=now,
            expires_at=now + config.expires_after_seconds,
            fingerprint=call.fingerprint,
            payload=encode_result(result, config.store.max_result_bytes),
        )
        if await _store(config.store.complete(record)):
            return
        current = await _store(config.store.get(key))
    except IdempotencyLeaseLostError:
        raise
    except Exception:
        # The claim stays until its lease lapses (about one lease); a retry after that runs again.
        logger.exception("key=<%s> | could not store the result; releasing the claim", key)
        await _release(config, key, owner)
        return
    if current is not None and current.owner == owner and current.state is RecordState.COMPLETED:
        # Our own complete, retried by the client after its response was lost, met the record it had written.
        return
    raise IdempotencyLeaseLostError(key, "the claim was taken over, or lost by the store, before the result was stored")


async def _release(config: IdempotencyConfig, key: str, owner: str) -> None:
    """Delete our claim so that a retry runs. Never raises (a lapsed lease frees it anyway)."""
    try:
        if not await config.store.release(key, owner):
            logger.debug("key=<%s> | claim was no longer ours to release", key)
    except Exception:
        logger.exception("key=<%s> | could not release the claim; it frees itself when its lease lapses", key)
