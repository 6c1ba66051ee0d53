"""Settling a primary's turn once it ran: storing its result, then committing, rolling back or leaving its session turn.

A result is stored only for a run that answered (never a failure, an abort or a cancelled run); a store fault while
storing it decides whether the turn is kept, undone, or left for the next holder of the session to judge.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time

from strands.agent.agent_result import AgentResult

from ..idempotency._calls import _store
from ..idempotency._heartbeat import was_cancelled
from ..idempotency.codec import encode_result
from ..idempotency.record import IdempotencyRecord, RecordState, new_version
from ..session._turn import SessionTurn
from ..types.exceptions import IdempotencyLeaseLostError, IdempotencyStoreError, InvocationCancelledError
from ._claim import DurableCall

logger = logging.getLogger(__name__)

# A session turn's result is kept this many leases beyond ``expires_after_seconds``, so that it outlives the lock
# record that names it (collectable ``lease + expires_after`` after its last write, which precedes the result's):
# the next holder of the session must never read "no result" for a turn whose answer was stored. See session/_turn.
RESULT_MARGIN_LEASES = 2


class _Stored(enum.Enum):
    """What storing a result came to."""

    STORED = "stored"
    NOT_STORED = "not stored"  # the write failed and our claim was yielded, its journal kept for the retry
    UNKNOWN = "unknown"  # the write failed and whether it landed cannot be learned now


async def settle(call: DurableCall, result: AgentResult, session: SessionTurn | None) -> None:
    """Store the primary's result and commit its turn; or, for a cancelled run, undo the turn and release.

    Raises:
        IdempotencyLeaseLostError: The claim or the session was lost before the result could be stored.
        IdempotencyStoreError: A session turn whose answer could not be stored (see ``durable_stream``).
    """
    if result.stop_reason == "cancelled":
        # Stopped by agent.cancel() or a cancel signal (a client that went away): not the token's answer. Undo the
        # turn and release the claim so that a retry runs; this caller still gets what upstream returned.
        logger.debug("key=<%s> | run was cancelled, leaving a tombstone instead of a result", call.key)
        # Cancelled from outside (its claim marked: cancel_invocation, an HTTP DELETE) rather than by agent.cancel()
        # alone: its caller learns it as every caller of a cancelled invocation does.
        marked = await was_cancelled(call.config.store, call.key, call.owner)
        try:
            if session is not None:
                await session.abort()
        finally:
            await call.end_cancelled()
        if marked:
            raise InvocationCancelledError(call.key, "the invocation was cancelled")
        return
    try:
        if session is not None:
            # The lock's lifetime is fixed before the result's begins (see RESULT_MARGIN_LEASES).
            await session.seal()
        stored = await _complete(call, result, margin=RESULT_MARGIN_LEASES if session is not None else 0)
    except asyncio.CancelledError:
        # Torn down mid-write (the loop is closing): whether the result landed is unknown, so the turn is neither
        # kept nor rolled back here; the next holder of the session decides from the token's record.
        if session is not None:
            await session.suspend()
        raise
    except InvocationCancelledError:
        try:
            if session is not None:
                await session.abort()
        finally:
            await call.end_cancelled()
        raise
    except BaseException:
        if session is not None:
            await session.abort()
        raise
    if session is None:
        return
    if stored is _Stored.STORED:
        await session.commit()
        return
    if stored is _Stored.NOT_STORED:
        await session.abort()
    else:
        await session.suspend()
    raise IdempotencyStoreError(
        f"the answer could not be stored ({stored.value}); the turn does not count unless it was: retry the request"
    )


async def _complete(call: DurableCall, result: AgentResult, *, margin: int) -> _Stored:
    """Store the result for replay, kept ``expires_after_seconds`` plus ``margin`` leases.

    Raises:
        IdempotencyLeaseLostError: The claim is no longer ours: another owner took it over, so this result is not
            the token's result (the new owner's will be).

    A store failure is logged; the claim is yielded if it is still ours, which tells whether the write landed
    (``NOT_STORED``), or the outcome stays ``UNKNOWN`` when even that fails.
    """
    config, key, owner = call.config, call.key, call.owner
    # A result over the store's limit is stored as a marker: its replays raise IdempotencyResultTooLargeError.
    payload = encode_result(result, config.store.max_result_bytes)
    now = time.time()
    record = IdempotencyRecord(
        key=key,
        state=RecordState.COMPLETED,
        owner=owner,
        version=new_version(),
        lease_seconds=0.0,
        expires_at=now + config.expires_after_seconds + margin * config.lease_seconds,
        fingerprint=call.fingerprint,
        payload=payload,
    )
    try:
        if await _store(config.store.complete(record)):
            return _Stored.STORED
        current = await _store(config.store.get(key))
    except IdempotencyStoreError:
        logger.exception("key=<%s> | could not store the result", key)
        return await _learn_outcome(call)
    if current is not None and current.owner == owner and current.state is RecordState.COMPLETED:
        # Our own complete, retried by the client after its response was lost, met the record it had written.
        return _Stored.STORED
    if current is not None and current.owner == owner and current.cancelled:
        # Cancelled while it answered: the cancel won (a result never lands after it). End it as a cancelled run.
        raise InvocationCancelledError(key, "the invocation was cancelled before its result was stored")
    raise IdempotencyLeaseLostError(key, "the claim was taken over, or lost by the store, before the result was stored")


async def _learn_outcome(call: DurableCall) -> _Stored:
    """After a failed complete: learn whether it landed, by yielding our claim (a write fenced on our claim).

    If the claim was still ours, the result was not stored: the claim is now yielded, so a retry takes it over at
    once and, with the journal, resumes from it (the answer rebuilt without paying for it again). If not, the record
    the complete wrote, or another owner's, is there to read.
    """
    config, key, owner = call.config, call.key, call.owner
    try:
        yielded = await _store(
            config.store.renew(
                key,
                owner,
                version=new_version(),
                lease_seconds=0.0,
                expires_at=time.time() + config.lease_seconds + config.expires_after_seconds,
            )
        )
        if yielded:
            return _Stored.NOT_STORED
        current = await _store(config.store.get(key))
    except IdempotencyStoreError:
        logger.warning("key=<%s> | whether the result was stored is unknown; the claim is taken over later", key)
        return _Stored.UNKNOWN
    if current is not None and current.owner == owner and current.state is RecordState.COMPLETED:
        return _Stored.STORED
    raise IdempotencyLeaseLostError(key, "the claim was taken over before the result was stored")
