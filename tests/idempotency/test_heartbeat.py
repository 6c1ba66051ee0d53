"""Heartbeats: a long run keeps its claim, a primary that loses its lease stops, and no renewal task outlives a run.

"Another process" is another agent whose store is a different wrapper around the same in-memory store: it shares
the records but not the in-process registry, so it waits on the store as a remote process would.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest

from strands_py import Agent, IdempotencyLeaseLostError
from strands_py._demo.storm import _until
from strands_py.idempotency import (
    IdempotencyConfig,
    IdempotencyRecord,
    IdempotencyStore,
    InMemoryIdempotencyStore,
    RecordState,
    ReplayedAgentResult,
)
from strands_py.idempotency._heartbeat import _Lease
from strands_py.idempotency.keys import make_key
from strands_py.testing import CountingStore, ScriptedBedrock

WAIT = 20.0
pytestmark = pytest.mark.racing
LEASE = 1.5  # renewals every 0.5 s; a whole second of margin for a loaded machine


def _agent(script: ScriptedBedrock, store: IdempotencyStore, **config: Any) -> Agent:
    config.setdefault("lease_seconds", LEASE)
    return Agent(
        model=script.model(),
        tools=script.tools(),
        callback_handler=None,
        idempotency=IdempotencyConfig(store=store, scope="s", **config),
    )


def _heartbeats() -> list[asyncio.Task[Any]]:
    return [t for t in asyncio.all_tasks() if t.get_name() == "strands-py-heartbeat" and not t.done()]


async def test_a_run_many_leases_long_keeps_its_claim_and_runs_once() -> None:
    gate = threading.Event()
    script = ScriptedBedrock(gate=gate, gate_timeout=WAIT)
    shared = InMemoryIdempotencyStore()
    owner_store, other_store = CountingStore(shared), CountingStore(shared)
    owner = _agent(script, owner_store)
    primary = asyncio.create_task(owner.invoke_async("weather?", idempotency_token="req-1"))
    await _until(script.entered.is_set, WAIT, "the primary's model call")
    other_script = ScriptedBedrock()
    waiting = asyncio.create_task(_agent(other_script, other_store).invoke_async("weather?", idempotency_token="req-1"))
    # three whole leases of renewals (nine heartbeats) while the other process polls, then let the run finish
    await _until(lambda: owner_store.calls["renew"] >= 9 and other_store.calls["get"] >= 3, WAIT, "three leases")
    gate.set()
    result = await asyncio.wait_for(primary, WAIT)
    replay = await asyncio.wait_for(waiting, WAIT)
    assert not isinstance(result, ReplayedAgentResult) and isinstance(replay, ReplayedAgentResult)
    assert script.model_calls == 2 and other_script.model_calls == 0
    assert other_store.calls["claim"] == 1  # it never took over
    assert not _heartbeats()


@pytest.mark.xfail(strict=True, raises=AssertionError)
async def test_negative_control_without_heartbeats_the_other_process_runs_it_again() -> None:
    gate = threading.Event()
    script = ScriptedBedrock(gate=gate, gate_timeout=WAIT)
    shared = InMemoryIdempotencyStore()
    owner = _agent(script, CountingStore(shared))
    original = _Lease.start
    _Lease.start = lambda self: None  # type: ignore[method-assign]
    try:
        primary = asyncio.create_task(owner.invoke_async("weather?", idempotency_token="req-1"))
        await _until(script.entered.is_set, WAIT, "the primary's model call")
        other_script = ScriptedBedrock()
        waiting = asyncio.create_task(
            _agent(other_script, CountingStore(shared)).invoke_async("weather?", idempotency_token="req-1")
        )
        await _until(other_script.entered.is_set, WAIT, "the other process to take the lapsed claim over")
        gate.set()
        await asyncio.wait_for(asyncio.gather(primary, waiting, return_exceptions=True), WAIT)
    finally:
        _Lease.start = original  # type: ignore[method-assign]
    assert other_script.model_calls == 0, "a second run of the same token"


async def _usurp(store: IdempotencyStore, key: str) -> None:
    """Another caller takes the claim over (its claim judged at a "now" past our lease)."""
    later = time.time() + 120
    assert (
        await store.claim(IdempotencyRecord(key, RecordState.IN_PROGRESS, "usurper", later + 60, later + 3600), later)
        is None
    )


async def test_a_primary_whose_renewal_is_fenced_off_stops_before_its_tool() -> None:
    gate = threading.Event()
    script = ScriptedBedrock(gate=gate, gate_timeout=WAIT)
    store = CountingStore(InMemoryIdempotencyStore())
    agent = _agent(script, store)
    primary = asyncio.create_task(agent.invoke_async("weather?", idempotency_token="req-1"))
    await _until(script.entered.is_set, WAIT, "the primary's model call")
    dup = asyncio.create_task(agent.invoke_async("weather?", idempotency_token="req-1"))
    key = make_key("s", "req-1")
    await _usurp(store.inner, key)
    renewals = store.calls["renew"]
    await _until(lambda: store.calls["renew"] > renewals, WAIT, "the next renewal")
    gate.set()
    outcomes = await asyncio.wait_for(asyncio.gather(primary, dup, return_exceptions=True), WAIT)
    assert all(isinstance(o, IdempotencyLeaseLostError) for o in outcomes), outcomes
    assert script.tool_calls == 0  # stopped before doing more
    stored = await store.inner.get(key)
    assert stored is not None and stored.owner == "usurper"  # nothing written over the new owner
    assert store.calls["complete"] == 0
    assert not _heartbeats()
    # the agent is usable again
    assert (await asyncio.wait_for(agent.invoke_async("weather?"), WAIT)).stop_reason == "end_turn"


class _FlakyRenewStore(CountingStore):
    def __init__(self, inner: IdempotencyStore, failures: int | None) -> None:
        super().__init__(inner)
        self.failures = failures  # None: every renewal fails

    async def renew(self, key: str, owner: str, lease_expires_at: float, checkpoint: str | None = None) -> bool:
        self.calls["renew"] += 1
        if self.failures is None or self.failures > 0:
            if self.failures is not None:
                self.failures -= 1
            raise ConnectionError("store unreachable")
        return await self.inner.renew(key, owner, lease_expires_at, checkpoint)


async def test_a_transient_renewal_failure_is_retried_within_the_lease() -> None:
    gate = threading.Event()
    script = ScriptedBedrock(gate=gate, gate_timeout=WAIT)
    store = _FlakyRenewStore(InMemoryIdempotencyStore(), failures=2)
    agent = _agent(script, store)
    primary = asyncio.create_task(agent.invoke_async("weather?", idempotency_token="req-1"))
    await _until(lambda: store.calls["renew"] >= 6, WAIT, "failed renewals and then good ones")
    gate.set()
    assert (await asyncio.wait_for(primary, WAIT)).stop_reason == "end_turn"
    assert store.calls["complete"] == 1


async def test_a_store_unreachable_for_a_whole_lease_loses_the_lease() -> None:
    gate = threading.Event()
    script = ScriptedBedrock(gate=gate, gate_timeout=WAIT)
    store = _FlakyRenewStore(InMemoryIdempotencyStore(), failures=None)
    agent = _agent(script, store)
    primary = asyncio.create_task(agent.invoke_async("weather?", idempotency_token="req-1"))
    await _until(script.entered.is_set, WAIT, "the primary's model call")
    await _until(lambda: not _heartbeats(), WAIT, "the heartbeat to give up")
    gate.set()
    with pytest.raises(IdempotencyLeaseLostError, match="whole lease"):
        await asyncio.wait_for(primary, WAIT)
    assert script.tool_calls == 0


@pytest.mark.parametrize("ending", ["result", "error", "cancel", "aclose"])
async def test_no_heartbeat_outlives_its_invocation(ending: str) -> None:
    gate = threading.Event()
    script = ScriptedBedrock(
        gate=gate, gate_timeout=WAIT, fail_with=RuntimeError("down") if ending == "error" else None
    )
    agent = _agent(script, InMemoryIdempotencyStore())
    stream = agent.stream_async("weather?", idempotency_token="req-1")
    consumer = asyncio.create_task(_drain(stream))
    await _until(script.entered.is_set, WAIT, "the model call")
    assert len(_heartbeats()) == 1
    if ending == "cancel":
        consumer.cancel()
    elif ending == "aclose":
        consumer.cancel()
        gate.set()
        await asyncio.wait([consumer], timeout=WAIT)
        await asyncio.wait_for(stream.aclose(), WAIT)  # type: ignore[attr-defined]
    gate.set()
    await asyncio.wait([consumer], timeout=WAIT)
    assert consumer.done()
    assert not _heartbeats()


async def _drain(stream: Any) -> None:
    async for _ in stream:
        pass


class _AnswerOnCue(InMemoryIdempotencyStore):
    """``renew`` waits for the test's cue, so the test decides when the renewal completes."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = asyncio.Event()
        self.cue: asyncio.Future[None] | None = None

    async def renew(self, key: str, owner: str, lease_expires_at: float, checkpoint: str | None = None) -> bool:
        self.cue = asyncio.get_running_loop().create_future()
        self.entered.set()
        await self.cue
        return await super().renew(key, owner, lease_expires_at, checkpoint)


