"""Every exception strands-py raises.

Where strands-agents defines the same name, the class here *is* upstream's class (``ConcurrencyException``) or a
subclass of it (``IdempotencyAbortedError`` on strands-agents >= 1.45), so ``except`` clauses written for
upstream keep catching what strands-py raises.
"""

import strands.types.exceptions as _upstream
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


__all__ = [
    "ConcurrencyException",
    "IdempotencyAbortedError",
    "IdempotencyTokenError",
]
