"""One durable turn, in one place: claim → session lock → heartbeats → run → settle → release.

Policy lives here, storage in the stores: what a primary does when it loses its lease, and when it has run, the
settling of its turn (``_settle.py``: whether and how its result is stored, and what a store fault then does to it).
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncGenerator, Callable
from typing import Any, TypeVar

from .. import telemetry
from .._events import result_of
from ..idempotency._calls import shielded
from ..idempotency._context import _RunContext
from ..idempotency._heartbeat import _Lease
from ..idempotency.codec import decode_result
from ..idempotency.record import IdempotencyRecord, ReplayedAgentResult
from ..session._turn import SessionTurn
from ..types.exceptions import (
    IdempotencyKeyMismatchError,
    IdempotencyLeaseLostError,
    IdempotencyStoreError,
    IdempotencyWaitTimeoutError,
    InvocationCancelledError,
)
from ._claim import DurableCall, claim_or_wait
from ._journal import Journal
from ._settle import settle

logger = logging.getLogger(__name__)


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

    A run that ends without a result (it failed, lost its lease, was closed early) yields its claim with its journal:
    the next retry takes it over at once and resumes. A run stopped deliberately (``agent.cancel()``, a cancel
    signal) releases it instead: the next retry runs afresh.

    A store fault while storing the result: without a session the caller still gets its result (nothing else
    depends on it; a retry would run again). With a session the answer is acknowledged only if it is kept: the turn
    is rolled back and the caller gets ``IdempotencyStoreError`` (its retry runs on the conversation as it was), or,
    when whether the result landed cannot be learned, the turn is left for the next holder of the session to judge
    from the token's record (kept if the result landed, rolled back if not) and the caller gets the error too.

    Raises:
        IdempotencyKeyMismatchError: The token's record has a different request fingerprint.
        IdempotencyWaitTimeoutError: Another process's invocation did not finish within ``wait_timeout_seconds``.
        IdempotencyRecordCorruptedError: The completed record cannot be decoded.
        IdempotencyResultTooLargeError: The completed result was too large to store.
        IdempotencyStoreError: The store failed before anything ran, or (a session turn) while storing its answer.
        IdempotencyLeaseLostError: The primary lost its claim while running; nothing was stored.
        SessionBusyError: With ``session``: another request holds the session.
    """
    config, key = call.config, call.key
    if claimed_at is None:
        completed, claimed_at, took_over = await _claim_traced(call, seen, session)
    else:
        # Claimed on the caller's thread already (a sync call's blocking claim, traced there).
        completed, took_over = None, False

    if completed is not None:
        logger.debug("key=<%s> | completed within the window, replaying stored result", key)
        if callback_handler is not None:
            callback_handler(result=completed)
        yield {"result": completed}
        return

    lease = _Lease(
        config.store,
        key,
        call.owner,
        config.lease_seconds,
        expires_after_seconds=config.expires_after_seconds,
        claimed_at=claimed_at,
        on_lost=on_lease_lost,
    )
    context = _RunContext(key=key, hmac_key=config.hmac_key, leases=[lease])
    settled = False  # the claim was completed or released on the way: nothing is left to hand back
    cancelled = False  # cancelled from outside, learnt from a refused write rather than from the heartbeat
    events: AsyncGenerator[Any, None] | None = None
    lease.start()
    try:
        if config.journaled:
            # Only a claim taken over can carry a journal (a fresh claim starts an empty one): read it then only.
            max_step = config.journal_max_step_bytes
            context.journal = (
                await Journal.load(config.store, key, call.owner, max_step_bytes=max_step)
                if took_over
                else Journal(config.store, key, call.owner, max_step_bytes=max_step)
            )
        if session is not None:
            await session.begin(key, lambda: not context.lease_lost(), lambda: lease.lost)
            if session.lease is not None:
                context.leases.append(session.lease)
        events = run_primary(context)
        try:
            async for event in events:
                result_seen = result_of(event) if isinstance(event, dict) and "result" in event else None
                if result_seen is None:
                    # Every event of a long answer passes here: the common case (no session, the lease live) costs
                    # one comparison; anything else is checked in full (and raises if the lease is gone).
                    if session is not None or lease.lost is not None or time.monotonic() >= lease.valid_until:
                        _check(lease, session)
                    yield event
                    continue
                await lease.stop()
                _check(lease, session)
                # The outcome is decided: carry it out to the end even if our caller is cancelled meanwhile (a
                # result stored but its turn rolled back, or a claim left to lapse, would break every retry).
                settled = True
                await shielded(settle(call, result_seen, session))
                yield event
        except Exception as e:
            # A run that failed after losing its lease failed because of that loss (e.g. a fenced session write).
            try:
                _check(lease, session)
            except IdempotencyLeaseLostError as lost:
                raise lost from e
            # strands wraps what a model or a tool raises (EventLoopException): a claim lost on the way (a journal
            # write refused) is what the caller must learn.
            found = _lost_in(e)
            if found is not None:
                cancelled = cancelled or isinstance(found, InvocationCancelledError)
                raise found from e
            # Likewise a store that failed under the run (a tool call it could not mark started): the caller learns
            # a store error (HTTP: 503, retry), not a failed agent.
            outage = _cause_of(e, IdempotencyStoreError)
            if outage is not None and outage is not e:
                raise outage from e
            raise
    finally:
        if context.journal is not None:
            context.journal.finish()
        try:
            await lease.stop()
        finally:
            try:
                if events is not None:
                    try:
                        await events.aclose()
                    finally:
                        context.close()  # what the primary's start set up for the run (see _RunContext.on_close)
            except Exception as e:
                # Cleanup that failed after the run lost its claim (a session write refused while strands closes, say)
                # failed because of that loss: the loss is what the caller must learn, not the refused write.
                if lease.lost is not None:
                    raise lease.lost from e
                raise
            finally:
                # Failed, aborted, closed early, lease lost, or cleanup raised: nothing stored. Undo the turn and
                # release the session first (a retry of this token must not find the session still held), then yield
                # the claim (fenced: a claim already taken over is not touched) so the next retry takes it over at
                # once, and resumes from its journal: what this run completed is not paid for, or run, again.
                if not settled:
                    try:
                        if session is not None:
                            await shielded(session.abort())
                    finally:
                        # A cancelled run ends with a tombstone (a retry runs afresh); any other yields its journal.
                        ended = call.end_cancelled() if lease.cancelled or cancelled else call.yield_claim()
                        await shielded(ended)


