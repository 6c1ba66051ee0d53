"""Bedrock AgentCore Runtime: ``AgentCoreEntrypoint``, an entrypoint for ``bedrock_agentcore``'s app.

```python
from bedrock_agentcore.runtime import BedrockAgentCoreApp
from strands_py.http import run
from strands_py.http.agentcore import AgentCoreEntrypoint

entrypoint = AgentCoreEntrypoint(make_agent, IdempotencyConfig(store=DynamoDBIdempotencyStore("agent-idempotency")))
app = BedrockAgentCoreApp(lifespan=entrypoint.lifespan)
entrypoint.install(app)
run(app, host="0.0.0.0", port=8080, drain=[entrypoint])  # or app.run(): same, without the draining shutdown
```

The same guarantees as ``AgentApp`` on AgentCore's ``POST /invocations``: one run per key (joined while live,
replayed after), detached runs, Server-Sent Events with resumable ids, RFC 9457 problems with their status codes.
The payload is ``{"prompt": ..., "idempotency_key": "...", "last_event_id": "..."}``; the key may come in a header
instead (``Idempotency-Key``, or ``X-Amzn-Bedrock-AgentCore-Runtime-Custom-Idempotency-Key``, the form AgentCore
Runtime forwards to the container), and so may the last event id (``Last-Event-ID``, or
``X-Amzn-Bedrock-AgentCore-Runtime-Custom-Last-Event-Id``). The agent factory gets the request, whose
``request.state.payload`` is the payload.

This module does not import ``bedrock_agentcore``: it works with any version whose entrypoints receive
``(payload, context)`` with ``context.request`` the Starlette request, and pass a returned Starlette response through.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

from starlette.exceptions import HTTPException
from starlette.responses import Response

from ..idempotency.config import IdempotencyConfig
from ._access import SCOPE_KEY, Access, LoggedResponse
from ._options import ServingOptions
from ._problems import KEY_INVALID, KEY_MISSING, Problem, http_problem
from ._protocol import (
    ProblemError,
    is_valid_key,
    parse_idempotency_key,
    parse_invocation,
    parse_last_event_id,
    wants_event_stream,
)
from ._runs import Run
from ._scopes import ScopeFunction
from ._service import AgentFactory, InvocationService

logger = logging.getLogger(__name__)

KEY_FIELD = "idempotency_key"
LAST_EVENT_ID_FIELD = "last_event_id"
_CUSTOM = "x-amzn-bedrock-agentcore-runtime-custom-"


class AgentCoreEntrypoint:
    """A ``BedrockAgentCoreApp`` entrypoint serving idempotent invocations (see the module's documentation).

    Runs live on the app's worker event loop (where AgentCore runs async entrypoints) and stream on its server
    loop; both are safe. While runs are in flight, an installed entrypoint reports them to the app as async tasks,
    so ``/ping`` answers ``HealthyBusy`` and AgentCore Runtime does not reclaim a session whose client disconnected
    while its run goes on.
    """

    def __init__(
        self,
        agent_factory: AgentFactory,
        idempotency: IdempotencyConfig | None = None,
        *,
        scope: ScopeFunction | None = None,
        single_tenant: bool = False,
        require_key: bool = True,
        run_timeout_seconds: float = 900.0,
        shutdown_grace_seconds: float = 10.0,
        max_concurrent_runs: int = 1000,
        max_buffered_events: int = 10_000,
        retain_finished_runs: int = 256,
        retain_finished_seconds: float = 60.0,
        keepalive_seconds: float = 15.0,
        retry_after_seconds: int = 1,
    ) -> None:
        """Create the entrypoint; the arguments are ``AgentApp``'s.

        Whose keys: as ``AgentApp``. AgentCore Runtime forwards the ``Authorization`` header only when it is in
        the agent's request header allowlist; without it every request is ``anonymous``: pass ``scope=`` (the
        runtime user your authorizer verified) or ``single_tenant=True`` to say which you mean.
        """
        options = ServingOptions(
            require_key=require_key,
            run_timeout_seconds=run_timeout_seconds,
            shutdown_grace_seconds=shutdown_grace_seconds,
            max_concurrent_runs=max_concurrent_runs,
            max_buffered_events=max_buffered_events,
            retain_finished_runs=retain_finished_runs,
            retain_finished_seconds=retain_finished_seconds,
            keepalive_seconds=keepalive_seconds,
            retry_after_seconds=retry_after_seconds,
        )
        self.__name__ = "strands_py_invocations"  # AgentCore logs its entrypoint's name
        self._app: Any = None
        self._tasks: dict[Run, int] = {}
        self._service = InvocationService(
            agent_factory,
            idempotency or IdempotencyConfig(),
            scope,
            options,
            on_run=self._track,
            single_tenant=single_tenant,
        )

    def install(self, app: Any) -> None:
        """Register as ``app``'s entrypoint, and report runs in flight to its ping status."""
        self._app = app
        app.entrypoint(self)

    @property
    def running(self) -> int:
        """Invocations running right now."""
        return self._service.registry.active

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Any = None) -> AsyncIterator[None]:
        """``BedrockAgentCoreApp(lifespan=entrypoint.lifespan)``: on exit, drain the runs (see ``aclose``)."""
        self._service.reopen()
        try:
            yield
        finally:
            await self.aclose()

    async def aclose(self) -> None:
        """Refuse new invocations, give running ones the grace period, then cancel them (claims released).

        Idempotent; safe from any event loop. Cancellation: cancelling ``aclose`` stops waiting only.
        """
        await self._service.aclose()

    async def __call__(self, payload: Any, context: Any) -> Response:
        """The entrypoint: the payload and AgentCore's request context in, a Starlette response out.

        The response writes its access line (see ``strands_py.http``'s logger) once it has been sent.
        """
        request = getattr(context, "request", None)
        if request is None:
            return Problem(
                500, "about:blank", "Internal Server Error", "No request in the AgentCore context."
            ).response()
        access = Access(request.method)
        request.scope[SCOPE_KEY] = access
        return LoggedResponse(await self._answer(request, payload), access)

    async def _answer(self, request: Any, payload: Any) -> Response:
        try:
            request.state.payload = payload
            headers = request.headers
            token = _one_key(
                parse_idempotency_key(
                    headers.getlist("idempotency-key") + headers.getlist(_CUSTOM + "idempotency-key")
                ),
                payload.get(KEY_FIELD) if isinstance(payload, dict) else None,
            )
            if token is None and self._service.options.require_key:
                raise ProblemError(
                    Problem(
                        400, KEY_MISSING, "Idempotency key required", f"Send {KEY_FIELD} in the payload, or a header."
                    )
                )
            invocation = parse_invocation(payload, frozenset({KEY_FIELD, LAST_EVENT_ID_FIELD}))
            last_event_id = (
                headers.get("last-event-id")
                or headers.get(_CUSTOM + "last-event-id")
                or (payload.get(LAST_EVENT_ID_FIELD) if isinstance(payload, dict) else None)
            )
            return await self._service.invoke(
                request,
                invocation,
                token,
                stream=wants_event_stream(headers.get("accept")),
                last_event_id=parse_last_event_id(last_event_id if isinstance(last_event_id, str) else None),
            )
        except ProblemError as e:
            return e.problem.response()
        except HTTPException as e:
            return http_problem(e).response(dict(e.headers or {}))

    def _track(self, run: Run, started: bool) -> None:
        """Report runs in flight to the app as async tasks (its ``/ping`` says ``HealthyBusy`` meanwhile)."""
        app = self._app
        if app is None:
            return
        if started:
            self._tasks[run] = app.add_async_task("strands-py invocation")
        elif run in self._tasks:
            app.complete_async_task(self._tasks.pop(run))


def _one_key(from_headers: str | None, from_payload: Any) -> str | None:
    """The key, from a header or the payload (both may be given if they agree)."""
    if from_payload is not None:
        if not is_valid_key(from_payload) or (from_headers is not None and from_headers != from_payload):
            raise ProblemError(
                Problem(
                    400,
                    KEY_INVALID,
                    "Invalid idempotency key",
                    f"{KEY_FIELD} is a string of 1 to 255 printable ASCII characters, and agrees with the header.",
                )
            )
        return str(from_payload)
    return from_headers
