"""The durable layer under real use: cancelled runs, retried and cancelled claims, outages, in-process mismatches,
replays that keep interrupts and structured output, keyed hashing. Each test fails on the code before the fix."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest
from pydantic import BaseModel
from strands.agent.agent_result import AgentResult
from strands.hooks import BeforeToolCallEvent
from strands.telemetry.metrics import EventLoopMetrics

from strands_py import Agent
from strands_py._demo.storm import _until
from strands_py.idempotency import (
    IdempotencyConfig,
    IdempotencyKeyMismatchError,
    IdempotencyRecord,
    IdempotencyStore,
    IdempotencyStoreError,
    InMemoryIdempotencyStore,
    RecordState,
    ReplayedAgentResult,
)
from strands_py.idempotency.codec import encode_result
from strands_py.idempotency.keys import make_key, request_fingerprint
from strands_py.idempotency.record import new_version
from strands_py.testing import CountingStore, ScriptedBedrock

WAIT = 10.0


def _agent(script: ScriptedBedrock, **config: Any) -> Agent:
    return Agent(
        model=script.model(), tools=script.tools(), callback_handler=None, idempotency=IdempotencyConfig(**config)
    )


def _record(
    key: str, owner: str, state: RecordState, fingerprint: str | None = None, payload: bytes | None = None
) -> IdempotencyRecord:
    """A record another process wrote: a claim leased for a minute (nobody renews it), or its result."""
    lease = 60.0 if state is RecordState.IN_PROGRESS else 0.0
    return IdempotencyRecord(
        key=key,
        state=state,
        owner=owner,
        version=new_version(),
        lease_seconds=lease,
        expires_at=time.time() + lease + 3600,
        fingerprint=fingerprint,
        payload=payload,
    )


def _gated() -> tuple[threading.Event, ScriptedBedrock]:
    gate = threading.Event()
    return gate, ScriptedBedrock(gate=gate, gate_timeout=WAIT)


async def test_a_cancelled_run_is_not_stored_and_the_retry_runs() -> None:
    gate, script = _gated()
    store = CountingStore(InMemoryIdempotencyStore())
    agent = _agent(script, store=store)
    run = asyncio.create_task(agent.invoke_async("weather?", idempotency_token="req-1"))
    await _until(script.entered.is_set, WAIT, "the model call")
    agent.cancel()  # what a client disconnect does through cancel_signal
    gate.set()
    cancelled = await asyncio.wait_for(run, WAIT)
    assert cancelled.stop_reason == "cancelled"  # upstream's result of agent.cancel(), to the caller
    # not stored as the token's result: a CANCELLED tombstone, which a retry replaces at once
    left = await store.inner.get(make_key(agent._idempotency_scope, "req-1"))
    assert left is not None and left.state is RecordState.CANCELLED and left.payload is None
    retry = await asyncio.wait_for(agent.invoke_async("weather?", idempotency_token="req-1"), WAIT)
    assert not isinstance(retry, ReplayedAgentResult) and retry.stop_reason == "end_turn"


class _LostResponseStore(CountingStore):
    """The claim's write lands but its response is lost; the client's retry then meets our own record."""

    async def claim(self, record: IdempotencyRecord, now: float) -> IdempotencyRecord | None:
        assert await self.inner.claim(record, now) is None
        self.calls["claim"] += 1
        return await self.inner.claim(record, now)  # the retried write: fails its condition on our record


async def test_our_own_retried_claim_is_ours() -> None:
    script = ScriptedBedrock()
    store = _LostResponseStore(InMemoryIdempotencyStore())
    agent = _agent(script, store=store, lease_seconds=60)
    result = await asyncio.wait_for(agent.invoke_async("weather?", idempotency_token="req-1"), WAIT)
    assert not isinstance(result, ReplayedAgentResult) and script.model_calls == 2
    # neither waited for itself (no poll) nor took its own claim over
    assert store.calls["get"] == 0 and store.calls["take_over"] == 0 and store.calls["complete"] == 1


class _StuckClaimStore(CountingStore):
    """The claim's write lands at once, but its answer only comes when ``answer`` is set."""

    def __init__(self, inner: IdempotencyStore) -> None:
        super().__init__(inner)
        self.landed = asyncio.Event()
        self.answer = asyncio.Event()

    async def claim(self, record: IdempotencyRecord, now: float) -> IdempotencyRecord | None:
        existing = await self.inner.claim(record, now)
        self.landed.set()
        await self.answer.wait()
        return existing


