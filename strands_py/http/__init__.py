"""Serve idempotent agents over HTTP: ``AgentApp``, an ASGI app (Starlette) for FastAPI, Starlette or uvicorn.

```python
from strands_py.http import AgentApp

app = AgentApp(lambda request: Agent(model=model, tools=tools), IdempotencyConfig(store=store))
```

Needs the ``http`` extra: ``pip install 'strands-py[http]'``.
"""

from ._app import AgentApp
from ._problems import (
    ABORTED,
    AGENT_BUSY,
    AGENT_FAILED,
    BODY_TOO_LARGE,
    IN_PROGRESS_ELSEWHERE,
    INVALID_BODY,
    KEY_INVALID,
    KEY_MISMATCH,
    KEY_MISSING,
    LEASE_LOST,
    NOT_FOUND,
    NOT_REPLAYABLE,
    RECORD_CORRUPTED,
    RUN_TIMEOUT,
    SCOPE_INVALID,
    SHUTTING_DOWN,
    STORE_UNAVAILABLE,
    TOO_MANY_RUNS,
    UNSUPPORTED_MEDIA_TYPE,
)
from ._server import Server, run

__all__ = [
    "ABORTED",
    "AGENT_BUSY",
    "AGENT_FAILED",
    "BODY_TOO_LARGE",
    "IN_PROGRESS_ELSEWHERE",
    "INVALID_BODY",
    "KEY_INVALID",
    "KEY_MISMATCH",
    "KEY_MISSING",
    "LEASE_LOST",
    "NOT_FOUND",
    "NOT_REPLAYABLE",
    "RECORD_CORRUPTED",
    "RUN_TIMEOUT",
    "SCOPE_INVALID",
    "SHUTTING_DOWN",
    "STORE_UNAVAILABLE",
    "TOO_MANY_RUNS",
    "UNSUPPORTED_MEDIA_TYPE",
    "AgentApp",
    "Server",
    "run",
]
