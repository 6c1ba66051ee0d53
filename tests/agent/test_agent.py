"""The gate in ``strands_py.Agent.stream_async``, with a real BedrockModel answering from a local script."""

from __future__ import annotations

import asyncio
import threading
from typing import Any
from unittest import mock

import pytest
import strands
import strands.types.exceptions as upstream_exceptions
from strands.types.agent import ConcurrentInvocationMode

from strands_py import Agent, ConcurrencyException, IdempotencyAbortedError, IdempotencyTokenError
from strands_py._demo.storm import _until
from strands_py.testing.bedrock import ScriptedBedrock

WAIT = 5.0


def _gated(**kwargs: Any) -> tuple[threading.Event, ScriptedBedrock]:
    gate = threading.Event()
    return gate, ScriptedBedrock(gate=gate, gate_timeout=WAIT, **kwargs)


def _agent(script: ScriptedBedrock, **kwargs: Any) -> Agent:
    return Agent(model=script.model(), tools=script.tools(), callback_handler=None, **kwargs)


async def _primary_in_flight(agent: Agent, script: ScriptedBedrock, token: Any = "t") -> asyncio.Task[Any]:
    task = asyncio.create_task(agent.invoke_async("weather?", idempotency_token=token))
    await _until(script.entered.is_set, WAIT, "the primary's model call")
    return task


async def _waiters(agent: Agent, count: int) -> None:
    inflight = agent._idempotency_gate.inflight
    assert inflight is not None
    await _until(lambda: inflight.waiter_count >= count, WAIT, f"{count} waiters")


async def test_without_a_token_it_is_strands_agent() -> None:
    ours_script, theirs_script = ScriptedBedrock(), ScriptedBedrock()
    ours = _agent(ours_script)
    theirs = strands.Agent(model=theirs_script.model(), tools=theirs_script.tools(), callback_handler=None)
    ours_result = await asyncio.wait_for(ours.invoke_async("weather?"), WAIT)
    theirs_result = await asyncio.wait_for(theirs.invoke_async("weather?"), WAIT)
    assert str(ours_result) == str(theirs_result)
    assert ours_result.stop_reason == theirs_result.stop_reason == "end_turn"
    assert _strip_ids(ours.messages) == _strip_ids(theirs.messages)
    assert ours_script.model_calls == theirs_script.model_calls == 2


def _strip_ids(messages: Any) -> list[Any]:
    # per-message ids (tracking_id on newer strands) differ between any two runs; compare what was said
    return [(m["role"], m["content"]) for m in messages]


async def test_duplicates_get_the_primarys_result_and_their_callback_fires_once() -> None:
    gate, script = _gated()
    agent_handler = mock.Mock()
    agent = Agent(model=script.model(), tools=script.tools(), callback_handler=agent_handler)
    primary = await _primary_in_flight(agent, script)
    own_handler = mock.Mock()
    pass_handler = asyncio.create_task(
        agent.invoke_async("weather?", idempotency_token="t", callback_handler=own_handler)
    )
    await _waiters(agent, 1)
    plain = asyncio.create_task(agent.invoke_async("weather?", idempotency_token="t"))
    await _waiters(agent, 2)
    primary_handler_calls = agent_handler.call_count
    gate.set()
    results = await asyncio.wait_for(asyncio.gather(primary, pass_handler, plain), WAIT)
    assert results[0] is results[1] is results[2]
    assert script.model_calls == 2 and script.tool_calls == 1
    own_handler.assert_called_once_with(result=results[0])
    # the agent's handler: every primary event, plus exactly one result= call for the plain duplicate
    assert agent_handler.call_args_list.count(mock.call(result=results[0])) == 2
    assert agent_handler.call_count > primary_handler_calls


async def _collect(agent: Agent, token: Any = "t") -> list[Any]:
    return [event async for event in agent.stream_async("weather?", idempotency_token=token)]


