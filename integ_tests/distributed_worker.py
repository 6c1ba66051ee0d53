"""Runs in a separate OS process (multiprocessing, spawn): its own Agent, its own stubbed BedrockModel."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import boto3

from strands_py import Agent
from strands_py._demo.stub import ScriptedBedrock
from strands_py.idempotency import DynamoDBIdempotencyStore, IdempotencyConfig, IdempotencyRecord

TABLE = "agent-idempotency"
SCOPE = "integ-weather-agent"
PROMPT = "What is the weather in Paris?"


class CountingDynamoDBStore(DynamoDBIdempotencyStore):
    """Counts this process's store calls; every claim also bumps a counter shared with the test process."""

    def __init__(self, endpoint: str, claims: Any) -> None:
        client = boto3.client(
            "dynamodb",
            region_name="us-east-1",
            endpoint_url=endpoint,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )
        super().__init__(TABLE, client=client)
        self.calls: Counter[str] = Counter()
        self._shared_claims = claims

    async def claim(self, record: IdempotencyRecord, now: float) -> IdempotencyRecord | None:
        existing = await super().claim(record, now)
        self.calls["claim"] += 1
        with self._shared_claims.get_lock():
            self._shared_claims.value += 1
        return existing

    async def get(self, key: str) -> IdempotencyRecord | None:
        self.calls["get"] += 1
        return await super().get(key)

    async def complete(self, record: IdempotencyRecord) -> bool:
        self.calls["complete"] += 1
        return await super().complete(record)

    async def release(self, key: str, owner: str) -> bool:
        self.calls["release"] += 1
        return await super().release(key, owner)


def make_agent(
    endpoint: str, claims: Any, gate: Any = None, entered: Any = None, **config: Any
) -> tuple[Agent, ScriptedBedrock, CountingDynamoDBStore]:
    script = ScriptedBedrock(gate=gate, entered=entered, gate_timeout=120)
    store = CountingDynamoDBStore(endpoint, claims)
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
    store.close()
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
