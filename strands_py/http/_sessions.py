"""Conversations as resources: turns of a session (``POST /sessions/{id}/invocations``), its state, its messages.

A turn runs with the session manager the app's factory builds for the conversation, under the session lock (taken
by the turn layer: one turn of a conversation at a time on every server sharing the store). The conversation a
caller names is stored under an id scoped to that caller (``session_storage_id``): two callers' ``conv-1`` never
share storage or lock. A busy conversation answers by the config's ``session_invocation_mode``: ``throw`` refuses
(409 ``session-busy``, ``Retry-After`` one lease), ``enqueue`` queues the turn (202, its status at
``Location: /invocations/{key}``) behind the turns ahead of it (``_lines.py``).

A turn that stopped for a human (``stop_reason`` ``"interrupt"``) is answered by the next turn, whose body carries
``interrupt_responses``; the turn layer checks it under the session lock against the interrupts the conversation
waits for then (``session/_interrupts.py``), and a mismatch is a 409 (``interrupt-stale``, ``interrupts-pending``)
listing them. ``GET /sessions/{id}`` shows them as ``pending_interrupts``.
"""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Awaitable, Callable
from typing import Any, cast
from urllib.parse import quote, urlencode

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from strands.interrupt import Interrupt
from strands.session.session_manager import SessionManager

from ..agent.agent import Agent
from ..idempotency.keys import session_lock_key
from ..session._interrupts import pending_in_record
from ..session._state import SessionLockState, read_lock_state
from ..types.exceptions import IdempotencyError
from ..types.session import SessionInvocationMode
from ._access import access_of, digest_of
from ._control import run_status, status_path, timestamp
from ._lines import SessionLines
from ._problems import MESSAGES_UNAVAILABLE, Problem, invalid_parameter_problem, problem_for, session_busy_problem
from ._protocol import Invocation, ProblemError
from ._runs import Run
from ._scopes import is_async_callable, session_storage_id
from ._service import InvocationService, _hmac_key
from ._wire import dumps, interrupt_items

logger = logging.getLogger(__name__)

SessionManagerFactory = Callable[[str, Request], "SessionManager | Awaitable[SessionManager]"]

DEFAULT_AGENT_ID = "default"  # strands' agent id when none is given
DEFAULT_PAGE = 50
MAX_PAGE = 500


def check_agent_factory(agent_factory: Any) -> None:
    """Refuse an agent factory that cannot be given ``session_manager=`` (an app with ``session_manager=``).

    Raises:
        TypeError: The factory takes no ``session_manager`` keyword (nor ``**kwargs``).
    """
    try:
        parameters = inspect.signature(agent_factory).parameters.values()
    except (TypeError, ValueError):  # no signature to read (a builtin): trust it, its call fails clearly if not
        return
    for parameter in parameters:
        if parameter.kind is inspect.Parameter.VAR_KEYWORD:
            return
        if parameter.name == "session_manager" and parameter.kind is not inspect.Parameter.POSITIONAL_ONLY:
            return
    raise TypeError(
        "with session_manager=, the agent factory is called as factory(request, session_manager=manager) (None for "
        "POST /invocations): give it a session_manager keyword, e.g. def make_agent(request, session_manager=None)"
    )