async def test_streaming_duplicates_get_every_event_of_the_primary() -> None:
    gate, script = _gated()
    agent = _agent(script)
    primary = asyncio.create_task(_collect(agent))
    await _until(script.entered.is_set, WAIT, "the primary's model call")
    early = asyncio.create_task(_collect(agent))  # joins before the primary's model answered
    await _waiters(agent, 1)
    gate.set()
    primary_events = await asyncio.wait_for(primary, WAIT)
    early_events = await asyncio.wait_for(early, WAIT)
    assert len(primary_events) > 5 and "result" in primary_events[-1]
    assert early_events == primary_events
    assert script.model_calls == 2


async def test_streaming_duplicate_joining_midway_gets_the_replayed_beginning() -> None:
    script = ScriptedBedrock()
    agent = _agent(script)
    stream = agent.stream_async("weather?", idempotency_token="t")
    seen = [await asyncio.wait_for(stream.__anext__(), WAIT) for _ in range(4)]
    late = asyncio.create_task(_collect(agent))
    await _waiters(agent, 1)
    seen += [event async for event in stream]
    assert await asyncio.wait_for(late, WAIT) == seen


async def test_invoke_async_duplicates_do_not_read_events_and_callback_fires_once() -> None:
    gate, script = _gated()
    agent = _agent(script)
    primary = await _primary_in_flight(agent, script)
    handler = mock.Mock()
    streaming = asyncio.create_task(_collect(agent))
    await _waiters(agent, 1)
    handler_dup = asyncio.create_task(agent.invoke_async("weather?", idempotency_token="t", callback_handler=handler))
    await _waiters(agent, 2)
    gate.set()
    result = await asyncio.wait_for(primary, WAIT)
    assert await asyncio.wait_for(handler_dup, WAIT) is result
    handler.assert_called_once_with(result=result)
    assert (await asyncio.wait_for(streaming, WAIT))[-1] == {"result": result}


async def test_event_buffer_cap_bounds_what_streaming_duplicates_get() -> None:
    gate, script = _gated()
    agent = Agent(model=script.model(), tools=script.tools(), callback_handler=None, max_buffered_events=3)
    primary = asyncio.create_task(_collect(agent))
    await _until(script.entered.is_set, WAIT, "the primary's model call")
    before_cap = asyncio.create_task(_collect(agent))
    await _waiters(agent, 1)
    inflight = agent._idempotency_gate.inflight
    assert inflight is not None
    gate.set()
    await _until(lambda: inflight._events_capped, WAIT, "the buffer to fill")
    after_cap = asyncio.create_task(_collect(agent))
    primary_events = await asyncio.wait_for(primary, WAIT)
    assert await asyncio.wait_for(before_cap, WAIT) == [*primary_events[:3], primary_events[-1]]
    assert await asyncio.wait_for(after_cap, WAIT) == [primary_events[-1]]


async def test_without_a_buffer_streaming_duplicates_get_the_result_only() -> None:
    gate, script = _gated()
    agent = Agent(model=script.model(), tools=script.tools(), callback_handler=None, max_buffered_events=0)
    primary = await _primary_in_flight(agent, script)
    dup = asyncio.create_task(_collect(agent))
    await _waiters(agent, 1)
    gate.set()
    result = await asyncio.wait_for(primary, WAIT)
    assert await asyncio.wait_for(dup, WAIT) == [{"result": result}]
    with pytest.raises(ValueError):
        Agent(model=script.model(), max_buffered_events=-1)


async def test_streaming_duplicate_gets_the_primarys_error_after_its_events() -> None:
    gate, script = _gated(fail_with=RuntimeError("model down"))
    agent = _agent(script)
    primary = await _primary_in_flight(agent, script)
    dup = asyncio.create_task(_collect(agent))
    await _waiters(agent, 1)
    gate.set()
    with pytest.raises(RuntimeError, match="model down"):
        await asyncio.wait_for(primary, WAIT)
    with pytest.raises(RuntimeError, match="model down"):
        await asyncio.wait_for(dup, WAIT)


