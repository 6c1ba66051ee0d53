"""``strands_py.Agent``: ``strands.Agent`` with one gate in ``stream_async`` that deduplicates retried invocations."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import aclosing
from typing import Any, cast

import strands
from strands.agent.agent_result import AgentResult
from strands.hooks import BeforeToolCallEvent
from strands.types.agent import ConcurrentInvocationMode

from .. import telemetry
from ..idempotency._calls import _store
from ..idempotency._context import STATE_KEY, _RunContext, run_context_of
from ..idempotency.config import IdempotencyConfig
from ..idempotency.keys import make_key, request_fingerprint, session_lock_key
from ..idempotency.record import RecordState
from ..session._conversation import session_id_of
from ..session._turn import SessionTurn
from ..turn import DurableCall
from ..turn._journaled import JournaledModel, JournaledTool
from ..types.exceptions import (
    IdempotencyAbortedError,
    IdempotencyLeaseLostError,
    IdempotencyStoreError,
)
from . import _gate
from ._concurrency import _ConcurrencyController, _InflightInvocation

logger = logging.getLogger(__name__)

# Events kept per invocation for streaming duplicates: a long streamed answer is a few thousand events.
DEFAULT_MAX_BUFFERED_EVENTS = 10_000

_BUSY = "Agent is already processing a request. Concurrent invocations are not supported."


class Agent(strands.Agent):
    """A drop-in ``strands.Agent`` whose invocations are idempotent per ``idempotency_token``.

    ``agent(prompt, idempotency_token=T)``, ``await agent.invoke_async(prompt, idempotency_token=T)`` and
    ``agent.stream_async(prompt, idempotency_token=T)`` all pass one gate. In THROW mode (the default) a call whose
    token ``==`` the in-flight invocation's token is a duplicate: it does not run the agent, it waits for the primary
    and receives the primary's ``AgentResult`` (``stream_async``: the primary's events, then the result event) and its
    ``callback_handler`` fires once with ``result=``. If the primary raises, every duplicate raises the same
    exception; if the primary ends without a result (cancelled, stream closed, ``KeyboardInterrupt``), duplicates
    raise ``IdempotencyAbortedError``. A call with another token, or none, while an invocation is in flight raises
    ``ConcurrencyException`` at once; a call that would wait for the very invocation it runs inside (a tool calling
    its own agent with the same token) raises ``ReentrantInvocationError``. The token is forgotten when the
    invocation ends. ``ConcurrentInvocationMode.UNSAFE_REENTRANT`` ignores tokens in-process. Calls without a token
    behave exactly like ``strands.Agent``.

    With ``idempotency=IdempotencyConfig(...)``, tokens are durable: completed results are replayed, other processes
    wait or replay, and every Agent instance of this process given the same store (and scope) joins a running
    invocation of the same key in-process, without touching the store.

    Thread-safety: calls may come from any threads and event loops (each sync call runs its own loop); waiting
    duplicates hold no thread. Cancellation: cancelling a waiting duplicate affects only that duplicate; cancelling
    the primary (or closing its stream) aborts its duplicates, releases its durable claim, and leaves the agent
    usable as soon as the cancellation (or ``aclose()``) returns.
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
        _check_config(idempotency)
        super().__init__(*args, **kwargs)
        # Not `_concurrency`: strands-agents >= 1.45 keeps its own controller under that name.
        self._idempotency_gate = gate
        self._max_buffered_events = max_buffered_events
        self._idempotency: IdempotencyConfig | None = idempotency
        self.hooks.add_callback(BeforeToolCallEvent, self._before_tool_call)

    @property
    def idempotency(self) -> IdempotencyConfig | None:
        """The durable idempotency configuration (None: tokens are forgotten when their invocation ends).

        May be replaced between invocations (an HTTP layer gives each request's agent its tenant's scope).
        """
        return self._idempotency

    @idempotency.setter
    def idempotency(self, config: IdempotencyConfig | None) -> None:
        _check_config(config)
        self._idempotency = config

    @property
    def _idempotency_scope(self) -> str:
        """The durable scope of a call that names no session (see ``_scope_for``)."""
        return self._scope_for(session_id_of(self))

    def _scope_for(self, session_id: str | None) -> str:
        """The durable scope: the configuration's, else derived from the agent's name and id, and its session.

        The session enters the default scope as a digest (keyed with ``hmac_key``), so that two conversations of
        one agent never share keys and no session id is stored in the clear.
        """
        config = self._idempotency
        if config is not None and config.scope is not None:
            return config.scope
        scope = f"{self.name}/{self.agent_id}".replace("#", "_")
        if session_id is not None:
            digest = session_lock_key(scope, session_id, config.hmac_key if config is not None else None)
            scope = f"{scope}/session-{digest.rsplit('-', 1)[-1][:32]}"
        return scope

    def __call__(self, prompt: Any = None, *, idempotency_token: Any = None, **kwargs: Any) -> AgentResult:
        """Run the agent synchronously, as ``strands.Agent.__call__``; see ``stream_async`` for the gate.

        A durable replay is answered on the calling thread: when the store can claim without an event loop
        (``claim_blocking``), the claim is made right here, and a stored result is returned without starting the
        thread and event loop strands' ``__call__`` starts for every call. Anything else (the agent runs, another
        owner is waited for, a duplicate follows) continues exactly as ``invoke_async`` would.
        """
        config = self._idempotency
        if (
            config is None
            or idempotency_token is None
            or not config.store.supports_blocking_claims
            or _gate.HANDOFF in kwargs
        ):
            return super().__call__(prompt, idempotency_token=idempotency_token, **kwargs)
        begun = _gate.begin(self, prompt, idempotency_token, dict(kwargs))
        if begun.registered and begun.session_id is None:
            replay = _gate.replay_blocking(self, begun)
            if replay is not None:
                return replay
        try:
            return super().__call__(prompt, idempotency_token=idempotency_token, **{**kwargs, _gate.HANDOFF: begun})
        finally:
            if not begun.consumed:
                # strands failed before our invoke_async ran (it never received the call): free what begin took.
                _gate.abandon(self, begun)

    async def stream_async(
        self,
        prompt: Any = None,
        *,
        idempotency_token: Any = None,
        **kwargs: Any,
    ) -> AsyncIterator[Any]:
        """Run the agent and yield its events; a duplicate of the in-flight token yields the primary's events.

        Args:
            prompt: As for ``strands.Agent.stream_async``.
            idempotency_token: Deduplication token (THROW mode only, unless durable), matched by ``==``; need not be
                hashable (durable tokens: str, bytes or JSON).
            **kwargs: Every other keyword of ``strands.Agent.stream_async`` (``invocation_state``,
                ``structured_output_model``, ``callback_handler``, ...), passed through unchanged.

        Yields:
            The primary's events, ending with ``{"result": AgentResult}``. A duplicate yields the primary's events
            from its beginning (replayed from the buffer, then live), up to ``max_buffered_events``, and then the
            same result event.

        Raises:
            ConcurrencyException: Another invocation (other token, or none) is in flight on this agent.
            ReentrantInvocationError: The call runs inside the invocation it would wait for.
            IdempotencyAbortedError: Duplicate of a primary that ended without a result.
            IdempotencyTokenError: The token could not be compared with the token in flight (or, with
                ``idempotency=``, is not str, bytes or JSON).
            IdempotencyKeyMismatchError: With ``idempotency=``: the token was used for a different request.
            IdempotencyWaitTimeoutError: With ``idempotency=``: another process's invocation of the token did not
                finish within ``wait_timeout_seconds``.
            IdempotencyStoreError: With ``idempotency=``: the store failed; nothing ran.
            IdempotencyLeaseLostError: With ``idempotency=``: the primary lost its claim while running.
            IdempotencyRecordCorruptedError: With ``idempotency=``: the token's stored record cannot be decoded.
            IdempotencyResultTooLargeError: With ``idempotency=``: the token completed, but its result was too large
                to store and replay.
            Exception: Whatever the primary raised (for a duplicate: the primary's exception object).
        """
        # aclosing: closing this stream closes the gate now, in this task, not when the garbage collector finds it.
        async with aclosing(self._gate(prompt, idempotency_token, kwargs, stream_duplicate=True)) as events:
            async for event in events:
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
        async with aclosing(self._gate(prompt, idempotency_token, kwargs, stream_duplicate=False)) as events:
            async for event in events:
                last = event
        return cast(AgentResult, last["result"])

    def _gate(
        self, prompt: Any, idempotency_token: Any, kwargs: dict[str, Any], *, stream_duplicate: bool
    ) -> AsyncGenerator[Any, None]:
        """The one gate every invocation passes (see ``stream_async`` and ``_gate.py``): decided now, run as iterated.

        Not a generator of its own: every event already passes through ``_gate.run``, and one layer fewer is one
        resumption fewer per event. Its caller iterates the stream at once (nothing may take the agent in between).
        """
        begun = kwargs.pop(_gate.HANDOFF, None) if _gate.HANDOFF in kwargs else None
        if begun is None:
            begun = _gate.begin(self, prompt, idempotency_token, kwargs)
        return _gate.run(self, prompt, begun, stream_duplicate=stream_duplicate)

    async def cancel_invocation(self, idempotency_token: Any, *, session_id: str | None = None) -> RecordState | None:
        """Cancel the durable invocation of ``idempotency_token``, wherever it runs.

        Marks its claim in the store: its owner (this agent, another one, another host) learns at its next heartbeat,
        stops at its next cancellation point, stores nothing, rolls its session turn back and leaves a ``CANCELLED``
        record, so that a retry of the token runs afresh; its caller gets ``InvocationCancelledError``. When this very
        agent runs the invocation, it is stopped at once (``cancel()``). A finished invocation is left as it is.

        Args:
            idempotency_token: The token the invocation was made with.
            session_id: The session it belongs to (default: the agent's session manager's, if any).

        Returns:
            The state of the token's record after the call: ``IN_PROGRESS`` (being cancelled), ``COMPLETED`` (it
            finished first: its answer stands), ``CANCELLED``, or None (nothing under that token).

        Raises:
            ValueError: The agent has no ``idempotency`` configuration (nothing is durable to cancel).
            IdempotencyTokenError: The token is unusable.
            IdempotencyStoreError: The store failed, or does not support cancels.
        """
        config = self._idempotency
        if config is None:
            raise ValueError("cancel_invocation needs an agent with an idempotency configuration")
        if not config.store.supports_cancel:
            raise IdempotencyStoreError(f"{type(config.store).__name__} does not support cancels")
        key = make_key(self._scope_for(session_id or session_id_of(self)), idempotency_token, config.hmac_key)
        record = await _store(config.store.cancel(key))
        inflight = self._idempotency_gate.inflight
        if inflight is not None and inflight.key == key:
            self.cancel()  # ours: stop now, not at the next heartbeat
        return None if record is None else record.state

    def _session_of_call(self, kwargs: dict[str, Any]) -> str | None:
        """The session this call belongs to: ``session_id=`` of the call, else the session manager's."""
        own = session_id_of(self)
        named = kwargs.get("session_id")
        if named is None:
            return own
        if not isinstance(named, str) or not named:
            raise ValueError(f"session_id must be a non-empty string, got {named!r}")
        if own is not None and named != own:
            raise ValueError("session_id names another session than the agent's session manager")
        return named

    def _session_turn(self, session_id: str | None, owner: str, prompt: Any) -> SessionTurn | None:
        """The session side of a turn, when the agent is durable and the call belongs to a session.

        ``prompt`` is checked against the conversation's pending interrupts once it is read under the session lock.
        """
        config = self._idempotency
        if config is None or session_id is None:
            return None
        scope = self._scope_for(session_id)
        return SessionTurn(self, config, scope, session_id, owner, self._on_lease_lost, prompt=prompt)

    def _durable_call(
        self, prompt: Any, token: Any, kwargs: dict[str, Any], session_id: str | None
    ) -> DurableCall | None:
        """The durable identity of this call (key, fingerprint), or None when it is not durable."""
        config = self._idempotency
        if config is None or token is None:
            return None
        scope = self._scope_for(session_id)
        structured_model = kwargs.get("structured_output_model") or self._default_structured_output_model
        fingerprint = None
        if config.validate_payload:
            options = {
                "structured_output_model": structured_model,
                "structured_output_prompt": kwargs.get("structured_output_prompt") or self._structured_output_prompt,
            }
            if session_id is not None:
                # One token names one turn of one conversation: the same token in another conversation is another
                # request (with a configured scope, the session is not in the key).
                options["session"] = session_id
            fingerprint = request_fingerprint(scope, prompt, options, config.hmac_key)
        return DurableCall(
            config=config,
            key=make_key(scope, token, config.hmac_key),
            fingerprint=fingerprint,
            structured_output_model=structured_model,
        )

    def _upstream_stream(
        self, prompt: Any, kwargs: dict[str, Any], context: _RunContext | None
    ) -> AsyncGenerator[Any, None]:
        """``strands.Agent.stream_async`` for this call; the token is never passed on.

        strands-agents < 1.45 does not know ``idempotency_token``; newer ones would deduplicate a second time. A
        durable run's context travels in ``invocation_state``, which strands hands to hooks and tools: set up here,
        undone by ``context.close()``, which whoever closes the returned stream calls (the turn layer). Upstream's
        own generator is returned, not wrapped: every event of the run passes one layer fewer.
        """
        if context is None:
            # Annotated upstream as an AsyncIterator, but it is an async generator: we need its aclose().
            return cast(AsyncGenerator[Any, None], super().stream_async(prompt, **kwargs))
        # The caller's own invocation_state object is passed on (as upstream does, tools may write to it for the
        # caller to read), with our entry in it for the duration of the run.
        state = kwargs.get("invocation_state")
        if state is None:
            state = {}
        state[STATE_KEY] = context
        model = self.model
        if context.journal is not None:
            # For this run only (the agent runs one invocation at a time): model calls go through the journal.
            self.model = cast(Any, JournaledModel(model, context.journal))

        def restore() -> None:
            self.model = model
            if state.get(STATE_KEY) is context:
                del state[STATE_KEY]

        context.on_close(restore)
        return cast(AsyncGenerator[Any, None], super().stream_async(prompt, **{**kwargs, "invocation_state": state}))

    def _before_tool_call(self, event: BeforeToolCallEvent) -> None:
        """Give the tool call its idempotency key; refuse to start it once this primary's lease is lost."""
        context = run_context_of(event.invocation_state)
        if context is None:
            return
        context.key_for(event.tool_use)
        if context.lease_lost():
            # Another caller may already be running this token (or this session): this tool must not run twice.
            event.cancel_tool = "cancelled: this invocation lost its idempotency lease to another caller"
            self.cancel()
            return
        config = self._idempotency
        if context.journal is not None and event.selected_tool is not None and config is not None:
            event.selected_tool = JournaledTool(
                event.selected_tool, context.journal, config.uncertain_tools, config.uncertain_tool_default
            )

    def _on_lease_lost(self, error: IdempotencyLeaseLostError) -> None:
        """Stop the run at its next cancellation point (model stream, before tools)."""
        logger.debug("key=<%s> | lease lost, cancelling the run", error.key)
        self.cancel()

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
                async with aclosing(inflight.stream_events()) as events:
                    async for event in events:
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
        handler = self._callback_handler_for(kwargs)
        if handler is not None:
            handler(result=shared)
        yield {"result": shared}

    def _callback_handler_for(self, kwargs: dict[str, Any]) -> Callable[..., Any] | None:
        """The call's ``callback_handler=`` keyword whenever it was passed (even a falsy one), else the agent's."""
        if "callback_handler" in kwargs:
            return cast("Callable[..., Any] | None", kwargs["callback_handler"])
        return cast(Callable[..., Any], self.callback_handler)

    async def _wait_for_primary(self, inflight: _InflightInvocation) -> None:
        """Wait, holding no thread, until the primary has settled.

        Cancellation: cancels only this duplicate's own future.
        """
        await inflight.register_waiter()


def _check_config(config: IdempotencyConfig | None) -> None:
    if config is not None and not isinstance(config, IdempotencyConfig):
        raise TypeError(f"idempotency must be an IdempotencyConfig, got {type(config).__name__}")
