"""Shutdown with runs in flight, and the app mounted in FastAPI (whose mounted apps get no lifespan events).

Negative control: uvicorn's own server, which waits for open responses before the lifespan shutdown, does not
stop while a client follows a run.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator

import pytest
from fastapi import FastAPI
from http_support import (
    ANONYMOUS_SCOPE,
    WAIT,
    PlainServer,
    client,
    headers,
    new_key,
    parse_sse,
    scripted,
    serve,
    text_of,
)

from strands_py.http import SHUTTING_DOWN, AgentApp
from strands_py.idempotency import IdempotencyConfig, InMemoryIdempotencyStore, RecordState
from strands_py.idempotency.keys import make_key
from strands_py.testing import CountingStore

PROMPT = {"prompt": "What is the weather in Paris?"}


async def _in_thread(event: threading.Event) -> None:
    assert await asyncio.wait_for(asyncio.to_thread(event.wait, WAIT), WAIT + 5)


async def test_runs_still_running_after_the_grace_period_are_cancelled_and_another_server_runs_them() -> None:
    inner = InMemoryIdempotencyStore()
    key = new_key()
    with scripted(gated=True) as doomed, scripted() as survivor:
        app = AgentApp(doomed.factory(), IdempotencyConfig(store=CountingStore(inner)), shutdown_grace_seconds=0.1)
        with serve(app) as server:
            async with client(server.url) as http:
                waiting = [
                    asyncio.ensure_future(http.post("/invocations", json=PROMPT, headers=headers(key, sse=sse)))
                    for sse in (False, True)
                ]
                await _in_thread(doomed.script.entered)
                stopping = asyncio.ensure_future(asyncio.to_thread(server.stop))
                responses = await asyncio.wait_for(asyncio.gather(*waiting), WAIT)
                doomed.script.gate.set()  # let the abandoned model thread end, so the server's loop can close
                assert await asyncio.wait_for(stopping, WAIT + 5)
        left = await inner.get(make_key(ANONYMOUS_SCOPE, key))
        assert left is None or left.yielded  # the claim was handed back (yielded: a retry takes it over at once)

        other = AgentApp(survivor.factory(), IdempotencyConfig(store=CountingStore(inner)))
        with serve(other) as server:
            async with client(server.url) as http:
                taken_over = await http.post("/invocations", json=PROMPT, headers=headers(key))
    for response in responses:
        assert response.status_code == 503 and response.json()["type"] == SHUTTING_DOWN
        assert response.headers["retry-after"] == "1"
    assert taken_over.status_code == 200 and "idempotent-replayed" not in taken_over.headers
    assert survivor.model_calls == 2


async def test_runs_finishing_within_the_grace_period_reach_their_clients_and_are_stored() -> None:
    inner = InMemoryIdempotencyStore()
    key = new_key()
    with scripted(paced=True) as script, scripted() as later:
        app = AgentApp(script.factory(), IdempotencyConfig(store=CountingStore(inner)), shutdown_grace_seconds=WAIT)
        with serve(app) as server:
            async with client(server.url) as http, client(server.url) as idle:
                assert (await idle.get("/nowhere")).status_code == 404  # a kept-alive connection, for later
                script.release(3)
                async with http.stream("POST", "/invocations", json=PROMPT, headers=headers(key, sse=True)) as sse:
                    assert sse.status_code == 200
                    stopping = asyncio.ensure_future(asyncio.to_thread(server.stop))
                    await _in_thread(server.server.shutting_down)
                    refused = await idle.post("/invocations", json=PROMPT, headers=headers(new_key()))
                    script.release()
                    events = parse_sse((await asyncio.wait_for(sse.aread(), WAIT)).decode())
                assert await asyncio.wait_for(stopping, WAIT + 5)
        record = await inner.get(make_key(ANONYMOUS_SCOPE, key))
        assert record is not None and record.state is RecordState.COMPLETED

        other = AgentApp(later.factory(), IdempotencyConfig(store=CountingStore(inner)))
        with serve(other) as server:
            async with client(server.url) as http:
                replayed = await http.post("/invocations", json=PROMPT, headers=headers(key))
    assert refused.status_code == 503 and refused.json()["type"] == SHUTTING_DOWN
    assert events[-1].event == "result" and text_of(events) == events[-1].data["text"].rstrip("\n")
    assert replayed.status_code == 200 and replayed.headers["idempotent-replayed"] == "true"
    assert replayed.json() == events[-1].data
    assert later.model_calls == 0


@pytest.mark.xfail(strict=True, reason="uvicorn waits for open responses before the lifespan shutdown")
async def test_plain_uvicorn_does_not_stop_while_a_client_follows_a_run() -> None:
    with scripted(paced=True) as script:
        app = AgentApp(script.factory(), shutdown_grace_seconds=0.1)
        with serve(app, server_class=PlainServer) as server:
            async with client(server.url) as http:
                script.release(3)
                async with http.stream("POST", "/invocations", json=PROMPT, headers=headers(new_key(), sse=True)):
                    try:
                        stopped = await asyncio.wait_for(asyncio.to_thread(server.stop, 2.0), WAIT)
                    finally:
                        script.release()
                    assert stopped


async def test_mounted_in_fastapi_with_its_lifespan_wired() -> None:
    inner = InMemoryIdempotencyStore()
    key = new_key()
    drained = threading.Event()
    with scripted(gated=True) as script:
        agent = AgentApp(script.factory(), IdempotencyConfig(store=inner), page=True, shutdown_grace_seconds=0.1)

        @contextlib.asynccontextmanager
        async def lifespan(app: FastAPI) -> AsyncIterator[None]:
            async with agent.lifespan(app):  # what a FastAPI user with a lifespan of their own writes
                yield
            drained.set()

        api = FastAPI(lifespan=lifespan)
        api.mount("/agent", agent)

        @api.get("/health")
        def health() -> dict[str, str]:
            return {"status": "ok"}

        # uvicorn's own server: only the parent's lifespan (wired to the agent app's) drains the runs.
        with serve(api, server_class=PlainServer, timeout_graceful_shutdown=0.5) as server:
            async with client(server.url) as http:
                assert (await http.get("/health")).json() == {"status": "ok"}
                page = await http.get("/agent/")
                assert page.status_code == 200 and '"/agent"' in page.text
                running = asyncio.ensure_future(http.post("/agent/invocations", json=PROMPT, headers=headers(key)))
                await _in_thread(script.script.entered)
                assert agent.running == 1
                stopping = asyncio.ensure_future(asyncio.to_thread(server.stop))
                cut = await asyncio.wait_for(running, WAIT)  # uvicorn gave up on the open request after 0.5 s
                await _in_thread(drained)
                script.script.gate.set()  # the cancelled run's model thread may end now: the loop can close
                assert await asyncio.wait_for(stopping, WAIT + 5)
    assert cut.status_code == 500
    assert agent.running == 0
    left = await inner.get(make_key(ANONYMOUS_SCOPE, key))
    assert left is None or left.yielded  # the lifespan cancelled the run: its claim handed back