async def _stop_as_a_renewal_completes(steps: int, patience: float = WAIT) -> None:
    store = _AnswerOnCue()
    now = time.time()
    record = IdempotencyRecord("k", RecordState.IN_PROGRESS, "me", now + 60, now + 120)
    assert await store.claim(record, now) is None
    lease = _Lease(store, "k", "me", 0.03, claimed_at=time.monotonic())
    lease.start()
    await asyncio.wait_for(store.entered.wait(), WAIT)
    assert store.cue is not None
    store.cue.set_result(None)  # the renewal completes...
    for _ in range(steps):  # ... and stop() is called this many loop steps later
        await asyncio.sleep(0)
    try:
        await asyncio.wait_for(lease.stop(), patience)
    except TimeoutError as e:
        raise AssertionError(f"stop() never returned ({steps} steps after the renewal completed)") from e


@pytest.mark.parametrize("steps", [0, 1, 2, 3])
async def test_stop_returns_whenever_it_meets_a_completing_renewal(steps: int) -> None:
    # Was: the renewal ran under asyncio.wait_for, which on Python 3.11 swallows a cancellation that arrives as the
    # awaited call completes; the heartbeat went on, and stop() (awaited by every ending invocation) waited forever.
    # Seen as a session turn that never ended in `hatch run stress`.
    await _stop_as_a_renewal_completes(steps)


async def _renew_forever_with_wait_for(self: _Lease) -> None:
    """The heartbeat of old: renewals under asyncio.wait_for, and no flag of its own to stop on."""
    while True:
        await asyncio.sleep(self.lease_seconds / 3)
        renewed = await asyncio.wait_for(
            self.store.renew(self.key, self.owner, time.time() + self.lease_seconds, None), WAIT
        )
        if renewed:
            self._renewed(time.monotonic())


@pytest.mark.xfail(raises=AssertionError, strict=True, reason="negative control: wait_for swallows stop()'s cancel")
async def test_negative_control_a_heartbeat_under_wait_for_never_stops(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_Lease, "_renew_forever", _renew_forever_with_wait_for)
    for steps in range(4):
        await _stop_as_a_renewal_completes(steps, patience=2.0)  # a hang is the expected failure: no need to wait long
