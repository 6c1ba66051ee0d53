"""``EventStreamResponse`` alone: a client gone (ASGI 2.4's ``OSError``, or ``http.disconnect``) ends it quietly."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from strands_py.http._responses import EventStreamResponse

WAIT = 5.0
SCOPE = {"type": "http", "method": "GET", "asgi": {"spec_version": "2.4"}}


class _Frames:
    """Frames that end on ``end`` (or never), remembering whether they were closed."""

    def __init__(self, count: int, end: asyncio.Event | None = None, error: Exception | None = None) -> None:
        self.closed = False
        self.waiting = asyncio.Event()
        self.iterator = self._frames(count, end, error)

    async def _frames(self, count: int, end: asyncio.Event | None, error: Exception | None) -> AsyncIterator[bytes]:
        try:
            for index in range(count):
                yield f"data: {index}\n\n".encode()
            if end is not None:
                self.waiting.set()
                await end.wait()
            if error is not None:
                raise error
        finally:
            self.closed = True


async def _never_disconnects() -> dict[str, Any]:
    await asyncio.Event().wait()
    return {}


async def test_a_send_that_raises_oserror_ends_the_stream_quietly() -> None:
    frames = _Frames(10)
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)
        if len(sent) == 3:
            raise ConnectionResetError("client went away")

    await asyncio.wait_for(EventStreamResponse(frames.iterator, {})(SCOPE, _never_disconnects, send), WAIT)
    assert len(sent) == 3 and frames.closed


class _Client:
    """A client that goes away (``http.disconnect``) once the third message (the start, two frames) was sent to it."""

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []
        self._gone = asyncio.Event()

    async def receive(self) -> dict[str, Any]:
        await self._gone.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: dict[str, Any]) -> None:
        self.sent.append(message)
        if len(self.sent) == 3:
            self._gone.set()


async def test_a_disconnect_while_waiting_for_the_next_event_ends_the_stream() -> None:
    frames = _Frames(2, end=asyncio.Event())
    client = _Client()
    sent = client.sent

    await asyncio.wait_for(EventStreamResponse(frames.iterator, {})(SCOPE, client.receive, client.send), WAIT)
    assert [m.get("body") for m in sent[1:]] == [b"data: 0\n\n", b"data: 1\n\n"] and frames.closed


async def test_a_failing_stream_raises_and_a_cancelled_response_closes_its_frames() -> None:
    failing = _Frames(1, error=ValueError("broken"))

    async def send(message: dict[str, Any]) -> None:
        pass

    with pytest.raises(ValueError, match="broken"):
        await asyncio.wait_for(EventStreamResponse(failing.iterator, {})(SCOPE, _never_disconnects, send), WAIT)
    waiting = _Frames(1, end=asyncio.Event())
    response = asyncio.ensure_future(EventStreamResponse(waiting.iterator, {})(SCOPE, _never_disconnects, send))
    await asyncio.wait_for(waiting.waiting.wait(), WAIT)
    response.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(response, WAIT)
    assert waiting.closed


class _WritesBackToBack(EventStreamResponse):
    """Negative control: writes whatever frames are ready without a turn of the loop in between."""

    async def _stream(self, send: Any) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        async for frames in self._frames:
            await send({"type": "http.response.body", "body": frames, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _writes_after_a_disconnect(response_class: type[EventStreamResponse]) -> int:
    """Frames written after the client went away, of 200 ready at once (a run followed late)."""
    frames = _Frames(200)
    client = _Client()
    await asyncio.wait_for(response_class(frames.iterator, {})(SCOPE, client.receive, client.send), WAIT)
    assert frames.closed
    return len([m for m in client.sent[3:] if m.get("body")])


async def test_frames_ready_at_once_stop_being_written_soon_after_the_client_went_away() -> None:
    # Each write of frames that were ready at once waits for a turn of the loop, in which the disconnect is seen.
    assert await _writes_after_a_disconnect(EventStreamResponse) <= 5


@pytest.mark.xfail(raises=AssertionError, strict=True, reason="negative control: every ready frame is written")
async def test_negative_control_written_back_to_back_every_frame_goes_out_after_the_client_left() -> None:
    assert await _writes_after_a_disconnect(_WritesBackToBack) <= 5
