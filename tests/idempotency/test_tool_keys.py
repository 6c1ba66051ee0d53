"""Idempotency keys for tool calls: stable across a re-run, distinct per call, keyed like every other key."""

from __future__ import annotations

import asyncio
import json
import threading
from typing import Any

import pytest
from strands import ToolContext, tool

from strands_py import Agent, tool_idempotency_key
from strands_py.idempotency import IdempotencyConfig, InMemoryIdempotencyStore
from strands_py.idempotency._context import STATE_KEY
from strands_py.idempotency.keys import make_key, tool_call_key
from strands_py.testing import ScriptedBedrock
from strands_py.testing.bedrock import _ScriptedEventStream, _text_chunks

WAIT = 10.0


def _two_identical_tool_uses() -> list[dict[str, Any]]:
    chunks: list[dict[str, Any]] = [{"messageStart": {"role": "assistant"}}]
    for index, tool_use_id in enumerate(("pay-a", "pay-b")):
        chunks += [
            {
                "contentBlockStart": {
                    "start": {"toolUse": {"toolUseId": tool_use_id, "name": "pay"}},
                    "contentBlockIndex": index,
                }
            },
            {
                "contentBlockDelta": {
                    "delta": {"toolUse": {"input": json.dumps({"cents": 500})}},
                    "contentBlockIndex": index,
                }
            },
            {"contentBlockStop": {"contentBlockIndex": index}},
        ]
    return [*chunks, {"messageStop": {"stopReason": "tool_use"}}]


class _PaymentScript(ScriptedBedrock):
    """First model call: two identical payments; then text. ``fail_after_tools`` makes the second call fail once."""

    def __init__(self, *, fail_after_tools: bool = False) -> None:
        super().__init__()
        self.fail_after_tools = fail_after_tools
        self.keys: list[str | None] = []
        self._keys_mutex = threading.Lock()

    def converse_stream(self, **request: Any) -> dict[str, Any]:
        self.model_calls += 1
        last = request.get("messages", [])[-1]
        if not any("toolResult" in block for block in last.get("content", [])):
            return {"stream": _ScriptedEventStream(_two_identical_tool_uses())}
        if self.fail_after_tools:
            self.fail_after_tools = False
            raise RuntimeError("owner died after its tools ran")
        return {"stream": _ScriptedEventStream(_text_chunks("paid twice"))}

    def tools(self) -> list[Any]:
        script = self

        @tool(context=True)
        def pay(cents: int, tool_context: ToolContext) -> str:
            """Pay.

            Args:
                cents: The amount.
            """
            with script._keys_mutex:
                script.keys.append(tool_idempotency_key(tool_context))
                # asking twice gives the same key
                assert tool_idempotency_key(tool_context) == script.keys[-1]
            return "ok"

        return [pay]


def _agent(script: _PaymentScript, config: IdempotencyConfig | None) -> Agent:
    return Agent(model=script.model(), tools=script.tools(), callback_handler=None, idempotency=config)


@pytest.mark.parametrize("hmac_key", [None, b"s" * 32])
async def test_each_tool_call_gets_a_key_and_a_rerun_gets_the_same_keys(hmac_key: bytes | None) -> None:
    store = InMemoryIdempotencyStore()
    # No journal: the re-run runs every tool again (with one, it would answer them from the journal).
    config = IdempotencyConfig(store=store, scope="s", hmac_key=hmac_key, journal=False)
    crashed = _PaymentScript(fail_after_tools=True)
    with pytest.raises(Exception, match="owner died"):
        await asyncio.wait_for(_agent(crashed, config).invoke_async("pay twice", idempotency_token="order-7"), WAIT)
    rerun = _PaymentScript()
    await asyncio.wait_for(_agent(rerun, config).invoke_async("pay twice", idempotency_token="order-7"), WAIT)
    durable_key = make_key("s", "order-7", hmac_key)
    expected = [tool_call_key(durable_key, "pay", {"cents": 500}, n, hmac_key) for n in (1, 2)]
    assert sorted(crashed.keys) == sorted(rerun.keys) == sorted(expected)  # type: ignore[type-var]
    assert len(set(expected)) == 2 and all(len(k) == 64 for k in expected)
    other = _PaymentScript()
    await asyncio.wait_for(_agent(other, config).invoke_async("pay twice", idempotency_token="order-8"), WAIT)
    assert not set(other.keys) & set(expected)  # another invocation, other keys


async def test_without_durable_idempotency_there_is_no_tool_key() -> None:
    script = _PaymentScript()
    await asyncio.wait_for(_agent(script, None).invoke_async("pay twice", idempotency_token="order-7"), WAIT)
    await asyncio.wait_for(_agent(script, IdempotencyConfig()).invoke_async("pay twice"), WAIT)
    assert script.keys == [None] * 4


async def test_the_callers_invocation_state_is_passed_on_and_left_clean() -> None:
    state: dict[str, Any] = {"tenant": "acme"}
    seen: list[Any] = []

    @tool(context=True)
    def lookup_weather(city: str, tool_context: ToolContext) -> str:
        """Look up the weather.

        Args:
            city: The city.
        """
        seen.append(tool_context.invocation_state.get("tenant"))
        tool_context.invocation_state["written_by_tool"] = True
        return "sunny"

    script = ScriptedBedrock()
    agent = Agent(model=script.model(), tools=[lookup_weather], callback_handler=None, idempotency=IdempotencyConfig())
    await asyncio.wait_for(agent.invoke_async("weather?", idempotency_token="t", invocation_state=state), WAIT)
    assert seen == ["acme"]
    # the very object was passed on (strands adds its own entries to it); ours is gone again
    assert state["tenant"] == "acme" and state["written_by_tool"] is True
    assert STATE_KEY not in state
