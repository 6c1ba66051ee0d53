"""RFC 9457 problem details: every error the HTTP layer answers, and how exceptions map onto them."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from starlette.exceptions import HTTPException
from starlette.responses import Response
from strands.types.exceptions import ConcurrencyException

from ..types.exceptions import (
    IdempotencyAbortedError,
    IdempotencyKeyMismatchError,
    IdempotencyLeaseLostError,
    IdempotencyRecordCorruptedError,
    IdempotencyResultTooLargeError,
    IdempotencyStoreError,
    IdempotencyTokenError,
    IdempotencyWaitTimeoutError,
    InterruptResponseStaleError,
    InterruptStateError,
    InvocationCancelledError,
    SessionBusyError,
)
from ._wire import dumps, interrupt_items

logger = logging.getLogger(__name__)

PROBLEM_MEDIA_TYPE = "application/problem+json"

# Problem type URIs. Tag URIs (RFC 4151): stable identifiers that clients match on, never dereferenced.
_TYPE_PREFIX = "tag:strands-py,2025:problem/"
KEY_MISSING = _TYPE_PREFIX + "idempotency-key-missing"
KEY_INVALID = _TYPE_PREFIX + "idempotency-key-invalid"
KEY_MISMATCH = _TYPE_PREFIX + "idempotency-key-mismatch"
IN_PROGRESS_ELSEWHERE = _TYPE_PREFIX + "invocation-in-progress"
AGENT_BUSY = _TYPE_PREFIX + "agent-busy"
LEASE_LOST = _TYPE_PREFIX + "lease-lost"
NOT_REPLAYABLE = _TYPE_PREFIX + "result-not-replayable"
RECORD_CORRUPTED = _TYPE_PREFIX + "record-corrupted"
STORE_UNAVAILABLE = _TYPE_PREFIX + "store-unavailable"
AGENT_FAILED = _TYPE_PREFIX + "agent-failed"
ABORTED = _TYPE_PREFIX + "invocation-aborted"
RUN_TIMEOUT = _TYPE_PREFIX + "invocation-timeout"
SHUTTING_DOWN = _TYPE_PREFIX + "shutting-down"
TOO_MANY_RUNS = _TYPE_PREFIX + "too-many-invocations"
INVALID_BODY = _TYPE_PREFIX + "invalid-body"
UNSUPPORTED_MEDIA_TYPE = _TYPE_PREFIX + "unsupported-media-type"
BODY_TOO_LARGE = _TYPE_PREFIX + "body-too-large"
NOT_FOUND = _TYPE_PREFIX + "invocation-not-found"
SCOPE_INVALID = _TYPE_PREFIX + "scope-invalid"
CANCELLED = _TYPE_PREFIX + "invocation-cancelled"
CANCEL_UNSUPPORTED = _TYPE_PREFIX + "cancel-unsupported"
SESSION_BUSY = _TYPE_PREFIX + "session-busy"
INVALID_PARAMETER = _TYPE_PREFIX + "invalid-parameter"
MESSAGES_UNAVAILABLE = _TYPE_PREFIX + "messages-unavailable"
INTERRUPT_STALE = _TYPE_PREFIX + "interrupt-stale"
INTERRUPTS_PENDING = _TYPE_PREFIX + "interrupts-pending"


@dataclass(frozen=True)
class Problem:
    """One RFC 9457 problem: ``type``, ``title``, ``status`` and ``detail``, plus ``Retry-After`` when retrying helps.

    Details never contain the raw idempotency key, the prompt, or an exception's message (which may quote either).

    Attributes:
        status: The HTTP status code.
        type: A tag URI naming the problem (``about:blank`` for plain HTTP errors).
        title: Short summary of the problem type; the same for every occurrence.
        detail: What happened in this occurrence and what the client can do.
        retry_after: Seconds after which a retry may succeed (sent as ``Retry-After``, and as ``retry_after`` in the
            body, which is all a Server-Sent Events client sees).
        extra: Extension members of this problem type (RFC 9457 section 3.2), ``(name, JSON value)`` pairs: the
            interrupt problems' ``pending``.
    """

    status: int
    type: str
    title: str
    detail: str
    retry_after: int | None = None
    extra: tuple[tuple[str, Any], ...] = ()

    def body(self) -> dict[str, Any]:
        """The problem details object."""
        body: dict[str, Any] = {"type": self.type, "title": self.title, "status": self.status, "detail": self.detail}
        if self.retry_after is not None:
            body["retry_after"] = self.retry_after
        for name, value in self.extra:
            body[name] = value
        return body

    def json(self) -> str:
        """The problem details object as compact JSON text (never raises: see ``dumps``)."""
        return dumps(self.body())

    def response(self, headers: dict[str, str] | None = None) -> Response:
        """An ``application/problem+json`` response with this problem's status (and ``Retry-After``)."""
        all_headers = dict(headers or {})
        if self.retry_after is not None:
            all_headers["Retry-After"] = str(self.retry_after)
        return Response(self.json(), status_code=self.status, headers=all_headers, media_type=PROBLEM_MEDIA_TYPE)


