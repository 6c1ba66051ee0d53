"""Durable idempotency through the agent: replay, expiry, failures, fingerprints, waiting, fencing, bad records."""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import threading
import time
from collections import Counter
from typing import Any
from unittest import mock

import pytest
from pydantic import BaseModel
from strands.agent.agent_result import AgentResult
from strands.telemetry.metrics import EventLoopMetrics
from strands.types.agent import ConcurrentInvocationMode

from strands_py import Agent, IdempotencyTokenError
from strands_py._demo.storm import _until
from strands_py.idempotency import (
    IdempotencyConfig,
    IdempotencyKeyMismatchError,
    IdempotencyLeaseLostError,
    IdempotencyRecord,
    IdempotencyRecordCorruptedError,
    IdempotencyResultTooLargeError,
    IdempotencyStore,
    IdempotencyWaitTimeoutError,
    InMemoryIdempotencyStore,
    RecordState,
    ReplayedAgentResult,
)
from strands_py.idempotency.codec import decode_result, encode_result
from strands_py.idempotency.keys import make_key
from strands_py.testing.bedrock import ScriptedBedrock
from strands_py.testing.counting import CountingStore

WAIT = 10.0


def _agent(script: ScriptedBedrock, **config: Any) -> Agent:
    return Agent(
        model=script.model(), tools=script.tools(), callback_handler=None, idempotency=IdempotencyConfig(**config)
    )


async def test_replay_after_completion_does_not_run_the_agent(store: IdempotencyStore) -> None:
    script = ScriptedBedrock()
    agent = _agent(script, store=store)
    first = await asyncio.wait_for(agent.invoke_async("weather?", idempotency_token="req-1"), WAIT)
    handler = mock.Mock()
    again = await asyncio.wait_for(
        agent.invoke_async("weather?", idempotency_token="req-1", callback_handler=handler), WAIT
    )
    assert not isinstance(first, ReplayedAgentResult)
    assert isinstance(again, ReplayedAgentResult)
    assert again.idempotency_key.startswith(agent._idempotency_scope + "#")
    assert (again.stop_reason, again.message) == (first.stop_reason, first.message)
    assert again.metrics.accumulated_usage == first.metrics.accumulated_usage
    assert script.model_calls == 2 and script.tool_calls == 1
    handler.assert_called_once_with(result=again)
    events = [e async for e in agent.stream_async("weather?", idempotency_token="req-1")]
    assert len(events) == 1 and isinstance(events[0]["result"], ReplayedAgentResult)
    # another agent object (a new process would do the same) sharing the store replays too
    other = _agent(ScriptedBedrock(), store=store, scope=agent._idempotency_scope)
    assert str(await asyncio.wait_for(other.invoke_async("weather?", idempotency_token="req-1"), WAIT)) == str(first)


async def test_expired_result_runs_again(store: IdempotencyStore) -> None:
    script = ScriptedBedrock()
    agent = _agent(script, store=store, expires_after_seconds=0.2)
    await asyncio.wait_for(agent.invoke_async("weather?", idempotency_token="req-1"), WAIT)
    # The window itself is under test. DynamoDB's expiry is whole seconds, rounded up: a 0.2 s window can last
    # up to 1.2 s there.
    await asyncio.sleep(1.6)
    again = await asyncio.wait_for(agent.invoke_async("weather?", idempotency_token="req-1"), WAIT)
    assert not isinstance(again, ReplayedAgentResult)
    assert script.model_calls == 4


async def test_failure_is_not_stored_and_waiting_duplicates_get_the_error(store: IdempotencyStore) -> None:
    gate = threading.Event()
    script = ScriptedBedrock(gate=gate, gate_timeout=WAIT, fail_with=RuntimeError("model down"))
    counting = CountingStore(store)
    agent = _agent(script, store=counting)
    primary = asyncio.create_task(agent.invoke_async("weather?", idempotency_token="req-1"))
    await _until(script.entered.is_set, WAIT, "the primary's model call")
    dup = asyncio.create_task(agent.invoke_async("weather?", idempotency_token="req-1"))
    inflight = agent._idempotency_gate.inflight
    assert inflight is not None
    await _until(lambda: inflight.waiter_count >= 1, WAIT, "the duplicate to wait")
    gate.set()
    outcomes = await asyncio.wait_for(asyncio.gather(primary, dup, return_exceptions=True), WAIT)
    assert all(isinstance(o, RuntimeError) for o in outcomes)
    assert counting.calls["release"] == 1 and counting.calls["complete"] == 0
    script.fail_with = None
    result = await asyncio.wait_for(agent.invoke_async("weather?", idempotency_token="req-1"), WAIT)
    assert not isinstance(result, ReplayedAgentResult) and script.model_calls == 3


