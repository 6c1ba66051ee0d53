"""Heartbeats and the waiter's judgement: a live owner is never taken over, a silent one is; a primary that loses its
lease stops; no renewal task outlives a run; ``LeaseWatch`` counts a whole lease per version on the monotonic clock.

"Another process" is another agent whose store is a different wrapper around the same in-memory store: it shares
the records but not the in-process registry, so it waits on the store as a remote process would.
"""

from __future__ import annotations

import asyncio
import sys
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
    _heartbeat,
)
from strands_py.idempotency._heartbeat import LeaseWatch, _Lease
from strands_py.idempotency.keys import make_key
from strands_py.idempotency.record import new_version
from strands_py.testing import CountingStore, ScriptedBedrock
from strands_py.turn import _claim

WAIT = 20.0
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


async def _a_live_owner_is_never_taken_over() -> None:
    gate = threading.Event()
    script = ScriptedBedrock(gate=gate, gate_timeout=WAIT)
    shared = InMemoryIdempotencyStore()
    owner_store, other_store = CountingStore(shared), CountingStore(shared)
    other_script = ScriptedBedrock()
    # Both agents are built first: building one (its boto3 client) blocks the event loop for up to a second or more
    # on a loaded machine, and the owner's heartbeat runs on that loop.
    owner, other = _agent(script, owner_store), _agent(other_script, other_store)
    primary = asyncio.create_task(owner.invoke_async("weather?", idempotency_token="req-1"))
    await _until(script.entered.is_set, WAIT, "the primary's model call")
    waiting = asyncio.create_task(other.invoke_async("weather?", idempotency_token="req-1"))
    # three whole leases of renewals (nine heartbeats) while the other process polls, then let the run finish; or
    # stop as soon as the other process runs the token itself (what the negative controls below do)
    await _until(
        lambda: other_script.entered.is_set() or (owner_store.calls["renew"] >= 9 and other_store.calls["get"] >= 3),
        WAIT,
        "three leases",
    )
    gate.set()
    result, replay = await asyncio.wait_for(asyncio.gather(primary, waiting, return_exceptions=True), WAIT)
    assert other_script.model_calls == 0 and other_store.calls["take_over"] == 0, "a live owner was taken over"
    assert not isinstance(result, ReplayedAgentResult) and isinstance(replay, ReplayedAgentResult)
    assert script.model_calls == 2
    assert other_store.calls["claim"] == 1
    assert not _heartbeats()


@pytest.mark.racing
async def test_a_run_many_leases_long_keeps_its_claim_and_runs_once() -> None:
    await _a_live_owner_is_never_taken_over()


@pytest.mark.racing
@pytest.mark.xfail(strict=True, raises=AssertionError)
async def test_negative_control_without_heartbeats_the_other_process_runs_it_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_Lease, "start", lambda self: None)
    await _a_live_owner_is_never_taken_over()


class _FirstSightWatch(LeaseWatch):
    """Negative control: counts one lease from the first record seen, whatever versions the owner wrote since."""

    def remaining(self, record: IdempotencyRecord, read_at: float) -> float:
        if record.yielded:
            return 0.0
        if self._version is None:
            self._version, self._since = record.version, read_at
        return max(0.0, self._since + record.lease_seconds - time.monotonic())


@pytest.mark.racing
@pytest.mark.xfail(strict=True, raises=AssertionError)
async def test_negative_control_a_waiter_blind_to_new_versions_takes_a_live_owner_over(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_claim, "LeaseWatch", _FirstSightWatch)
    await _a_live_owner_is_never_taken_over()


