"""Durable idempotency: replay completed results within a window, and deduplicate across processes and hosts.

```python
from strands_py import Agent
from strands_py.idempotency import IdempotencyConfig, DynamoDBIdempotencyStore

agent = Agent(model=model, idempotency=IdempotencyConfig(store=DynamoDBIdempotencyStore("agent-idempotency")))
```
"""

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
