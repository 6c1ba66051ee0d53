"""Responses that follow runs: an event stream, and a response decided only once its run says enough."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing

from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from ._protocol import ProblemError


class EventStreamResponse(StreamingResponse):
    """``text/event-stream``, never cached or buffered by proxies; it stops writing as soon as the client is gone.

    ``content`` yields bytes holding one or more frames (a follower that fell behind catches up 16 frames a write). A
    stream that never waits (a long run followed late) would write back to back, and the writes after a client went
    away would each reach a closed socket (asyncio logs ``socket.send() raised exception.`` for each) before the
    server had a turn to notice. So no write follows another without a turn of the event loop in between, in which
    the server sees a lost connection (and its ``send`` stops writing): waiting for the next frames is such a turn,
    and frames that were ready at once get one of their own. A task watching for ``http.disconnect`` then ends the
    stream, a few turns later (in the meantime the app may still hand a frame or two to a ``send`` that no longer
    writes). A server that raises ``OSError`` on a send to a client that went away (ASGI 2.4) ends it at once. The
    run itself carries on either way.
    """

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[bytes], headers: dict[str, str]) -> None:
        """Stream ``content`` (SSE frames)."""
        super().__init__(content, headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no", **headers})
        self._frames = content

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Send the frames until they end or the client goes away; the frames' iterator is closed either way."""
        streaming = asyncio.ensure_future(self._stream(send))
        disconnected = asyncio.ensure_future(_disconnect(receive))
        try:
            await asyncio.wait({streaming, disconnected}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            disconnected.cancel()
            if not streaming.done():
                streaming.cancel()  # the client went away (or we are cancelled): stop following the run
                # The stream ends at its next await; no frame is written meanwhile (the server stopped writing).
                await asyncio.wait({streaming})
        error = None if streaming.cancelled() else streaming.exception()
        if error is not None:
            raise error

    async def _stream(self, send: Send) -> None:
        loop = asyncio.get_running_loop()
        turned = _Turned()
        async with aclosing(self._frames):  # type: ignore[type-var]
            try:
                await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
                async for frames in self._frames:
                    if not turned.yes:
                        # These frames were ready at once: one turn of the loop first, so that a connection lost
                        # during the last write is noticed before this one. Frames that had to be waited for come
                        # after such a turn already (a live run's next event), and are written without another.
                        await asyncio.sleep(0)
                    await send({"type": "http.response.body", "body": frames, "more_body": True})
                    turned.yes = False
                    loop.call_soon(turned.mark)  # runs at the loop's next turn
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            except OSError:
                return  # ASGI 2.4: the client went away


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


class _Turned:
    """Whether the event loop has turned since the last write (``mark`` is called soon after each write)."""

    __slots__ = ("yes",)

    def __init__(self) -> None:
        self.yes = True

    def mark(self) -> None:
        self.yes = True


async def _disconnect(receive: Receive) -> None:
    """Return when the client disconnects (the body has been read already)."""
    while (await receive())["type"] != "http.disconnect":
        pass