@pytest.mark.racing
async def test_an_owner_silent_for_a_lease_is_taken_over_and_the_token_runs_once_more() -> None:
    """The owner's process died mid-run (its heartbeat stopped): the other process takes over and runs the token."""
    gate = threading.Event()
    script = ScriptedBedrock(gate=gate, gate_timeout=WAIT)
    shared = InMemoryIdempotencyStore()
    owner_store, other_store = CountingStore(shared), CountingStore(shared)
    primary = asyncio.create_task(_agent(script, owner_store).invoke_async("weather?", idempotency_token="req-1"))
    await _until(lambda: script.entered.is_set() and owner_store.calls["renew"] >= 1, WAIT, "a heartbeat")
    heartbeat = _heartbeats()
    assert len(heartbeat) == 1
    heartbeat[0].cancel()  # the owner falls silent: nothing renews its claim any more
    other_script = ScriptedBedrock()
    taken = await asyncio.wait_for(
        _agent(other_script, other_store).invoke_async("weather?", idempotency_token="req-1"), WAIT
    )
    assert not isinstance(taken, ReplayedAgentResult) and other_script.model_calls == 2
    assert other_store.calls["take_over"] == 1
    gate.set()
    # the silent owner comes back: it lost its lease and stores nothing over the result
    with pytest.raises(IdempotencyLeaseLostError):
        await asyncio.wait_for(primary, WAIT)
    assert script.tool_calls == 0 and owner_store.calls["complete"] == 0 and other_store.calls["complete"] == 1
    stored = await shared.get(make_key("s", "req-1"))
    assert stored is not None and stored.state is RecordState.COMPLETED
    assert not _heartbeats()


async def _usurp(store: IdempotencyStore, key: str) -> None:
    """Another process judged our claim abandoned and took it over: a compare-and-set on the version it read."""
    for _ in range(10):  # a renewal of ours between its read and its write makes it read again
        held = await store.get(key)
        assert held is not None and held.state is RecordState.IN_PROGRESS
        now = time.time()
        usurper = IdempotencyRecord(
            key=key,
            state=RecordState.IN_PROGRESS,
            owner="usurper",
            version=new_version(),
            lease_seconds=60.0,
            expires_at=now + 3660,
            fingerprint=held.fingerprint,
        )
        if await store.take_over(usurper, held.version):
            return
    raise AssertionError("could not take the claim over")


@pytest.mark.racing
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

    async def renew(self, key: str, owner: str, **fields: Any) -> bool:
        self.calls["renew"] += 1
        if self.failures is None or self.failures > 0:
            if self.failures is not None:
                self.failures -= 1
            raise ConnectionError("store unreachable")
        return await self.inner.renew(key, owner, **fields)


@pytest.mark.racing
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


@pytest.mark.racing
async def test_a_store_unreachable_for_a_whole_lease_loses_the_lease() -> None:
    gate = threading.Event()
    script = ScriptedBedrock(gate=gate, gate_timeout=WAIT)
    store = _FlakyRenewStore(InMemoryIdempotencyStore(), failures=None)
    agent = _agent(script, store)
    primary = asyncio.create_task(agent.invoke_async("weather?", idempotency_token="req-1"))
    await _until(script.entered.is_set, WAIT, "the primary's model call")
    # The heartbeat task starts when the first renewal is due: it has once it tried one.
    await _until(lambda: store.calls["renew"] >= 1 and not _heartbeats(), WAIT, "the heartbeat to give up")
    gate.set()
    with pytest.raises(IdempotencyLeaseLostError, match="whole lease"):
        await asyncio.wait_for(primary, WAIT)
    assert script.tool_calls == 0


@pytest.mark.racing
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
    # Started when its first renewal is due (a third of a lease in), while the model call waits for the gate.
    await _until(lambda: len(_heartbeats()) == 1, WAIT, "the heartbeat to start")
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

    async def renew(self, key: str, owner: str, **fields: Any) -> bool:
        self.cue = asyncio.get_running_loop().create_future()
        self.entered.set()
        await self.cue
        return await super().renew(key, owner, **fields)


async def _stop_as_a_renewal_completes(steps: int, patience: float = WAIT) -> None:
    store = _AnswerOnCue()
    now = time.time()
    record = IdempotencyRecord("k", RecordState.IN_PROGRESS, "me", new_version(), 60.0, now + 120)
    assert await store.claim(record, now) is None
    lease = _Lease(store, "k", "me", 0.03, expires_after_seconds=60.0, claimed_at=time.monotonic())
    lease.start()
    await asyncio.wait_for(store.entered.wait(), WAIT)
    assert store.cue is not None
    store.cue.set_result(None)  # the renewal completes...
    for _ in range(steps):  # ... and stop() is called this many loop steps later
        await asyncio.sleep(0)
    try:
        await asyncio.wait_for(lease.stop(), patience)
    except asyncio.TimeoutError as e:  # wait_for's, which is not the builtin TimeoutError on Python 3.10
        raise AssertionError(f"stop() never returned ({steps} steps after the renewal completed)") from e