async def test_same_token_different_request_is_a_mismatch(store: IdempotencyStore) -> None:
    script = ScriptedBedrock()
    agent = _agent(script, store=store)
    await asyncio.wait_for(agent.invoke_async("weather in Paris?", idempotency_token="req-1"), WAIT)
    with pytest.raises(IdempotencyKeyMismatchError) as raised:
        await asyncio.wait_for(agent.invoke_async("weather in Rome?", idempotency_token="req-1"), WAIT)
    assert "req-1" not in str(raised.value) and raised.value.key.startswith(agent._idempotency_scope)
    assert script.model_calls == 2


async def test_without_validation_a_different_request_replays() -> None:
    script = ScriptedBedrock()
    agent = _agent(script, validate_payload=False)
    await asyncio.wait_for(agent.invoke_async("weather in Paris?", idempotency_token="req-1"), WAIT)
    again = await asyncio.wait_for(agent.invoke_async("weather in Rome?", idempotency_token="req-1"), WAIT)
    assert isinstance(again, ReplayedAgentResult) and script.model_calls == 2


async def test_in_process_duplicates_never_touch_the_store(store: IdempotencyStore) -> None:
    gate = threading.Event()
    script = ScriptedBedrock(gate=gate, gate_timeout=WAIT)
    counting = CountingStore(store)
    agent = _agent(script, store=counting)
    primary = asyncio.create_task(agent.invoke_async("weather?", idempotency_token="req-1"))
    await _until(script.entered.is_set, WAIT, "the primary's model call")
    dups = [asyncio.create_task(agent.invoke_async("weather?", idempotency_token="req-1")) for _ in range(50)]
    inflight = agent._idempotency_gate.inflight
    assert inflight is not None
    await _until(lambda: inflight.waiter_count >= 50, WAIT, "50 duplicates")
    gate.set()
    results = await asyncio.wait_for(asyncio.gather(primary, *dups), WAIT)
    assert all(r is results[0] for r in results)
    assert counting.calls == Counter(claim=1, complete=1)


async def test_waits_for_another_owner_then_replays(store: IdempotencyStore) -> None:
    script = ScriptedBedrock()
    counting = CountingStore(store)
    agent = _agent(script, store=counting)
    producer = _agent(ScriptedBedrock(), store=store, scope=agent._idempotency_scope)
    key = make_key(agent._idempotency_scope, "req-1")
    now = time.time()
    # another process holds the claim
    assert (
        await store.claim(IdempotencyRecord(key, RecordState.IN_PROGRESS, "elsewhere", now + 60, now + 3600), now)
        is None
    )
    waiting = asyncio.create_task(agent.invoke_async("weather?", idempotency_token="req-1"))
    await _until(lambda: counting.calls["get"] >= 1, WAIT, "the caller to poll")
    produced = await producer.invoke_async("weather?")  # the other process's result
    payload = encode_result(produced, None)
    done = IdempotencyRecord(key, RecordState.COMPLETED, "elsewhere", now, now + 3600, None, payload)
    assert await store.complete(done)
    result = await asyncio.wait_for(waiting, WAIT)
    assert isinstance(result, ReplayedAgentResult) and str(result) == str(produced)
    assert script.model_calls == 0


async def test_wait_deadline_raises(store: IdempotencyStore) -> None:
    script = ScriptedBedrock()
    agent = _agent(script, store=store, wait_timeout_seconds=0.3)
    key = make_key(agent._idempotency_scope, "req-1")
    now = time.time()
    await store.claim(IdempotencyRecord(key, RecordState.IN_PROGRESS, "elsewhere", now + 60, now + 3600), now)
    with pytest.raises(IdempotencyWaitTimeoutError) as raised:
        await asyncio.wait_for(agent.invoke_async("weather?", idempotency_token="req-1"), WAIT)
    assert raised.value.key == key and script.model_calls == 0
    # the agent is free again afterwards
    assert (await asyncio.wait_for(agent.invoke_async("weather?"), WAIT)).stop_reason == "end_turn"


async def test_lapsed_lease_is_taken_over_and_runs_once(store: IdempotencyStore) -> None:
    script = ScriptedBedrock()
    agent = _agent(script, store=store)
    key = make_key(agent._idempotency_scope, "req-1")
    now = time.time()
    await store.claim(IdempotencyRecord(key, RecordState.IN_PROGRESS, "crashed", now + 0.4, now + 3600), now)
    result = await asyncio.wait_for(agent.invoke_async("weather?", idempotency_token="req-1"), WAIT)
    assert not isinstance(result, ReplayedAgentResult) and script.model_calls == 2
    stored = await store.get(key)
    assert stored is not None and stored.state is RecordState.COMPLETED and stored.owner != "crashed"


