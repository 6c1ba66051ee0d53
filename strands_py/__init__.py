"""strands-py: idempotent, retry-storm-proof invocations for Strands Agents."""

from strands.types.agent import ConcurrentInvocationMode

from .__about__ import __version__
from .agent import Agent
from .idempotency import (
    DynamoDBIdempotencyStore,
    IdempotencyConfig,
    InMemoryIdempotencyStore,
    ReplayedAgentResult,
)
from .idempotency._context import tool_idempotency_key
from .types.exceptions import (
    ConcurrencyException,
    IdempotencyAbortedError,
    IdempotencyError,
    IdempotencyKeyMismatchError,
    IdempotencyLeaseLostError,
    IdempotencyRecordCorruptedError,
    IdempotencyResultTooLargeError,
    IdempotencyStoreError,
    IdempotencyTokenError,
    IdempotencyWaitTimeoutError,
    InterruptResponseStaleError,
    InterruptsPendingError,
    InterruptStateError,
    InvocationCancelledError,
    ReentrantInvocationError,
    SessionBusyError,
)
from .types.session import SessionInvocationMode

__all__ = [
    "Agent",
    "ConcurrencyException",
    "ConcurrentInvocationMode",
    "DynamoDBIdempotencyStore",
    "IdempotencyAbortedError",
    "IdempotencyConfig",
    "IdempotencyError",
    "IdempotencyKeyMismatchError",
    "IdempotencyLeaseLostError",
    "IdempotencyRecordCorruptedError",
    "IdempotencyResultTooLargeError",
    "IdempotencyStoreError",
    "IdempotencyTokenError",
    "IdempotencyWaitTimeoutError",
    "InMemoryIdempotencyStore",
    "InterruptResponseStaleError",
    "InterruptStateError",
    "InterruptsPendingError",
    "InvocationCancelledError",
    "ReentrantInvocationError",
    "ReplayedAgentResult",
    "SessionBusyError",
    "SessionInvocationMode",
    "__version__",
    "tool_idempotency_key",
]