async def test_primary_error_is_shared_and_the_token_is_forgotten() -> None:
    gate, script = _gated(fail_with=RuntimeError("model exploded"))
    agent = _agent(script)
    primary = await _primary_in_flight(agent, script)
    dups = [asyncio.create_task(agent.invoke_async("weather?", idempotency_token="t")) for _ in range(5)]
    await _waiters(agent, 5)
    gate.set()
    outcomes = await asyncio.wait_for(asyncio.gather(primary, *dups, return_exceptions=True), WAIT)
    assert all(isinstance(o, RuntimeError) for o in outcomes)
    assert all(o is outcomes[0] for o in outcomes)
    assert script.model_calls == 1
    script.fail_with = None
    again = await asyncio.wait_for(agent.invoke_async("weather?", idempotency_token="t"), WAIT)
    assert again.stop_reason == "end_turn" and script.model_calls == 3


async def test_token_is_forgotten_after_success() -> None:
    script = ScriptedBedrock()
    agent = _agent(script)
    first = await asyncio.wait_for(agent.invoke_async("weather?", idempotency_token="t"), WAIT)
    second = await asyncio.wait_for(agent.invoke_async("weather?", idempotency_token="t"), WAIT)
    assert first is not second and script.model_calls == 4


@pytest.mark.parametrize("other_token", ["other", None])
async def test_other_token_or_none_while_busy_raises_and_waiters_carry_on(other_token: Any) -> None:
    gate, script = _gated()
    agent = _agent(script)
    primary = await _primary_in_flight(agent, script)
    dup = asyncio.create_task(agent.invoke_async("weather?", idempotency_token="t"))
    await _waiters(agent, 1)
    with pytest.raises(ConcurrencyException):
        await asyncio.wait_for(agent.invoke_async("weather?", idempotency_token=other_token), WAIT)
    assert isinstance(ConcurrencyException(), upstream_exceptions.ConcurrencyException)
    gate.set()
    results = await asyncio.wait_for(asyncio.gather(primary, dup), WAIT)
    assert results[0] is results[1]


async def test_tokenless_primary_refuses_tokens_and_releases_the_lock() -> None:
    gate, script = _gated()
    agent = _agent(script)
    primary = await _primary_in_flight(agent, script, token=None)
    with pytest.raises(ConcurrencyException):
        await asyncio.wait_for(agent.invoke_async("weather?", idempotency_token="t"), WAIT)
    gate.set()
    await asyncio.wait_for(primary, WAIT)
    assert (await asyncio.wait_for(agent.invoke_async("again", idempotency_token="t"), WAIT)).stop_reason


async def test_cancelled_primary_aborts_duplicates_and_agent_stays_usable() -> None:
    gate, script = _gated()
    agent = _agent(script)
    primary = await _primary_in_flight(agent, script)
    dups = [asyncio.create_task(agent.invoke_async("weather?", idempotency_token="t")) for _ in range(3)]
    await _waiters(agent, 3)
    primary.cancel()
    outcomes = await asyncio.wait_for(asyncio.gather(*dups, return_exceptions=True), WAIT)
    assert all(isinstance(o, IdempotencyAbortedError) for o in outcomes)
    gate.set()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(primary, WAIT)
    result = await asyncio.wait_for(agent.invoke_async("weather?", idempotency_token="t"), WAIT)
    assert result.stop_reason == "end_turn"


async def test_cancelling_one_waiting_duplicate_leaves_the_others() -> None:
    gate, script = _gated()
    agent = _agent(script)
    primary = await _primary_in_flight(agent, script)
    dups = [asyncio.create_task(agent.invoke_async("weather?", idempotency_token="t")) for _ in range(3)]
    await _waiters(agent, 3)
    dups[0].cancel()
    gate.set()
    results = await asyncio.wait_for(asyncio.gather(primary, dups[1], dups[2]), WAIT)
    assert results[0] is results[1] is results[2]
    assert dups[0].cancelled()