@pytest.mark.racing
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
        renewed = await asyncio.wait_for(self._renew(self.lease_seconds, None), WAIT)
        if renewed:
            self._renewed(time.monotonic())


@pytest.mark.racing
@pytest.mark.skipif(sys.version_info >= (3, 12), reason="wait_for is built on asyncio.timeout from 3.12: no swallowing")
@pytest.mark.xfail(raises=AssertionError, strict=True, reason="negative control: wait_for swallows stop()'s cancel")
async def test_negative_control_a_heartbeat_under_wait_for_never_stops(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_Lease, "_renew_forever", _renew_forever_with_wait_for)
    for steps in range(4):
        await _stop_as_a_renewal_completes(steps, patience=2.0)  # a hang is the expected failure: no need to wait long


# LeaseWatch: the waiter's judgement, on a monotonic clock the test moves (``_Monotonic`` stands in for ``time``).


class _Monotonic:
    def __init__(self) -> None:
        self.now = 500.0

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def mono(monkeypatch: pytest.MonkeyPatch) -> _Monotonic:
    fake = _Monotonic()
    monkeypatch.setattr(_heartbeat, "time", fake)
    return fake


def _held(version: str, *, lease: float = 1.0, expires_at: float = 0.0) -> IdempotencyRecord:
    """Another owner's claim, as a read returned it (expires_at in the past: no clock may judge it)."""
    return IdempotencyRecord("s#k", RecordState.IN_PROGRESS, "owner", version, lease, expires_at)


def test_a_watch_judges_a_version_seen_for_a_whole_lease(mono: _Monotonic) -> None:
    watch = LeaseWatch()
    assert watch.remaining(_held("v1"), mono.now) == 1.0
    mono.now += 0.5
    assert watch.remaining(_held("v1"), mono.now) == 0.5  # the same version read again: the count goes on
    mono.now += 0.25
    assert watch.remaining(_held("v1"), mono.now) == 0.25
    mono.now += 0.25
    assert watch.remaining(_held("v1"), mono.now) == 0.0
    mono.now += 60
    assert watch.remaining(_held("v1"), mono.now) == 0.0


def test_a_new_version_restarts_the_count(mono: _Monotonic) -> None:
    watch = LeaseWatch()
    assert watch.remaining(_held("v1"), mono.now) == 1.0
    mono.now += 0.75
    assert watch.remaining(_held("v2"), mono.now) == 1.0  # the owner renewed: a whole lease from this read
    mono.now += 0.75  # 1.5 s after v1 was first seen, 0.75 s after v2
    assert watch.remaining(_held("v2"), mono.now) == 0.25
    mono.now += 0.25
    assert watch.remaining(_held("v2"), mono.now) == 0.0
    # another owner took over (a new version too): watched afresh, for the lease that record carries
    assert watch.remaining(_held("v3", lease=2.0), mono.now) == 2.0
    mono.now += 1.5
    assert watch.remaining(_held("v3", lease=2.0), mono.now) == 0.5


def test_the_count_starts_when_the_read_returned(mono: _Monotonic) -> None:
    watch = LeaseWatch()
    read_at = mono.now
    mono.now += 0.25  # judged a little after the read returned
    assert watch.remaining(_held("v1"), read_at) == 0.75
    mono.now += 0.5
    assert watch.remaining(_held("v1"), mono.now) == 0.25  # a later read of the same version does not move it


def test_a_yielded_record_is_takeable_at_once(mono: _Monotonic) -> None:
    assert LeaseWatch().remaining(_held("v1", lease=0.0), mono.now) == 0.0
    watch = LeaseWatch()
    assert watch.remaining(_held("v1"), mono.now) == 1.0
    mono.now += 0.25
    assert watch.remaining(_held("v2", lease=0.0), mono.now) == 0.0  # its owner yielded it mid-watch
    assert watch.remaining(_held("v3"), mono.now) == 1.0  # claimed again with a lease: watched afresh


def test_a_watch_never_reads_the_wall_clock(mono: _Monotonic) -> None:
    """Only the monotonic clock counts: a record's ``expires_at``, however far past or ahead, changes nothing."""
    watch = LeaseWatch()
    assert watch.remaining(_held("v1", expires_at=0.0), mono.now) == 1.0
    assert watch.remaining(_held("v1", expires_at=time.time() + 86_400), mono.now) == 1.0
    assert not hasattr(mono, "time")  # _heartbeat.time.time() would raise AttributeError
