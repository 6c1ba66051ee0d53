"""The A2A methods: ``message/send``, ``message/stream``, ``tasks/get``, ``tasks/cancel``, ``tasks/resubscribe``.

Each one is the HTTP layer's machinery seen through A2A: a message is an invocation keyed by its messageId (joined,
replayed or started by the invocation service), a task's status and cancel are the run control's, a resubscription
follows the run here or the record in the store.
"""

from __future__ import annotations

import json
import logging
import time
import weakref
from collections.abc import AsyncGenerator, Awaitable
from typing import Any

from a2a.types import Message, MessageSendParams, Role, TaskIdParams, TaskQueryParams, TaskState
from starlette.requests import Request
from starlette.responses import Response

from ..http._control import RunControl
from ..http._problems import cancelled_problem, problem_for
from ..http._protocol import ProblemError
from ..http._responses import DeferredResponse
from ..http._runs import Run
from ..http._service import InvocationService
from ..idempotency.codec import decode_result
from ..idempotency.record import IdempotencyRecord, RecordState
from ..types.exceptions import IdempotencyError, IdempotencyStoreError
from ._convert import invocation_of
from ._errors import (
    PUSH_NOTIFICATION_NOT_SUPPORTED,
    TASK_NOT_CANCELABLE,
    UNSUPPORTED_OPERATION,
    RpcError,
    ends_the_task,
    error_for,
    invalid_params,
    task_not_found,
)
from ._ids import (
    check_context_id,
    check_message_id,
    derived_context_id,
    digest_of,
    key_in,
    parse_task_id,
    task_id_of,
)
from ._rpc import RequestId, event_stream, json_error, json_result
from ._tasks import STATES, TaskView, absorb_all, follow_run, follow_started, follow_stored, interrupted_problem
from ._turns import Turns

logger = logging.getLogger(__name__)


def token_of(message: Message) -> str:
    """The idempotency token of a message: its ``messageId``."""
    return message.message_id


def _started_or_queued(run: Run) -> bool:
    return run.decided or run.phase == "queued"


