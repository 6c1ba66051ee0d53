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
from strands_py.idempotency._heartbeat import LeaseWatch
from strands_py.idempotency.codec import decode_result, encode_result
from strands_py.idempotency.keys import make_key
from strands_py.idempotency.record import new_version
from strands_py.testing.bedrock import ScriptedBedrock
from strands_py.testing.counting import CountingStore
from strands_py.turn import _claim

WAIT = 10.0


def _in_progress(key: str, owner: str, *, lease: float = 60.0) -> IdempotencyRecord:
    """Another process's claim, leased for ``lease`` seconds; only its owner (the test) renews it."""
    return IdempotencyRecord(
        key=key,
        state=RecordState.IN_PROGRESS,
        owner=owner,
        version=new_version(),
        lease_seconds=lease,
        expires_at=time.time() + lease + 3600,
    )


def _completed(key: str, owner: str, payload: bytes | None, *, expires_at: float | None = None) -> IdempotencyRecord:
    return IdempotencyRecord(
        key=key,
        state=RecordState.COMPLETED,
        owner=owner,
        version=new_version(),
        lease_seconds=0.0,
        expires_at=time.time() + 3600 if expires_at is None else expires_at,
        payload=payload,
    )


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
    assert counting.calls["complete"] == 0
    left = await store.get(make_key(agent._idempotency_scope, "req-1"))
    assert left is not None and left.yielded  # handed back with its journal: the next call takes it over at once
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
    # exactly the store calls of one invocation alone (its claim, its journal, its result): none for the duplicates
    alone = CountingStore(store)
    await asyncio.wait_for(
        _agent(ScriptedBedrock(), store=alone).invoke_async("weather?", idempotency_token="r2"), WAIT
    )
    assert counting.calls == alone.calls
    assert counting.calls["claim"] == counting.calls["complete"] == 1 and counting.calls["get"] == 0


async def test_waits_for_another_owner_then_replays(store: IdempotencyStore) -> None:
    script = ScriptedBedrock()
    counting = CountingStore(store)
    agent = _agent(script, store=counting)
    producer = _agent(ScriptedBedrock(), store=store, scope=agent._idempotency_scope)
    key = make_key(agent._idempotency_scope, "req-1")
    now = time.time()
    # another process holds the claim
    assert await store.claim(_in_progress(key, "elsewhere"), now) is None
    waiting = asyncio.create_task(agent.invoke_async("weather?", idempotency_token="req-1"))
    await _until(lambda: counting.calls["get"] >= 1, WAIT, "the caller to poll")
    produced = await producer.invoke_async("weather?")  # the other process's result
    assert await store.complete(_completed(key, "elsewhere", encode_result(produced, None)))
    result = await asyncio.wait_for(waiting, WAIT)
    assert isinstance(result, ReplayedAgentResult) and str(result) == str(produced)
    assert script.model_calls == 0 and counting.calls["take_over"] == 0


async def test_wait_deadline_raises(store: IdempotencyStore) -> None:
    script = ScriptedBedrock()
    agent = _agent(script, store=store, wait_timeout_seconds=0.3)
    key = make_key(agent._idempotency_scope, "req-1")
    await store.claim(_in_progress(key, "elsewhere"), time.time())
    with pytest.raises(IdempotencyWaitTimeoutError) as raised:
        await asyncio.wait_for(agent.invoke_async("weather?", idempotency_token="req-1"), WAIT)
    assert raised.value.key == key and script.model_calls == 0
    # the agent is free again afterwards
    assert (await asyncio.wait_for(agent.invoke_async("weather?"), WAIT)).stop_reason == "end_turn"


async def test_an_owner_silent_for_a_lease_is_taken_over_and_runs_once(store: IdempotencyStore) -> None:
    script = ScriptedBedrock()
    counting = CountingStore(store)
    agent = _agent(script, store=counting)
    key = make_key(agent._idempotency_scope, "req-1")
    # crashed: its claim leased 0.3 s, and nobody renews it (the waiter watches it for that long on its own clock)
    assert await store.claim(_in_progress(key, "crashed", lease=0.3), time.time()) is None
    result = await asyncio.wait_for(agent.invoke_async("weather?", idempotency_token="req-1"), WAIT)
    assert not isinstance(result, ReplayedAgentResult) and script.model_calls == 2
    assert counting.calls["take_over"] == 1 and counting.calls["get"] >= 1  # judged by watching, not at first sight
    stored = await store.get(key)
    assert stored is not None and stored.state is RecordState.COMPLETED and stored.owner != "crashed"
    # the crashed owner, should it come back, is fenced off
    assert await store.complete(_completed(key, "crashed", b"zlate")) is False


async def test_a_yielded_claim_is_taken_over_at_once(store: IdempotencyStore) -> None:
    script = ScriptedBedrock()
    counting = CountingStore(store)
    agent = _agent(script, store=counting)
    key = make_key(agent._idempotency_scope, "req-1")
    assert await store.claim(_in_progress(key, "gone"), time.time()) is None
    assert await store.renew(key, "gone", version=new_version(), lease_seconds=0, expires_at=time.time() + 60)
    result = await asyncio.wait_for(agent.invoke_async("weather?", idempotency_token="req-1"), WAIT)
    assert not isinstance(result, ReplayedAgentResult) and script.model_calls == 2
    assert counting.calls["take_over"] == 1 and counting.calls["get"] == 0  # no watching: taken over when met


