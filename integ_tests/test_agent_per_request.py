"""One Agent per request, as strands' docs deploy it: retries on other instances join the running invocation.

1,000 requests, each building its own ``strands_py.Agent`` over one shared configuration, one token: one model run,
one store claim, no store read (the one run's writes are its claim, its journal and its result); every streaming
duplicate gets every event; every request's own callback handler fires once. The negative control shares no store
object (each request a store wrapper of its own): the retries then poll the store instead of joining, and get no
stream.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

import pytest
from strands.models import BedrockModel

from strands_py import Agent
from strands_py._demo.storm import _until
from strands_py.idempotency import IdempotencyConfig, IdempotencyStore, InMemoryIdempotencyStore, ReplayedAgentResult
from strands_py.testing import CountingStore, ScriptedBedrock

WAIT = 60.0
REQUESTS = 1000
pytestmark = pytest.mark.racing


class _Handler:
    def __init__(self) -> None:
        self.results: list[Any] = []

    def __call__(self, **event: Any) -> None:
        if "result" in event:
            self.results.append(event["result"])


def _one_claim_no_read(store: CountingStore) -> None:
    """One claim, one result, and nothing else but the one run's journal: no read, no takeover, no second claim."""
    assert store.calls["claim"] == 1 and store.calls["complete"] == 1, dict(store.calls)
    assert set(store.calls) <= {"claim", "complete", "append"}, dict(store.calls)


async def _storm(store_for_request: Callable[[], IdempotencyStore], ready: Callable[[Any], bool]) -> dict[str, Any]:
    gate = threading.Event()
    script = ScriptedBedrock(gate=gate, gate_timeout=WAIT)
    model: BedrockModel = script.model()  # one model client for the process, as a server keeps it
    tools = script.tools()

    def request_agent(handler: _Handler) -> Agent:
        return Agent(
            model=model,
            tools=tools,
            callback_handler=handler,
            idempotency=IdempotencyConfig(store=store_for_request(), scope="tenant-1/booking"),
        )

    async def stream(agent: Agent) -> list[Any]:
        return [e async for e in agent.stream_async("book it", idempotency_token="req-42")]

    handlers = [_Handler() for _ in range(REQUESTS)]
    agents = [request_agent(h) for h in handlers]
    primary = asyncio.create_task(stream(agents[0]))
    await _until(script.entered.is_set, WAIT, "the primary's model call")
    retries: list[asyncio.Task[Any]] = []
    for index, agent in enumerate(agents[1:], start=1):
        if index % 2:
            retries.append(asyncio.create_task(stream(agent)))
        else:
            retries.append(asyncio.create_task(agent.invoke_async("book it", idempotency_token="req-42")))
    inflight = agents[0]._idempotency_gate.inflight
    assert inflight is not None
    await _until(lambda: ready(inflight), WAIT, "every retry to join or poll")
    joined = inflight.waiter_count
    gate.set()
    primary_events = await asyncio.wait_for(primary, WAIT)
    outcomes = await asyncio.wait_for(asyncio.gather(*retries), WAIT)
    return {
        "script": script,
        "primary_events": primary_events,
        "outcomes": outcomes,
        "handlers": handlers,
        "joined": joined,
    }


async def test_a_thousand_agents_one_token_one_run_one_claim_no_read() -> None:
    store = CountingStore(InMemoryIdempotencyStore())
    report = await _storm(lambda: store, lambda inflight: inflight.waiter_count >= REQUESTS - 1)
    script, primary_events = report["script"], report["primary_events"]
    assert report["joined"] == REQUESTS - 1
    assert script.model_calls == 2 and script.tool_calls == 1  # one run: one tool-use cycle
    _one_claim_no_read(store)
    result = primary_events[-1]["result"]
    for index, outcome in enumerate(report["outcomes"], start=1):
        if index % 2:
            assert outcome == primary_events  # every event, in order, then the same result event
        else:
            assert outcome is result
    # each request's own callback handler: the primary's saw its own result once, every retry's exactly once
    assert all(h.results == [result] for h in report["handlers"])


@pytest.mark.xfail(strict=True, raises=AssertionError)
async def test_negative_control_without_a_shared_store_object_retries_poll_and_get_no_stream() -> None:
    shared = InMemoryIdempotencyStore()
    wrappers: list[CountingStore] = []

    def own_wrapper() -> CountingStore:
        wrappers.append(CountingStore(shared))
        return wrappers[-1]

    # every retry has polled the store at least once
    report = await _storm(own_wrapper, lambda _: sum(w.calls["get"] >= 1 for w in wrappers) >= REQUESTS - 1)
    assert report["joined"] == REQUESTS - 1
    assert all(not isinstance(o, ReplayedAgentResult) for o in report["outcomes"])


def test_sync_requests_on_threads_each_with_its_own_agent_and_loop_run_once() -> None:
    gate = threading.Event()
    script = ScriptedBedrock(gate=gate, gate_timeout=WAIT)
    model, tools = script.model(), script.tools()
    store = CountingStore(InMemoryIdempotencyStore())
    results: list[Any] = []
    mutex = threading.Lock()
    first: list[Agent] = []

    def request() -> None:
        agent = Agent(model=model, tools=tools, callback_handler=None, idempotency=IdempotencyConfig(store=store))
        with mutex:
            first.append(agent)
        result = agent("book it", idempotency_token="req-42")  # strands runs it on a new thread and event loop
        with mutex:
            results.append(result)

    threads = [threading.Thread(target=request) for _ in range(16)]
    threads[0].start()
    assert script.entered.wait(WAIT)
    for t in threads[1:]:
        t.start()
    inflight = first[0]._idempotency_gate.inflight
    assert inflight is not None
    asyncio.run(_until(lambda: inflight.waiter_count >= 15, WAIT, "15 retries to join"))
    gate.set()
    for t in threads:
        t.join(WAIT)
    assert len(results) == 16 and all(r is results[0] for r in results)
    assert script.model_calls == 2
    _one_claim_no_read(store)
