"""Every exception strands-py raises.

Where strands-agents defines the same name, the class here *is* upstream's class (``ConcurrencyException``) or a
subclass of it (``IdempotencyAbortedError`` on strands-agents >= 1.45), so ``except`` clauses written for
upstream keep catching what strands-py raises.
"""

from __future__ import annotations

import strands.types.exceptions as _upstream
from strands.interrupt import Interrupt
from strands.types.exceptions import ConcurrencyException

# strands-agents < 1.45 has no idempotency and so no IdempotencyAbortedError; there ours derives from Exception.
_UpstreamAbortedError: type[Exception] = getattr(_upstream, "IdempotencyAbortedError", Exception)


class IdempotencyAbortedError(_UpstreamAbortedError):  # type: ignore[valid-type,misc]
    """The primary invocation for this idempotency token ended without a result.

    Raised in every duplicate that was waiting on a primary that was cancelled, whose stream was closed before the
    result, or that was interrupted by a ``BaseException`` (``KeyboardInterrupt``, ``SystemExit``). The token is
    forgotten: a retry runs the agent again.
    """


class IdempotencyTokenError(TypeError):
    """An idempotency token could not be compared with the token in flight.

    Tokens match by ``==``. If that comparison raises (or its result has no truth value), only the call that brought
    the token fails, with this error chained to the original one; the in-flight invocation and its waiters carry on.
    """


class ReentrantInvocationError(ConcurrencyException):
    """A call ran inside the invocation it would have to wait for, so waiting would deadlock.

    Raised at once when a tool, hook or ``callback_handler`` of a running primary calls an agent with the primary's
    own idempotency token (the same agent, or, with durable idempotency, any agent sharing its store and scope). The
    primary is unaffected. Subclasses strands' ``ConcurrencyException``.
    """


class SessionBusyError(ConcurrencyException):
    """Another request holds the conversation's session lock (on this host or another), so this turn did not run.

    Raised at once with ``session_invocation_mode="throw"``, or after ``wait_timeout_seconds`` of waiting with
    ``"enqueue"``. Nothing ran and nothing was written; an HTTP layer answers 409. Retries of the *same* request (same
    idempotency token) never get this: they join or replay the running turn. Subclasses strands'
    ``ConcurrencyException``.
    """


class IdempotencyError(Exception):
    """Base class of the durable idempotency layer's errors (``Agent(idempotency=IdempotencyConfig(...))``)."""


class IdempotencyStoreError(IdempotencyError):
    """The idempotency store could not be reached or answered with an error; nothing was decided.

    The original error (botocore, redis-py, a timeout, ...) is chained as ``__cause__``. The call did not run the
    agent; retrying later is safe (an HTTP layer answers 503 with ``Retry-After``).
    """


class IdempotencyLeaseLostError(IdempotencyError):
    """A running primary lost its claim on the token, so it stopped before doing more and stored nothing.

    Either another caller took the claim over (the renewal was fenced off), or no renewal succeeded for a whole
    lease (the store was unreachable). The caller and the duplicates that were waiting on it get this error; the new
    owner's outcome is the token's outcome, and a retry joins or replays it.

    Attributes:
        key: The record's key.
    """

    def __init__(self, key: str, reason: str) -> None:
        """Create the error for ``key``."""
        super().__init__(f"lost the claim on idempotency key {key}: {reason}")
        self.key = key


class InvocationCancelledError(IdempotencyLeaseLostError):
    """The invocation was cancelled from outside (``cancel_invocation``, HTTP ``DELETE /invocations/{key}``).

    Its owner learnt it at its next heartbeat, stopped at its next cancellation point, stored nothing and left a
    ``CANCELLED`` tombstone: a retry of the key runs afresh. A subclass of ``IdempotencyLeaseLostError``: the run
    stopped because it lost its claim, on purpose.

    Attributes:
        key: The record's key.
    """


class IdempotencyKeyMismatchError(IdempotencyError):
    """The token was already used for a different request (its fingerprint differs); nothing ran or replayed.

    Attributes:
        key: The record's key (scope and SHA-256 of the token; never the raw token).
    """

    def __init__(self, key: str) -> None:
        """Create the error for ``key``."""
        super().__init__(f"idempotency key {key} was used for a different request (payload fingerprint differs)")
        self.key = key


