"""Messages become runs: joined when the messageId's run is here, started otherwise, in their context's line.

Without a session manager a message's run is the HTTP layer's plain invocation (``POST /invocations``). With one,
the context is the conversation, exactly as ``POST /sessions/{contextId}/invocations`` makes it: its session manager
is built for the context's storage id (scoped to the caller), the turn holds the session lock on every server that
shares the store, and a busy context refuses the message (``throw``: a ``-32051`` error, nothing ran) or lines it up
(``enqueue``: the task is ``submitted`` until the turns ahead of it have ended, here or elsewhere).
"""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Awaitable
from typing import Any, cast

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

from ..agent.agent import Agent
from ..http._lines import SessionLines
from ..http._problems import problem_for, session_busy_problem
from ..http._protocol import Invocation, ProblemError
from ..http._runs import Run
from ..http._scopes import is_async_callable, session_storage_id
from ..http._service import InvocationService, _hmac_key
from ..http._sessions import SessionManagerFactory
from ..idempotency.keys import session_lock_key
from ..session._state import SessionLockState, read_lock_state
from ..types.exceptions import IdempotencyError
from ..types.session import SessionInvocationMode

logger = logging.getLogger(__name__)


class Turns:
    """Admits messages as runs of one app's invocation service; see the module's documentation.

    Thread-safety: the app's event loop only.
    """

    def __init__(self, service: InvocationService, session_manager: SessionManagerFactory | None) -> None:
        """Admit into ``service``; with ``session_manager``, every message is a turn of its context's conversation."""
        if session_manager is not None and not callable(session_manager):
            raise TypeError(
                f"session_manager must be a factory (session_id, request) -> SessionManager, got {session_manager!r}"
            )
        self._service = service
        self._factory = session_manager
        self._factory_is_async = session_manager is not None and is_async_callable(session_manager)
        self.lines = SessionLines()
        if session_manager is not None:
            service.with_session_manager = True

    @property
    def sessions(self) -> bool:
        """Whether contexts are conversations (a session manager was given)."""
        return self._factory is not None

    def fingerprint(self, scope: str, invocation: Invocation, context_id: str) -> str | None:
        """The fingerprint of a message: its prompt, and its context when contexts are conversations.

        The same as HTTP's for the same prompt (and conversation), so that a message joins an HTTP request of its
        messageId, and the reverse.

        Raises:
            ProblemError: 400, the prompt cannot be fingerprinted.
        """
        options = {"session": context_id} if self.sessions else None
        return self._service.fingerprint(scope, invocation, options)

    async def admit(
        self,
        request: Request,
        scope: str,
        key: str,
        token: str,
        invocation: Invocation,
        context_id: str,
    ) -> tuple[Run, bool]:
        """The run of the message: ``(run, joined)``, joined when it was running or retained here.

        Raises:
            ProblemError: 422 messageId reused with another message, 409 context busy (``throw``), 503 shutting
                down, too many runs or the store unreachable, 400 a prompt that cannot be fingerprinted.
        """
        service = self._service
        fingerprint = self.fingerprint(scope, invocation, context_id)
        if not self.sessions:
            run = service.join(key, fingerprint)
            if run is not None:
                return run, True
            return service.start(request, scope, key, fingerprint, invocation, token), False
        config = service.config
        storage = session_storage_id(scope, context_id, _hmac_key(config))
        lock_key = session_lock_key(scope, storage, _hmac_key(config))
        holder: SessionLockState | None = None
        if not self.lines.busy(lock_key) and service.join(key, fingerprint) is None:
            holder = await self._lock_state(lock_key)
            # A holder naming this very key is a dead run of this message: the turn layer takes it over, no line.
            if not holder.held or holder.token_key == key:
                holder = None
        # Decided after the await: another message may have started a turn of the context (or this key's) meanwhile.
        run = service.join(key, fingerprint)
        if run is not None:
            return run, True
        busy_here = self.lines.busy(lock_key)
        if (busy_here or holder is not None) and config.session_invocation_mode is SessionInvocationMode.THROW:
            lease = holder.lease_seconds if holder is not None and not busy_here else config.lease_seconds
            logger.debug("key=<%s> | context busy, refusing the turn", key)
            raise ProblemError(session_busy_problem(max(1, math.ceil(lease))))
        place = self.lines.join(lock_key, context_id, elsewhere=holder is not None and not busy_here)

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
        return run, False

    async def _lock_state(self, lock_key: str) -> SessionLockState:
        try:
            return await read_lock_state(self._service.config.store, lock_key)
        except IdempotencyError as e:
            raise ProblemError(problem_for(e, self._service.options.retry_after_seconds)) from e

    async def _manager(self, storage: str, request: Request) -> Any:
        factory = self._factory
        assert factory is not None
        if self._factory_is_async:
            return await cast(Awaitable[Any], factory(storage, request))
        manager = await run_in_threadpool(factory, storage, request)
        return await manager if inspect.isawaitable(manager) else manager
