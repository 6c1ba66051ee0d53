"""The server's manners in its log, on a real uvicorn: one line per invocation, and quiet when a client leaves early.

Negative control: ``StreamingResponse.__call__`` (how event streams were sent before the fix) writes every frame
of a replay to a client that already closed its socket, and asyncio logs one warning per frame.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
import threading
from collections.abc import AsyncIterator
from typing import Any

import pytest
from http_support import WAIT, client, headers, new_key, scripted, serve
from starlette.responses import StreamingResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from strands_py.http import AgentApp
from strands_py.http._buffer import EventBuffer
from strands_py.http._responses import EventStreamResponse
from strands_py.idempotency import IdempotencyConfig, InMemoryIdempotencyStore

PROMPT = {"prompt": "What is the weather in Paris?"}
LONG_ANSWER = " ".join(f"w{n}" for n in range(3000)) + "."
SEND_WARNING = "socket.send() raised exception."


class _Served:
    """ASGI middleware: ``done`` is set when a request to a path ending in ``/events`` has been served."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.done = threading.Event()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await self.app(scope, receive, send)
        finally:
            if scope["type"] == "http" and scope["path"].endswith("/events"):
                self.done.set()


def _read_a_little_then_reset(port: int, path: str) -> bytes:
    """GET ``path``, read the first bytes of the response, then close the connection with a reset."""
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
        head = sock.recv(512)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST, not FIN
    return head


@pytest.mark.racing
@pytest.mark.parametrize("stream", ["fixed", "old"])
async def test_a_client_closing_a_replay_early_leaves_no_warning_per_event(
    stream: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    if stream == "old":
        # The old stream: starlette's own response, sent a frame at a time with no turn of the loop in between.
        monkeypatch.setattr(EventStreamResponse, "__call__", StreamingResponse.__call__)
        batched = EventBuffer.events

        async def frame_by_frame(self: EventBuffer, *args: Any, **kwargs: Any) -> AsyncIterator[bytes]:
            async for frames in batched(self, *args, **kwargs):
                for frame in frames.split(b"\n\n")[:-1]:
                    yield frame + b"\n\n"

        monkeypatch.setattr(EventBuffer, "events", frame_by_frame)
    caplog.set_level(logging.WARNING, logger="asyncio")
    with scripted(answer=LONG_ANSWER) as script:
        app = AgentApp(script.factory())
        served = _Served(app)
        with serve(served, drain=[app]) as server:
            key = new_key()
            async with client(server.url) as http:
                assert (await http.post("/invocations", json=PROMPT, headers=headers(key))).status_code == 200
            port = int(server.url.rpartition(":")[2])
            head = await asyncio.to_thread(_read_a_little_then_reset, port, f"/invocations/{key}/events")
            assert await asyncio.to_thread(served.done.wait, WAIT)
            assert app.running == 0
    assert head.startswith(b"HTTP/1.1 200")
    warnings = [r for r in caplog.records if r.getMessage() == SEND_WARNING]
    if stream == "old":
        assert warnings  # about one per event left to send (thousands), however the client's reset was timed
    else:
        assert warnings == []


@pytest.mark.racing
async def test_a_client_leaving_a_live_stream_stops_the_stream_not_the_run() -> None:
    with scripted(paced=True) as script:
        app = AgentApp(script.factory())
        served = _Served(app)
        with serve(served, drain=[app]) as server:
            key = new_key()
            async with client(server.url) as http:
                script.release(2)
                port = int(server.url.rpartition(":")[2])
                async with http.stream("POST", "/invocations", json=PROMPT, headers=headers(key, sse=True)) as post:
                    assert post.status_code == 200
                    # The stream is waiting for the next word: a GET that leaves now is noticed while it waits.
                    head = await asyncio.to_thread(_read_a_little_then_reset, port, f"/invocations/{key}/events")
                    assert await asyncio.to_thread(served.done.wait, WAIT)
                    assert app.running == 1
                    script.release()
                    body = (await asyncio.wait_for(post.aread(), WAIT)).decode()
    assert head.startswith(b"HTTP/1.1 200")
    assert "event: result" in body
    assert script.model_calls == 2


def _lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, str]]:
    """The access lines, as their fields."""
    lines = []
    for record in caplog.records:
        if record.name == "strands_py.http" and record.levelno == logging.INFO:
            fields, _, message = record.getMessage().partition(" | ")
            line = dict(field.split("=<", 1) for field in fields.split(", "))
            fields = {name: value.rstrip(">") for name, value in line.items()}
            lines.append(fields | {"message": message, "thread": record.threadName})
    return lines


async def test_one_line_per_invocation_with_a_key_digest_status_outcome_and_duration(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="strands_py.http")
    store = InMemoryIdempotencyStore()
    with scripted() as script:
        first = AgentApp(script.factory(), IdempotencyConfig(store=store))
        other = AgentApp(script.factory(), IdempotencyConfig(store=store))
        with serve(first) as one, serve(other) as two:
            async with client(one.url) as http, client(two.url) as http2:
                key = "order-1234-secret-key"
                secret_prompt = {"prompt": "my secret prompt"}
                await http.post("/invocations", json=secret_prompt, headers=headers(key))
                await http.post("/invocations", json=secret_prompt, headers=headers(key, sse=True))
                await http.get(f"/invocations/{key}/events")
                await http2.post("/invocations", json=secret_prompt, headers=headers(key))
                await http.post("/invocations", json=secret_prompt)  # no key: 400
                await http.get(f"/invocations/{new_key()}/events")  # unknown: 404
                await http.get("/")  # not an invocation: no line
    lines = _lines(caplog)
    # A line is written once its response is out: the client may be at its next request by then, so the two servers'
    # lines interleave as they will (each server's own are in order: one connection, one request after the other).
    on_one = [line for line in lines if line["thread"] == f"uvicorn-{one.url.rpartition(':')[2]}"]
    on_two = [line for line in lines if line["thread"] == f"uvicorn-{two.url.rpartition(':')[2]}"]
    assert len(on_one) + len(on_two) == len(lines)
    assert [(line["method"], line["status"], line["outcome"]) for line in on_one] == [
        ("POST", "200", "ran"),
        ("POST", "200", "joined"),
        ("GET", "200", "joined"),
        ("POST", "400", "-"),
        ("GET", "404", "-"),
    ]
    assert [(line["method"], line["status"], line["outcome"]) for line in on_two] == [("POST", "200", "replayed")]
    digests = {line["key"] for line in [*on_one[:3], *on_two]}
    assert len(digests) == 1 and len(digests.pop()) == 16 and on_one[3]["key"] == "-"
    assert all(float(line["seconds"]) >= 0 and line["message"] == "invocation answered" for line in lines)
    assert "secret" not in caplog.text and key not in caplog.text


async def test_the_line_of_a_client_that_left_says_so() -> None:
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("strands_py.http")
    logger.addHandler(handler)
    previous = logger.level
    logger.setLevel(logging.INFO)
    try:
        with scripted(answer=LONG_ANSWER) as script:
            app = AgentApp(script.factory())
            served = _Served(app)
            with serve(served, drain=[app]) as server:
                key = new_key()
                async with client(server.url) as http:
                    await http.post("/invocations", json=PROMPT, headers=headers(key))
                port = int(server.url.rpartition(":")[2])
                await asyncio.to_thread(_read_a_little_then_reset, port, f"/invocations/{key}/events")
                assert await asyncio.to_thread(served.done.wait, WAIT)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous)
    last: Any = records[-1]
    assert last.getMessage().endswith("| client went away before the end") and "outcome=<joined>" in last.getMessage()
