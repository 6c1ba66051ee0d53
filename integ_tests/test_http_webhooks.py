"""Webhooks across a takeover, with real processes: the owner is SIGKILLed after storing its result but before its
``completed`` event was accepted; the next retry of the key, on another server sharing the redis-server store, sends
the event (same ``webhook-id``), and a receiver verifies it with ``standardwebhooks``. A third server replaying the key
after that finds the delivery recorded and sends nothing (the negative control).

Run as a script, this module is the owner's server: ``python test_http_webhooks.py REDIS_URL RECEIVER_URL``.
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
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import uvicorn
from standardwebhooks import Webhook
from starlette.requests import Request
from starlette.responses import Response

from strands_py import Agent
from strands_py.http import AgentApp, WebhookOptions
from strands_py.idempotency import IdempotencyConfig, RedisIdempotencyStore
from strands_py.testing import ScriptedBedrock

WAIT = 30.0
SECRET = "whsec_" + "c3RyYW5kcy1weSB3ZWJob29rcyBpbnRlZyB0ZXN0IQ=="  # 32 bytes, fixed: shared with the owner process
PROMPT = {"prompt": "What is the weather in Paris?"}


def _app(redis_url: str, receiver_url: str, options: WebhookOptions) -> AgentApp:
    script = ScriptedBedrock()

    def make_agent(request: Request) -> Agent:
        return Agent(model=script.model(), tools=script.tools(), callback_handler=None)

    store = RedisIdempotencyStore.from_url(redis_url)
    return AgentApp(
        make_agent,
        IdempotencyConfig(store=store),
        single_tenant=True,
        webhook=receiver_url,
        webhook_secret=SECRET,
        webhook_options=options,
    )


class _Receiver:
    """Refuses the first delivery (503), accepts the others; records each with its status."""

    def __init__(self) -> None:
        self.deliveries: list[tuple[dict[str, str], bytes, int]] = []
        self.changed = threading.Condition()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        request = Request(scope, receive)
        body = await request.body()
        with self.changed:
            status = 503 if not self.deliveries else 200
            self.deliveries.append((dict(request.headers), body, status))
            self.changed.notify_all()
        await Response(status_code=status)(scope, receive, send)

    def wait_for(self, count: int) -> list[tuple[dict[str, str], bytes, int]]:
        with self.changed:
            assert self.changed.wait_for(lambda: len(self.deliveries) >= count, WAIT), self.deliveries
            return list(self.deliveries)


def _listen() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)  # connections wait in the backlog until the server accepts them
    return sock


@pytest.fixture
def receiver() -> Iterator[tuple[_Receiver, str]]:
    app = _Receiver()
    sock = _listen()
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    yield app, f"http://127.0.0.1:{sock.getsockname()[1]}/hooks"
    server.should_exit = True
    thread.join(WAIT)
    sock.close()


@pytest.fixture
def redis_url() -> Iterator[str]:
    from _servers import running_redis

    with running_redis() as server:
        yield server.url


async def _post(url: str, key: str) -> httpx.Response:
    async with httpx.AsyncClient(base_url=url, timeout=WAIT) as http:
        return await http.post("/invocations", json=PROMPT, headers={"Idempotency-Key": json.dumps(key)})


async def test_a_completion_whose_owner_died_undelivered_is_sent_by_the_server_that_replays_it(
    receiver: tuple[_Receiver, str], redis_url: str
) -> None:
    hooks, hooks_url = receiver
    owner = subprocess.Popen(
        [sys.executable, __file__, redis_url, hooks_url],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        ready = await asyncio.wait_for(asyncio.to_thread(owner.stdout.readline), WAIT)  # type: ignore[union-attr]
        owner_url = ready.split()[1]
        first = await _post(owner_url, "trip-42")
        assert first.status_code == 200
        [(refused_headers, _, refused_status)] = await asyncio.to_thread(hooks.wait_for, 1)
        assert refused_status == 503  # the owner now waits an hour to retry: kill it there
    finally:
        owner.send_signal(signal.SIGKILL)
        owner.wait(WAIT)

    replay = WebhookOptions(replay_grace_seconds=0)
    for name in ("replayer", "control"):
        app = _app(redis_url, hooks_url, replay)
        async with app.lifespan(), httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://s") as c:
            retry = await c.post("/invocations", json=PROMPT, headers={"Idempotency-Key": '"trip-42"'})
            assert retry.status_code == 200 and retry.headers["Idempotent-Replayed"] == "true", name
        # Leaving the lifespan drained its deliveries: the replayer's is in, the control sent none.
        assert len(hooks.deliveries) == 2, name

    _, (headers, body, status) = hooks.deliveries
    assert status == 200 and headers["webhook-id"] == refused_headers["webhook-id"]
    event = Webhook(SECRET).verify(body, headers)
    assert event["type"] == "invocation.completed" and event["data"]["key"] == "trip-42"
    assert event["data"]["result"] == first.json()


def _serve_owner(redis_url: str, receiver_url: str) -> None:
    """The owner: one attempt, then a retry an hour later (it is killed before)."""
    app = _app(redis_url, receiver_url, WebhookOptions(first_retry_seconds=3600, max_retry_seconds=3600))
    sock = _listen()

    class Ready(uvicorn.Server):
        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets)
            print(f"ready http://127.0.0.1:{sock.getsockname()[1]}", flush=True)

    Ready(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])


if __name__ == "__main__":
    _serve_owner(sys.argv[1], sys.argv[2])
