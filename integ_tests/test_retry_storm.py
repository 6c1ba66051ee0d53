"""Retry storms against a real BedrockModel (boto3 client stubbed) with moto's mock_aws active.

The loop's default executor is capped at 4 workers, as in a small container. The negative control is the old
blocking waiter (``BlockingWaiterAgent`` in ``strands_py._demo.storm``, shared with the demo so both run the very
same variant): the same storm must hang with it, which proves that this storm detects the deadlock.
"""

from __future__ import annotations

import asyncio
import gc
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from moto import mock_aws

from strands_py import Agent, IdempotencyAbortedError
from strands_py._demo.storm import BlockingWaiterAgent, _until, run_storm
from strands_py.testing.bedrock import STUB_ANSWER, ScriptedBedrock

pytestmark = pytest.mark.racing
WAIT = 10.0


@pytest.fixture(autouse=True)
def no_real_aws() -> Iterator[None]:
    """Any AWS call that the stub does not answer goes to moto and fails instead of leaving the machine."""
    with mock_aws():
        yield


def test_unstubbed_bedrock_calls_fail_under_mock_aws() -> None:
    model = ScriptedBedrock().model()
    with pytest.raises(NotImplementedError):
        model.client.converse(modelId="m", messages=[{"role": "user", "content": [{"text": "hi"}]}])


@pytest.mark.parametrize("duplicates", [64, 2000])
def test_storm_finishes_with_one_primary_and_no_parked_threads(duplicates: int) -> None:
    report = run_storm(Agent, duplicates, workers=4, timeout=WAIT)
    assert report.completed
    assert report.model_calls == 2  # one tool-use cycle: exactly one primary ran
    assert report.tool_calls == 1
    assert report.threads_parked == 0
    assert report.thread_growth == 0
    assert report.errors == 0
    assert report.equal_results == duplicates + 1


def test_negative_control_blocking_waiter_hangs() -> None:
    report = run_storm(BlockingWaiterAgent, 64, workers=4, timeout=2.0)
    assert not report.completed
    assert report.threads_parked == 4  # every worker of the capped executor holds a waiting duplicate
    assert report.model_calls == 1  # the primary's second model call never got a worker


def test_twelve_threads_sync_calls_one_primary() -> None:
    gate = threading.Event()
    script = ScriptedBedrock(gate=gate, gate_timeout=WAIT)
    agent = Agent(model=script.model(), tools=script.tools(), callback_handler=None)
    results: list[Any] = []
    mutex = threading.Lock()

    def call() -> None:
        result = agent("What is the weather in Paris?", idempotency_token={"request": "req-42"})
        with mutex:
            results.append(result)

    threads = [threading.Thread(target=call) for _ in range(12)]
    for t in threads:
        t.start()
    assert script.entered.wait(WAIT)

    # Each sync call runs its own event loop on its own thread: 11 duplicates on 11 loops.
    def all_waiting() -> bool:
        inflight = agent._idempotency_gate.inflight
        return inflight is not None and inflight.waiter_count >= 11

    asyncio.run(_until(all_waiting, WAIT, "11 duplicates to wait"))
    gate.set()
    for t in threads:
        t.join(WAIT)
    assert len(results) == 12
    assert all(r is results[0] for r in results)
    assert str(results[0]) == STUB_ANSWER + "\n"
    assert script.model_calls == 2 and script.tool_calls == 1


def _storm_agent(**script_kwargs: Any) -> tuple[threading.Event, ScriptedBedrock, Agent]:
    gate = threading.Event()
    script = ScriptedBedrock(gate=gate, gate_timeout=WAIT, **script_kwargs)
    return gate, script, Agent(model=script.model(), tools=script.tools(), callback_handler=None)


def _run_capped(coro_fn: Any) -> Any:
    """Run a coroutine on a fresh loop whose default executor has 4 workers."""
    loop = asyncio.new_event_loop()
    executor = ThreadPoolExecutor(max_workers=4)
    loop.set_default_executor(executor)
    try:
        return loop.run_until_complete(asyncio.wait_for(coro_fn(), WAIT * 2))
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        executor.shutdown(wait=True)
        loop.close()


async def _duplicates(agent: Agent, count: int) -> list[asyncio.Task[Any]]:
    tasks = [asyncio.create_task(agent.invoke_async("weather?", idempotency_token="t")) for _ in range(count)]
    inflight = agent._idempotency_gate.inflight
    assert inflight is not None
    await _until(lambda: inflight.waiter_count >= count, WAIT, f"{count} duplicates to wait")
    return tasks


def test_primary_error_reaches_every_duplicate() -> None:
    error = RuntimeError("model exploded")
    gate, script, agent = _storm_agent(fail_with=error)

    async def storm() -> list[Any]:
        primary = asyncio.create_task(agent.invoke_async("weather?", idempotency_token="t"))
        await _until(script.entered.is_set, WAIT, "the primary's model call")
        dups = await _duplicates(agent, 200)
        gate.set()
        return await asyncio.gather(primary, *dups, return_exceptions=True)

    outcomes = _run_capped(storm)
    assert len(outcomes) == 201 and all(o is error for o in outcomes)
    assert script.model_calls == 1


def test_cancelled_primary_aborts_duplicates_and_agent_is_usable() -> None:
    gate, script, agent = _storm_agent()

    async def storm() -> tuple[list[Any], Any]:
        primary = asyncio.create_task(agent.invoke_async("weather?", idempotency_token="t"))
        await _until(script.entered.is_set, WAIT, "the primary's model call")
        dups = await _duplicates(agent, 200)
        primary.cancel()
        outcomes = await asyncio.gather(*dups, return_exceptions=True)
        gate.set()
        again = await agent.invoke_async("weather?", idempotency_token="t")
        return outcomes, again

    outcomes, again = _run_capped(storm)
    assert all(isinstance(o, IdempotencyAbortedError) for o in outcomes)
    assert again.stop_reason == "end_turn"


def test_abandoned_primary_stream_never_hangs_duplicates() -> None:
    _, script, agent = _storm_agent()
    script.gate = None

    async def storm() -> tuple[list[Any], Any]:
        stream = agent.stream_async("weather?", idempotency_token="t")
        await stream.__anext__()
        dups = await _duplicates(agent, 50)
        # The caller drops the stream without closing it (a client went away); nothing else references it.
        del stream
        gc.collect()
        outcomes = await asyncio.gather(*dups, return_exceptions=True)
        again = await agent.invoke_async("weather?")
        return outcomes, again

    outcomes, again = _run_capped(storm)
    assert all(isinstance(o, IdempotencyAbortedError) for o in outcomes)
    assert again.stop_reason == "end_turn"


def test_stream_async_duplicate_ends_with_the_result_event() -> None:
    gate, script, agent = _storm_agent()

    async def storm() -> tuple[Any, list[list[Any]]]:
        primary = asyncio.create_task(agent.invoke_async("weather?", idempotency_token="t"))
        await _until(script.entered.is_set, WAIT, "the primary's model call")

        async def collect() -> list[Any]:
            return [e async for e in agent.stream_async("weather?", idempotency_token="t")]

        streams = [asyncio.create_task(collect()) for _ in range(20)]
        inflight = agent._idempotency_gate.inflight
        assert inflight is not None
        await _until(lambda: inflight.waiter_count >= 20, WAIT, "20 streaming duplicates")
        gate.set()
        return await primary, await asyncio.gather(*streams)

    result, streams = _run_capped(storm)
    assert all(events[-1] == {"result": result} for events in streams)
