"""The gate every invocation passes, in two halves: a synchronous ``begin`` that decides, and an async ``run``.

``begin`` runs no I/O and holds no loop: it validates the call, computes its durable identity, takes the agent's
THROW lock or joins the per-agent invocation, and registers the durable key in this process's registry (or finds the
invocation to relay). ``run`` then follows, relays, replays or runs, and always cleans up what ``begin`` took.

The split is what lets a synchronous ``agent(...)`` answer a replay on the caller's own thread (``replay_blocking``):
strands' ``__call__`` starts a thread and an event loop for every call, which a stored result does not need.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any, Protocol

from strands.agent.agent_result import AgentResult
from strands.types.exceptions import ConcurrencyException

from .. import telemetry
from .._events import result_of
from ..idempotency._calls import shielded
from ..idempotency._context import _RunContext
from ..idempotency.codec import decode_result
from ..idempotency.config import IdempotencyConfig
from ..idempotency.record import IdempotencyRecord, RecordState
from ..session._interrupts import check_interrupts
from ..session._turn import SessionTurn
from ..turn import DurableCall, durable_stream, locked_stream
from ..types.exceptions import (
    IdempotencyError,
    IdempotencyKeyMismatchError,
    IdempotencyLeaseLostError,
    IdempotencyStoreError,
    InterruptStateError,
    ReentrantInvocationError,
)
from ._concurrency import _BeginResult, _ConcurrencyController, _InflightInvocation, _running, _waits_for_itself
from ._registry import _InflightRegistry, registry_for

logger = logging.getLogger(__name__)

# The keyword that carries a begun call from ``Agent.__call__`` through strands' ``__call__`` to ``invoke_async``.
HANDOFF = "_strands_py_begun"

# How long an abandoned call waits for its claim to be handed back (it frees itself after a lease anyway).
_ABANDON_RELEASE_SECONDS = 10.0

_BUSY = "Agent is already processing a request. Concurrent invocations are not supported."


class Agent(Protocol):
    """What the gate needs of ``strands_py.Agent`` (a protocol, so that this module does not import ``agent.py``)."""

    idempotency: IdempotencyConfig | None
    _idempotency_gate: _ConcurrencyController
    _max_buffered_events: int

    def _session_of_call(self, kwargs: dict[str, Any]) -> str | None: ...

    def _durable_call(
        self, prompt: Any, token: Any, kwargs: dict[str, Any], session_id: str | None
    ) -> DurableCall | None: ...

    def _session_turn(self, session_id: str | None, owner: str, prompt: Any) -> SessionTurn | None: ...

    def _callback_handler_for(self, kwargs: dict[str, Any]) -> Callable[..., Any] | None: ...

    def _follow_primary(
        self, inflight: _InflightInvocation, kwargs: dict[str, Any], stream_duplicate: bool
    ) -> AsyncGenerator[Any, None]: ...

    def _upstream_stream(
        self, prompt: Any, kwargs: dict[str, Any], context: _RunContext | None
    ) -> AsyncGenerator[Any, None]: ...

    def _on_lease_lost(self, error: IdempotencyLeaseLostError) -> None: ...


@dataclass
class _Begun:
    """What ``begin`` decided for one call, and what ``run`` must clean up.

    Attributes:
        kwargs: The call's keywords for upstream (without ours).
        session_id: The session the call belongs to, if any.
        call: The durable identity, for a durable call with a token.
        begin: The per-agent controller's decision.
        inflight: The invocation this call's duplicates follow (when it is a primary with a token or durable key).
        registry: The store's in-process registry, for a durable call.
        registered: Whether ``inflight`` is registered there under ``call.key`` (this call is the process's primary).
        other: Another agent's invocation of the same key, to relay.
        claimed_at: Set when the claim was already taken (by ``replay_blocking``): the monotonic time it was sent.
        seen: The record a blocking claim attempt met (another owner's), to wait on.
        consumed: Whether ``run`` took this call over (it then owns every cleanup).
    """

    kwargs: dict[str, Any]
    session_id: str | None
    call: DurableCall | None
    begin: _BeginResult
    inflight: _InflightInvocation | None = None
    registry: _InflightRegistry | None = None
    registered: bool = False
    other: _InflightInvocation | None = None
    claimed_at: float | None = None
    seen: IdempotencyRecord | None = None
    consumed: bool = field(default=False, repr=False)
    refusal: _Refusal | None = field(default=None, repr=False)


def begin(agent: Agent, prompt: Any, token: Any, kwargs: dict[str, Any]) -> _Begun:
    """Decide, without I/O: duplicate, refused, or primary (registered or relaying). See ``_Begun``.

    Raises:
        IdempotencyTokenError: The token is unusable (durable) or its comparison failed.
        TypeError: The prompt cannot be fingerprinted.
        ValueError: ``session_id=`` is invalid.
    """
    session_id = agent._session_of_call(kwargs)
    if "session_id" in kwargs:
        kwargs = {k: v for k, v in kwargs.items() if k != "session_id"}
    # Everything that can reject the call (an unusable token, an unfingerprintable prompt) runs before the gate.
    call = agent._durable_call(prompt, token, kwargs, session_id)
    decision = agent._idempotency_gate.begin(
        token,
        key=call.key if call is not None else None,
        fingerprint=call.fingerprint if call is not None else None,
    )
    begun = _Begun(kwargs=kwargs, session_id=session_id, call=call, begin=decision)
    if decision.waiting_on is not None or not decision.lock_acquired:
        return begun
    try:
        # The invocation duplicates follow: the per-agent one, or (UNSAFE_REENTRANT, durable) one of our own that
        # only agents sharing the store can find.
        inflight = decision.registered
        if inflight is None and call is not None:
            inflight = _InflightInvocation(agent._max_buffered_events, key=call.key, fingerprint=call.fingerprint)
        begun.inflight = inflight
        if call is not None and inflight is not None:
            begun.registry = registry_for(call.config.store)
            begun.other = begun.registry.begin(call.key, inflight)
            begun.registered = begun.other is None
    except BaseException as e:
        # The agent's lock is held from here on: whatever fails must hand it back, or every later call is refused.
        finish(agent, begun, None, e)
        raise
    return begun


def finish(agent: Agent, begun: _Begun, result: AgentResult | None, error: BaseException | None) -> None:
    """Release what ``begin`` took and settle the duplicates. Never raises; call exactly once per primary."""
    decision, inflight, call = begun.begin, begun.inflight, begun.call
    if begun.registered and begun.registry is not None and call is not None and inflight is not None:
        begun.registry.end(call.key, inflight)
    if decision.registered is not None:
        # Neither result nor error (cancelled, closed early, BaseException) aborts the duplicates.
        agent._idempotency_gate.complete(decision.registered_token, result=result, error=error)
    else:
        agent._idempotency_gate.release_lock()
        if inflight is not None:
            inflight.settle(result, error)


def check_joinable(inflight: _InflightInvocation, call: DurableCall | None) -> None:
    """Refuse to follow an invocation of another request, or one the caller itself runs inside."""
    if (
        call is not None
        and call.fingerprint is not None
        and inflight.fingerprint is not None
        and call.fingerprint != inflight.fingerprint
    ):
        raise IdempotencyKeyMismatchError(call.key)
    if _waits_for_itself(inflight):
        raise ReentrantInvocationError(
            "this call runs inside the invocation of the same idempotency token (a tool, hook or callback handler "
            "of that invocation called the agent again with its token); waiting for it would deadlock"
        )


async def run(agent: Agent, prompt: Any, begun: _Begun, *, stream_duplicate: bool) -> AsyncGenerator[Any, None]:
    """The async half: follow, relay, replay or run, then clean up what ``begin`` took."""
    begun.consumed = True
    decision, call, kwargs = begun.begin, begun.call, begun.kwargs
    if decision.waiting_on is not None:
        check_joinable(decision.waiting_on, call)
        async with aclosing(agent._follow_primary(decision.waiting_on, kwargs, stream_duplicate)) as followed:
            async for event in followed:
                yield event
        return
    if not decision.lock_acquired:
        raise ConcurrencyException(_BUSY)

    inflight = begun.inflight
    result: AgentResult | None = None
    error: BaseException | None = None
    events: AsyncGenerator[Any, None] | None = None
    try:
        events = _events(agent, prompt, begun)
        while True:
            # Code running inside this primary (tools, hooks, callback handlers, tasks they start) is marked, so
            # that a call of theirs that would wait for this very invocation fails instead of deadlocking.
            marker = _running.set((*_running.get(), inflight)) if inflight is not None else None
            try:
                event = await events.__anext__()
            except StopAsyncIteration:
                break
            finally:
                if marker is not None:
                    _running.reset(marker)
            event_result = result_of(event) if isinstance(event, dict) and "result" in event else None
            if event_result is not None:
                result = event_result
                if decision.registered is not None:
                    agent._idempotency_gate.publish(decision.registered_token, result)
                elif inflight is not None:
                    inflight.settle(result, None)
            elif inflight is not None:
                inflight.append_event(event)
            yield event
    except Exception as e:
        error = e
        refusal = begun.refusal
        if call is not None and refusal is not None and isinstance(e, InterruptStateError) and refusal.refused(e):
            # The durable stream ended (its claim yielded, with its journal, for a retry of the same request). A
            # refused call ran nothing, and its retry is another request (a corrected answer, another fingerprint),
            # which a yielded claim would refuse as a key reused: the claim is released instead, fenced on its owner
            # (a claim another caller took over in between is left to it).
            logger.debug("key=<%s> | refused by the interrupt check, releasing the claim", call.key)
            await shielded(call.release())
        raise
    finally:
        try:
            # Close the inner streams now, in this task: upstream holds its own lock until its generator ends, and
            # a store claim must be handed back before this call returns.
            if events is not None:
                await events.aclose()
        finally:
            finish(agent, begun, result, error)


def _events(agent: Agent, prompt: Any, begun: _Begun) -> AsyncGenerator[Any, None]:
    """The stream a primary yields: a relayed invocation, the durable pass, a locked turn, or upstream's own."""
    call, kwargs, inflight = begun.call, begun.kwargs, begun.inflight
    if begun.other is not None:
        # Another Agent instance of this process runs this key: relay its invocation.
        check_joinable(begun.other, call)
        if inflight is not None:
            inflight.follows = begun.other
        return agent._follow_primary(begun.other, kwargs, stream_duplicate=True)
    if call is not None:
        session = agent._session_turn(begun.session_id, call.owner, prompt)
        refusal = begun.refusal = _Refusal(session)

        def primary(context: _RunContext) -> AsyncGenerator[Any, None]:
            if session is None:
                # No conversation to read again: the agent's own interrupt state (its lock held) is what counts.
                refusal.check(agent, prompt)
            return agent._upstream_stream(prompt, kwargs, context)

        return durable_stream(
            call,
            agent._callback_handler_for(kwargs),
            primary,
            agent._on_lease_lost,
            session,
            claimed_at=begun.claimed_at,
            seen=begun.seen,
        )
    if agent.idempotency is not None and begun.session_id is not None:
        turn = agent._session_turn(begun.session_id, uuid.uuid4().hex, prompt)
        assert turn is not None
        return locked_stream(turn, lambda context: agent._upstream_stream(prompt, kwargs, context))
    return agent._upstream_stream(prompt, kwargs, None)


class _Refusal:
    """Whether a durable call was refused by the interrupt check (its session turn's, or the agent's own)."""

    def __init__(self, session: SessionTurn | None) -> None:
        self.session = session
        self.error: InterruptStateError | None = None

    def check(self, agent: Any, prompt: Any) -> None:
        try:
            check_interrupts(agent, prompt)
        except InterruptStateError as e:
            self.error = e
            raise

    def refused(self, error: BaseException) -> bool:
        found = self.error if self.session is None else self.session.refused
        return found is not None and found is error


def replay_blocking(agent: Agent, begun: _Begun) -> AgentResult | None:
    """On the caller's thread, with no event loop: one blocking claim; a replay is answered right here.

    Only for the process's primary of a durable key with no session, on a store with ``claim_blocking``. Returns
    the replayed result (everything ``begin`` took is released), or None with ``begun`` updated for ``run``: the
    claim taken (``claimed_at``), or the record of another owner to wait on (``seen``).

    Raises:
        IdempotencyKeyMismatchError: The token's record is another request's (nothing is left held).
        IdempotencyStoreError: The store failed (nothing is left held).
    """
    call = begun.call
    assert call is not None and begun.registered
    config = call.config
    claim_blocking = config.store.claim_blocking
    span = telemetry.start_span(telemetry.SPAN_CLAIM, {"key": call.key})
    started = time.monotonic()
    decision = "error"
    error: BaseException | None = None
    try:
        now = time.time()
        claimed_at = time.monotonic()
        try:
            existing = claim_blocking(call.claim_record(now), now)
        except Exception as e:
            # The write may have been applied before the call failed (a read timeout, a reset connection): hand
            # it back (fenced on our owner), or every retry waits a whole lease for an owner that is not running.
            _release_blocking(call)
            if isinstance(e, IdempotencyError):
                raise
            raise IdempotencyStoreError(f"idempotency store failed: {type(e).__name__}: {e}") from e
        if existing is None or call.owns(existing):
            decision = "claimed"
            begun.claimed_at = claimed_at
            return None
        try:
            call.check_request(existing)
        except IdempotencyKeyMismatchError:
            decision = "mismatch"
            telemetry.add_event(span, telemetry.EVENT_FINGERPRINT_MISMATCH, {"key": call.key})
            raise
        if existing.state is not RecordState.COMPLETED or existing.expired(now):
            # Another owner runs it: the async path waits (the claim span continues there).
            decision = "waiting"
            begun.seen = existing
            return None
        replay = decode_result(existing, call.structured_output_model)
        decision = "replayed"
        telemetry.add_event(span, telemetry.EVENT_RESULT_REPLAYED, {"key": call.key})
    except BaseException as e:
        error = e
        finish(agent, begun, None, e)
        begun.consumed = True
        raise
    finally:
        telemetry.end_span(span, {"decision": decision, "wait_seconds": time.monotonic() - started}, error)
    logger.debug("key=<%s> | completed within the window, replaying stored result", call.key)
    finish(agent, begun, replay, None)
    begun.consumed = True
    handler = agent._callback_handler_for(begun.kwargs)
    if handler is not None:
        handler(result=replay)
    return replay


def abandon(agent: Agent, begun: _Begun) -> None:
    """Free what ``begin`` (and a blocking claim) took for a call that never reached ``run``. Never raises."""
    begun.consumed = True
    call = begun.call
    if begun.claimed_at is not None and call is not None:
        _release_blocking(call)
    finish(agent, begun, None, None)


def _release_blocking(call: DurableCall) -> None:
    """Release ``call``'s claim from a synchronous caller; never raises, waits a bounded time."""
    # The caller's thread may run an event loop of its own: release from a thread of ours, with one of its own.
    releaser = threading.Thread(target=asyncio.run, args=(call.release(),), name="strands-py-release")
    releaser.start()
    releaser.join(_ABANDON_RELEASE_SECONDS)
