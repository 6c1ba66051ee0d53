"""Re-entrant calls fail at once instead of deadlocking; a call's own callback handler counts whenever passed.

Negative control: with the re-entrancy check disabled, the same scenario deadlocks (bounded by a timeout here).
"""

from __future__ import annotations

import asyncio
from typing import Any
from unittest import mock

import pytest
from deadline_kit import deadline
from strands import tool

from strands_py import Agent, ConcurrencyException, ReentrantInvocationError
from strands_py._demo.storm import _until
from strands_py.agent import _concurrency
from strands_py.idempotency import IdempotencyConfig, InMemoryIdempotencyStore
from strands_py.testing import ScriptedBedrock

WAIT = 10.0


class _Reentry:
    """A tool that calls an agent with the running invocation's own token, and records what that call did."""

    def __init__(self) -> None:
        self.target: Agent | None = None
        self.outcome: BaseException | object | None = None

    def tools(self, sync: bool) -> list[Any]:
        reentry = self

        if sync:

            @tool(name="lookup_weather")
            def lookup_sync(city: str) -> str:
                """Look up the weather.

                Args:
                    city: The city.
                """
                assert reentry.target is not None
                try:
                    reentry.outcome = reentry.target("weather?", idempotency_token="t")
                except BaseException as e:  # noqa: BLE001 - the outcome under test
                    reentry.outcome = e
                return "sunny"

            return [lookup_sync]

        @tool(name="lookup_weather")
        async def lookup_async(city: str) -> str:
            """Look up the weather.

            Args:
                city: The city.
            """
            assert reentry.target is not None
            try:
                reentry.outcome = await asyncio.wait_for(
                    reentry.target.invoke_async("weather?", idempotency_token="t"), WAIT / 4
                )
            except BaseException as e:  # noqa: BLE001 - the outcome under test
                reentry.outcome = e
            return "sunny"

        return [lookup_async]


def _agents(sync: bool, durable: bool, same_agent: bool) -> tuple[Agent, _Reentry]:
    reentry = _Reentry()
    config = IdempotencyConfig(store=InMemoryIdempotencyStore(), scope="s") if durable else None
    primary = Agent(
        model=ScriptedBedrock().model(), tools=reentry.tools(sync), callback_handler=None, idempotency=config
    )
    reentry.target = primary if same_agent else Agent(model=ScriptedBedrock().model(), idempotency=config)
    return primary, reentry


@pytest.mark.parametrize(
    ("sync", "durable", "same_agent"),
    [(False, False, True), (True, False, True), (False, True, True), (False, True, False), (True, True, False)],
)
async def test_a_tool_calling_with_its_own_token_fails_at_once(sync: bool, durable: bool, same_agent: bool) -> None:
    primary, reentry = _agents(sync, durable, same_agent)
    result = await asyncio.wait_for(primary.invoke_async("weather?", idempotency_token="t"), WAIT)
    assert result.stop_reason == "end_turn"
    assert isinstance(reentry.outcome, ReentrantInvocationError)
    assert isinstance(reentry.outcome, ConcurrencyException)


@pytest.mark.xfail(strict=True, raises=AssertionError)
async def test_negative_control_without_the_check_the_tool_deadlocks() -> None:
    primary, reentry = _agents(sync=False, durable=False, same_agent=True)
    with (
        mock.patch.object(_concurrency, "_waits_for_itself", return_value=False),
        mock.patch("strands_py.agent._gate._waits_for_itself", return_value=False),
    ):
        await asyncio.wait_for(primary.invoke_async("weather?", idempotency_token="t"), WAIT)
    # the tool's call waited for its own invocation until the tool's own timeout
    assert isinstance(reentry.outcome, ReentrantInvocationError), reentry.outcome


async def test_a_callback_handler_calling_with_the_token_fails_at_once() -> None:
    # A synchronous call from a callback handler blocks the primary's own event loop: without the check, the
    # duplicate would wait for a primary that can never go on.
    outcomes: list[BaseException] = []
    agent: Agent | None = None

    def handler(**event: Any) -> None:
        if "data" in event and not outcomes:
            assert agent is not None
            try:
                agent("weather?", idempotency_token="t")
            except BaseException as e:  # noqa: BLE001 - the outcome under test
                outcomes.append(e)

    script = ScriptedBedrock()
    agent = Agent(model=script.model(), tools=script.tools(), callback_handler=handler)
    await asyncio.wait_for(agent.invoke_async("weather?", idempotency_token="t"), WAIT)
    assert len(outcomes) == 1 and isinstance(outcomes[0], ReentrantInvocationError)


async def test_a_settled_primary_is_no_reentry() -> None:
    # A consumer that, after the result event, asks again with the token gets the result: nothing waits.
    script = ScriptedBedrock()
    agent = Agent(model=script.model(), tools=script.tools(), callback_handler=None)
    async with deadline(WAIT):
        async for event in agent.stream_async("weather?", idempotency_token="t"):
            if "result" in event:
                again = await agent.invoke_async("weather?", idempotency_token="t")
                assert again is event["result"]


class _Collector(list[dict[str, Any]]):
    """A list-based callback handler: callable, and falsy while empty."""

    def __call__(self, **event: Any) -> None:
        self.append(event)


async def test_a_falsy_callable_handler_of_a_duplicate_fires() -> None:
    gate_script = ScriptedBedrock(gate=__import__("threading").Event(), gate_timeout=WAIT)
    agent_handler = mock.Mock()
    agent = Agent(model=gate_script.model(), tools=gate_script.tools(), callback_handler=agent_handler)
    primary = asyncio.create_task(agent.invoke_async("weather?", idempotency_token="t"))
    await _until(gate_script.entered.is_set, WAIT, "the primary's model call")
    collector = _Collector()
    assert not collector
    dup = asyncio.create_task(agent.invoke_async("weather?", idempotency_token="t", callback_handler=collector))
    inflight = agent._idempotency_gate.inflight
    assert inflight is not None
    await _until(lambda: inflight.waiter_count >= 1, WAIT, "the duplicate")
    assert gate_script.gate is not None
    gate_script.gate.set()
    result = await asyncio.wait_for(primary, WAIT)
    assert await asyncio.wait_for(dup, WAIT) is result
    assert collector == [{"result": result}]
    assert agent_handler.call_args_list.count(mock.call(result=result)) == 1  # the primary's own, only


async def test_a_falsy_callable_handler_of_a_replay_fires() -> None:
    agent = Agent(model=ScriptedBedrock().model(), callback_handler=None, idempotency=IdempotencyConfig())
    await asyncio.wait_for(agent.invoke_async("weather?", idempotency_token="t"), WAIT)
    collector = _Collector()
    replay = await asyncio.wait_for(
        agent.invoke_async("weather?", idempotency_token="t", callback_handler=collector), WAIT
    )
    assert collector == [{"result": replay}]
