"""Serve idempotent agents over the A2A protocol: ``A2AApp``, an ASGI app (JSON-RPC over HTTP, and its agent card).

```python
from strands_py.a2a import A2AApp

app = A2AApp(lambda request: Agent(model=model, tools=tools), IdempotencyConfig(store=store))
```

A message's ``messageId`` is its idempotency key, a ``contextId`` a conversation (with ``session_manager=``), and a
task id names both, so that every server sharing the store answers for every task. Needs the ``a2a`` extra:
``pip install 'strands-py[a2a]'``.
"""

from ._app import AGENT_CARD_PATH, A2AApp
from ._errors import (
    CONTEXT_BUSY,
    INTERRUPT_NOT_PENDING,
    INTERRUPTS_WAITING,
    MESSAGE_ID_MISMATCH,
    RESULT_NOT_REPLAYABLE,
    TASK_IN_PROGRESS,
    UNAVAILABLE,
)

__all__ = [
    "AGENT_CARD_PATH",
    "CONTEXT_BUSY",
    "INTERRUPTS_WAITING",
    "INTERRUPT_NOT_PENDING",
    "MESSAGE_ID_MISMATCH",
    "RESULT_NOT_REPLAYABLE",
    "TASK_IN_PROGRESS",
    "UNAVAILABLE",
    "A2AApp",
]
