"""Serve idempotent agents over HTTP: ``AgentApp``, an ASGI app (Starlette) for FastAPI, Starlette or uvicorn.

```python
from strands_py.http import AgentApp

app = AgentApp(lambda request: Agent(model=model, tools=tools), IdempotencyConfig(store=store))
```

Needs the ``http`` extra: ``pip install 'strands-py[http]'``.
"""

from ._app import AgentApp
from ._options import WebhookOptions
from ._problems import (
    ABORTED,
    AGENT_BUSY,
    AGENT_FAILED,
    BODY_TOO_LARGE,
    CANCEL_UNSUPPORTED,
    CANCELLED,
    IN_PROGRESS_ELSEWHERE,
    INTERRUPT_STALE,
    INTERRUPTS_PENDING,
    INVALID_BODY,
    INVALID_PARAMETER,
    KEY_INVALID,
    KEY_MISMATCH,
    KEY_MISSING,
    LEASE_LOST,
    MESSAGES_UNAVAILABLE,
    NOT_FOUND,
    NOT_REPLAYABLE,
    RECORD_CORRUPTED,
    RUN_TIMEOUT,
    SCOPE_INVALID,
    SESSION_BUSY,
    SHUTTING_DOWN,
    STORE_UNAVAILABLE,
    TOO_MANY_RUNS,
    UNSUPPORTED_MEDIA_TYPE,
)
from ._server import Server, run
from ._sessions import SessionManagerFactory
from ._webhook_signing import new_webhook_secret
from ._webhooks import WebhookTarget

__all__ = [
    "ABORTED",
    "AGENT_BUSY",
    "AGENT_FAILED",
    "BODY_TOO_LARGE",
    "CANCELLED",
    "CANCEL_UNSUPPORTED",
    "INVALID_BODY",
    "INVALID_PARAMETER",
    "IN_PROGRESS_ELSEWHERE",
    "INTERRUPTS_PENDING",
    "INTERRUPT_STALE",
    "KEY_INVALID",
    "KEY_MISMATCH",
    "KEY_MISSING",
    "LEASE_LOST",
    "MESSAGES_UNAVAILABLE",
    "NOT_FOUND",
    "NOT_REPLAYABLE",
    "RECORD_CORRUPTED",
    "RUN_TIMEOUT",
    "SCOPE_INVALID",
    "SESSION_BUSY",
    "SHUTTING_DOWN",
    "STORE_UNAVAILABLE",
    "TOO_MANY_RUNS",
    "UNSUPPORTED_MEDIA_TYPE",
    "AgentApp",
    "Server",
    "SessionManagerFactory",
    "WebhookOptions",
    "WebhookTarget",
    "new_webhook_secret",
    "run",
]
