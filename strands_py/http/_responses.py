"""Responses that follow runs: an event stream, and a response decided only once its run says enough."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from ._protocol import ProblemError


class EventStreamResponse(StreamingResponse):
    """``text/event-stream``, never cached or buffered by proxies."""

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[bytes], headers: dict[str, str]) -> None:
        """Stream ``content`` (SSE frames)."""
        super().__init__(content, headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no", **headers})


class DeferredResponse(Response):
    """A response decided only when ``prepare()`` returns, given up if the client disconnects first.

    Waiting for a run is not tied to the request: a client that goes away stops waiting, the run carries on.
    """

    def __init__(self, prepare: Callable[[], Awaitable[Response]]) -> None:
        """Defer to ``prepare``; a ``ProblemError`` it raises becomes the problem response."""
        self._prepare = prepare

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Prepare (racing the client's disconnect), then send the prepared response."""
        preparing = asyncio.ensure_future(self._prepare())
        disconnected = asyncio.ensure_future(_disconnect(receive))
        try:
            await asyncio.wait({preparing, disconnected}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            disconnected.cancel()
            if not preparing.done():
                preparing.cancel()  # the client went away (or we are cancelled): stop waiting, the run goes on
        if not preparing.done() or preparing.cancelled():
            return  # cancel() only requested it: the task ends on its own, nothing is left to send to
        try:
            response = preparing.result()
        except ProblemError as e:
            response = e.problem.response()
        if scope["method"] == "HEAD":
            response = Response(status_code=response.status_code, headers=dict(response.headers))
        await response(scope, receive, send)


async def _disconnect(receive: Receive) -> None:
    """Return when the client disconnects (the body has been read already)."""
    while (await receive())["type"] != "http.disconnect":
        pass