class _RenewedBeforeEveryPoll(CountingStore):
    """Another process's owner, alive: a heartbeat of its 0.3 s lease lands before every read of the waiter."""

    def __init__(self, inner: IdempotencyStore, key: str, owner: str) -> None:
        super().__init__(inner)
        self.key, self.owner = key, owner

    async def get(self, key: str) -> IdempotencyRecord | None:
        version = new_version()
        await self.inner.renew(self.key, self.owner, version=version, lease_seconds=0.3, expires_at=time.time() + 60)
        return await super().get(key)


async def _a_live_owner_is_never_taken_over(store: IdempotencyStore) -> None:
    script = ScriptedBedrock()
    key = make_key("s", "req-1")
    counting = _RenewedBeforeEveryPoll(store, key, "alive")
    agent = _agent(script, store=counting, scope="s")
    assert await store.claim(_in_progress(key, "alive", lease=0.3), time.time()) is None
    waiting = asyncio.create_task(agent.invoke_async("weather?", idempotency_token="req-1"))
    # Eight polls: the waiter sleeps at least 0.025, 0.05, 0.1 and 0.2 s, then about a lease, between them, so it
    # watches the owner for more than four leases; or stop at once if it took the owner over.
    await _until(lambda: counting.calls["get"] >= 8 or counting.calls["take_over"] > 0, WAIT, "eight polls")
    assert counting.calls["take_over"] == 0 and script.model_calls == 0, "a live owner was taken over"
    produced = await _agent(ScriptedBedrock(), store=store, scope="other").invoke_async("weather?")
    assert await store.complete(_completed(key, "alive", encode_result(produced, None)))
    result = await asyncio.wait_for(waiting, WAIT)
    assert isinstance(result, ReplayedAgentResult) and str(result) == str(produced)


async def test_a_live_owner_is_never_taken_over_however_short_its_lease(store: IdempotencyStore) -> None:
    await _a_live_owner_is_never_taken_over(store)


class _FirstSightWatch(LeaseWatch):
    """Negative control: counts one lease from the first record seen, whatever versions the owner wrote since."""

    def remaining(self, record: IdempotencyRecord, read_at: float) -> float:
        if self._version is None:
            self._version, self._since = record.version, read_at
        return max(0.0, self._since + record.lease_seconds - time.monotonic())


@pytest.mark.xfail(strict=True, raises=AssertionError)
async def test_negative_control_a_waiter_that_reads_a_lease_as_a_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_claim, "LeaseWatch", _FirstSightWatch)
    await _a_live_owner_is_never_taken_over(InMemoryIdempotencyStore())


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
    # another process judged our claim abandoned (a pause, say) and took over exactly the version it read
    key = make_key(agent._idempotency_scope, "req-1")
    held = await store.get(key)
    assert held is not None
    usurper = _in_progress(key, "usurper")
    assert await store.take_over(usurper, held.version)
    gate.set()
    outcomes = await asyncio.wait_for(asyncio.gather(primary, dup, return_exceptions=True), WAIT)
    assert all(isinstance(o, IdempotencyLeaseLostError) for o in outcomes), outcomes
    stored = await store.get(key)
    assert stored == usurper


async def test_store_failure_on_complete_never_fails_the_caller(caplog: pytest.LogCaptureFixture) -> None:
    store = CountingStore(InMemoryIdempotencyStore())
    store.complete = mock.AsyncMock(side_effect=ConnectionError("store unreachable"))  # type: ignore[method-assign]
    script = ScriptedBedrock()
    agent = _agent(script, store=store)
    with caplog.at_level(logging.ERROR):
        result = await asyncio.wait_for(agent.invoke_async("weather?", idempotency_token="req-1"), WAIT)
    assert result.stop_reason == "end_turn"
    left = await store.inner.get(make_key(agent._idempotency_scope, "req-1"))
    assert left is not None and left.yielded  # the claim was handed back (with its journal) so a retry can run
    assert any("could not store the result" in r.getMessage() for r in caplog.records)


async def test_a_failure_to_hand_the_claim_back_is_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    store = CountingStore(InMemoryIdempotencyStore(), complete_result=None)
    store.renew = mock.AsyncMock(side_effect=ConnectionError("store unreachable"))  # type: ignore[method-assign]
    agent = _agent(ScriptedBedrock(fail_with=RuntimeError("model down")), store=store)
    with caplog.at_level(logging.ERROR), pytest.raises(RuntimeError, match="model down"):
        await asyncio.wait_for(agent.invoke_async("weather?", idempotency_token="req-1"), WAIT)
    assert any("could not yield the claim" in r.getMessage() for r in caplog.records)


async def test_corrupt_record_is_a_clear_error_naming_the_key(store: IdempotencyStore) -> None:
    agent = _agent(ScriptedBedrock(), store=store, validate_payload=False)
    key = make_key(agent._idempotency_scope, "req-1")
    await store.claim(_in_progress(key, "x"), time.time())
    assert await store.complete(_completed(key, "x", b"zgarbage"))
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
    record = _completed("s#k", "o", encode_result(result, None), expires_at=1.0)
    replay = decode_result(record, Forecast)
    assert replay.message == message
    assert replay.structured_output == Forecast(city="Paris", degrees=21)
    assert replay.metrics.accumulated_usage["totalTokens"] == 7
    assert decode_result(record, None).structured_output is None


@pytest.mark.parametrize("payload", [None, b"", b"?unknown", b"z" + b"not zlib"])
def test_undecodable_payloads_are_corrupt(payload: bytes | None) -> None:
    record = _completed("s#k", "o", payload, expires_at=1.0)
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
