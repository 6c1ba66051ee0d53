"""The in-process registry of durable keys works for any store object (compared by identity), and a call that fails
while beginning never leaves the agent busy."""

from __future__ import annotations

import asyncio
import dataclasses
import weakref
from typing import Any

import pytest
from strands.types.exceptions import ConcurrencyException

from strands_py import Agent
from strands_py.agent import _gate, _registry
from strands_py.idempotency import (
    IdempotencyConfig,
    IdempotencyRecord,
    IdempotencyStore,
    InMemoryIdempotencyStore,
    ReplayedAgentResult,
)
from strands_py.testing import ScriptedBedrock

WAIT = 8.0


def durable_agent(script: ScriptedBedrock, store: IdempotencyStore, **config: Any) -> Agent:
    config.setdefault("scope", "s")
    return Agent(
        model=script.model(),
        tools=script.tools(),
        callback_handler=None,
        idempotency=IdempotencyConfig(store=store, **config),
    )


@dataclasses.dataclass
class _DataclassStore(IdempotencyStore):
    """A user's own store written as a dataclass: ``eq=True`` makes it unhashable (``__hash__ = None``).

    Nothing in ``IdempotencyStore``'s contract (or the contract suite) says a store must be hashable or weakly
    referenceable, and ``IdempotencyConfig`` accepts it.
    """

    inner: InMemoryIdempotencyStore = dataclasses.field(default_factory=InMemoryIdempotencyStore)

    async def claim(self, record: IdempotencyRecord, now: float) -> IdempotencyRecord | None:
        return await self.inner.claim(record, now)

    async def take_over(self, record: IdempotencyRecord, version: str) -> bool:
        return await self.inner.take_over(record, version)

    async def get(self, key: str) -> IdempotencyRecord | None:
        return await self.inner.get(key)

    async def complete(self, record: IdempotencyRecord) -> bool:
        return await self.inner.complete(record)

    async def release(self, key: str, owner: str) -> bool:
        return await self.inner.release(key, owner)

    async def renew(
        self,
        key: str,
        owner: str,
        *,
        version: str,
        lease_seconds: float,
        expires_at: float,
        checkpoint: str | None = None,
    ) -> bool:
        return await self.inner.renew(
            key, owner, version=version, lease_seconds=lease_seconds, expires_at=expires_at, checkpoint=checkpoint
        )


async def test_an_unhashable_store_works() -> None:
    # Was: `registry_for` kept registries in a WeakKeyDictionary, whose lookup raises TypeError for an unhashable
    # store: a dataclass store (eq=True sets __hash__ to None) failed every tokened call.
    script = ScriptedBedrock()
    store = _DataclassStore()
    first = await asyncio.wait_for(durable_agent(script, store).invoke_async("weather?", idempotency_token="r"), WAIT)
    again = await asyncio.wait_for(durable_agent(script, store).invoke_async("weather?", idempotency_token="r"), WAIT)
    assert first.stop_reason == "end_turn" and isinstance(again, ReplayedAgentResult)
    assert script.model_calls == 2  # one run (a tool call and the answer), then a replay


@pytest.mark.xfail(raises=TypeError, strict=True, reason="negative control: registries keyed by the store's hash")
async def test_negative_control_registries_keyed_by_hash(monkeypatch: pytest.MonkeyPatch) -> None:
    by_hash: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()
    monkeypatch.setattr(_gate, "registry_for", lambda store: by_hash.setdefault(store, _registry._InflightRegistry()))
    await test_an_unhashable_store_works()


async def _a_failing_begin_leaves_the_agent_free(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(store: Any) -> Any:
        raise RuntimeError("registry unavailable")

    agent = durable_agent(ScriptedBedrock(), InMemoryIdempotencyStore())
    with monkeypatch.context() as patch:
        patch.setattr(_gate, "registry_for", broken)
        with pytest.raises(RuntimeError, match="registry unavailable"):
            await asyncio.wait_for(agent.invoke_async("weather?", idempotency_token="req-1"), WAIT)
    try:
        after = await asyncio.wait_for(agent.invoke_async("weather?"), WAIT)
    except ConcurrencyException as e:
        raise AssertionError("the agent stays busy forever after a failed begin") from e
    assert after.stop_reason == "end_turn"


async def test_a_failing_begin_leaves_the_agent_free(monkeypatch: pytest.MonkeyPatch) -> None:
    await _a_failing_begin_leaves_the_agent_free(monkeypatch)


@pytest.mark.xfail(raises=AssertionError, strict=True, reason="negative control: begin does not hand the lock back")
async def test_negative_control_begin_keeps_the_lock(monkeypatch: pytest.MonkeyPatch) -> None:
    real_finish = _gate.finish

    def finish(agent: Any, begun: Any, result: Any, error: Any) -> None:
        if not isinstance(error, RuntimeError):
            real_finish(agent, begun, result, error)

    monkeypatch.setattr(_gate, "finish", finish)
    await _a_failing_begin_leaves_the_agent_free(monkeypatch)