async def test_primary_stream_closed_early_aborts_duplicates() -> None:
    script = ScriptedBedrock()
    agent = _agent(script)
    stream = agent.stream_async("weather?", idempotency_token="t")
    await asyncio.wait_for(stream.__anext__(), WAIT)  # the primary is in flight, stopped at its first event
    dup = asyncio.create_task(agent.invoke_async("weather?", idempotency_token="t"))
    await _waiters(agent, 1)
    await asyncio.wait_for(stream.aclose(), WAIT)
    with pytest.raises(IdempotencyAbortedError):
        await asyncio.wait_for(dup, WAIT)
    assert (await asyncio.wait_for(agent.invoke_async("weather?"), WAIT)).stop_reason == "end_turn"


async def test_duplicates_do_not_wait_for_a_primary_consumer_that_stalls_after_the_result() -> None:
    script = ScriptedBedrock()
    agent = _agent(script)
    stream = agent.stream_async("weather?", idempotency_token="t")
    first = await asyncio.wait_for(stream.__anext__(), WAIT)
    assert first is not None
    dup = asyncio.create_task(agent.invoke_async("weather?", idempotency_token="t"))
    await _waiters(agent, 1)
    result = None
    while result is None:
        event = await asyncio.wait_for(stream.__anext__(), WAIT)
        result = event.get("result")
    # The primary's consumer holds the stream open after the result; the duplicate already has it.
    assert await asyncio.wait_for(dup, WAIT) is result
    late = await asyncio.wait_for(agent.invoke_async("weather?", idempotency_token="t"), WAIT)
    assert late is result  # a retry while the primary still holds the agent joins it
    await asyncio.wait_for(stream.aclose(), WAIT)
    assert script.model_calls == 2


@pytest.mark.racing
@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, SystemExit])
def test_base_exception_in_primary_aborts_duplicates(interrupt: type[BaseException]) -> None:
    # asyncio lets KeyboardInterrupt / SystemExit escape the event loop, so each call runs as a sync call on its
    # own thread (its own loop), as a server's worker thread would.
    gate, script = _gated(fail_with=interrupt())
    agent = _agent(script)
    outcomes: dict[str, BaseException | None] = {}

    def call(name: str) -> None:
        try:
            agent("weather?", idempotency_token="t")
            outcomes[name] = None
        except BaseException as e:  # noqa: BLE001 - the outcome under test
            outcomes[name] = e

    primary = threading.Thread(target=call, args=("primary",))
    primary.start()
    assert script.entered.wait(WAIT)
    duplicate = threading.Thread(target=call, args=("duplicate",))
    duplicate.start()
    inflight = agent._idempotency_gate.inflight
    assert inflight is not None
    asyncio.run(_until(lambda: inflight.waiter_count >= 1, WAIT, "the duplicate to wait"))
    gate.set()
    primary.join(WAIT)
    duplicate.join(WAIT)
    assert isinstance(outcomes["primary"], interrupt)
    assert isinstance(outcomes["duplicate"], IdempotencyAbortedError)
    script.fail_with = None
    assert agent("weather?", idempotency_token="t").stop_reason == "end_turn"


async def test_unsafe_reentrant_ignores_tokens() -> None:
    gate, script = _gated()
    agent = _agent(script, concurrent_invocation_mode=ConcurrentInvocationMode.UNSAFE_REENTRANT)
    first = await _primary_in_flight(agent, script)
    second = asyncio.create_task(agent.invoke_async("weather?", idempotency_token="t"))
    await _until(lambda: script.model_calls == 2, WAIT, "the second call to reach the model")
    gate.set()
    results = await asyncio.wait_for(asyncio.gather(first, second), WAIT)
    assert results[0] is not results[1]


async def test_token_with_raising_eq_fails_only_its_own_call() -> None:
    class Unequal:
        def __eq__(self, other: object) -> bool:
            raise RuntimeError("no comparison")

        __hash__ = object.__hash__

    gate, script = _gated()
    agent = _agent(script)
    primary = await _primary_in_flight(agent, script)
    dup = asyncio.create_task(agent.invoke_async("weather?", idempotency_token="t"))
    await _waiters(agent, 1)
    with pytest.raises(IdempotencyTokenError):
        await asyncio.wait_for(agent.invoke_async("weather?", idempotency_token=Unequal()), WAIT)
    gate.set()
    results = await asyncio.wait_for(asyncio.gather(primary, dup), WAIT)
    assert results[0] is results[1]