class IdempotencyWaitTimeoutError(IdempotencyError):
    """A duplicate waited ``wait_timeout_seconds`` for another process's invocation of its token, in vain.

    The other invocation may still complete; a later retry replays its result.

    Attributes:
        key: The record's key.
    """

    def __init__(self, key: str, waited: float) -> None:
        """Create the error for ``key`` after ``waited`` seconds."""
        super().__init__(f"gave up after {waited:.2f}s waiting for the invocation of idempotency key {key}")
        self.key = key


class IdempotencyRecordCorruptedError(IdempotencyError):
    """A stored record could not be decoded.

    Attributes:
        key: The record's key.
    """

    def __init__(self, key: str, reason: str) -> None:
        """Create the error for ``key``."""
        super().__init__(f"idempotency record {key} could not be decoded: {reason}")
        self.key = key


class IdempotencyResultTooLargeError(IdempotencyError):
    """The invocation completed, but its result was too large for the store, so it cannot be replayed.

    The primary's own caller got its result; the record remembers only that the invocation completed, so that a
    retry does not run the agent (and its tools) a second time.

    Attributes:
        key: The record's key.
    """

    def __init__(self, key: str, size: int, limit: int) -> None:
        """Create the error for ``key``."""
        super().__init__(
            f"idempotency key {key} completed, but its result ({size} bytes compressed) exceeded the store's "
            f"limit of {limit} bytes and cannot be replayed"
        )
        self.key = key


class InterruptStateError(Exception):
    """A call does not fit the interrupts pending in its conversation, so nothing of it ran.

    Checked under the session lock, after the conversation was read again, for every durable call (an agent with
    ``idempotency=`` and a token) and every turn of a locked session; one of the two subclasses is raised. Nothing
    ran and nothing was written to the conversation, and the call's claim on its token was released: a corrected
    call with the same token runs. A retry of a call that did run (an answer already given, with its token) replays
    its result as always, before any check. An HTTP layer answers 409 with ``pending``.

    Attributes:
        pending: The interrupts pending now (strands ``Interrupt`` objects without a response), possibly empty.
    """

    def __init__(self, message: str, pending: list[Interrupt]) -> None:
        """Create the error; ``pending`` are the conversation's pending interrupts."""
        super().__init__(message)
        self.pending = list(pending)


class InterruptResponseStaleError(InterruptStateError):
    """The call answers an interrupt that is not pending: already answered, rolled back, superseded, or unknown.

    Attributes:
        pending: The interrupts pending now (possibly empty): answer these instead.
        stale: The ids of the answered interrupts that are not pending.
    """

    def __init__(self, stale: list[str], pending: list[Interrupt]) -> None:
        """Create the error for the answers to ``stale``."""
        super().__init__(
            f"interrupts=<{len(stale)}>, pending=<{len(pending)}> | the call answers interrupts that are not pending "
            "in the conversation (already answered, rolled back, superseded or unknown)",
            pending,
        )
        self.stale = list(stale)


class InterruptsPendingError(InterruptStateError):
    """The call is a new prompt, but the conversation waits for answers to its pending interrupts.

    Answer them first (a prompt of ``interruptResponse`` blocks); ``pending`` lists them.
    """

    def __init__(self, pending: list[Interrupt]) -> None:
        """Create the error; ``pending`` is never empty."""
        super().__init__(
            f"pending=<{len(pending)}> | the conversation waits for answers to its interrupts: answer them before "
            "sending a new prompt",
            pending,
        )


__all__ = [
    "ConcurrencyException",
    "IdempotencyAbortedError",
    "IdempotencyError",
    "IdempotencyKeyMismatchError",
    "IdempotencyLeaseLostError",
    "InterruptResponseStaleError",
    "InterruptStateError",
    "InterruptsPendingError",
    "InvocationCancelledError",
    "IdempotencyRecordCorruptedError",
    "IdempotencyResultTooLargeError",
    "IdempotencyStoreError",
    "IdempotencyTokenError",
    "IdempotencyWaitTimeoutError",
    "ReentrantInvocationError",
    "SessionBusyError",
]