async def test_a_claim_whose_caller_gave_up_is_handed_back() -> None:
    script = ScriptedBedrock()
    inner = InMemoryIdempotencyStore()
    store = _StuckClaimStore(inner)
    agent = _agent(script, store=store)
    call = asyncio.create_task(agent.invoke_async("weather?", idempotency_token="req-1"))
    await asyncio.wait_for(store.landed.wait(), WAIT)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(call, WAIT)
    store.answer.set()
    key = make_key(agent._idempotency_scope, "req-1")
    await _until(lambda: len(inner) == 0, WAIT, "the orphaned claim to be released")
    assert await inner.get(key) is None and script.model_calls == 0
    # and the retry runs at once instead of waiting for a lease
    retry = await asyncio.wait_for(agent.invoke_async("weather?", idempotency_token="req-1"), WAIT)
    assert retry.stop_reason == "end_turn"


class _DownStore(CountingStore):
    def __init__(self, inner: IdempotencyStore, failing: str) -> None:
        super().__init__(inner)
        self.failing = failing

    async def claim(self, record: IdempotencyRecord, now: float) -> IdempotencyRecord | None:
        if self.failing == "claim":
            raise ConnectionError("store unreachable")
        return await super().claim(record, now)

    async def get(self, key: str) -> IdempotencyRecord | None:
        if self.failing == "get":
            raise TimeoutError("read timed out")
        return await super().get(key)


@pytest.mark.parametrize("failing", ["claim", "get"])
async def test_store_outages_raise_idempotency_store_error(failing: str) -> None:
    script = ScriptedBedrock()
    inner = InMemoryIdempotencyStore()
    agent = _agent(script, store=_DownStore(inner, failing))
    if failing == "get":  # another owner holds the token, so the caller polls
        key = make_key(agent._idempotency_scope, "req-1")
        await inner.claim(_record(key, "elsewhere", RecordState.IN_PROGRESS), time.time())
    with pytest.raises(IdempotencyStoreError) as raised:
        await asyncio.wait_for(agent.invoke_async("weather?", idempotency_token="req-1"), WAIT)
    assert isinstance(raised.value.__cause__, ConnectionError | TimeoutError)
    assert script.model_calls == 0
    # the agent itself is free again
    assert (await asyncio.wait_for(agent.invoke_async("weather?"), WAIT)).stop_reason == "end_turn"


@pytest.mark.parametrize("same_agent", [True, False])
async def test_same_token_other_request_in_process_is_a_mismatch(same_agent: bool) -> None:
    gate, script = _gated()
    store = InMemoryIdempotencyStore()
    agent = _agent(script, store=store, scope="s")
    other = agent if same_agent else _agent(ScriptedBedrock(), store=store, scope="s")
    primary = asyncio.create_task(agent.invoke_async("weather in Paris?", idempotency_token="req-1"))
    await _until(script.entered.is_set, WAIT, "the primary's model call")
    with pytest.raises(IdempotencyKeyMismatchError):
        await asyncio.wait_for(other.invoke_async("weather in Rome?", idempotency_token="req-1"), WAIT)
    # the same request does join
    same = asyncio.create_task(other.invoke_async("weather in Paris?", idempotency_token="req-1"))
    inflight = agent._idempotency_gate.inflight
    assert inflight is not None
    await _until(lambda: inflight.waiter_count >= 1, WAIT, "the same request to join")
    gate.set()
    results = await asyncio.wait_for(asyncio.gather(primary, same), WAIT)
    assert results[0] is results[1] and script.model_calls == 2