async def test_a_primary_whose_claim_was_taken_over_stores_nothing_and_raises_lease_lost() -> None:
    gate = threading.Event()
    script = ScriptedBedrock(gate=gate, gate_timeout=WAIT)
    store = InMemoryIdempotencyStore()
    agent = _agent(script, store=store, lease_seconds=60)
    primary = asyncio.create_task(agent.invoke_async("weather?", idempotency_token="req-1"))
    await _until(script.entered.is_set, WAIT, "the primary's model call")
    dup = asyncio.create_task(agent.invoke_async("weather?", idempotency_token="req-1"))
    inflight = agent._idempotency_gate.inflight
    assert inflight is not None
    await _until(lambda: inflight.waiter_count >= 1, WAIT, "the duplicate")
    # another process took the claim over (as if our lease had lapsed): its claim is judged at a later "now"
    key = make_key(agent._idempotency_scope, "req-1")
    later = time.time() + 120
    usurper = IdempotencyRecord(key, RecordState.IN_PROGRESS, "usurper", later + 60, later + 3600)
    assert await store.claim(usurper, later) is None
    gate.set()
    outcomes = await asyncio.wait_for(asyncio.gather(primary, dup, return_exceptions=True), WAIT)
    assert all(isinstance(o, IdempotencyLeaseLostError) for o in outcomes), outcomes
    stored = await store.get(key)
    assert stored is not None and stored.owner == "usurper" and stored.state is RecordState.IN_PROGRESS


async def test_store_failure_on_complete_never_fails_the_caller(caplog: pytest.LogCaptureFixture) -> None:
    store = CountingStore(InMemoryIdempotencyStore())
    store.complete = mock.AsyncMock(side_effect=ConnectionError("store unreachable"))  # type: ignore[method-assign]
    script = ScriptedBedrock()
    agent = _agent(script, store=store)
    with caplog.at_level(logging.ERROR):
        result = await asyncio.wait_for(agent.invoke_async("weather?", idempotency_token="req-1"), WAIT)
    assert result.stop_reason == "end_turn"
    assert store.calls["release"] == 1  # the claim was handed back so a retry can run
    assert any("could not store the result" in r.getMessage() for r in caplog.records)


async def test_release_failure_is_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    store = CountingStore(InMemoryIdempotencyStore(), complete_result=None)
    store.release = mock.AsyncMock(side_effect=ConnectionError("store unreachable"))  # type: ignore[method-assign]
    agent = _agent(ScriptedBedrock(fail_with=RuntimeError("model down")), store=store)
    with caplog.at_level(logging.ERROR), pytest.raises(RuntimeError, match="model down"):
        await asyncio.wait_for(agent.invoke_async("weather?", idempotency_token="req-1"), WAIT)
    assert any("could not release" in r.getMessage() for r in caplog.records)


async def test_corrupt_record_is_a_clear_error_naming_the_key(store: IdempotencyStore) -> None:
    agent = _agent(ScriptedBedrock(), store=store, validate_payload=False)
    key = make_key(agent._idempotency_scope, "req-1")
    now = time.time()
    await store.claim(IdempotencyRecord(key, RecordState.IN_PROGRESS, "x", now + 60, now + 3600), now)
    await store.complete(IdempotencyRecord(key, RecordState.COMPLETED, "x", now, now + 3600, None, b"zgarbage"))
    with pytest.raises(IdempotencyRecordCorruptedError, match=key.replace("/", ".")):
        await asyncio.wait_for(agent.invoke_async("weather?", idempotency_token="req-1"), WAIT)


async def test_oversized_result_keeps_the_primary_and_blocks_reruns(store: IdempotencyStore) -> None:
    # Random text compresses badly: about 600 KB, over DynamoDB's 400 KB item limit even after zlib.
    huge = base64.b64encode(os.urandom(450_000)).decode()
    small_limit = {"max_result_bytes": 1000} if isinstance(store, InMemoryIdempotencyStore) else {}
    if small_limit:
        store = InMemoryIdempotencyStore(**small_limit)
    script = ScriptedBedrock(answer=huge)
    agent = _agent(script, store=store)
    first = await asyncio.wait_for(agent.invoke_async("weather?", idempotency_token="req-1"), WAIT)
    assert str(first).strip() == huge
    with pytest.raises(IdempotencyResultTooLargeError):
        await asyncio.wait_for(agent.invoke_async("weather?", idempotency_token="req-1"), WAIT)
    assert script.model_calls == 2  # the retry did not run the agent again


