"""JSON-RPC errors of the A2A app: the protocol's own codes, ours, and how the HTTP layer's problems map onto them.

JSON-RPC 2.0 leaves -32000 to -32099 to the implementation; A2A 0.3 takes -32001 to -32007 of it. Ours start at
-32050, well clear of both:

| code   | name                     | when                                                                        |
|--------|--------------------------|-----------------------------------------------------------------------------|
| -32050 | ``MESSAGE_ID_MISMATCH``  | a messageId reused with another message (other parts, or another context)    |
| -32051 | ``CONTEXT_BUSY``         | another turn of the context runs (``session_invocation_mode="throw"``)        |
| -32052 | ``TASK_IN_PROGRESS``     | the task runs elsewhere past the wait, or its lease moved: retry the same    |
| -32053 | ``UNAVAILABLE``          | store unreachable, shutting down, too many tasks: nothing ran, retry the same |
| -32054 | ``RESULT_NOT_REPLAYABLE``| the task completed but its result was too large to store                     |
| -32055 | ``INTERRUPT_NOT_PENDING``| an answer to an interrupt the context does not wait for (``data.pending``)   |
| -32056 | ``INTERRUPTS_WAITING``   | a prompt while the context waits for answers to interrupts (``data.pending``) |

Every error's ``data`` is the problem the HTTP layer would answer (``type``, ``title``, ``status``, ``detail``, and
``retry_after`` where retrying helps): the ``type`` URIs are the constants of ``strands_py.http``, so a client matches
one vocabulary over both protocols.

What is an error and what is a task: an error answers a request that started nothing (or joined nothing) and can be
retried as it is; an agent that failed, ran out of time or was cancelled ends its *task* ``failed`` or ``canceled``.
"""

from __future__ import annotations

from typing import Any

from ..http._problems import (
    ABORTED,
    AGENT_BUSY,
    AGENT_FAILED,
    CANCEL_UNSUPPORTED,
    CANCELLED,
    IN_PROGRESS_ELSEWHERE,
    INTERRUPT_STALE,
    INTERRUPTS_PENDING,
    INVALID_BODY,
    KEY_INVALID,
    KEY_MISMATCH,
    LEASE_LOST,
    NOT_FOUND,
    NOT_REPLAYABLE,
    RUN_TIMEOUT,
    SESSION_BUSY,
    SHUTTING_DOWN,
    STORE_UNAVAILABLE,
    TOO_MANY_RUNS,
    Problem,
)

# JSON-RPC 2.0's codes.
PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603
# A2A 0.3's codes.
TASK_NOT_FOUND = -32001
TASK_NOT_CANCELABLE = -32002
PUSH_NOTIFICATION_NOT_SUPPORTED = -32003
UNSUPPORTED_OPERATION = -32004
CONTENT_TYPE_NOT_SUPPORTED = -32005
AUTHENTICATED_EXTENDED_CARD_NOT_CONFIGURED = -32007
# Ours (see the module's documentation).
MESSAGE_ID_MISMATCH = -32050
CONTEXT_BUSY = -32051
TASK_IN_PROGRESS = -32052
UNAVAILABLE = -32053
RESULT_NOT_REPLAYABLE = -32054
INTERRUPT_NOT_PENDING = -32055
INTERRUPTS_WAITING = -32056