def _json(body: dict[str, Any], status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(dumps(body), status_code=status, media_type="application/json", headers=headers)


class Conversations:
    """The conversation routes of one app, on top of its invocation service; see the module's documentation.

    Thread-safety: the app's event loop only.
    """

    def __init__(self, service: InvocationService, factory: SessionManagerFactory) -> None:
        """Serve conversations whose session managers ``factory(session_id, request)`` builds (sync or async)."""
        if not callable(factory):
            raise TypeError(
                f"session_manager must be a factory (session_id, request) -> SessionManager, got {factory!r}"
            )
        self._service = service
        self._factory = factory
        self._factory_is_async = is_async_callable(factory)
        self.lines = SessionLines()
        service.with_session_manager = True

    # -- POST /sessions/{id}/invocations -----------------------------------------------------------------------

    async def invoke(
        self,
        request: Request,
        session_id: str,
        invocation: Invocation,
        token: str | None,
        *,
        stream: bool,
        last_event_id: tuple[str, int] | None,
    ) -> Response:
        """Join the key's turn, or run a turn of the conversation now, or queue it, or refuse it (busy).

        Raises:
            HTTPException: From the scope function.
            ProblemError: 409 busy (``throw``), 422 key reused, 503 shutting down, too many runs or store down.
        """
        service, config = self._service, self._service.config
        access = access_of(request)
        scope = await service.scope_of(request)
        key = service.durable_key(scope, token) if token is not None else None
        if access is not None:
            access.key = key
        # The conversation enters the fingerprint: one key names one turn of one conversation.
        fingerprint = service.fingerprint(scope, invocation, {"session": session_id}) if key is not None else None
        storage = session_storage_id(scope, session_id, _hmac_key(config))
        lock_key = session_lock_key(scope, storage, _hmac_key(config))
        holder: SessionLockState | None = None
        if not self.lines.busy(lock_key) and service.join(key, fingerprint) is None:
            holder = await self._lock_state(lock_key)
            # A holder naming this very key is a dead run of this request: the turn layer takes it over, not a queue.
            if not holder.held or (key is not None and holder.token_key == key):
                holder = None
        # Decided after the await: another request may have started a turn (or this key's) meanwhile.
        run = service.join(key, fingerprint)
        if run is not None:
            if run.phase == "queued" and token is not None:
                return self._accepted(request, run, token, joined=True)
            return service.respond(run, stream=stream, joined=True, last_event_id=last_event_id, access=access)
        busy_here = self.lines.busy(lock_key)
        if busy_here or holder is not None:
            if SessionInvocationMode(config.session_invocation_mode) is SessionInvocationMode.THROW:
                lease = holder.lease_seconds if holder is not None and not busy_here else config.lease_seconds
                logger.debug("key=<%s> | conversation busy, refusing the turn", key)
                raise ProblemError(session_busy_problem(max(1, math.ceil(lease))))
        place = self.lines.join(lock_key, session_id, elsewhere=holder is not None and not busy_here)

        async def prepare() -> Agent:
            await place.turn()
            manager = await self._manager(storage, request)
            return await service.make_agent(request, session_manager=manager)

        try:
            run = service.start(request, scope, key, fingerprint, invocation, token, prepare=prepare, place=place)
        except BaseException:
            place.leave()
            raise
        place.run = run
        if run.phase == "queued" and token is not None:
            logger.debug("key=<%s>, position=<%d> | turn queued", key, run.position())
            return self._accepted(request, run, token, joined=False)
        return service.respond(run, stream=stream, joined=False, last_event_id=last_event_id, access=access)

    def _accepted(self, request: Request, run: Run, token: str, *, joined: bool) -> Response:
        """202: the turn waits for its conversation; its status (and position) is at ``Location``."""
        access = access_of(request)
        if access is not None:
            access.answered(run, joined=joined)
        body = run_status(run, token, self._service.config.lease_seconds)
        return _json(body, 202, {"Location": status_path(request.scope.get("root_path", ""), token)})

    async def _lock_state(self, lock_key: str) -> SessionLockState:
        try:
            return await read_lock_state(self._service.config.store, lock_key)
        except IdempotencyError as e:
            raise ProblemError(problem_for(e, self._service.options.retry_after_seconds)) from e

    async def _manager(self, storage: str, request: Request) -> Any:
        if self._factory_is_async:
            return await cast(Awaitable[Any], self._factory(storage, request))
        manager = await run_in_threadpool(self._factory, storage, request)
        return await manager if inspect.isawaitable(manager) else manager

    # -- GET /sessions/{id} ------------------------------------------------------------------------------------

    async def state(self, request: Request, session_id: str, token: str | None) -> Response:
        """The conversation's state: idle or busy, its turns (running, queued here, last), its pending interrupts.

        ``token``: the request's ``Idempotency-Key``, whose position is given when that turn waits here.

        Raises:
            HTTPException: From the scope function.
            ProblemError: 503 store unavailable, 500 the session manager failed.
        """
        service, config = self._service, self._service.config
        scope = await service.scope_of(request)
        storage = session_storage_id(scope, session_id, _hmac_key(config))
        lock_key = session_lock_key(scope, storage, _hmac_key(config))
        holder = await self._lock_state(lock_key)
        places = self.lines.places(lock_key)
        head: Run | None = places[0].run if places else None
        running: dict[str, Any] | None = None
        if head is not None and head.phase in ("running", "cancelling"):
            running = {"key_digest": digest_of(head.key), "where": "here", "lease_seconds": config.lease_seconds}
            running["started_at"] = timestamp(head.started_wall)
        elif holder.held:
            running = {"key_digest": digest_of(holder.token_key), "where": "elsewhere"}
            running["lease_seconds"] = holder.lease_seconds
        queued = [
            {"key_digest": digest_of(place.run.key), "position": place.run.position()}
            for place in places
            if place.run is not None and place.run.phase == "queued"
        ]
        position = None
        if token is not None:
            mine = service.registry.find(service.durable_key(scope, token))
            position = mine.position() if mine is not None and mine.phase == "queued" else None
        last = self.lines.last_completed(lock_key)
        updated_at, pending = await self._persisted(storage, request)
        body: dict[str, Any] = {
            "session": session_id,
            "status": "busy" if running is not None or queued else "idle",
            "running": running,
            "queued": queued,
            "position": position,
            "last_turn": None
            if last is None
            else {"key_digest": digest_of(last[0]), "finished_at": timestamp(last[1])},
            "updated_at": updated_at,
            "pending_interrupts": interrupt_items(pending),
        }
        return _json(body)

    async def _persisted(self, storage: str, request: Request) -> tuple[str | None, list[Interrupt]]:
        """The conversation's agent record, read through its manager: when it was written, the interrupts it awaits.

        A read, never a judgement: while a turn runs (or a dead one waits to be rolled back), its record may still
        change; an answer is checked against the record as it stands under the session lock.
        """
        manager = await self._read_manager(storage, request)
        repository = getattr(manager, "session_repository", None)
        if repository is None:
            return None, []
        agent = await self._read(lambda: repository.read_agent(storage, DEFAULT_AGENT_ID))
        updated = getattr(agent, "updated_at", None)
        pending = pending_in_record(getattr(agent, "_internal_state", None))
        return (updated if isinstance(updated, str) else None), pending

    # -- GET /sessions/{id}/messages ---------------------------------------------------------------------------

    async def messages(self, request: Request, session_id: str) -> Response:
        """A page of the conversation's messages (``?offset=&limit=&agent_id=``), with a ``next`` link.

        Raises:
            HTTPException: From the scope function.
            ProblemError: 400 bad parameters, 501 the session manager keeps no repository, 500 it failed.
        """
        query = request.query_params
        offset = _int_parameter(query.get("offset"), "offset", 0, 0, None)
        limit = _int_parameter(query.get("limit"), "limit", DEFAULT_PAGE, 1, MAX_PAGE)
        agent_id = query.get("agent_id") or DEFAULT_AGENT_ID
        service = self._service
        scope = await service.scope_of(request)
        storage = session_storage_id(scope, session_id, _hmac_key(service.config))
        manager = await self._read_manager(storage, request)
        repository = getattr(manager, "session_repository", None)
        if repository is None:
            raise ProblemError(
                Problem(
                    501,
                    MESSAGES_UNAVAILABLE,
                    "Messages not readable",
                    "This app's session manager keeps no repository to read the conversation's messages from.",
                )
            )

        def read() -> list[Any]:
            if repository.read_agent(storage, agent_id) is None:
                return []  # nothing written for this agent yet: an empty conversation
            return list(repository.list_messages(storage, agent_id, limit=limit + 1, offset=offset))

        stored = await self._read(read)
        items = [
            {"message_id": m.message_id, "message": m.to_message(), "created_at": m.created_at} for m in stored[:limit]
        ]
        body: dict[str, Any] = {"session": session_id, "offset": offset, "limit": limit, "messages": items}
        body["next"] = None
        headers: dict[str, str] = {}
        if len(stored) > limit:
            parameters: dict[str, Any] = {"offset": offset + limit, "limit": limit}
            if "agent_id" in query:
                parameters["agent_id"] = agent_id
            path = f"{request.scope.get('root_path', '')}/sessions/{quote(session_id, safe='')}/messages"
            body["next"] = f"{path}?{urlencode(parameters)}"
            headers["Link"] = f'<{body["next"]}>; rel="next"'
        return _json(body, headers=headers)

    async def _read_manager(self, storage: str, request: Request) -> Any:
        try:
            return await self._manager(storage, request)
        except Exception as e:
            logger.exception("session manager factory failed")
            raise ProblemError(_unreadable()) from e

    async def _read(self, read: Callable[[], Any]) -> Any:
        try:
            return await run_in_threadpool(read)
        except Exception as e:
            logger.exception("the conversation could not be read")
            raise ProblemError(_unreadable()) from e


def _unreadable() -> Problem:
    return Problem(500, MESSAGES_UNAVAILABLE, "Conversation unreadable", "The conversation could not be read.")


def _int_parameter(value: str | None, name: str, default: int, low: int, high: int | None) -> int:
    """A query parameter of ASCII digits within ``[low, high]``, or ``default`` when absent.

    Raises:
        ProblemError: 400, malformed or out of range.
    """
    if value is None or value == "":
        return default
    bound = f"{low} to {high}" if high is not None else f"at least {low}"
    if not (value.isascii() and value.isdigit() and len(value) <= 12) or not (
        low <= int(value) and (high is None or int(value) <= high)
    ):
        raise ProblemError(invalid_parameter_problem(f"{name} is a whole number, {bound}."))
    return int(value)