def http_problem(exc: HTTPException) -> Problem:
    """A plain HTTP error (404, 405, or an ``HTTPException`` raised by a scope function or agent factory)."""
    try:
        title = HTTPStatus(exc.status_code).phrase
    except ValueError:
        title = "Error"
    detail = exc.detail if isinstance(exc.detail, str) else title
    return Problem(exc.status_code, "about:blank", title, detail)


def problem_for(error: BaseException, retry_after: int) -> Problem:
    """Map what an invocation raised onto the problem a client gets.

    Args:
        error: The exception of the agent, the agent factory, or the durable layer.
        retry_after: Seconds to advertise where retrying later helps.
    """
    if isinstance(error, IdempotencyKeyMismatchError):
        return Problem(
            422,
            KEY_MISMATCH,
            "Idempotency-Key reused with a different request",
            "This Idempotency-Key was already used with a different request body; use a new key for a new request.",
        )
    if isinstance(error, IdempotencyWaitTimeoutError):
        return Problem(
            409,
            IN_PROGRESS_ELSEWHERE,
            "Invocation still in progress",
            "The invocation of this Idempotency-Key is running elsewhere and did not finish in time; retry later "
            "with the same key to get its result.",
            retry_after,
        )
    if isinstance(error, InvocationCancelledError):  # before its base class, a lost lease
        return cancelled_problem()
    if isinstance(error, IdempotencyLeaseLostError):
        return Problem(
            409,
            LEASE_LOST,
            "Invocation continues elsewhere",
            "This server lost its claim on the invocation, which continues elsewhere; retry with the same key to "
            "get its result.",
            retry_after,
        )
    if isinstance(error, IdempotencyStoreError):
        return Problem(
            503,
            STORE_UNAVAILABLE,
            "Idempotency store unavailable",
            "The idempotency store could not be reached; nothing ran. Retry with the same key.",
            retry_after,
        )
    if isinstance(error, IdempotencyResultTooLargeError):
        return Problem(
            410,
            NOT_REPLAYABLE,
            "Result cannot be replayed",
            "The invocation of this Idempotency-Key completed, but its result was too large to store; it will not "
            "run again.",
        )
    if isinstance(error, IdempotencyRecordCorruptedError):
        return Problem(
            500,
            RECORD_CORRUPTED,
            "Stored invocation record is corrupted",
            "The stored record of this Idempotency-Key cannot be decoded.",
        )
    if isinstance(error, IdempotencyAbortedError):
        return Problem(
            503,
            ABORTED,
            "Invocation aborted",
            "The invocation this request was following ended without a result; retry with the same key to run it.",
            retry_after,
        )
    if isinstance(error, InterruptStateError):
        return interrupt_problem(error)
    if isinstance(error, SessionBusyError):  # a ConcurrencyException: the session's, not the agent's
        return session_busy_problem(retry_after)
    if isinstance(error, ConcurrencyException):
        return Problem(
            409,
            AGENT_BUSY,
            "Agent busy",
            "The agent or its session is processing another request; retry when it has finished.",
            retry_after,
        )
    if isinstance(error, IdempotencyTokenError):
        return Problem(400, KEY_INVALID, "Invalid Idempotency-Key", "The Idempotency-Key cannot be used as a token.")
    if isinstance(error, HTTPException):
        return http_problem(error)
    return Problem(
        500,
        AGENT_FAILED,
        "Agent failed",
        "The agent failed; nothing was stored, so a retry with the same key runs it again.",
    )


