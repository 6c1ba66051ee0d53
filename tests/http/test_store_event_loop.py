"""The servers' lifespans hand their event loop to the store (``IdempotencyStore.use_event_loop``) for as long as they
serve: ``AgentApp`` and ``A2AApp`` enter it, and leave it only after their runs are drained. On Redis, a request's
store calls are then made on the loop, none on the store's threads. ``CountingStore`` hands the loop on to the store
it counts.

Negative controls: the same app served without its lifespan (mounted, say) leaves the store's calls on its threads; a
lifespan that lets the store leave the loop before its runs are drained; a counting store that keeps the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections.abc import AsyncIterator
from typing import Any

import fakeredis
import httpx
import pytest

from strands_py.a2a import A2AApp
from strands_py.http import AgentApp
from strands_py.http._demo import DemoAgents, demo_agent_factory
from strands_py.idempotency import IdempotencyConfig, InMemoryIdempotencyStore
from strands_py.idempotency.redis import RedisIdempotencyStore
from strands_py.testing.counting import CountingStore

WAIT = 10.0


class _Watched(fakeredis.FakeRedis):
    """Counts the commands sent from the Redis store's own threads."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.from_threads = 0

    def execute_command(self, *args: Any, **options: Any) -> Any:
        if threading.current_thread().name.startswith("strands-py-idempotency-redis"):
            self.from_threads += 1
        return super().execute_command(*args, **options)


class _LoopStore(InMemoryIdempotencyStore):
    """Says when its loop block is entered and left, and how many runs the app had then."""

    def __init__(self) -> None:
        super().__init__()
        self.app: Any = None
        self.seen: list[tuple[str, int]] = []

    @contextlib.asynccontextmanager
    async def _block(self) -> AsyncIterator[None]:
        self.seen.append(("entered", self.app.running))
        yield
        self.seen.append(("left", self.app.running))

    def use_event_loop(self) -> contextlib.AbstractAsyncContextManager[None]:
        return self._block()


@pytest.mark.parametrize("kind", ["agentapp", "a2a"])
async def test_the_lifespan_holds_the_stores_loop_block_until_the_runs_are_drained(kind: str) -> None:
    store = _LoopStore()
    made = AgentApp if kind == "agentapp" else A2AApp
    store.app = app = made(demo_agent_factory(0.0), IdempotencyConfig(store=store), single_tenant=True)
    async with app.lifespan():
        assert store.seen == [("entered", 0)]
    assert store.seen == [("entered", 0), ("left", 0)]


class _LeavesFirst(AgentApp):
    """Broken variant: the store leaves the loop before the runs are drained."""

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Any = None) -> AsyncIterator[None]:
        try:
            async with self._service.config.store.use_event_loop():
                yield
        finally:
            await self.aclose()


class _CountingOnly(CountingStore):
    """Broken variant: counts, and keeps the loop to itself (the store's default, which does nothing)."""

    def use_event_loop(self) -> contextlib.AbstractAsyncContextManager[None]:
        return contextlib.nullcontext()


async def test_a_counting_store_hands_the_loop_on_to_the_store_it_counts() -> None:
    await _counted(CountingStore)


@pytest.mark.xfail(strict=True, raises=AssertionError)
async def test_negative_control_a_counting_store_that_keeps_the_loop() -> None:
    await _counted(_CountingOnly)


async def _counted(counting: type[CountingStore]) -> None:
    inner = _LoopStore()
    config = IdempotencyConfig(store=counting(inner))
    inner.app = app = AgentApp(demo_agent_factory(0.0), config, single_tenant=True)
    async with app.lifespan():
        assert inner.seen == [("entered", 0)]
    assert inner.seen == [("entered", 0), ("left", 0)]


async def test_a_run_in_flight_at_shutdown_ends_before_the_store_leaves_the_loop() -> None:
    await _shutdown_with_a_run_in_flight(AgentApp)


@pytest.mark.xfail(strict=True, raises=AssertionError)
async def test_negative_control_a_store_that_leaves_the_loop_before_the_drain() -> None:
    await _shutdown_with_a_run_in_flight(_LeavesFirst)


async def _shutdown_with_a_run_in_flight(made: type[AgentApp]) -> None:
    answering = threading.Event()
    release = threading.Event()

    def pace(index: int) -> None:
        answering.set()
        release.wait(WAIT)

    store = _LoopStore()
    store.app = app = made(DemoAgents(pace=pace), IdempotencyConfig(store=store), single_tenant=True)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://a") as client:
        lifespan = app.lifespan()
        await lifespan.__aenter__()
        request = asyncio.ensure_future(
            client.post("/invocations", json={"prompt": "hi"}, headers={"Idempotency-Key": json.dumps("k")})
        )
        assert await asyncio.to_thread(answering.wait, WAIT)
        leaving = asyncio.ensure_future(lifespan.__aexit__(None, None, None))
        release.set()  # the run finishes within the grace period, while the lifespan waits for it
        await asyncio.wait_for(leaving, WAIT)
        assert (await asyncio.wait_for(request, WAIT)).status_code == 200
    assert store.seen == [("entered", 0), ("left", 0)]


async def _served(lifespan: bool) -> int:
    """One request through ``AgentApp`` on Redis, then its replay; the commands sent from the store's threads."""
    server = fakeredis.FakeServer()
    sync = _Watched(server=server)
    store = RedisIdempotencyStore(sync, asyncio_client=lambda: fakeredis.FakeAsyncRedis(server=server))
    app = AgentApp(demo_agent_factory(0.0), IdempotencyConfig(store=store), single_tenant=True)
    async with contextlib.AsyncExitStack() as stack:
        if lifespan:
            await stack.enter_async_context(app.lifespan())
        client = await stack.enter_async_context(
            httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://a")
        )
        for _ in range(2):
            answered = await client.post(
                "/invocations", json={"prompt": "Weather in Paris?"}, headers={"Idempotency-Key": json.dumps("k")}
            )
            assert answered.status_code == 200, answered.text
        if not lifespan:
            await app.aclose()
    store.close()
    return sync.from_threads


async def test_agentapp_makes_its_loops_store_calls_on_the_loop() -> None:
    assert await _served(lifespan=True) == 0


@pytest.mark.xfail(strict=True, raises=AssertionError)
async def test_negative_control_without_the_lifespan_the_calls_take_the_threads() -> None:
    assert await _served(lifespan=False) == 0
