"""Durable idempotency: replay completed results within a window, and deduplicate across processes and hosts.

```python
from strands_py import Agent
from strands_py.idempotency import IdempotencyConfig, DynamoDBIdempotencyStore

agent = Agent(model=model, idempotency=IdempotencyConfig(store=DynamoDBIdempotencyStore("agent-idempotency")))
```
"""

from typing import TYPE_CHECKING, Any

from ..types.exceptions import (
    IdempotencyError,
    IdempotencyKeyMismatchError,
    IdempotencyLeaseLostError,
    IdempotencyRecordCorruptedError,
    IdempotencyResultTooLargeError,
    IdempotencyStoreError,
    IdempotencyWaitTimeoutError,
)
from ._context import tool_idempotency_key
from .base import IdempotencyStore
from .config import IdempotencyConfig
from .dynamodb import DynamoDBIdempotencyStore
from .memory import InMemoryIdempotencyStore
from .record import IdempotencyRecord, RecordState, ReplayedAgentResult

__all__ = [
    "DynamoDBIdempotencyStore",
    "IdempotencyConfig",
    "IdempotencyError",
    "IdempotencyKeyMismatchError",
    "IdempotencyLeaseLostError",
    "IdempotencyRecord",
    "IdempotencyRecordCorruptedError",
    "IdempotencyResultTooLargeError",
    "IdempotencyStore",
    "IdempotencyStoreError",
    "IdempotencyWaitTimeoutError",
    "InMemoryIdempotencyStore",
    "RecordState",
    "ReplayedAgentResult",
    "tool_idempotency_key",
]

if TYPE_CHECKING:
    from .redis import RedisIdempotencyStore as RedisIdempotencyStore


def __getattr__(name: str) -> Any:
    # RedisIdempotencyStore needs redis-py (strands-py[redis]): imported on first use, so that this package imports
    # without it. Not in __all__ for the same reason.
    if name == "RedisIdempotencyStore":
        from .redis import RedisIdempotencyStore

        return RedisIdempotencyStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
