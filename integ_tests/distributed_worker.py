"""Runs in a separate OS process (multiprocessing, spawn): its own Agent, its own stubbed BedrockModel."""

from __future__ import annotations

import asyncio
from typing import Any

import boto3

from strands_py import Agent
from strands_py.idempotency import DynamoDBIdempotencyStore, IdempotencyConfig
from strands_py.testing.bedrock import ScriptedBedrock
from strands_py.testing.counting import CountingStore

TABLE = "agent-idempotency"
SCOPE = "integ-weather-agent"
PROMPT = "What is the weather in Paris?"


def counting_store(endpoint: str, claims: Any) -> CountingStore:
    """This process's DynamoDB store, counting its calls; every claim also bumps a counter shared with the test."""
    client = boto3.client(
        "dynamodb",
        region_name="us-east-1",
        endpoint_url=endpoint,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )

    def bump() -> None:
        with claims.get_lock():
            claims.value += 1

    return CountingStore(DynamoDBIdempotencyStore(TABLE, client=client), on_claim=bump)


def make_agent(
    endpoint: str, claims: Any, gate: Any = None, entered: Any = None, **config: Any
) -> tuple[Agent, ScriptedBedrock, CountingStore]:
    script = ScriptedBedrock(gate=gate, entered=entered, gate_timeout=120)
    store = counting_store(endpoint, claims)
    agent = Agent(
        model=script.model(),
        tools=script.tools(),
        callback_handler=None,
        idempotency=IdempotencyConfig(store=store, scope=SCOPE, **config),
    )
    return agent, script, store


def run(index: int, endpoint: str, token: str, calls: int, claims: Any, gate: Any, entered: Any, out: Any) -> None:
    """One process: ``calls`` concurrent invocations with one token; reports what happened on ``out``."""
    agent, script, store = make_agent(endpoint, claims, gate, entered)

    async def main() -> list[Any]:
        return await asyncio.gather(
            *(agent.invoke_async(PROMPT, idempotency_token=token) for _ in range(calls)), return_exceptions=True
        )

    results = asyncio.run(main())
    assert isinstance(store.inner, DynamoDBIdempotencyStore)
    store.inner.close()
    out.put(
        {
            "index": index,
            "results": [r if isinstance(r, BaseException) else str(r) for r in results],
            "replayed": sum(type(r).__name__ == "ReplayedAgentResult" for r in results),
            "model_calls": script.model_calls,
            "tool_calls": script.tool_calls,
            "store_calls": dict(store.calls),
        }
    )


def hold_claim(endpoint: str, token: str, claims: Any, gate: Any, entered: Any, lease_seconds: float) -> None:
    """Claims the token and then hangs in its model call until killed."""
    agent, _, _ = make_agent(endpoint, claims, gate, entered, lease_seconds=lease_seconds)
    agent(PROMPT, idempotency_token=token)