# Problem type -> (code, message, detail as A2A says it; None keeps the problem's own detail).
_BY_TYPE: dict[str, tuple[int, str, str | None]] = {
    KEY_MISMATCH: (
        MESSAGE_ID_MISMATCH,
        "messageId reused with a different message",
        "This messageId was already used with another message (other parts, or another context); use a new "
        "messageId for a new message.",
    ),
    SESSION_BUSY: (
        CONTEXT_BUSY,
        "Context busy",
        "Another turn of this context is running; nothing ran. Send the message again (same messageId) once it "
        "has finished.",
    ),
    IN_PROGRESS_ELSEWHERE: (
        TASK_IN_PROGRESS,
        "Task in progress elsewhere",
        "The task of this messageId is running elsewhere and did not finish in time; send it again (same "
        "messageId) or resubscribe later to get its result.",
    ),
    LEASE_LOST: (TASK_IN_PROGRESS, "Task continues elsewhere", None),
    AGENT_BUSY: (TASK_IN_PROGRESS, "Agent busy", None),
    STORE_UNAVAILABLE: (UNAVAILABLE, "Idempotency store unavailable", None),
    SHUTTING_DOWN: (UNAVAILABLE, "Server shutting down", None),
    TOO_MANY_RUNS: (UNAVAILABLE, "Too many tasks", None),
    ABORTED: (UNAVAILABLE, "Task aborted", None),
    NOT_REPLAYABLE: (
        RESULT_NOT_REPLAYABLE,
        "Result cannot be replayed",
        "The task of this messageId completed, but its result was too large to store; it will not run again.",
    ),
    NOT_FOUND: (TASK_NOT_FOUND, "Task not found", "No task with this id in the caller's scope."),
    CANCEL_UNSUPPORTED: (UNSUPPORTED_OPERATION, "Cancel not supported", None),
    INTERRUPT_STALE: (
        INTERRUPT_NOT_PENDING,
        "Interrupt not pending",
        "The message answers an interrupt this context does not wait for (already answered, rolled back, "
        "superseded or unknown); nothing ran. Answer the interrupts in pending, in a new message.",
    ),
    INTERRUPTS_PENDING: (
        INTERRUPTS_WAITING,
        "Interrupts pending",
        "This context waits for answers to its interrupts; nothing ran. Send a new message whose one part is the "
        'data {"interrupt_responses": [{"interrupt_id": ..., "response": ...}]} answering those in pending.',
    ),
    INVALID_BODY: (INVALID_PARAMS, "Invalid params", None),
    KEY_INVALID: (INVALID_PARAMS, "Invalid messageId", "The messageId cannot be used as an idempotency key."),
}

# Problems a task ends with, rather than an error of the request that asked for it.
_OUTCOMES = frozenset({AGENT_FAILED, CANCELLED, RUN_TIMEOUT})


class RpcError(Exception):
    """A JSON-RPC error to answer: its code, message and data."""

    def __init__(self, code: int, message: str, data: Any = None) -> None:
        """The error ``code`` with ``message`` (and ``data``, when there is some)."""
        super().__init__(message)
        self.code = code
        self.message = message
        self.data = data

    def body(self) -> dict[str, Any]:
        """The JSON-RPC error object."""
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.data is not None:
            error["data"] = self.data
        return error


def error_for(problem: Problem) -> RpcError:
    """The JSON-RPC error of an HTTP problem, its body (detail said in A2A's terms) as ``data``."""
    code, message, detail = _BY_TYPE.get(problem.type, (INTERNAL_ERROR, problem.title, None))
    data = problem.body()
    if detail is not None:
        data["detail"] = detail
    return RpcError(code, message, data)


def ends_the_task(problem: Problem) -> bool:
    """Whether ``problem`` is how a task ended (``failed`` or ``canceled``), not an error of the request.

    A run that started (its first event was out) ends its task whatever stopped it. One that stopped before that
    ended its task only when its agent failed, ran out of time or was cancelled; any other problem (a mismatch, a
    busy context, a store outage, a shutdown) means nothing ran, and the request gets the error.
    """
    return problem.type in _OUTCOMES


def invalid_params(detail: str) -> RpcError:
    """``-32602``: the params do not say what A2A needs."""
    return RpcError(INVALID_PARAMS, "Invalid params", {"detail": detail})


def task_not_found() -> RpcError:
    """``-32001``: no task of that id in the caller's scope."""
    return RpcError(TASK_NOT_FOUND, "Task not found", {"detail": "No task with this id in the caller's scope."})
