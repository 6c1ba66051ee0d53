"""Real servers and clients for the HTTP tests: uvicorn on 127.0.0.1 (a free port), started and stopped per test."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import uvicorn
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from strands_py import Agent
from strands_py.http import Server
from strands_py.http._demo import StreamingScript
from strands_py.http._scopes import ANONYMOUS, DEFAULT_SCOPE

WAIT = 30.0
# The scope of a request without credentials to an app that is neither scoped nor single-tenant.
ANONYMOUS_SCOPE = f"{DEFAULT_SCOPE}/{ANONYMOUS}"
ANSWER = " ".join(f"word{n:02d}" for n in range(1, 41)) + "."


class StartedServer(Server):
    """The library's draining server, telling the test when it is up and when its shutdown begins."""

    def __init__(self, config: uvicorn.Config, drain: Any = ()) -> None:
        super().__init__(config, drain)
        self.up = threading.Event()
        self.shutting_down = threading.Event()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        self.up.set()

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.shutting_down.set()
        await super().shutdown(sockets)


class PlainServer(uvicorn.Server):
    """uvicorn's own server (no drain), for negative controls."""

    def __init__(self, config: uvicorn.Config, drain: Any = ()) -> None:
        super().__init__(config)
        self.up = threading.Event()
        self.shutting_down = threading.Event()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        self.up.set()

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.shutting_down.set()
        await super().shutdown(sockets)


class Observer:
    """ASGI middleware: counts the HTTP requests that reached the app, and sees clients disconnect.

    ``all_in`` is set once ``expected`` requests have arrived; ``disconnected`` when the app received an
    ``http.disconnect`` (the server noticed a client went away); ``errors`` holds what the app raised.
    """

    def __init__(self, app: ASGIApp, expected: int = 1) -> None:
        self.app = app
        self.expected = expected
        self.count = 0
        self.all_in = threading.Event()
        self.disconnected = threading.Event()
        self.errors: list[BaseException] = []  # what the app raised (a response it failed to send)
        self._lock = threading.Lock()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        with self._lock:
            self.count += 1
            if self.count >= self.expected:
                self.all_in.set()

        async def observed_receive() -> Message:
            message = await receive()
            if message["type"] == "http.disconnect":
                self.disconnected.set()
            return message

        try:
            await self.app(scope, observed_receive, send)
        except BaseException as e:
            self.errors.append(e)
            raise


@dataclass
class Running:
    """A server running on a thread of the test process."""

    url: str
    server: StartedServer | PlainServer
    thread: threading.Thread

    def stop(self, timeout: float = WAIT) -> bool:
        """Ask the server to exit and wait for it; whether it did."""
        self.server.should_exit = True
        self.thread.join(timeout)
        return not self.thread.is_alive()


@contextlib.contextmanager
def serve(
    app: ASGIApp, *, drain: Any = None, server_class: type[Any] = StartedServer, **config: Any
) -> Iterator[Running]:
    """Serve ``app`` on 127.0.0.1 (a free port) on a thread; stopped (and joined) on exit, whatever happened."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(2048)
    port = sock.getsockname()[1]
    options = {"log_level": "warning", "lifespan": "on", **config}
    server = server_class(uvicorn.Config(app, **options), [app] if drain is None else drain)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    running = Running(f"http://127.0.0.1:{port}", server, thread)
    try:
        assert server.up.wait(WAIT), "uvicorn did not start"
        yield running
    finally:
        stopped = running.stop()
        if not stopped:
            server.force_exit = True
            thread.join(WAIT)
        sock.close()
        assert stopped, "uvicorn did not stop"


@dataclass
class Script:
    """A scripted model shared by every agent a factory builds, releasing its answer's words on demand."""

    script: StreamingScript
    words: threading.Semaphore = field(default_factory=lambda: threading.Semaphore(0))
    agents: int = 0

    @property
    def model_calls(self) -> int:
        return self.script.model_calls

    def release(self, words: int | None = None) -> None:
        """Let ``words`` more words of the answer through (all of them by default)."""
        self.words.release(len(self.script.chunks) if words is None else words)

    def factory(self, **agent_options: Any) -> Callable[[Any], Agent]:
        def make_agent(request: Any) -> Agent:
            self.agents += 1
            return Agent(model=self.script.model(), tools=self.script.tools(), callback_handler=None, **agent_options)

        return make_agent


def make_script(*, paced: bool = False, answer: str = ANSWER, **options: Any) -> Script:
    """A script; ``paced``: each word waits for ``release`` (so a test can hold the answer mid-stream)."""
    holder: list[Script] = []

    def pace(_: int) -> None:
        if not holder[0].words.acquire(timeout=WAIT):
            raise TimeoutError("the test never released the next word")

    script = Script(StreamingScript(answer=answer, pace=pace if paced else None, **options))
    holder.append(script)
    return script


@contextlib.contextmanager
def scripted(*, paced: bool = False, gated: bool = False, **options: Any) -> Iterator[Script]:
    """A script for one test; gate and pace are opened at the end, so that no model thread outlives the test.

    ``paced``: each word of the answer waits for ``release``. ``gated``: model calls wait for ``script.gate.set()``.
    """
    made = make_script(paced=paced, gate=threading.Event() if gated else None, **options)
    try:
        yield made
    finally:
        if made.script.gate is not None:
            made.script.gate.set()
        made.release(10_000)


def new_key() -> str:
    return str(uuid.uuid4())


def headers(key: str | None, *, sse: bool = False, last_event_id: str | None = None) -> dict[str, str]:
    result = {"Accept": "text/event-stream"} if sse else {}
    if key is not None:
        result["Idempotency-Key"] = f'"{key}"'
    if last_event_id is not None:
        result["Last-Event-ID"] = last_event_id
    return result


@dataclass(frozen=True)
class Event:
    id: str
    event: str
    data: Any

    @property
    def position(self) -> int:
        return int(self.id.rpartition(":")[2])

    @property
    def run(self) -> str:
        return self.id.rpartition(":")[0]


def parse_sse(text: str) -> list[Event]:
    """The events of an SSE body (comments and ``retry:`` skipped); each ``data`` parsed as JSON."""
    events = []
    for block in text.replace("\r\n", "\n").split("\n\n"):
        fields: dict[str, str] = {}
        for line in block.split("\n"):
            name, _, value = line.partition(": ")
            if name in ("id", "event", "data"):
                fields[name] = value
        if "data" in fields:
            events.append(Event(fields.get("id", ""), fields.get("event", "message"), json.loads(fields["data"])))
    return events


def text_of(events: list[Event]) -> str:
    return "".join(e.data["text"] for e in events if e.event == "data")


def client(url: str, **options: Any) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=500, max_keepalive_connections=500)
    return httpx.AsyncClient(base_url=url, timeout=WAIT, limits=limits, **options)


class SerialMotoServer:
    """moto's DynamoDB on 127.0.0.1, one request at a time (moto's backend is not atomic under threads)."""

    def __init__(self) -> None:
        from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
        from werkzeug.serving import make_server

        app = DomainDispatcherApplication(create_backend_app)
        self._server = make_server("127.0.0.1", 0, app, threaded=False, request_handler=MotoRequestHandler)
        self.url = f"http://127.0.0.1:{self._server.server_port}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="moto-server", daemon=True)

    def __enter__(self) -> SerialMotoServer:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._server.shutdown()
        self._thread.join(WAIT)