def test_invalid_mode_is_rejected() -> None:
    with pytest.raises(ValueError):
        Agent(model=ScriptedBedrock().model(), concurrent_invocation_mode="sometimes")


def test_exceptions_are_upstreams_where_upstream_has_them() -> None:
    assert ConcurrencyException is upstream_exceptions.ConcurrencyException
    upstream_aborted = getattr(upstream_exceptions, "IdempotencyAbortedError", Exception)
    assert issubclass(IdempotencyAbortedError, upstream_aborted)


async def test_a_stalled_streaming_duplicate_slows_no_one() -> None:
    gate, script = _gated()
    agent = _agent(script)
    primary = await _primary_in_flight(agent, script)
    stalled = agent.stream_async("weather?", idempotency_token="t")
    first = asyncio.create_task(stalled.__anext__())  # reads one event, then its consumer stops reading
    await _waiters(agent, 1)
    other = asyncio.create_task(_collect(agent))
    await _waiters(agent, 2)
    gate.set()
    result = await asyncio.wait_for(primary, WAIT)
    other_events = await asyncio.wait_for(other, WAIT)
    assert other_events[-1] == {"result": result}
    # the stalled reader resumes much later and still gets everything, in order
    rest = [await asyncio.wait_for(first, WAIT)] + [event async for event in stalled]
    assert rest == other_events


@pytest.mark.racing
def test_streaming_duplicates_on_other_threads_and_loops() -> None:
    gate, script = _gated()
    agent = _agent(script)
    streams: list[list[Any]] = []
    mutex = threading.Lock()

    def stream_on_own_loop() -> None:
        events = asyncio.run(_collect(agent))
        with mutex:
            streams.append(events)

    async def scenario() -> list[Any]:
        primary = asyncio.create_task(_collect(agent))
        await _until(script.entered.is_set, WAIT, "the primary's model call")
        threads = [threading.Thread(target=stream_on_own_loop) for _ in range(4)]
        for t in threads:
            t.start()
        await _waiters(agent, 4)
        gate.set()
        events = await asyncio.wait_for(primary, WAIT)
        for t in threads:
            await asyncio.to_thread(t.join, WAIT)
        return events

    primary_events = asyncio.run(scenario())
    assert len(streams) == 4 and all(s == primary_events for s in streams)


async def test_a_raising_duplicate_callback_fails_only_that_duplicate() -> None:
    gate, script = _gated()
    agent = _agent(script)
    primary = await _primary_in_flight(agent, script)

    def broken_handler(**_: Any) -> None:
        raise ValueError("handler bug")

    broken = asyncio.create_task(agent.invoke_async("weather?", idempotency_token="t", callback_handler=broken_handler))
    await _waiters(agent, 1)
    fine = asyncio.create_task(agent.invoke_async("weather?", idempotency_token="t"))
    await _waiters(agent, 2)
    gate.set()
    result = await asyncio.wait_for(primary, WAIT)
    with pytest.raises(ValueError, match="handler bug"):
        await asyncio.wait_for(broken, WAIT)
    assert await asyncio.wait_for(fine, WAIT) is result


async def test_tokens_equal_by_eq_are_one_token_in_process() -> None:
    # 1 == 1.0 == True in Python, so in-process they are the same token (durable keys tell them apart).
    gate, script = _gated()
    agent = _agent(script)
    primary = await _primary_in_flight(agent, script, token=1)
    dups = [asyncio.create_task(agent.invoke_async("weather?", idempotency_token=t)) for t in (1.0, True)]
    await _waiters(agent, 2)
    gate.set()
    results = await asyncio.wait_for(asyncio.gather(primary, *dups), WAIT)
    assert results[0] is results[1] is results[2] and script.model_calls == 2
