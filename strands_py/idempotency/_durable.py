"""The durable pass of an in-process primary: claim, or wait for another process and replay, then complete."""

from __future__ import annotations

import asyncio
import logging
import random
import time
import uuid
from collections.abc import AsyncGenerator, Callable
from typing import Any

from opentelemetry.trace import Span
from strands.agent.agent_result import AgentResult

from .. import telemetry
from .._events import result_of
from ..types.exceptions import IdempotencyKeyMismatchError, IdempotencyWaitTimeoutError
from .codec import decode_result, encode_result
from .config import IdempotencyConfig
from .keys import make_key, request_fingerprint
from .record import IdempotencyRecord, RecordState

logger = logging.getLogger(__name__)

# Polling another process's invocation: capped exponential backoff with jitter, never a parked thread.
_POLL_FIRST_SECONDS = 0.05
_POLL_MAX_SECONDS = 1.0


def _answer_options(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The call options that change the answer, for the request fingerprint."""
    return {
        "structured_output_model": kwargs.get("structured_output_model"),
        "structured_output_prompt": kwargs.get("structured_output_prompt"),
    }


async def durable_stream(
    config: IdempotencyConfig,
    scope: str,
    token: Any,
    prompt: Any,
    kwargs: dict[str, Any],
    callback_handler: Callable[..., Any],
    run_primary: Callable[[], AsyncGenerator[Any, None]],
) -> AsyncGenerator[Any, None]:
    """Run ``run_primary`` at most once per token and window, across every process sharing ``config.store``.

    Yields the primary's events, or for a replay one ``{"result": ReplayedAgentResult}`` event (after firing
    ``callback_handler(result=...)`` once).

    Raises:
        IdempotencyKeyMismatchError: The token's record has a different request fingerprint.
        IdempotencyWaitTimeoutError: Another process's invocation did not finish within ``wait_timeout_seconds``.
        IdempotencyRecordCorruptedError: The completed record cannot be decoded.
        IdempotencyResultTooLargeError: The completed result was too large to store.
    """
    key = make_key(scope, token)
    fingerprint = request_fingerprint(prompt, _answer_options(kwargs)) if config.validate_payload else None
    owner = uuid.uuid4().hex
    span = telemetry.start_span(telemetry.SPAN_CLAIM, {"key": key})
    started = time.monotonic()
    decision = "error"
    error: BaseException | None = None
    try:
        completed = await _claim_or_wait(config, key, owner, fingerprint, span)
        if completed is None:
            decision = "claimed"
        else:
            result = decode_result(completed, kwargs.get("structured_output_model"))
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
        callback_handler(result=result)
        yield {"result": result}
        return

    result_seen: AgentResult | None = None
    events = run_primary()
    try:
        async for event in events:
            event_result = result_of(event)
            if event_result is not None:
                result_seen = event_result
            yield event
    finally:
        await events.aclose()
        if result_seen is not None:
            await _complete(config, key, owner, fingerprint, result_seen)
        else:
            # Failed or aborted: failures are not stored, so the next retry runs.
            await _release(config, key, owner)


async def _claim_or_wait(
    config: IdempotencyConfig, key: str, owner: str, fingerprint: str | None, span: Span
) -> IdempotencyRecord | None:
    """Claim the key (returns None) or return its completed record, waiting while another process runs it."""
    store = config.store
    started = time.monotonic()
    delay = _POLL_FIRST_SECONDS
    while True:
        now = time.time()
        claim = IdempotencyRecord(
            key=key,
            state=RecordState.IN_PROGRESS,
            owner=owner,
            lease_expires_at=now + config.lease_seconds,
            expires_at=now + config.lease_seconds + config.expires_after_seconds,
            fingerprint=fingerprint,
        )
        existing = await store.claim(claim, now)
        if existing is None:
            logger.debug("key=<%s> | claimed", key)
            return None
        logger.debug("key=<%s>, state=<%s> | token already claimed", key, existing.state.value)
        if existing.state is RecordState.IN_PROGRESS:
            telemetry.add_event(span, telemetry.EVENT_WAITING_FOR_OWNER, {"key": key})
        while True:
            if fingerprint is not None and existing.fingerprint is not None and existing.fingerprint != fingerprint:
                raise IdempotencyKeyMismatchError(key)
            if existing.state is RecordState.COMPLETED:
                return existing
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
            current = await store.get(key)
            if current is None or not current.is_live(time.time()):
                # Completed-and-expired, released after a failure, or the owner's lease lapsed: claim it ourselves.
                if current is not None and current.state is RecordState.IN_PROGRESS:
                    logger.debug("key=<%s> | lease of the previous owner lapsed, taking over", key)
                    telemetry.add_event(span, telemetry.EVENT_LEASE_TAKEN_OVER, {"key": key})
                break
            existing = current


async def _complete(
    config: IdempotencyConfig, key: str, owner: str, fingerprint: str | None, result: AgentResult
) -> None:
    """Store the result for replay. Never raises: the primary's caller gets its result whatever happens here."""
    try:
        now = time.time()
        payload = encode_result(result, config.store.max_result_bytes)
        record = IdempotencyRecord(
            key=key,
            state=RecordState.COMPLETED,
            owner=owner,
            lease_expires_at=now,
            expires_at=now + config.expires_after_seconds,
            fingerprint=fingerprint,
            payload=payload,
        )
        if not await config.store.complete(record):
            logger.warning("key=<%s> | claim was taken over by another owner, result not stored", key)
    except Exception:
        # The claim stays until its lease lapses; a retry after that runs again. Better than failing the caller.
        logger.exception("key=<%s> | could not store the result; releasing the claim", key)
        await _release(config, key, owner)


async def _release(config: IdempotencyConfig, key: str, owner: str) -> None:
    """Delete our claim so that a retry runs. Never raises (a lapsed lease frees it anyway)."""
    try:
        if not await config.store.release(key, owner):
            logger.warning("key=<%s> | claim was taken over by another owner before release", key)
    except Exception:
        logger.exception("key=<%s> | could not release the claim; it frees itself when its lease lapses", key)
