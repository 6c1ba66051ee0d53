"""A server killed mid-answer, another takes over: the client's stream goes on, with no text repeated or missing.

Two server processes (``takeover_server.py``) share a real redis-server. Server A answers (one tool call, then the
answer word by word) and stops for good in the middle of the answer; the test kills it (SIGKILL). The client
re-attaches to server B with the ``Last-Event-ID`` it got from A. B takes the silent claim over after a lease,
resumes from the journal (the tool call and its result are replayed: B pays neither), and goes live at the answer,
which A had partly streamed but never journaled: the client gets a ``rewind`` to the last event that still holds,
then B's answer. Applying the rewind, the client shows the answer exactly once.

The page does the same in headless Chromium, behind a front proxy that sends the browser to A, then to B.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from _servers import RedisServer, free_port, redis_server_binary
from http_support import WAIT, new_key, parse_sse
from test_http_browser import browser, until  # noqa: F401 - the module's Chromium fixture, and its wait

from strands_py.http._demo import DEMO_ANSWER

SERVER = str(Path(__file__).with_name("takeover_server.py"))
LEASE = 1.0
STOP_AT_WORD = 6

pytestmark = pytest.mark.racing  # server processes racing for one claim


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    redis_server_binary()
    server = RedisServer().start()
    try:
        yield server.url
    finally:
        server.cleanup()


class _Servers:
    """Server A (stops mid-answer) and B, their ledger, and whatever the test started."""

    def __init__(self, tmp_path: Path, redis_url: str) -> None:
        self.ledger = str(tmp_path / "ledger")
        self.ports = {"a": free_port(), "b": free_port()}
        self.processes: dict[str, subprocess.Popen[str]] = {}
        self.tmp = tmp_path
        self.redis_url = redis_url

    def start(self, name: str) -> None:
        config = {"redis": self.redis_url, "ledger": self.ledger, "port": self.ports[name], "lease_seconds": LEASE}
        if name == "a":
            config["stop_at_word"] = STOP_AT_WORD
        path = self.tmp / f"{name}.json"
        path.write_text(json.dumps(config))
        self.processes[name] = subprocess.Popen(
            [sys.executable, SERVER, str(path)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        deadline = time.monotonic() + WAIT
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.ports[name]), timeout=1).close()
                return
            except OSError:
                if self.processes[name].poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"server {name} did not start") from None
                time.sleep(0.05)  # polling a port: bounded above, not a synchronisation

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.ports[name]}"

    def lines(self) -> list[tuple[int, str]]:
        try:
            with open(self.ledger) as f:
                return [(int(pid), what.strip()) for pid, what in (line.split(" ", 1) for line in f)]
        except FileNotFoundError:
            return []

    def paid_by(self, name: str) -> dict[str, int]:
        pid = self.processes[name].pid
        mine = [what for who, what in self.lines() if who == pid]
        return {"model": mine.count("model"), "tool": mine.count("tool")}

    def wait_stopped(self) -> None:
        deadline = time.monotonic() + WAIT
        while "stopped" not in [what for _, what in self.lines()]:
            if time.monotonic() > deadline:
                raise AssertionError("server A never stopped mid-answer")
            time.sleep(0.05)

    def kill(self, name: str) -> None:
        process = self.processes[name]
        os.kill(process.pid, signal.SIGKILL)
        process.wait(WAIT)

    def stop_all(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(WAIT)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(WAIT)


@pytest.fixture
def servers(tmp_path: Path, redis_url: str) -> Iterator[_Servers]:
    started = _Servers(tmp_path, redis_url)
    try:
        yield started
    finally:
        started.stop_all()


def _shown(events: list[Any]) -> str:
    """The answer a client shows: data events by position, a rewind withdrawing those after its position."""
    chunks: list[tuple[int, str]] = []
    for event in events:
        if event.event == "data":
            chunks.append((event.position, event.data["text"]))
        elif event.event == "rewind":
            chunks = [chunk for chunk in chunks if chunk[0] <= event.data["to"]]
    return "".join(text for _, text in chunks)


async def _read_until_stopped(servers: _Servers, key: str) -> list[Any]:
    """Follow the invocation on A until A stops mid-answer; the events received so far."""
    received = b""
    async with httpx.AsyncClient(timeout=WAIT) as client:
        request = client.build_request(
            "POST",
            servers.url("a") + "/invocations",
            json={"prompt": "What is the weather in Paris?"},
            headers={"Idempotency-Key": json.dumps(key), "Accept": "text/event-stream"},
        )
        response = await client.send(request, stream=True)
        assert response.status_code == 200
        async for chunk in response.aiter_bytes():
            received += chunk
            complete = received.decode().rpartition("\n\n")[0]  # whole events only
            if sum(1 for e in parse_sse(complete) if e.event == "data") >= STOP_AT_WORD - 1:
                break
        await response.aclose()
    await asyncio.get_running_loop().run_in_executor(None, servers.wait_stopped)
    return parse_sse(received.decode().rpartition("\n\n")[0])


async def test_a_client_re_attached_to_another_server_sees_the_answer_once(servers: _Servers) -> None:
    servers.start("a")
    servers.start("b")
    key = new_key()
    before = await _read_until_stopped(servers, key)
    assert _shown(before) and DEMO_ANSWER.startswith(_shown(before))
    servers.kill("a")
    last_id = [e.id for e in before if e.id][-1]
    async with httpx.AsyncClient(timeout=WAIT * 2) as client:
        response = await client.post(
            servers.url("b") + "/invocations",
            json={"prompt": "What is the weather in Paris?"},
            headers={"Idempotency-Key": json.dumps(key), "Accept": "text/event-stream", "Last-Event-ID": last_id},
        )
    after = parse_sse(response.text)
    names = [e.event for e in after]
    assert "rewind" in names and names[-1] == "result", names
    assert last_id.split(".", 1)[0] == after[-1].id.split(".", 1)[0], "another lineage: the client would start over"
    assert _shown(before + after) == DEMO_ANSWER
    assert servers.paid_by("b") == {"model": 1, "tool": 0}, "B paid again for a journaled step"


# -- the page ------------------------------------------------------------------------------------------------------


class _Front:
    """A TCP relay on 127.0.0.1 to one server, switched to another by ``target``: a load balancer, as it were."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.port = free_port()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="front", daemon=True)
        self._server: asyncio.AbstractServer | None = None

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)

        async def start() -> None:
            self._server = await asyncio.start_server(self._relay, "127.0.0.1", self.port)
            self._ready.set()

        self._loop.run_until_complete(start())
        self._loop.run_forever()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", self.target)
        except OSError:
            writer.close()
            return

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            try:
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
            except OSError:
                pass
            finally:
                sink.close()

        await asyncio.gather(pipe(reader, upstream_writer), pipe(upstream_reader, writer))

    def __enter__(self) -> _Front:
        self._thread.start()
        assert self._ready.wait(WAIT)
        return self

    def __exit__(self, *_: object) -> None:
        async def stop() -> None:
            if self._server is not None:
                self._server.close()
            for task in asyncio.all_tasks(self._loop):
                if task is not asyncio.current_task():
                    task.cancel()

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(WAIT)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(WAIT)


def test_the_page_shows_the_answer_once_after_a_takeover(servers: _Servers, browser: Any) -> None:  # noqa: F811
    servers.start("a")
    servers.start("b")
    with _Front(servers.ports["a"]) as front:
        browser.get(f"http://127.0.0.1:{front.port}/")
        browser.find_element("id", "prompt").send_keys("What is the weather in Paris?")
        browser.find_element("id", "send").click()
        servers.wait_stopped()
        until(browser, f"document.getElementById('answer').textContent.split(' ').length >= {STOP_AT_WORD - 1}")
        front.target = servers.ports["b"]  # the balancer sends the reconnecting browser to the other server
        servers.kill("a")
        until(browser, "document.body.dataset.state === 'done'")
        shown = browser.find_element("id", "answer").text
        corrected = browser.execute_script("return document.body.dataset.corrected || null")
    assert shown == DEMO_ANSWER.strip()
    assert corrected is None, "the streamed text differed from the result: the rewind was not applied"
    assert servers.paid_by("b") == {"model": 1, "tool": 0}
