"""The invocation service behind every HTTP front (the ASGI app, the AgentCore adapter): keys, runs, responses."""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, cast

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response

from ..agent.agent import Agent
from ..idempotency._context import run_context_of
from ..idempotency.config import IdempotencyConfig
from ..idempotency.keys import make_key, request_fingerprint
from ..types.exceptions import IdempotencyKeyMismatchError
from ._access import Access, access_of
from ._options import ServingOptions
from ._problems import (
    INVALID_BODY,
    TOO_MANY_RUNS,
    Problem,
    problem_for,
    run_timeout_problem,
    shutting_down_problem,
)
from ._protocol import Invocation, ProblemError
from ._registry import RunRegistry
from ._responses import DeferredResponse, EventStreamResponse
from ._runs import Place, Run
from ._scopes import ScopeFunction, Scopes, is_async_callable
from ._stored import stored_run

logger = logging.getLogger(__name__)

AgentFactory = Callable[..., "Agent | Awaitable[Agent]"]

REPLAYED_HEADER = "Idempotent-Replayed"
_CANCEL_WAIT_SECONDS = 10.0
_MAX_CACHED_CONFIGS = 1024


class InvocationService:
    """Maps requests onto runs: scope and key, join or start, then answer as JSON or Server-Sent Events.

    Thread-safety: requests may arrive on any one event loop; followers of a run may read it from other loops (the
    AgentCore adapter streams on its server's loop what runs on its worker loop).
    """

    def __init__(
        self,
        agent_factory: AgentFactory,
        idempotency: IdempotencyConfig,
        scope: ScopeFunction | None,
        options: ServingOptions,
        on_run: Callable[[Run, bool], None] | None = None,
        *,
        single_tenant: bool = False,
    ) -> None:
        """Serve the agents of ``agent_factory`` with ``idempotency``; see ``AgentApp``.

        ``on_run(run, started)`` is told when a run starts (True) and when its task ends (False). Without ``scope``
        and ``single_tenant``, keys are scoped per caller by their credentials, and a warning says so.

        Raises:
            TypeError: ``idempotency`` is not an ``IdempotencyConfig``.
            ValueError: Both ``scope`` and ``single_tenant``, or the config's scope is not valid Unicode text.
        """
        if not isinstance(idempotency, IdempotencyConfig):
            raise TypeError(f"idempotency must be an IdempotencyConfig, got {type(idempotency).__name__}")
        self._factory = agent_factory
        self._factory_is_async = is_async_callable(agent_factory)
        self.config = idempotency
        self.scopes = Scopes(idempotency, scope, single_tenant, _hmac_key(idempotency), options.retry_after_seconds)
        self.options = options
        retain = min(options.retain_finished_seconds, idempotency.expires_after_seconds)
        self.registry = RunRegistry(options.retain_finished_runs, retain)
        self._configs: dict[str, IdempotencyConfig] = {}
        self._on_run = on_run
        self.closing = False
        self.with_session_manager = False

    # -- keys --------------------------------------------------------------------------------------------------

    async def scope_of(self, request: Request) -> str:
        """The request's scope (see ``Scopes.of``).

        Raises:
            HTTPException: As raised by the scope function (401, 403, ...).
            ProblemError: 500, the scope function failed or returned no tenant id.
        """
        return await self.scopes.of(request)

    def durable_key(self, scope: str, token: str) -> str:
        """The store's key of ``token`` in ``scope`` (the one the agent computes too)."""
        return make_key(scope, token, _hmac_key(self.config))

    def _config_for(self, scope: str) -> IdempotencyConfig:
        """One config object per scope, so that agents of one scope share one configuration."""
        config = self._configs.get(scope)
        if config is None:
            if len(self._configs) >= _MAX_CACHED_CONFIGS:
                self._configs.clear()
            config = self._configs[scope] = dataclasses.replace(self.config, scope=scope)
        return config

    # -- POST /invocations -------------------------------------------------------------------------------------

    async def invoke(
        self,
        request: Request,
        invocation: Invocation,
        token: str | None,
        *,
        stream: bool,
        last_event_id: tuple[str, int] | None,
    ) -> Response:
        """Join the key's run (same request) or start one, and answer when it has something to say.

        Raises:
            HTTPException: From the scope function.
            ProblemError: 400 an answer to interrupts outside a conversation (with ``session_manager=``), 422 key
                reused with another request, 503 shutting down or too many runs, 500 scope.
        """
        if invocation.answers and self.with_session_manager:
            # Agents of POST /invocations get no session manager here: they have no interrupts to answer.
            raise ProblemError(
                Problem(
                    400,
                    INVALID_BODY,
                    "Invalid request body",
                    "interrupt_responses answer a conversation's interrupts: POST them to /sessions/{id}/invocations.",
                )
            )
        access = access_of(request)
        scope = await self.scope_of(request)
        key = self.durable_key(scope, token) if token is not None else None
        if access is not None:
            access.key = key
        fingerprint = self.fingerprint(scope, invocation) if key is not None else None
        run = self.join(key, fingerprint)
        joined = run is not None
        if run is None:
            run = self.start(request, scope, key, fingerprint, invocation, token)
        return self.respond(run, stream=stream, joined=joined, last_event_id=last_event_id, access=access)

    def join(self, key: str | None, fingerprint: str | None) -> Run | None:
        """The run of ``key`` a request of it follows: live, or finished with a result a moment ago; else None.

        Raises:
            ProblemError: 422, the run is another request's (its fingerprint differs).
        """
        run = self.registry.find(key) if key is not None else None
        if run is None or (run.finished and not run.succeeded):
            return None
        if fingerprint is not None and run.fingerprint is not None and fingerprint != run.fingerprint:
            logger.debug("key=<%s> | key reused with another request", key)
            raise ProblemError(problem_for(IdempotencyKeyMismatchError(str(key)), 0))
        logger.debug("key=<%s> | joining the run of this key", key)
        return run

    def fingerprint(self, scope: str, invocation: Invocation, options: dict[str, Any] | None = None) -> str | None:
        """The request's fingerprint (None when payloads are not validated); ``options`` enter it too.

        Raises:
            ProblemError: 400, the prompt cannot be fingerprinted.
        """
        if not self.config.validate_payload:
            return None
        try:
            return request_fingerprint(scope, invocation.prompt, options or {}, _hmac_key(self.config))
        except TypeError as e:
            raise ProblemError(
                Problem(400, INVALID_BODY, "Invalid request body", "The prompt cannot be fingerprinted (too deep).")
            ) from e

    async def key_of(self, request: Request, token: str) -> str:
        """The durable key of ``token`` in the request's scope.

        Raises:
            HTTPException: From the scope function.
            ProblemError: 500, the scope function failed.
        """
        return self.durable_key(await self.scope_of(request), token)

    def start(
        self,
        request: Request,
        scope: str,
        key: str | None,
        fingerprint: str | None,
        invocation: Invocation,
        token: str | None,
        *,
        prepare: Callable[[], Awaitable[Agent]] | None = None,
        place: Place | None = None,
    ) -> Run:
        """Register and start a new run (no await between the lookup and this: one run per key).

        ``prepare()`` builds the run's agent (default: the agent factory, for the request); ``place``: the run is a
        turn of a conversation, and stands there in its line.

        Raises:
            ProblemError: 503, shutting down or too many runs.
        """
        options = self.options
        if self.closing:
            raise ProblemError(shutting_down_problem(options.retry_after_seconds))
        if self.registry.active >= options.max_concurrent_runs:
            raise ProblemError(
                Problem(
                    503,
                    TOO_MANY_RUNS,
                    "Too many invocations",
                    "This server is running as many invocations as it allows; retry later with the same key.",
                    options.retry_after_seconds,
                )
            )

        # The agent puts its run's context (with its step journal) here while it runs.
        invocation_state: dict[str, Any] = {}

        async def open_stream() -> AsyncIterator[Any]:
            agent = await (prepare() if prepare is not None else self.make_agent(request))
            agent.idempotency = self._config_for(scope)  # the agent keys its tokens with the config's scope
            run.agent = agent  # from here a cancel goes through agent.cancel(): no await before the stream starts
            return agent.stream_async(invocation.prompt, idempotency_token=token, invocation_state=invocation_state)

        def journal_of() -> Any:
            context = run_context_of(invocation_state)
            return None if context is None else context.journal

        run = Run(key, fingerprint, options.max_buffered_events)
        run.place = place
        self.registry.add(run)
        if self._on_run is not None:
            self._on_run(run, True)
        run.start(
            open_stream,
            timeout_problem=run_timeout_problem(options.run_timeout_seconds),
            timeout_seconds=options.run_timeout_seconds,
            retry_after=options.retry_after_seconds,
            on_settled=self._settled,
            journal_of=journal_of,
        )
        logger.debug("key=<%s> | run started", key)
        return run

    def _settled(self, run: Run) -> None:
        if run.place is not None:
            run.place.leave()
        self.registry.settled(run)
        if self._on_run is not None:
            self._on_run(run, False)

    async def make_agent(self, request: Request, **options: Any) -> Agent:
        """An agent of the factory for ``request`` (sync factories run on a worker thread).

        ``options`` are passed to the factory as keywords (``session_manager=``); with ``session_manager`` set
        (``with_session_manager``), every call gets ``session_manager=`` (None for ``POST /invocations``).

        Raises:
            TypeError: The factory returned something else than a ``strands_py.Agent``.
        """
        if self.with_session_manager:
            options.setdefault("session_manager", None)
        if self._factory_is_async:
            agent: Any = await cast(Awaitable[Agent], self._factory(request, **options))
        else:
            agent = await run_in_threadpool(self._factory, request, **options)
            if inspect.isawaitable(agent):
                agent = await agent
        if not isinstance(agent, Agent):
            raise TypeError(f"agent_factory must return a strands_py.Agent, got {type(agent).__name__}")
        return agent

    # -- answering ---------------------------------------------------------------------------------------------

    def respond(
        self,
        run: Run,
        *,
        stream: bool,
        joined: bool,
        last_event_id: tuple[str, int] | None = None,
        access: Access | None = None,
    ) -> Response:
        """The response for a follower of ``run``: JSON when it finished, or its event stream once it started."""

        async def prepare() -> Response:
            await run.wait(lambda r: r.decided if stream else r.finished)
            return self._answer(run, stream=stream, joined=joined, last_event_id=last_event_id, access=access)

        return DeferredResponse(prepare)

    def _answer(
        self,
        run: Run,
        *,
        stream: bool,
        joined: bool,
        last_event_id: tuple[str, int] | None,
        access: Access | None = None,
    ) -> Response:
        if access is not None:
            access.answered(run, joined=joined)
        headers = {REPLAYED_HEADER: "true"} if joined or run.replayed else {}
        problem = run.problem
        if problem is not None and (not stream or run.failed_before_start):
            return problem.response(headers)
        if not stream:
            return Response(run.result_json, media_type="application/json", headers=headers)
        start = run.start_index(last_event_id)
        seen = run.seen_by(last_event_id)  # an earlier owner's events this client saw (a takeover happened)
        if run.at_end(start) and not run.rewinds(seen):
            return Response(status_code=204, headers=headers)  # EventSource: nothing more, stop reconnecting
        return EventStreamResponse(self._frames(run, start, seen), headers)

    async def _frames(self, run: Run, start: int, seen: int) -> AsyncIterator[bytes]:
        yield f"retry: {self.options.reconnect_millis}\n\n".encode()
        async for frame in run.events(start, self.options.keepalive_seconds, seen):
            yield frame

    # -- GET /invocations/{key}/events -------------------------------------------------------------------------

    async def follow(self, request: Request, token: str, last_event_id: tuple[str, int] | None) -> Response:
        """The event stream of the key's invocation: its run here, or its stored result (waiting while it runs).

        Raises:
            HTTPException: From the scope function.
        """
        access = access_of(request)
        scope = await self.scope_of(request)
        key = self.durable_key(scope, token)
        if access is not None:
            access.key = key

        async def prepare() -> Response:
            run = self.registry.find(key)
            if run is None or (run.finished and not run.succeeded):
                # A failed run here may have been run again elsewhere since: the store knows. If it knows nothing,
                # the failure is what a reconnecting client should see.
                try:
                    run = await stored_run(self.config, self.registry, key, self.options.retry_after_seconds)
                except ProblemError as e:
                    if run is None or e.problem.status != 404:
                        raise
            await run.wait(lambda r: r.decided)
            return self._answer(run, stream=True, joined=True, last_event_id=last_event_id, access=access)

        return DeferredResponse(prepare)

    # -- lifecycle ---------------------------------------------------------------------------------------------

    def reopen(self) -> None:
        """Accept new invocations again (a lifespan startup after a shutdown)."""
        self.closing = False

    async def aclose(self) -> None:
        """Stop starting runs; give running ones ``shutdown_grace_seconds``, then stop them (claims yielded).

        Idempotent. Cancellation: cancelling ``aclose`` stops waiting; runs already cancelled stay cancelled.
        """
        self.closing = True
        runs = self.registry.active_runs()
        if runs:
            logger.debug("runs=<%d> | shutting down, waiting for running invocations", len(runs))
            if not await _settle(runs, self.options.shutdown_grace_seconds):
                problem = shutting_down_problem(self.options.retry_after_seconds)
                for run in runs:
                    run.cancel(problem)
                if not await _settle(runs, _CANCEL_WAIT_SECONDS):
                    logger.warning("runs=<%d> | runs did not end after cancellation", self.registry.active)
        self.registry.clear()


async def _settle(runs: list[Run], timeout: float) -> bool:
    """Wait until every run's task has ended, at most ``timeout`` seconds; whether they all did."""
    waits = [asyncio.ensure_future(run.wait(lambda r: r.settled)) for run in runs]
    try:
        _, pending = await asyncio.wait(waits, timeout=timeout)
    finally:
        for wait in waits:
            wait.cancel()
    return not pending


def _hmac_key(config: IdempotencyConfig) -> bytes | None:
    """The config's HMAC key for keys and fingerprints, when the config has one."""
    key = getattr(config, "hmac_key", None)
    return key if isinstance(key, bytes) else None