async def test_replay_keeps_the_interrupts_of_an_interrupted_result() -> None:
    script = ScriptedBedrock()
    store = InMemoryIdempotencyStore()

    def ask_approval(event: BeforeToolCallEvent) -> None:
        event.interrupt("approval", reason={"tool": event.tool_use["name"], "amount": 42})

    first = _agent(script, store=store, scope="s")
    first.hooks.add_callback(BeforeToolCallEvent, ask_approval)
    interrupted = await asyncio.wait_for(first.invoke_async("pay?", idempotency_token="req-1"), WAIT)
    assert interrupted.stop_reason == "interrupt" and interrupted.interrupts
    retry = _agent(ScriptedBedrock(), store=store, scope="s")
    replay = await asyncio.wait_for(retry.invoke_async("pay?", idempotency_token="req-1"), WAIT)
    assert isinstance(replay, ReplayedAgentResult) and replay.stop_reason == "interrupt"
    assert [i.to_dict() for i in replay.interrupts or []] == [i.to_dict() for i in interrupted.interrupts]


class Forecast(BaseModel):
    city: str
    degrees: int


async def test_replay_rebuilds_structured_output_with_the_agents_default_model() -> None:
    store = InMemoryIdempotencyStore()
    script = ScriptedBedrock()
    agent = Agent(
        model=script.model(),
        callback_handler=None,
        structured_output_model=Forecast,
        idempotency=IdempotencyConfig(store=store, scope="s"),
    )
    key = make_key("s", "req-1")
    fingerprint = request_fingerprint(
        "s", "weather?", {"structured_output_model": Forecast, "structured_output_prompt": None}
    )
    message: Any = {"role": "assistant", "content": [{"text": "done"}]}
    stored = AgentResult(
        "end_turn", message, EventLoopMetrics(), {}, structured_output=Forecast(city="Paris", degrees=21)
    )
    await store.claim(_record(key, "o", RecordState.IN_PROGRESS, fingerprint), time.time())
    assert await store.complete(_record(key, "o", RecordState.COMPLETED, fingerprint, encode_result(stored, None)))
    replay = await asyncio.wait_for(agent.invoke_async("weather?", idempotency_token="req-1"), WAIT)
    assert isinstance(replay, ReplayedAgentResult)
    assert replay.structured_output == Forecast(city="Paris", degrees=21)
    assert script.model_calls == 0


async def test_hmac_key_changes_every_key_and_still_replays() -> None:
    store = CountingStore(InMemoryIdempotencyStore())
    secret = b"k" * 32
    first = _agent(ScriptedBedrock(), store=store, scope="s", hmac_key=secret)
    await asyncio.wait_for(first.invoke_async("weather?", idempotency_token="req-1"), WAIT)
    keyed = make_key("s", "req-1", secret)
    assert keyed != make_key("s", "req-1")
    stored = await store.inner.get(keyed)
    assert stored is not None and stored.fingerprint is not None
    assert stored.fingerprint != request_fingerprint(
        "s", "weather?", {"structured_output_model": None, "structured_output_prompt": None}
    )
    again = _agent(ScriptedBedrock(), store=store, scope="s", hmac_key=secret)
    assert isinstance(
        await asyncio.wait_for(again.invoke_async("weather?", idempotency_token="req-1"), WAIT), ReplayedAgentResult
    )
    # without the secret the record is simply not found: the call runs
    unkeyed = _agent(ScriptedBedrock(), store=store, scope="s")
    ran = await asyncio.wait_for(unkeyed.invoke_async("weather?", idempotency_token="req-1"), WAIT)
    assert not isinstance(ran, ReplayedAgentResult)


@pytest.mark.parametrize(
    "bad",
    [
        {"expires_after_seconds": 1e130},
        {"expires_after_seconds": True},
        {"lease_seconds": 10 * 24 * 3600.0},
        {"lease_seconds": 0.01},
        {"wait_timeout_seconds": 1e12},
        {"wait_timeout_seconds": float("nan")},
        {"hmac_key": "text"},
        {"hmac_key": b"short"},
        {"scope": 3},
    ],
)
def test_config_bounds_every_duration(bad: dict[str, Any]) -> None:
    with pytest.raises((TypeError, ValueError)) as raised:
        IdempotencyConfig(**bad)
    assert next(iter(bad)) in str(raised.value)


def test_config_defaults_to_a_short_lease() -> None:
    assert IdempotencyConfig().lease_seconds == 30.0
    assert "secret-secret-secret" not in repr(IdempotencyConfig(hmac_key=b"secret-secret-secret"))