async def _claim_traced(
    call: DurableCall, seen: IdempotencyRecord | None, session: SessionTurn | None
) -> tuple[ReplayedAgentResult | None, float, bool]:
    """``claim_or_wait`` in the claim span.

    Returns:
        The stored result to replay (or None: claimed), when the winning write was sent, and whether the claim was
        taken over.
    """
    key = call.key
    span = telemetry.start_span(telemetry.SPAN_CLAIM, {"key": key})
    started = time.monotonic()
    decision = "error"
    error: BaseException | None = None
    try:
        watch_lock = session.watch_lock if session is not None else None
        completed, claimed_at, took_over = await claim_or_wait(call, span, seen, watch_lock)
        if completed is None:
            decision = "claimed"
            return None, claimed_at, took_over
        result = decode_result(completed, call.structured_output_model)
        decision = "replayed"
        telemetry.add_event(span, telemetry.EVENT_RESULT_REPLAYED, {"key": key})
        return result, claimed_at, took_over
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


def _lost_in(error: BaseException) -> IdempotencyLeaseLostError | None:
    """The lost claim behind ``error``, if any (looked for in what it was raised from)."""
    return _cause_of(error, IdempotencyLeaseLostError)


_E = TypeVar("_E", bound=BaseException)


def _cause_of(error: BaseException, kind: type[_E]) -> _E | None:
    """The first ``kind`` in ``error``'s chain (itself, then what it was raised from), if any."""
    seen: set[int] = set()
    cause: BaseException | None = error
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, kind):
            return cause
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return None


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
    context = _RunContext(key=None, hmac_key=None, leases=[])
    try:
        await session.begin(None)
        if session.lease is not None:
            context.leases.append(session.lease)
        events = run_primary(context)
        async for event in events:
            session.check()
            result_seen = result_of(event)
            if result_seen is not None and result_seen.stop_reason != "cancelled":
                # The commit finishes even if our caller is cancelled meanwhile (the abort below is then a no-op);
                # if it fails, the turn does not count and the abort below rolls it back.
                await shielded(session.commit())
                committed = True
            yield event
    finally:
        try:
            if events is not None:
                try:
                    await events.aclose()
                finally:
                    context.close()
        finally:
            if not committed:
                await shielded(session.abort())
