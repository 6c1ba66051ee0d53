"""Closing a stream early: when ``aclose()`` returns the agent is free, the claim released, errors propagated.

The negative control, ``_BareIterationAgent``, is the old ``stream_async``: it iterates the gate with a bare
``async for``, so closing the outer generator leaves the inner ones to the garbage collector.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from importlib.metadata import version
from typing import Any

import pytest
from deadline_kit import deadline
from strands.hooks import AfterInvocationEvent

from strands_py import Agent, ConcurrencyException
from strands_py.idempotency import IdempotencyConfig, InMemoryIdempotencyStore
from strands_py.idempotency.keys import make_key
from strands_py.testing import ScriptedBedrock

_STRANDS_CLOSES_ITS_LOOP = version("strands-agents") != "1.30.0"

WAIT = 5.0


class _BareIterationAgent(Agent):
    """Negative control: the old stream_async, which never closes the gate it iterates."""

    async def stream_async(
        self, prompt: Any = None, *, idempotency_token: Any = None, **kwargs: Any
    ) -> AsyncIterator[Any]:
        async for event in self._gate(prompt, idempotency_token, kwargs, stream_duplicate=True):
            yield event


def _agent(cls: type[Agent] = Agent, **kwargs: Any) -> Agent:
    script = ScriptedBedrock()
    return cls(model=script.model(), tools=script.tools(), callback_handler=None, **kwargs)


async def _start_and_close(agent: Agent, token: Any = "t") -> None:
    # A deadline, not wait_for: the stream is driven and closed by this very task, as an application would.
    stream = agent.stream_async("weather?", idempotency_token=token)
    async with deadline(WAIT):
        await stream.__anext__()
        await stream.aclose()  # type: ignore[attr-defined]


async def test_after_aclose_the_very_next_call_runs() -> None:
    agent = _agent()
    await _start_and_close(agent)
    # another token: under the broken variant the stale primary still holds the agent, and this raises
    result = await asyncio.wait_for(agent.invoke_async("weather?", idempotency_token="other"), WAIT)
    assert result.stop_reason == "end_turn"


@pytest.mark.xfail(strict=True, raises=ConcurrencyException)
async def test_negative_control_bare_iteration_leaves_the_agent_busy() -> None:
    agent = _agent(_BareIterationAgent)
    await _start_and_close(agent)
    await asyncio.wait_for(agent.invoke_async("weather?", idempotency_token="other"), WAIT)


def _close_then_close_the_loop(agent: Agent) -> None:
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(_start_and_close(agent))
    finally:
        loop.close()  # without shutdown_asyncgens: whatever was left to the garbage collector never runs


def test_closing_the_loop_after_aclose_does_not_wedge_the_agent() -> None:
    store = InMemoryIdempotencyStore()
    agent = _agent(idempotency=IdempotencyConfig(store=store))
    _close_then_close_the_loop(agent)
    # the agent is free, the claim was handed back (yielded: the next call takes it over at once), and the token runs
    # again (a duplicate would have waited forever)
    left = asyncio.run(store.get(make_key(agent._idempotency_scope, "t")))
    assert left is None or left.yielded
    assert agent("weather?", idempotency_token="t").stop_reason == "end_turn"
    assert agent("weather?", idempotency_token="t").stop_reason == "end_turn"  # replayed


@pytest.mark.xfail(strict=True, raises=ConcurrencyException)
def test_negative_control_bare_iteration_wedges_after_the_loop_closes() -> None:
    agent = _agent(_BareIterationAgent)
    _close_then_close_the_loop(agent)
    agent("weather?", idempotency_token="other")  # (a duplicate of "t" would wait forever)


class _Boom(RuntimeError):
    pass


def _failing_cleanup(agent: Agent) -> list[str]:
    fired: list[str] = []

    def fail(_: AfterInvocationEvent) -> None:
        fired.append("after-invocation")
        raise _Boom("session store down")

    agent.hooks.add_callback(AfterInvocationEvent, fail)
    return fired


async def test_an_error_raised_while_closing_reaches_the_caller_and_the_claim_is_released() -> None:
    store = InMemoryIdempotencyStore()
    agent = _agent(idempotency=IdempotencyConfig(store=store))
    fired = _failing_cleanup(agent)
    raised: BaseException | None = None
    try:
        await _start_and_close(agent)
    except _Boom as e:
        raised = e
    # strands-agents 1.30 itself leaves its inner event loop generator to the garbage collector when its stream is
    # closed: its AfterInvocationEvent hooks run later, in a task of the loop's async-generator finalizer (whenever
    # the collector gets to it, possibly before aclose() returns), and their error cannot reach anyone. Newer strands
    # closes it during aclose(), and then the error must reach the caller of aclose().
    if _STRANDS_CLOSES_ITS_LOOP:
        assert raised is not None and fired
    else:
        assert raised is None
    # and whatever upstream's cleanup did: nothing holds the token (its claim is yielded), and the agent runs the next
    left = await store.get(make_key(agent._idempotency_scope, "t"))
    assert left is None or left.yielded
    assert len(store) <= 1
    # the agent is free: the next call runs to its end (where the broken hook raises again), it is not refused
    with pytest.raises(_Boom):
        await asyncio.wait_for(agent.invoke_async("weather?"), WAIT)


@pytest.mark.xfail(strict=True, raises=AssertionError)
async def test_negative_control_bare_iteration_loses_the_error() -> None:
    agent = _agent(_BareIterationAgent)
    fired = _failing_cleanup(agent)
    try:
        await _start_and_close(agent)
    except _Boom:
        return
    # the hook may run later, in the garbage collector's task, where its error is lost
    await asyncio.sleep(0)
    raise AssertionError(f"aclose() returned although closing raised (hook fired later: {bool(fired)})")


async def test_closing_early_detaches_every_opentelemetry_context(caplog: pytest.LogCaptureFixture) -> None:
    agent = _agent()
    with caplog.at_level(logging.ERROR):
        await _start_and_close(agent)
        await asyncio.wait_for(agent.invoke_async("weather?"), WAIT)
    assert not [r for r in caplog.records if "detach" in r.getMessage().lower()]
