"""``AgentApp``: the ASGI app that serves idempotent agent invocations over HTTP."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from ..idempotency.config import IdempotencyConfig
from ._access import SCOPE_KEY, Access, access_of
from ._control import RunControl
from ._options import ServingOptions, WebhookOptions
from ._page import render_page
from ._problems import KEY_MISSING, Problem, http_problem
from ._protocol import (
    Invocation,
    ProblemError,
    is_valid_key,
    parse_idempotency_key,
    parse_invocation,
    parse_last_event_id,
    read_json_body,
    wants_event_stream,
)
from ._scopes import ScopeFunction
from ._service import AgentFactory, InvocationService
from ._sessions import Conversations, SessionManagerFactory, check_agent_factory
from ._webhooks import CURRENT_REQUEST, Webhooks, WebhookTarget

logger = logging.getLogger(__name__)


class AgentApp:
    """An ASGI app serving idempotent invocations of agents, one agent per request.

    Routes (relative to where it is mounted):

    - ``POST /invocations``: body ``{"prompt": str | [content blocks]}`` (``application/json``), header
      ``Idempotency-Key`` (draft-ietf-httpapi-idempotency-key-header; an sf-string, the bare form accepted too).
      JSON result by default; ``Accept: text/event-stream`` streams Server-Sent Events, resumable with
      ``Last-Event-ID``; it starts with the run's first event (a failure before it is a status code). A retry
      of a key joins its run (live, or finished a moment ago) or replays its stored result, with
      ``Idempotent-Replayed: true``. Errors are ``application/problem+json`` (RFC 9457).
    - ``GET /invocations/{key}/events``: the events of that key's invocation (in the caller's scope), for
      ``EventSource``: live, resumed after ``Last-Event-ID`` (or ``?last_event_id=``, for a new ``EventSource``
      that goes on where an earlier one was), or replayed from the store. 404 for a key nobody runs any more (its
      owner stopped without a result): POST it again to resume it.
    - ``GET /invocations/{key}``: the status of that key's invocation (in the caller's scope), JSON: ``status``
      ``queued`` / ``running`` / ``cancelling`` / ``completed`` (with its ``result``) / ``failed`` (stopped without a
      result: POST it again to resume it) / ``cancelled``, ``where`` it runs (``here`` or ``elsewhere``) and its
      ``lease_seconds`` while it runs, ``started_at`` / ``finished_at`` where this server knows them. 404 unknown.
    - ``DELETE /invocations/{key}``: cancel it wherever it runs (a mark in the store its owner sees at its next
      heartbeat; a run of this server is stopped at once through its agent's ``cancel()``): the turn is rolled
      back and nothing is stored, so the key runs afresh when sent again. 202 (``cancelling``, ``Location`` of the
      status) while it stops, 200 with the final state when it had finished, 404 unknown, 501 for a store without
      ``supports_cancel``. Idempotent. Followers of a cancelled run get the ``invocation-cancelled`` problem (409).
    - With ``session_manager=``: ``POST /sessions/{id}/invocations`` (as ``POST /invocations``) runs a turn of
      conversation ``{id}`` under its session lock; a busy conversation answers per the config's
      ``session_invocation_mode``: ``throw`` 409 ``session-busy`` (``Retry-After``: one lease), ``enqueue`` 202 with
      the status at ``Location: /invocations/{key}`` (``queued``, with its position on this server). ``GET
      /sessions/{id}``: idle or busy, the running turn (a digest of its key), the turns queued here, the last turn
      completed here. ``GET /sessions/{id}/messages?offset=&limit=``: its messages, paged (``next`` link).
    - ``GET /``: a small chat page (only with ``page=True``).

    With ``webhook=``, an invocation that completes, fails or is cancelled here is POSTed to the webhook's URL as an
    event (``invocation.completed``, ``invocation.failed``, ``invocation.cancelled``), signed per Standard Webhooks
    with ``webhook_secret``, retried with backoff (``webhook_options``), drained at shutdown; a server that replays a
    completed key sends its event again unless its delivery was recorded in the store (see docs/webhooks.md).

    Whose keys: keys of different scopes never meet (a key of one caller can neither join, replay nor read
    another's invocation). With ``scope=``, the scope is the tenant the function returns. By default, it is the
    caller the request's ``Authorization`` header names (a digest of it; requests without one share an
    ``anonymous`` scope), and a warning at construction says so. ``single_tenant=True`` declares one scope for
    every request: anyone who knows a key can read its answer.

    One line per invocation request is logged on the ``strands_py.http`` logger at INFO (a digest of the key, the
    status, ``ran``/``joined``/``replayed``, the duration; never the key or the prompt).

    Every invocation is a *detached run* owned by the app: a client that disconnects stops following it, the run
    carries on (at most ``run_timeout_seconds``) and its result is stored; a retry re-attaches. At shutdown, runs
    get ``shutdown_grace_seconds`` to finish, then are stopped, which yields their claims so that another server
    takes them over at once (resuming from their journal). A ``DELETE`` is another thing: it cancels the
    invocation itself, which then runs afresh only if sent again.

    Lifespan: standalone (``uvicorn.run(app)``) the app runs its own lifespan. Mounted in FastAPI or Starlette
    (``parent.mount("/agent", app)``) it gets none, because mounted apps receive no lifespan events: wire it into the
    parent's, ``FastAPI(lifespan=app.lifespan)`` or ``async with app.lifespan(): ...`` inside your own, or call
    ``await app.aclose()`` at shutdown. Without that, runs in flight at exit are simply lost with the process
    (their claims lapse after the lease). Nothing needs starting: runs start on the serving loop on demand.

    Servers wait for open responses before the lifespan shutdown, so under plain uvicorn open event streams
    hold the shutdown until uvicorn's ``--timeout-graceful-shutdown``; ``strands_py.http.run`` (and
    ``python -m strands_py serve``) drain the app first, so streams end with their run's last event.

    Thread-safety: serve it from one event loop (any ASGI server does).
    """

    def __init__(
        self,
        agent_factory: AgentFactory,
        idempotency: IdempotencyConfig | None = None,
        *,
        scope: ScopeFunction | None = None,
        single_tenant: bool = False,
        require_key: bool = True,
        max_body_bytes: int = 1_000_000,
        run_timeout_seconds: float = 900.0,
        shutdown_grace_seconds: float = 10.0,
        max_concurrent_runs: int = 1000,
        max_buffered_events: int = 10_000,
        retain_finished_runs: int = 256,
        retain_finished_seconds: float = 60.0,
        keepalive_seconds: float = 15.0,
        retry_after_seconds: int = 1,
        reconnect_millis: int = 1000,
        page: bool = False,
        session_manager: SessionManagerFactory | None = None,
        webhook: WebhookTarget | None = None,
        webhook_secret: str | list[str] | None = None,
        webhook_options: WebhookOptions | None = None,
    ) -> None:
        """Create the app.

        Args:
            agent_factory: ``factory(request) -> strands_py.Agent``, sync (run on a worker thread) or async; called
                once per run, never for a request that joins a run. The app sets the agent's ``idempotency`` to
                ``idempotency`` with the request's scope (an ``IdempotencyConfig`` the agent had is replaced).
            idempotency: Store and policy of the durable layer (default: an in-memory store, this process only).
                Its ``scope`` (default ``"invocations"``) names this service's keys.
            scope: ``scope(request) -> str`` (sync or async): the tenant or principal; keys of different scopes
                never meet (a key of one tenant can neither join, replay nor read another's). Any non-empty str
                works (it is escaped; a very long one is digested); an empty string or a non-str is a 500
                ``scope-invalid`` problem. It may raise Starlette's ``HTTPException`` (401, 403). Default: the
                caller's credentials: a keyed digest of the ``Authorization`` header (HMAC with the config's
                ``hmac_key`` when set), and one ``anonymous`` scope for requests without one. A client whose
                credentials change between retries (a refreshed token) is then another caller: return your
                authenticated principal here to keep its retries together.
            single_tenant: Declare that every request shares one scope (no ``scope`` function allowed): anyone who
                knows a key can read its answer. Without either, keys are scoped per caller, and the app logs a
                warning at construction.
            require_key: Refuse requests without ``Idempotency-Key`` (400). With False, such requests run
                without deduplication and cannot be resumed.
            max_body_bytes: Largest request body (413 beyond it, checked while reading).
            run_timeout_seconds: A run is stopped after this long (504; its claim is yielded, nothing stored),
                the time it waited behind other turns of its conversation included.
            shutdown_grace_seconds: How long shutdown waits for running invocations before cancelling them.
            max_concurrent_runs: Runs in flight at once; beyond it new invocations get 503 with ``Retry-After``.
            max_buffered_events: Events kept per run for followers and resumes; past it only ``message``,
                ``result`` and ``error`` events are kept (followers then miss text chunks, never the result).
            retain_finished_runs: Finished runs kept in memory, so that a reconnect resumes exactly.
            retain_finished_seconds: How long a finished run is kept (at most the config's expiry).
            keepalive_seconds: An idle event stream gets an SSE comment this often (keeps proxies from closing it).
            retry_after_seconds: ``Retry-After`` of 409 and 503 answers.
            reconnect_millis: The ``retry:`` sent at the start of each event stream (``EventSource`` reconnect delay).
            page: Serve the chat page at ``GET /``.
            session_manager: ``factory(session_id, request) -> SessionManager`` (sync or async; strands'
                ``FileSessionManager``, ``S3SessionManager``, any ``RepositorySessionManager``): serve conversations
                at ``/sessions/{id}``. The id it gets is the caller's conversation scoped to the caller:
                ``conv-<32 hex digits>``, a keyed digest of the caller's scope and the id, so two callers' ``conv-1``
                never share storage. The agent factory is then called as ``agent_factory(request,
                session_manager=manager)`` (``None`` for ``POST /invocations``).
            webhook: Where events go: a URL (``https://...``), or ``webhook(request) -> URL | None`` (sync, quick and
                without I/O, or async), asked when a run of that request ends (None: no event). Needs
                ``webhook_secret``.
            webhook_secret: The Standard Webhooks secret the events are signed with, ``whsec_<base64>`` (24 to 64
                bytes; ``strands_py.http.new_webhook_secret()`` makes one), or a list of them during a rotation (the
                new one first: each signs). Checked here: a malformed secret never reaches a delivery.
            webhook_options: Retries, timeouts, the replay grace, the drain and the HTTP client of deliveries.

        Raises:
            TypeError: ``idempotency`` is not an ``IdempotencyConfig``, or with ``session_manager``, the agent
                factory takes no ``session_manager`` keyword; ``webhook`` is neither a URL nor callable.
            ValueError: An option is out of range, or both ``scope`` and ``single_tenant`` are given; ``webhook``
                is not an absolute http(s) URL; ``webhook_secret`` is malformed, missing with ``webhook``, or given
                without it.
        """
        if max_body_bytes < 1:
            raise ValueError(f"max_body_bytes must be positive, got {max_body_bytes!r}")
        config = idempotency or IdempotencyConfig()
        self._webhooks: Webhooks | None = None
        if webhook is not None:
            if webhook_secret is None:
                raise ValueError("webhook needs webhook_secret (make one with strands_py.http.new_webhook_secret())")
            if not isinstance(config, IdempotencyConfig):
                raise TypeError(f"idempotency must be an IdempotencyConfig, got {type(config).__name__}")
            self._webhooks = Webhooks(webhook, webhook_secret, webhook_options or WebhookOptions(), config)
        elif webhook_secret is not None or webhook_options is not None:
            raise ValueError("webhook_secret and webhook_options need webhook")
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
            reconnect_millis=reconnect_millis,
        )
        self._service = InvocationService(
            agent_factory,
            config,
            scope,
            options,
            None if self._webhooks is None else self._webhooks.on_run,
            single_tenant=single_tenant,
        )
        self._max_body_bytes = max_body_bytes
        self._control = RunControl(
            self._service.config, self._service.registry, self._service.key_of, retry_after_seconds
        )
        routes = [
            Route("/invocations", self._post_invocation, methods=["POST"]),
            Route("/invocations/{key:path}/events", self._get_events, methods=["GET"]),
            Route("/invocations/{key:path}", self._invocation, methods=["GET", "DELETE"]),
        ]
        self._conversations: Conversations | None = None
        if session_manager is not None:
            check_agent_factory(agent_factory)
            self._conversations = Conversations(self._service, session_manager)
            routes += [
                Route("/sessions/{session_id}/invocations", self._post_turn, methods=["POST"]),
                Route("/sessions/{session_id}/messages", self._get_messages, methods=["GET"]),
                Route("/sessions/{session_id}", self._get_session, methods=["GET"]),
            ]
        if page:
            routes.append(Route("/", self._get_page, methods=["GET"]))
        self._app = Starlette(
            routes=routes,
            lifespan=self.lifespan,
            exception_handlers={HTTPException: _http_error, ProblemError: _problem_error},
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The ASGI entry point."""
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        access = Access(scope["method"])
        try:
            await self._app({**scope, SCOPE_KEY: access}, receive, access.send(send))
        finally:
            if access.routed:  # an invocation route: a line per request (not for the page, nor a 404 path)
                access.log()

    @property
    def running(self) -> int:
        """Invocations running right now (their tasks, including ones storing a finished result)."""
        return self._service.registry.active

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Any = None) -> AsyncIterator[None]:
        """The app's lifespan: accept invocations inside it; on exit, drain them (see ``aclose``).

        Pass it as a parent's ``lifespan=`` (it takes the parent app as its argument, as Starlette does), or enter
        it inside your own lifespan.
        """
        self._service.reopen()
        if self._webhooks is not None:
            self._webhooks.reopen()
        # Its store serves this loop's calls the way a long-lived loop allows (Redis: on the loop, no thread hop), until
        # the runs are drained.
        async with self._service.config.store.use_event_loop():
            try:
                yield
            finally:
                await self.aclose()

    async def aclose(self) -> None:
        """Refuse new invocations (503), give running ones ``shutdown_grace_seconds``, then cancel the rest.

        Stopped runs yield their claims (another server takes their keys over at once) and their followers get an
        ``error`` event (503). Then webhook deliveries in progress get the webhook options' ``drain_seconds``
        (replays waiting for their grace are sent at once), and the rest are cancelled. Idempotent. Cancellation:
        cancelling ``aclose`` stops waiting only.
        """
        await self._service.aclose()
        if self._webhooks is not None:
            await self._webhooks.aclose()

    @property
    def webhooks_pending(self) -> int:
        """Webhook events waiting or being delivered (0 without ``webhook``)."""
        return 0 if self._webhooks is None else self._webhooks.pending

    async def _post_invocation(self, request: Request) -> Response:
        _route(request)
        token, invocation = await self._read_invocation(request)
        started = CURRENT_REQUEST.set(request)  # the run this request starts (if any) learns its webhook's request
        try:
            return await self._service.invoke(
                request,
                invocation,
                token,
                stream=wants_event_stream(request.headers.get("accept")),
                last_event_id=parse_last_event_id(request.headers.get("last-event-id")),
            )
        finally:
            CURRENT_REQUEST.reset(started)

    async def _read_invocation(self, request: Request) -> tuple[str | None, Invocation]:
        token = parse_idempotency_key(request.headers.getlist("idempotency-key"))
        if token is None and self._service.options.require_key:
            raise ProblemError(
                Problem(
                    400,
                    KEY_MISSING,
                    "Idempotency-Key required",
                    'Send an Idempotency-Key header (a unique value per request, e.g. "<uuid>"); retries reuse it.',
                )
            )
        return token, parse_invocation(await read_json_body(request, self._max_body_bytes))

    async def _invocation(self, request: Request) -> Response:
        _route(request)
        key = request.path_params["key"]
        if not is_valid_key(key):
            raise HTTPException(404)
        if request.method == "DELETE":
            return await self._control.cancel(request, key)
        return await self._control.status(request, key)

    async def _post_turn(self, request: Request) -> Response:
        _route(request)
        conversations, session_id = self._session_route(request)
        token, invocation = await self._read_invocation(request)
        started = CURRENT_REQUEST.set(request)
        try:
            return await conversations.invoke(
                request,
                session_id,
                invocation,
                token,
                stream=wants_event_stream(request.headers.get("accept")),
                last_event_id=parse_last_event_id(request.headers.get("last-event-id")),
            )
        finally:
            CURRENT_REQUEST.reset(started)

    async def _get_session(self, request: Request) -> Response:
        _route(request)
        conversations, session_id = self._session_route(request)
        token = parse_idempotency_key(request.headers.getlist("idempotency-key"))
        return await conversations.state(request, session_id, token)

    async def _get_messages(self, request: Request) -> Response:
        _route(request)
        conversations, session_id = self._session_route(request)
        return await conversations.messages(request, session_id)

    def _session_route(self, request: Request) -> tuple[Conversations, str]:
        session_id = request.path_params["session_id"]
        if self._conversations is None or not is_valid_key(session_id):
            raise HTTPException(404)
        return self._conversations, session_id

    async def _get_events(self, request: Request) -> Response:
        _route(request)
        key = request.path_params["key"]
        if not is_valid_key(key):
            raise HTTPException(404)
        # EventSource sends Last-Event-ID only when it reconnects by itself; a client opening a new one to go on
        # where it was (after re-posting its request, say) names the id in the query instead.
        last_event_id = request.headers.get("last-event-id") or request.query_params.get("last_event_id")
        return await self._service.follow(request, key, parse_last_event_id(last_event_id))

    async def _get_page(self, request: Request) -> Response:
        return HTMLResponse(render_page(request.scope.get("root_path", "")), headers={"Cache-Control": "no-store"})


def _route(request: Request) -> None:
    access = access_of(request)
    if access is not None:
        access.routed = True


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return http_problem(exc).response(dict(exc.headers or {}))


async def _problem_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ProblemError)
    return exc.problem.response()
