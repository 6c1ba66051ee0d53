"""strands-py: idempotent, retry-storm-proof invocations for Strands Agents."""

from strands.types.agent import ConcurrentInvocationMode

from .__about__ import __version__
from .agent import Agent
from .types.exceptions import ConcurrencyException, IdempotencyAbortedError, IdempotencyTokenError

__all__ = [
    "Agent",
    "ConcurrencyException",
    "ConcurrentInvocationMode",
    "IdempotencyAbortedError",
    "IdempotencyTokenError",
    "__version__",
]
