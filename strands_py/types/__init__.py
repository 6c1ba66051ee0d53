"""Public types of strands-py."""

from .exceptions import ConcurrencyException, IdempotencyAbortedError, IdempotencyTokenError

__all__ = ["ConcurrencyException", "IdempotencyAbortedError", "IdempotencyTokenError"]