def aborted_problem(retry_after: int) -> Problem:
    """The run's task was cancelled from outside (its event loop is closing): nothing was stored."""
    return Problem(
        503,
        ABORTED,
        "Invocation aborted",
        "The invocation was aborted before it finished; nothing was stored, so a retry with the same key runs it.",
        retry_after,
    )


def run_timeout_problem(seconds: float) -> Problem:
    """The invocation ran longer than the app allows and was cancelled (its claim released)."""
    return Problem(
        504,
        RUN_TIMEOUT,
        "Invocation timed out",
        f"The invocation ran longer than {seconds:g} seconds and was cancelled; nothing was stored, so a retry with "
        "the same key runs it again.",
    )


def shutting_down_problem(retry_after: int) -> Problem:
    """The server is shutting down: new invocations are refused, unfinished ones were cancelled (claims released)."""
    return Problem(
        503,
        SHUTTING_DOWN,
        "Server shutting down",
        "This server is shutting down; retry with the same key (another server takes the invocation over).",
        retry_after,
    )


def scope_invalid_problem() -> Problem:
    """The app's scope function returned no usable tenant id (an empty string, or not a str): a server bug."""
    return Problem(
        500,
        SCOPE_INVALID,
        "Caller scope unavailable",
        "The server could not tell whose request this is (its scope function returned no tenant id); nothing ran.",
    )


def cancelled_problem() -> Problem:
    """The invocation was cancelled (``DELETE /invocations/{key}``): nothing stored; the key runs afresh if sent again.

    409: the request conflicts with the state of the key's invocation (cancelled). Not retried by itself: whoever
    cancelled it meant it to stop; a client that still wants an answer sends the request again.
    """
    return Problem(
        409,
        CANCELLED,
        "Invocation cancelled",
        "The invocation of this Idempotency-Key was cancelled and stored nothing; send the request again with the "
        "same key to run it afresh.",
    )


def session_busy_problem(retry_after: int) -> Problem:
    """Another turn of the conversation is running (the app's session mode is ``throw``); nothing ran."""
    return Problem(
        409,
        SESSION_BUSY,
        "Conversation busy",
        "Another turn of this conversation is running; nothing ran. Retry with the same key once it has finished.",
        retry_after,
    )


def cancel_unsupported_problem(store: object) -> Problem:
    """The idempotency store cannot mark a run cancelled (a store without ``supports_cancel``)."""
    return Problem(
        501,
        CANCEL_UNSUPPORTED,
        "Cancel not supported",
        f"This server's idempotency store ({type(store).__name__}) cannot cancel invocations; nothing was changed.",
    )


def not_found_problem() -> Problem:
    """No invocation with this key in the caller's scope (never seen, expired, or another caller's)."""
    return Problem(404, NOT_FOUND, "Invocation not found", "No invocation with this Idempotency-Key.")


def invalid_parameter_problem(detail: str) -> Problem:
    """A query parameter is malformed."""
    return Problem(400, INVALID_PARAMETER, "Invalid query parameter", detail)


def interrupt_problem(error: InterruptStateError) -> Problem:
    """409: the request does not fit the interrupts the conversation waits for; nothing ran, the key is free again.

    Not retried by itself (no ``Retry-After``): the same request would meet the same state. ``pending`` lists the
    interrupts pending now, ``[{"id", "name", "reason"}]``, so that the client can answer those instead.
    """
    pending = (("pending", interrupt_items(error.pending)),)
    if isinstance(error, InterruptResponseStaleError):
        return Problem(
            409,
            INTERRUPT_STALE,
            "Interrupt not pending",
            "The request answers an interrupt that is not pending in this conversation (already answered, rolled "
            "back, superseded or unknown); nothing ran. The interrupts pending now are in pending: answer those, "
            "with a new Idempotency-Key.",
            extra=pending,
        )
    return Problem(
        409,
        INTERRUPTS_PENDING,
        "Interrupts pending",
        "The conversation waits for answers to its interrupts; nothing ran. Answer the interrupts in pending "
        '({"interrupt_responses": [...]}, with a new Idempotency-Key) before sending a new prompt.',
        extra=pending,
    )
