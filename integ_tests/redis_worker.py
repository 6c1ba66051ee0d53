"""Runs in a separate OS process (multiprocessing, spawn): its own Agent, stubbed BedrockModel and Redis store."""

from __future__ import annotations

import asyncio
from typing import Any

from strands_py import Agent
from strands_py.idempotency import IdempotencyConfig
from strands_py.idempotency.redis import RedisIdempotencyStore
from strands_py.testing.bedrock import ScriptedBedrock
from strands_py.testing.counting import CountingStore

SCOPE = "integ-weather-agent"
PROMPT = "What is the weather in Paris?"


def counting_store(url: str, claims: Any) -> CountingStore:
    """This process's Redis store, counting its calls; every claim also bumps a counter shared with the test."""

    def bump() -> None:
        with claims.get_lock():
            claims.value += 1

    return CountingStore(RedisIdempotencyStore.from_url(url), on_claim=bump)


def make_agent(
    url: str, claims: Any, gate: Any = None, entered: Any = None, **config: Any
) -> tuple[Agent, ScriptedBedrock, CountingStore]:
    script = ScriptedBedrock(gate=gate, entered=entered, gate_timeout=120)
    store = counting_store(url, claims)
    agent = Agent(
        model=script.model(),
        tools=script.tools(),
        callback_handler=None,
        idempotency=IdempotencyConfig(store=store, scope=SCOPE, **config),
    )
    return agent, script, store


def close(store: CountingStore) -> None:
    assert isinstance(store.inner, RedisIdempotencyStore)
    store.inner.close()


def run(index: int, url: str, token: str, calls: int, claims: Any, gate: Any, entered: Any, out: Any) -> None:
    """One process: ``calls`` concurrent invocations with one token; reports what happened on ``out``."""
    agent, script, store = make_agent(url, claims, gate, entered)

    async def main() -> list[Any]:
        return await asyncio.gather(
            *(agent.invoke_async(PROMPT, idempotency_token=token) for _ in range(calls)), return_exceptions=True
        )

    results = asyncio.run(main())
    close(store)
    out.put(
        {
            "index": index,
            # exceptions as text: ours take several arguments and do not survive pickling between processes
            "results": [f"{type(r).__name__}: {r}" if isinstance(r, BaseException) else str(r) for r in results],
            "replayed": sum(type(r).__name__ == "ReplayedAgentResult" for r in results),
            "model_calls": script.model_calls,
            "tool_calls": script.tool_calls,
            "store_calls": dict(store.calls),
        }
    )


def hold_claim(url: str, token: str, claims: Any, gate: Any, entered: Any, lease_seconds: float) -> None:
    """Claims the token and then hangs in its model call until killed."""
    agent, _, _ = make_agent(url, claims, gate, entered, lease_seconds=lease_seconds)
    agent(PROMPT, idempotency_token=token)
