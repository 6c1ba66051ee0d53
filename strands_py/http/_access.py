"""One log line per request to an invocation or conversation route, on the ``strands_py.http`` logger at INFO.

```
method=<POST>, key=<3f9c2a71b0c4d5e6>, status=<200>, outcome=<ran>, seconds=<1.234> | invocation answered
```

- ``key``: the first 16 hex digits of the durable key's digest (``-`` without a key, as for ``GET /sessions/{id}``);
  never the raw key, the caller's scope, the conversation's id or the prompt.
- ``status``: the HTTP status sent (``-`` when the client went away before anything was sent). An event stream is
  200 even when its last event is an ``error``.
- ``outcome``: ``ran`` (this request started the run, and the agent ran), ``joined`` (it followed a run another
  request started here; or, with a 202, queued behind other turns of its conversation), ``replayed`` (the answer
  came from the idempotency store), ``-`` (refused before any run: a 4xx, a 503, a key not found; and the status,
  cancel and conversation reads).
- ``seconds``: from the request to the end of its response (a stream's whole length).

The message says ``client went away before the end`` when the response was not sent to its end.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

from ._runs import Run

logger = logging.getLogger("strands_py.http")

SCOPE_KEY = "strands_py.access"
_DIGEST_CHARS = 16


class Access:
    """What the line of one request says; filled in as the request is served. Not thread-safe: one request's."""

    __slots__ = ("complete", "key", "method", "outcome", "routed", "started", "status")

    def __init__(self, method: str) -> None:
        """A request that has just arrived."""
        self.method = method
        self.started = time.monotonic()
        self.key: str | None = None
        self.outcome = "-"
        self.status: int | None = None
        self.complete = False
        self.routed = False

    def answered(self, run: Run, *, joined: bool) -> None:
        """The request is answered from ``run``: joined it (found it running or retained here), or started it."""
        self.outcome = "replayed" if run.replayed else "joined" if joined else "ran"

    def send(self, send: Send) -> Send:
        """``send``, noting the status and whether the body was sent to its end."""

        async def noted(message: Message) -> None:
            if message["type"] == "http.response.start":
                self.status = message["status"]
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                self.complete = True
            await send(message)

        return noted

    def log(self) -> None:
        """Write the line (at INFO on ``strands_py.http``)."""
        if not logger.isEnabledFor(logging.INFO):
            return
        digest = digest_of(self.key) or "-"
        logger.info(
            "method=<%s>, key=<%s>, status=<%s>, outcome=<%s>, seconds=<%.3f> | %s",
            self.method,
            digest,
            "-" if self.status is None else self.status,
            self.outcome,
            time.monotonic() - self.started,
            "invocation answered" if self.complete else "client went away before the end",
        )


def digest_of(key: str | None) -> str | None:
    """What may be shown of a durable key: the first 16 hex digits of its digest (None for None); never the key."""
    return None if key is None else key.rpartition("#")[2][:_DIGEST_CHARS]


def access_of(request: Request) -> Access | None:
    """The access record of ``request``, when its front keeps one."""
    access = request.scope.get(SCOPE_KEY)
    return access if isinstance(access, Access) else None


class LoggedResponse(Response):
    """``response``, sent with its access line written once it is done (for fronts that only return responses)."""

    def __init__(self, response: Response, access: Access) -> None:
        """Send ``response``, then log ``access``."""
        self._response = response
        self._access = access

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Send the wrapped response; log the line however it ends."""
        try:
            await self._response(scope, receive, self._access.send(send))
        finally:
            self._access.log()

    def __getattr__(self, name: str) -> Any:
        """Everything else is the wrapped response's (``status_code``, ``headers``, ``body``)."""
        return getattr(self._response, name)