async def test_scopes_isolate_tenants() -> None:
    store = InMemoryIdempotencyStore()
    script_a, script_b = ScriptedBedrock(), ScriptedBedrock()
    agent_a = _agent(script_a, store=store, scope="tenant-a")
    agent_b = _agent(script_b, store=store, scope="tenant-b")
    await agent_a.invoke_async("weather?", idempotency_token="req-1")
    result_b = await agent_b.invoke_async("weather?", idempotency_token="req-1")
    assert not isinstance(result_b, ReplayedAgentResult)
    assert script_a.model_calls == script_b.model_calls == 2


async def test_calls_without_a_token_do_not_touch_the_store() -> None:
    counting = CountingStore(InMemoryIdempotencyStore())
    agent = _agent(ScriptedBedrock(), store=counting)
    await agent.invoke_async("weather?")
    assert counting.calls == Counter()


async def test_unsafe_reentrant_mode_still_uses_the_durable_store() -> None:
    script = ScriptedBedrock()
    agent = Agent(
        model=script.model(),
        tools=script.tools(),
        callback_handler=None,
        concurrent_invocation_mode=ConcurrentInvocationMode.UNSAFE_REENTRANT,
        idempotency=IdempotencyConfig(),
    )
    await agent.invoke_async("weather?", idempotency_token="req-1")
    assert isinstance(await agent.invoke_async("weather?", idempotency_token="req-1"), ReplayedAgentResult)


async def test_token_that_cannot_be_hashed_durably_is_rejected() -> None:
    agent = _agent(ScriptedBedrock())
    with pytest.raises(IdempotencyTokenError):
        await agent.invoke_async("weather?", idempotency_token=object())


def test_durable_keys_distinguish_token_types() -> None:
    keys = {make_key("s", t) for t in ("1", b"1", 1, 1.0, True, {"a": 1})}
    assert len(keys) == 6
    assert make_key("s", {"a": 1, "b": 2}) == make_key("s", {"b": 2, "a": 1})


class Forecast(BaseModel):
    city: str
    degrees: int


def test_codec_round_trips_structured_output_and_bytes() -> None:
    message: Any = {"role": "assistant", "content": [{"text": "hi"}, {"image": {"source": {"bytes": b"\x00\xff"}}}]}
    metrics = EventLoopMetrics()
    metrics.accumulated_usage.update({"inputTokens": 3, "outputTokens": 4, "totalTokens": 7})
    result = AgentResult("end_turn", message, metrics, {}, structured_output=Forecast(city="Paris", degrees=21))
    record = IdempotencyRecord("s#k", RecordState.COMPLETED, "o", 0, 1, None, encode_result(result, None))
    replay = decode_result(record, Forecast)
    assert replay.message == message
    assert replay.structured_output == Forecast(city="Paris", degrees=21)
    assert replay.metrics.accumulated_usage["totalTokens"] == 7
    assert decode_result(record, None).structured_output is None


@pytest.mark.parametrize("payload", [None, b"", b"?unknown", b"z" + b"not zlib"])
def test_undecodable_payloads_are_corrupt(payload: bytes | None) -> None:
    record = IdempotencyRecord("s#k", RecordState.COMPLETED, "o", 0, 1, None, payload)
    with pytest.raises(IdempotencyRecordCorruptedError, match="s#k"):
        decode_result(record, None)


@pytest.mark.parametrize(
    "bad",
    [
        {"store": object()},
        {"expires_after_seconds": 0},
        {"lease_seconds": float("inf")},
        {"wait_timeout_seconds": -1},
        {"scope": ""},
        {"scope": "a#b"},
    ],
)
def test_config_rejects_bad_values(bad: dict[str, Any]) -> None:
    with pytest.raises((TypeError, ValueError)):
        IdempotencyConfig(**bad)


def test_agent_rejects_a_config_of_the_wrong_type() -> None:
    with pytest.raises(TypeError):
        Agent(model=ScriptedBedrock().model(), idempotency={"store": None})  # type: ignore[arg-type]


def test_in_memory_store_bounds_and_validation() -> None:
    with pytest.raises(ValueError):
        InMemoryIdempotencyStore(max_entries=0)
    with pytest.raises(ValueError):
        InMemoryIdempotencyStore(max_result_bytes=0)