class Methods:
    """The A2A methods of one app; see the module's documentation.

    Thread-safety: the app's event loop only.
    """

    def __init__(self, service: InvocationService, turns: Turns) -> None:
        """Serve the runs of ``service``, admitting messages through ``turns``."""
        self._service = service
        self._turns = turns
        self._control = RunControl(
            service.config, service.registry, self._key_of_task, service.options.retry_after_seconds
        )
        # The message that started each run here, for the history of its task while the run is retained.
        self._messages: weakref.WeakKeyDictionary[Run, Message] = weakref.WeakKeyDictionary()

    # -- message/send, message/stream --------------------------------------------------------------------------

    async def send(
        self, request: Request, request_id: RequestId, params: MessageSendParams, *, stream: bool
    ) -> Response:
        """Join the messageId's task or start it; answer its task (``message/send``) or follow it (``/stream``).

        Raises:
            RpcError: The message cannot be taken (invalid, mismatched, busy context, store down, shutting down).
            HTTPException: From the scope function.
        """
        message, configuration = params.message, params.configuration
        if configuration is not None and configuration.push_notification_config is not None:
            raise RpcError(PUSH_NOTIFICATION_NOT_SUPPORTED, "Push Notification is not supported")
        if message.role is not Role.user:
            raise invalid_params("A message to the agent has the role user.")
        wrong = check_message_id(message.message_id) or (
            check_context_id(message.context_id) if message.context_id is not None else None
        )
        if wrong is not None:
            raise invalid_params(wrong)
        invocation = invocation_of(message)
        if invocation.answers and not self._turns.sessions:
            raise invalid_params(
                "interrupt_responses answer a context's interrupts: this server keeps no conversations "
                "(session_manager=)."
            )
        service = self._service
        try:
            scope = await service.scope_of(request)
            token = token_of(message)
            key = service.durable_key(scope, token)
            context_id = message.context_id or derived_context_id(key)
            task_id = task_id_of(key, context_id)
            if message.task_id is not None and message.task_id != task_id:
                raise RpcError(
                    UNSUPPORTED_OPERATION,
                    "Tasks do not continue",
                    {"detail": "A task is one turn: send a new message (in the same contextId) without taskId."},
                )
            request.state.a2a_message = message
            request.state.a2a_context_id = context_id
            run, joined = await self._turns.admit(request, scope, key, token, invocation, context_id)
        except ProblemError as e:
            raise error_for(e.problem) from e
        if not joined:
            self._messages[run] = message
        view = TaskView(task_id, context_id, digest_of(key), message)
        history_length = configuration.history_length if configuration is not None else None
        blocking = configuration is None or configuration.blocking is not False
        keepalive = service.options.keepalive_seconds

        if stream:
            return event_stream(request_id, follow_started(run, view, keepalive))

        async def answer() -> Response:
            await run.wait(_started_or_queued if not blocking else lambda r: r.finished)
            problem = run.problem
            if run.failed_before_start and problem is not None and not ends_the_task(problem):
                # Nothing ran (a mismatch the store saw, a context busy on another server, the store down): an error.
                return json_error(request_id, error_for(problem))
            absorb_all(view, run)
            return json_result(request_id, view.task(history_length))

        return DeferredResponse(answer)

    # -- tasks/get, tasks/cancel -------------------------------------------------------------------------------

    async def get(self, request: Request, request_id: RequestId, params: TaskQueryParams) -> Response:
        """The task as this server or the store knows it.

        Raises:
            RpcError: Unknown task, store unavailable, corrupted record.
        """
        key, view = await self._task(request, params.id)
        body = await self._body(self._control.status(request, params.id))
        self._fill(view, body, self._service.registry.find(key))
        return json_result(request_id, view.task(params.history_length))

    async def cancel(self, request: Request, request_id: RequestId, params: TaskIdParams) -> Response:
        """Cancel the task wherever it runs (the store's mark; a run here stops at once through its agent).

        A task that completed or failed cannot be canceled (``-32002``); a canceled one is answered as it is.

        Raises:
            RpcError: Unknown task, a store without cancels, store unavailable, not cancelable.
        """
        key, view = await self._task(request, params.id)
        body = await self._body(self._control.cancel(request, params.id))
        self._fill(view, body, self._service.registry.find(key))
        if view.state in (TaskState.completed, TaskState.input_required, TaskState.failed):
            raise RpcError(
                TASK_NOT_CANCELABLE,
                "Task cannot be canceled",
                {"detail": f"The task has already {view.state.value}.", "state": view.state.value},
            )
        return json_result(request_id, view.task())

    def _fill(self, view: TaskView, body: dict[str, Any], run: Run | None) -> None:
        """Put a run-control status body (and what this server's run recorded) into ``view``."""
        status = body["status"]
        if run is not None:
            view.user_message = self._messages.get(run)
        if status in ("queued", "running") and run is not None and not run.finished:
            absorb_all(view, run)  # the text so far
        elif "result" in body:
            view.result = body["result"]
        elif STATES[status] is TaskState.canceled:
            view.problem = body.get("problem") or cancelled_problem().body()
        elif status != "running":  # failed, or completed without a replayable result
            problem = body.get("problem") or interrupted_problem(self._service.options.retry_after_seconds).body()
            view.problem = problem

    # -- tasks/resubscribe -------------------------------------------------------------------------------------

    async def resubscribe(self, request: Request, request_id: RequestId, params: TaskIdParams) -> Response:
        """Follow the task: its run here, else its record in the store (replayed, or polled until it ends).

        Raises:
            RpcError: Unknown task, store unavailable, corrupted or unreplayable record.
        """
        key, view = await self._task(request, params.id)
        service = self._service
        keepalive = service.options.keepalive_seconds
        run = service.registry.find(key)
        if run is not None:
            view.user_message = self._messages.get(run)
            if not (run.finished and not run.succeeded):
                return event_stream(request_id, follow_run(run, view, keepalive))
        # Not here, or failed here: the store knows whether it ran again since (here or elsewhere).
        record = await self._read(key)
        if record is None:
            if run is None:
                raise task_not_found()
            return event_stream(request_id, follow_run(run, view, keepalive))
        if record.state is RecordState.COMPLETED:
            try:
                replay = Run.replay(key, decode_result(record, None))
            except IdempotencyError as e:
                raise error_for(problem_for(e, service.options.retry_after_seconds)) from e
            return event_stream(request_id, follow_run(replay, view, keepalive))
        if record.state is RecordState.CANCELLED:
            view.problem = cancelled_problem().body()
            return event_stream(request_id, _one(view.task()))
        retry_after = service.options.retry_after_seconds
        return event_stream(
            request_id, follow_stored(service.config, service.registry, key, view, retry_after, keepalive)
        )

    # -- helpers -----------------------------------------------------------------------------------------------

    async def _task(self, request: Request, task_id: str) -> tuple[str, TaskView]:
        """The durable key of a task id in the request's scope, and an empty view of the task.

        Raises:
            RpcError: -32001, not a task id of ours.
        """
        parsed = parse_task_id(task_id)
        if parsed is None:
            raise task_not_found()
        digest, context_id = parsed
        try:
            scope = await self._service.scope_of(request)
        except ProblemError as e:
            raise error_for(e.problem) from e
        return key_in(scope, digest), TaskView(task_id, context_id, digest, None)

    async def _key_of_task(self, request: Request, task_id: str) -> str:
        """The run control's ``key_of``: the durable key a task id names in the request's scope."""
        key, _ = await self._task(request, task_id)
        return key

    async def _body(self, call: Awaitable[Response]) -> dict[str, Any]:
        """The JSON body of a run-control answer; its problems as errors."""
        try:
            response = await call
        except ProblemError as e:
            raise error_for(e.problem) from e
        body: dict[str, Any] = json.loads(bytes(response.body))
        return body

    async def _read(self, key: str) -> IdempotencyRecord | None:
        """The key's record (expired ones dropped); store failures as ``-32053``."""
        retry_after = self._service.options.retry_after_seconds
        try:
            record = await self._service.config.store.get(key)
        except IdempotencyError as e:
            raise error_for(problem_for(e, retry_after)) from e
        except Exception as e:  # a store that raises something else is a store outage too
            raise error_for(problem_for(IdempotencyStoreError(type(e).__name__), retry_after)) from e
        return None if record is not None and record.expired(time.time()) else record


async def _one(item: Any) -> AsyncGenerator[Any, None]:
    yield item
