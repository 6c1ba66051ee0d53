"""``strands_py.Agent``: ``strands.Agent`` with one gate in ``stream_async`` that deduplicates retried invocations."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any, cast

import strands
from strands.agent.agent_result import AgentResult
from strands.types.agent import ConcurrentInvocationMode
from strands.types.exceptions import ConcurrencyException

from .. import telemetry
from .._events import result_of
from ..idempotency._durable import durable_stream
from ..idempotency.config import IdempotencyConfig
from ..types.exceptions import IdempotencyAbortedError
from ._concurrency import _ConcurrencyController, _InflightInvocation

logger = logging.getLogger(__name__)

# Events kept per invocation for streaming duplicates: a long streamed answer is a few thousand events.
DEFAULT_MAX_BUFFERED_EVENTS = 10_000


class Agent(strands.Agent):
    """A drop-in ``strands.Agent`` whose invocations are idempotent per ``idempotency_token``.

    ``agent(prompt, idempotency_token=T)``, ``await agent.invoke_async(prompt, idempotency_token=T)`` and
    ``agent.stream_async(prompt, idempotency_token=T)`` all pass the gate in ``stream_async``. In THROW mode (the
    default) a call whose token ``==`` the in-flight invocation's token is a duplicate: it does not run the agent,
    it waits for the primary and receives the primary's ``AgentResult`` (``stream_async`` yields one final
    ``{"result": ...}`` event) and its ``callback_handler`` fires once with ``result=``. If the primary raises,
    every duplicate raises the same exception; if the primary ends without a result (cancelled, stream closed,
    ``KeyboardInterrupt``), duplicates raise ``IdempotencyAbortedError``. A call with another token, or none, while
    an invocation is in flight raises ``ConcurrencyException`` at once. The token is forgotten when the invocation
    ends. ``ConcurrentInvocationMode.UNSAFE_REENTRANT`` ignores tokens. Calls without a token behave exactly like
    ``strands.Agent``.

    Thread-safety: calls may come from any threads and event loops (each sync call runs its own loop); waiting
    duplicates hold no thread. Cancellation: cancelling a waiting duplicate affects only that duplicate; cancelling
    the primary aborts its duplicates and leaves the agent usable.
    """

    def __init__(
        self,
        *args: Any,
        idempotency: IdempotencyConfig | None = None,
        max_buffered_events: int = DEFAULT_MAX_BUFFERED_EVENTS,
        **kwargs: Any,
    ) -> None:
        """Create an agent; takes the arguments of ``strands.Agent``, plus ``idempotency`` and ``max_buffered_events``.

        Args:
            *args: Positional arguments of ``strands.Agent``.
            idempotency: Durable idempotency (replay after completion, deduplication across processes through a
                shared store). None (the default): a token is forgotten when its invocation ends, as upstream.
            max_buffered_events: How many events of an invocation with a token are kept for duplicates that call
                ``stream_async``; a streaming duplicate gets the first ``max_buffered_events`` events and the result
                (one that joins after the cap was passed gets the result only). 0: duplicates never stream events.
            **kwargs: Keyword arguments of ``strands.Agent``.

        Raises:
            ValueError: ``concurrent_invocation_mode`` is not a ``ConcurrentInvocationMode``, or
                ``max_buffered_events`` is negative.
            TypeError: ``idempotency`` is not an ``IdempotencyConfig``.
        """
        # Validated before upstream sees it, which would otherwise accept any value and treat it as "not THROW".
        gate = _ConcurrencyController(
            kwargs.get("concurrent_invocation_mode", ConcurrentInvocationMode.THROW), max_buffered_events
        )
        if idempotency is not None and not isinstance(idempotency, IdempotencyConfig):
            raise TypeError(f"idempotency must be an IdempotencyConfig, got {type(idempotency).__name__}")
        super().__init__(*args, **kwargs)
        # Not `_concurrency`: strands-agents >= 1.45 keeps its own controller under that name.
        self._idempotency_gate = gate
        self.idempotency = idempotency
        self._idempotency_scope = (idempotency.scope if idempotency else None) or (
            f"{self.name}/{self.agent_id}".replace("#", "_")
        )

    async def stream_async(
        self,
        prompt: Any = None,
        *,
        idempotency_token: Any = None,
        **kwargs: Any,
    ) -> AsyncIterator[Any]:
        """Run the agent and yield its events; a duplicate of the in-flight token yields only the result event.

        Args:
            prompt: As for ``strands.Agent.stream_async``.
            idempotency_token: Deduplication token (THROW mode only), matched by ``==``; need not be hashable.
            **kwargs: Every other keyword of ``strands.Agent.stream_async`` (``invocation_state``,
                ``structured_output_model``, ``callback_handler``, ...), passed through unchanged.

        Yields:
            The primary's events, ending with ``{"result": AgentResult}``. A duplicate yields the primary's events
            from its beginning (replayed from the buffer, then live), up to ``max_buffered_events``, and then the
            same result event.

        Raises:
            ConcurrencyException: Another invocation (other token, or none) is in flight on this agent.
            IdempotencyAbortedError: Duplicate of a primary that ended without a result.
            IdempotencyTokenError: The token could not be compared with the token in flight (or, with
                ``idempotency=``, is not str, bytes or JSON-serializable).
            IdempotencyKeyMismatchError: With ``idempotency=``: the token was used for a different request.
            IdempotencyWaitTimeoutError: With ``idempotency=``: another process's invocation of the token did not
                finish within ``wait_timeout_seconds``.
            IdempotencyRecordCorruptedError: With ``idempotency=``: the token's stored record cannot be decoded.
            IdempotencyResultTooLargeError: With ``idempotency=``: the token completed, but its result was too large
                to store and replay.
            Exception: Whatever the primary raised (for a duplicate: the primary's exception object).
        """
        async for event in self._gate(prompt, idempotency_token, kwargs, stream_duplicate=True):
            yield event

    async def invoke_async(self, prompt: Any = None, *, idempotency_token: Any = None, **kwargs: Any) -> AgentResult:
        """Run the agent and return its result; a duplicate of the in-flight token returns the primary's result.

        Same gate as ``stream_async`` (see there for every outcome), but a duplicate does not read the primary's
        events: it only waits for the result.

        Args:
            prompt: As for ``strands.Agent.invoke_async``.
            idempotency_token: Deduplication token, matched by ``==``.
            **kwargs: Every other keyword of ``strands.Agent.invoke_async``, passed through unchanged.

        Returns:
            The primary's ``AgentResult`` (a ``ReplayedAgentResult`` when replayed from the durable store).
        """
        last: Any = None
        async for event in self._gate(prompt, idempotency_token, kwargs, stream_duplicate=False):
            last = event
        return cast(AgentResult, last["result"])

    async def _gate(
        self, prompt: Any, idempotency_token: Any, kwargs: dict[str, Any], *, stream_duplicate: bool
    ) -> AsyncGenerator[Any, None]:
        """The one gate every invocation passes; see ``stream_async``."""
        gate = self._idempotency_gate
        begin = gate.begin(idempotency_token)

        if begin.waiting_on is not None:
            async for event in self._follow_primary(begin.waiting_on, kwargs, stream_duplicate):
                yield event
            return

        if not begin.lock_acquired:
            raise ConcurrencyException(
                "Agent is already processing a request. Concurrent invocations are not supported."
            )

        token = begin.registered_token
        buffer = gate.inflight if token is not None else None
        result: AgentResult | None = None
        error: BaseException | None = None
        events: AsyncGenerator[Any, None] | None = None
        try:
            if self.idempotency is not None and idempotency_token is not None:
                events = durable_stream(
                    self.idempotency,
                    self._idempotency_scope,
                    idempotency_token,
                    prompt,
                    kwargs,
                    self._callback_handler_for(kwargs),
                    lambda: self._upstream_stream(prompt, kwargs),
                )
            else:
                events = self._upstream_stream(prompt, kwargs)
            async for event in events:
                event_result = result_of(event)
                if event_result is not None:
                    result = event_result
                    if token is not None:
                        gate.publish(token, result)
                elif buffer is not None:
                    buffer.append_event(event)
                yield event
        except Exception as e:
            error = e
            raise
        finally:
            try:
                # Close upstream's stream now, not at garbage collection: it holds upstream's own lock until then.
                if events is not None:
                    await events.aclose()
            finally:
                if token is not None:
                    # Neither result nor error (cancelled, closed early, BaseException) aborts the duplicates.
                    gate.complete(token, result=result, error=error)
                else:
                    gate.release_lock()

    def _upstream_stream(self, prompt: Any, kwargs: dict[str, Any]) -> AsyncGenerator[Any, None]:
        """``strands.Agent.stream_async`` for this call; the token is never passed on.

        strands-agents < 1.45 does not know ``idempotency_token``; newer ones would deduplicate a second time.
        """
        # Annotated upstream as an AsyncIterator, but it is an async generator: we need its aclose().
        return cast(AsyncGenerator[Any, None], super().stream_async(prompt, **kwargs))

    async def _follow_primary(
        self, inflight: _InflightInvocation, kwargs: dict[str, Any], stream_duplicate: bool
    ) -> AsyncGenerator[Any, None]:
        """The duplicate's path: wait for (or stream) the primary, then its outcome, traced without the token."""
        waiters = inflight.waiter_count + 1
        # No token in logs or spans: tokens often carry request or user identifiers.
        logger.debug("waiters=<%d> | duplicate detected, waiting for primary", waiters)
        span = telemetry.start_span(telemetry.SPAN_DUPLICATE)
        telemetry.add_event(span, telemetry.EVENT_DUPLICATE_DETECTED, {"waiters": waiters})
        started = time.monotonic()
        outcome = "cancelled"
        error: BaseException | None = None
        try:
            if stream_duplicate:
                async for event in inflight.stream_events():
                    yield event
            else:
                await self._wait_for_primary(inflight)
            shared = inflight.outcome()
            outcome = "result"
        except IdempotencyAbortedError as e:
            outcome, error = "aborted", e
            raise
        except (asyncio.CancelledError, GeneratorExit):
            raise  # this duplicate was cancelled or its stream closed: outcome stays "cancelled"
        except BaseException as e:
            outcome, error = "error", e
            raise
        finally:
            telemetry.end_span(span, {"wait_seconds": time.monotonic() - started, "outcome": outcome}, error)
        self._callback_handler_for(kwargs)(result=shared)
        yield {"result": shared}

    def _callback_handler_for(self, kwargs: dict[str, Any]) -> Any:
        """The call's ``callback_handler=`` keyword, else the agent's."""
        return kwargs.get("callback_handler") or self.callback_handler

    async def _wait_for_primary(self, inflight: _InflightInvocation) -> None:
        """Wait, holding no thread, until the primary has settled.

        Cancellation: cancels only this duplicate's own future.
        """
        await inflight.register_waiter()
