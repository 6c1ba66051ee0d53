"""``A2AApp``: the ASGI app serving idempotent agents over the A2A protocol (JSON-RPC over HTTP, and its agent card)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

from a2a.types import (
    AgentCapabilities,
    AgentCard,
    AgentSkill,
    MessageSendParams,
    TaskIdParams,
    TaskQueryParams,
    TransportProtocol,
)
from pydantic import BaseModel, ValidationError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from ..http._options import ServingOptions
from ..http._problems import http_problem
from ..http._protocol import ProblemError, read_json_body
from ..http._scopes import ScopeFunction
from ..http._service import AgentFactory, InvocationService
from ..http._sessions import SessionManagerFactory, check_agent_factory
from ..http._wire import dumps
from ..idempotency.config import IdempotencyConfig
from ._errors import (
    AUTHENTICATED_EXTENDED_CARD_NOT_CONFIGURED,
    INVALID_REQUEST,
    METHOD_NOT_FOUND,
    PARSE_ERROR,
    PUSH_NOTIFICATION_NOT_SUPPORTED,
    RpcError,
    invalid_params,
)
from ._methods import Methods
from ._rpc import RequestId, error_stream, json_error
from ._turns import Turns

logger = logging.getLogger(__name__)

AGENT_CARD_PATH = "/.well-known/agent-card.json"
# A2A before 0.3 named the card agent.json: older clients still look there.
LEGACY_AGENT_CARD_PATH = "/.well-known/agent.json"

_STREAMING = frozenset({"message/stream", "tasks/resubscribe"})
_PUSH_METHODS = frozenset(
    {
        "tasks/pushNotificationConfig/set",
        "tasks/pushNotificationConfig/get",
        "tasks/pushNotificationConfig/list",
        "tasks/pushNotificationConfig/delete",
    }
)


class A2AApp:
    """An ASGI app serving the A2A protocol (0.3, JSON-RPC over HTTP) for agents of a factory, one per message.

    Routes (relative to where it is mounted): ``POST /`` takes JSON-RPC requests (``message/send``,
    ``message/stream``, ``tasks/get``, ``tasks/cancel``, ``tasks/resubscribe``), and ``GET
    /.well-known/agent-card.json`` (and the older ``/.well-known/agent.json``) answers the agent card.

    - A message's ``messageId`` is its idempotency key, scoped per caller as HTTP keys are: a retry of
      ``message/send`` or ``message/stream`` with the same ``messageId`` joins the running task, or replays its
      stored result; the agent runs once. The same ``messageId`` with another message (other parts, another
      ``contextId``) is the JSON-RPC error ``-32050``, and nothing runs.
    - With ``session_manager=``, a ``contextId`` is a conversation: its turns hold the session lock on every server
      sharing the store, and a busy context refuses a message (``-32051``, the config's ``session_invocation_mode``
      ``throw``) or queues it (``enqueue``: its task is ``submitted`` until its turn). Without it, every message
      stands alone and its ``contextId`` is only carried along (not part of its identity).
    - A turn that stops for a human (strands interrupts) ends its task ``input-required``, the interrupts in
      ``metadata.strands_py.interrupts``; the next message of the context answers them, its one part the data
      ``{"interrupt_responses": [{"interrupt_id", "response"}]}`` (``-32055`` for an interrupt not pending,
      ``-32056`` for a prompt while interrupts are pending).
    - A task id names the task's key and context (``<64 hex digits>-<context>``), so any server sharing the store
      answers ``tasks/get`` (from its runs, else from the store), ``tasks/cancel`` (the store's cancel mark, seen by
      the owner at its next heartbeat: the turn is rolled back, and the message, sent again, runs afresh) and
      ``tasks/resubscribe`` (the run here, live; else the store's record, replayed or waited for).
    - The ids map onto HTTP's (``strands_py.http.AgentApp`` on the same store, config scope and callers): a
      ``messageId`` is an ``Idempotency-Key``, a ``contextId`` a conversation of ``/sessions/{id}``, and a message of
      one text part has the fingerprint of ``{"prompt": text}``; so a client can start over one protocol and follow
      over the other.

    Runs are detached as ``AgentApp``'s are: a client that disconnects stops following, the run carries on (at most
    ``run_timeout_seconds``) and stores its result. The lifespan is the same as ``AgentApp``'s: standalone it runs
    its own; mounted, wire ``app.lifespan`` into the parent's, or call ``await app.aclose()`` at shutdown.

    The agent factory gets the Starlette request of the JSON-RPC call; the message is at
    ``request.state.a2a_message`` (an ``a2a.types.Message``) and its context at ``request.state.a2a_context_id``.

    Thread-safety: serve it from one event loop (any ASGI server does).
    """

    def __init__(
        self,
        agent_factory: AgentFactory,
        idempotency: IdempotencyConfig | None = None,
        *,
        scope: ScopeFunction | None = None,
        single_tenant: bool = False,
        session_manager: SessionManagerFactory | None = None,
        name: str = "Strands agent",
        description: str = "An idempotent Strands agent.",
        version: str = "0.1.0",
        skills: list[AgentSkill] | None = None,
        url: str | None = None,
        card: AgentCard | None = None,
        max_body_bytes: int = 1_000_000,
        run_timeout_seconds: float = 900.0,
        shutdown_grace_seconds: float = 10.0,
        max_concurrent_runs: int = 1000,
        max_buffered_events: int = 10_000,
        retain_finished_runs: int = 256,
        retain_finished_seconds: float = 60.0,
        keepalive_seconds: float = 15.0,
        retry_after_seconds: int = 1,
    ) -> None:
        """Create the app.

        Args:
            agent_factory: ``factory(request) -> strands_py.Agent`` (sync or async), called once per run, never for
                a message that joins one; with ``session_manager``, called as ``factory(request,
                session_manager=manager)``. The app sets the agent's ``idempotency`` to ``idempotency`` with the
                caller's scope.
            idempotency: Store and policy of the durable layer (default: in memory, this process only). Share a
                store (Redis, DynamoDB) so that any server answers for every task.
            scope: ``scope(request) -> str`` (sync or async): the caller's tenant; see ``AgentApp``. Default: a
                keyed digest of the ``Authorization`` header (one ``anonymous`` scope without one).
            single_tenant: Every request shares one scope (no ``scope`` allowed).
            session_manager: ``factory(session_id, request) -> SessionManager`` (sync or async): contexts are
                conversations; the id it gets is the context scoped to the caller (``conv-<32 hex digits>``).
            name: The agent card's name.
            description: The agent card's description.
            version: The agent card's version (your agent's, not the protocol's).
            skills: The agent card's skills (default: none).
            url: The URL the card advertises for JSON-RPC (default: where the card was fetched, with the mount path).
            card: A whole agent card to serve instead (its ``url`` as given; ``name`` .. ``url`` are then unused).
            max_body_bytes: Largest JSON-RPC request body.
            run_timeout_seconds: A run is stopped after this long (its task ``failed``; nothing stored).
            shutdown_grace_seconds: How long shutdown waits for running tasks before stopping them.
            max_concurrent_runs: Runs at once; beyond it messages get ``-32053`` (retry the same messageId).
            max_buffered_events: Events kept per run for followers (past it, followers get the whole answer at the
                end instead of the chunks).
            retain_finished_runs: Finished runs kept in memory for followers.
            retain_finished_seconds: How long a finished run is kept (at most the config's expiry).
            keepalive_seconds: An idle event stream gets an SSE comment this often.
            retry_after_seconds: ``retry_after`` in the ``data`` of errors where retrying helps.

        Raises:
            TypeError: ``idempotency`` is not an ``IdempotencyConfig``; with ``session_manager``, the agent factory
                takes no ``session_manager`` keyword, or ``session_manager`` is not callable.
            ValueError: An option is out of range, or both ``scope`` and ``single_tenant``.
        """
        if max_body_bytes < 1:
            raise ValueError(f"max_body_bytes must be positive, got {max_body_bytes!r}")
        options = ServingOptions(
            run_timeout_seconds=run_timeout_seconds,
            shutdown_grace_seconds=shutdown_grace_seconds,
            max_concurrent_runs=max_concurrent_runs,
            max_buffered_events=max_buffered_events,
            retain_finished_runs=retain_finished_runs,
            retain_finished_seconds=retain_finished_seconds,
            keepalive_seconds=keepalive_seconds,
            retry_after_seconds=retry_after_seconds,
        )
        if session_manager is not None:
            check_agent_factory(agent_factory)
        self._service = InvocationService(
            agent_factory, idempotency or IdempotencyConfig(), scope, options, single_tenant=single_tenant
        )
        self._methods = Methods(self._service, Turns(self._service, session_manager))
        self._max_body_bytes = max_body_bytes
        self._card = card
        self._card_fields: dict[str, Any] = {
            "name": name,
            "description": description,
            "version": version,
            "skills": list(skills or []),
        }
        self._url = url
        self._app = Starlette(
            routes=[
                Route("/", self._rpc, methods=["POST"]),
                Route(AGENT_CARD_PATH, self._get_card, methods=["GET"]),
                Route(LEGACY_AGENT_CARD_PATH, self._get_card, methods=["GET"]),
            ],
            lifespan=self.lifespan,
            exception_handlers={HTTPException: _http_error},
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The ASGI entry point."""
        await self._app(scope, receive, send)

    @property
    def running(self) -> int:
        """Tasks running right now on this server."""
        return self._service.registry.active

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Any = None) -> AsyncIterator[None]:
        """The app's lifespan: accept messages inside it; on exit, drain the runs (see ``aclose``)."""
        self._service.reopen()
        # Its store serves this loop's calls the way a long-lived loop allows (Redis: on the loop, no thread hop), until
        # the runs are drained.
        async with self._service.config.store.use_event_loop():
            try:
                yield
            finally:
                await self.aclose()

    async def aclose(self) -> None:
        """Refuse new messages, give running tasks ``shutdown_grace_seconds``, then stop the rest (claims yielded).

        Idempotent. Cancellation: cancelling ``aclose`` stops waiting only.
        """
        await self._service.aclose()

    def agent_card(self, base_url: str) -> AgentCard:
        """The agent card, advertising ``url`` (or ``base_url``, where it is served) for JSON-RPC."""
        if self._card is not None:
            return self._card
        return AgentCard(
            url=self._url or base_url,
            preferred_transport=TransportProtocol.jsonrpc,
            capabilities=AgentCapabilities(streaming=True, push_notifications=False, state_transition_history=False),
            default_input_modes=["text/plain", "application/json", "image/*", "video/*", "application/pdf"],
            default_output_modes=["text/plain", "application/json"],
            **self._card_fields,
        )

    # -- routes ------------------------------------------------------------------------------------------------

    async def _get_card(self, request: Request) -> Response:
        base = str(request.base_url).rstrip("/") + request.scope.get("root_path", "") + "/"
        card = self.agent_card(base)
        return Response(
            dumps(card.model_dump(mode="json", exclude_none=True, by_alias=True)), media_type="application/json"
        )

    async def _rpc(self, request: Request) -> Response:
        try:
            body = await read_json_body(request, self._max_body_bytes)
        except ProblemError as e:
            if e.problem.status == 413:
                return json_error(None, RpcError(INVALID_REQUEST, "Request too large", e.problem.body()))
            return json_error(None, RpcError(PARSE_ERROR, "Parse error", e.problem.body()))
        if not isinstance(body, dict):
            return json_error(None, RpcError(INVALID_REQUEST, "Invalid Request", {"detail": "Send one JSON object."}))
        request_id = body.get("id")
        if not (isinstance(request_id, str | int) and not isinstance(request_id, bool)) and request_id is not None:
            request_id = None
        method = body.get("method")
        if body.get("jsonrpc") != "2.0" or not isinstance(method, str) or "id" not in body:
            detail = 'A request has "jsonrpc": "2.0", a string "method" and an "id" (notifications are not served).'
            return json_error(request_id, RpcError(INVALID_REQUEST, "Invalid Request", {"detail": detail}))
        try:
            return await self._dispatch(request, request_id, method, body.get("params"))
        except RpcError as e:
            logger.debug("method=<%s>, code=<%d> | json-rpc error", method, e.code)
            return error_stream(request_id, e) if method in _STREAMING else json_error(request_id, e)

    async def _dispatch(self, request: Request, request_id: RequestId, method: str, params: Any) -> Response:
        methods = self._methods
        if method in ("message/send", "message/stream"):
            send_params = _params(MessageSendParams, params)
            return await methods.send(request, request_id, send_params, stream=method == "message/stream")
        if method == "tasks/get":
            return await methods.get(request, request_id, _params(TaskQueryParams, params))
        if method == "tasks/cancel":
            return await methods.cancel(request, request_id, _params(TaskIdParams, params))
        if method == "tasks/resubscribe":
            return await methods.resubscribe(request, request_id, _params(TaskIdParams, params))
        if method in _PUSH_METHODS:
            raise RpcError(PUSH_NOTIFICATION_NOT_SUPPORTED, "Push Notification is not supported")
        if method == "agent/getAuthenticatedExtendedCard":
            raise RpcError(AUTHENTICATED_EXTENDED_CARD_NOT_CONFIGURED, "Authenticated Extended Card is not configured")
        raise RpcError(METHOD_NOT_FOUND, "Method not found", {"detail": f"No method {method[:100]!r} here."})


def _params(model: type[Any], params: Any) -> Any:
    """``params`` validated as ``model``.

    Raises:
        RpcError: ``-32602``, they are not.
    """
    if not isinstance(params, dict):
        raise invalid_params("params is a JSON object.")
    try:
        value = model.model_validate(params)
    except ValidationError as e:
        where = ", ".join(".".join(str(part) for part in error["loc"]) or "params" for error in e.errors()[:5])
        raise invalid_params(f"Invalid or missing: {where}.") from e
    assert isinstance(value, BaseModel)
    return value


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return http_problem(exc).response(dict(exc.headers or {}))
