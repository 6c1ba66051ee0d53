"""InMemoryIdempotencyStore beyond the shared contract: its bound on entries, what it evicts, and when it collects.

The store judges a claim's silence on this process's monotonic clock, from the claim's last write. Tests that need a
claim to fall silent move a fake clock (``_Clock``, standing in for the ``time`` module inside ``memory.py``) instead
of sleeping: the wall clock and the monotonic clock move separately, so a test can step one without the other.
"""

from __future__ import annotations

import time
from collections import OrderedDict

import pytest

from strands_py.idempotency import (
    IdempotencyRecord,
    IdempotencyStore,
    IdempotencyStoreError,
    InMemoryIdempotencyStore,
    RecordState,
    memory,
)
from strands_py.idempotency.record import new_version


def _claim(key: str, owner: str, now: float, *, lease: float = 60.0, ttl: float = 3600.0) -> IdempotencyRecord:
    return IdempotencyRecord(
        key=key,
        state=RecordState.IN_PROGRESS,
        owner=owner,
        version=new_version(),
        lease_seconds=lease,
        expires_at=now + lease + ttl,
        fingerprint="fp",
    )


def _completed(key: str, owner: str, now: float, *, ttl: float = 3600.0) -> IdempotencyRecord:
    return IdempotencyRecord(
        key=key,
        state=RecordState.COMPLETED,
        owner=owner,
        version=new_version(),
        lease_seconds=0.0,
        expires_at=now + ttl,
        fingerprint="fp",
        payload=b"z",
    )


async def _renew(store: IdempotencyStore, key: str, owner: str, now: float, *, lease: float = 60.0) -> bool:
    """A heartbeat: a new version, the lease, and the expiry an hour past the lease."""
    return await store.renew(key, owner, version=new_version(), lease_seconds=lease, expires_at=now + lease + 3600)


class _Clock:
    """Stands in for the ``time`` module inside ``memory.py``: a wall clock and a monotonic clock the test moves."""

    def __init__(self) -> None:
        self.wall = time.time()
        self.mono = 1_000.0

    def time(self) -> float:
        return self.wall

    def monotonic(self) -> float:
        return self.mono

    def advance(self, seconds: float) -> None:
        """Both clocks move on together, as they do on a host whose wall clock does not step."""
        self.wall += seconds
        self.mono += seconds


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> _Clock:
    fake = _Clock()
    monkeypatch.setattr(memory, "time", fake)
    return fake


def _held(store: InMemoryIdempotencyStore, *keys: str) -> set[str]:
    """Which of ``keys`` the store holds, read without touching recency or expiry."""
    return {k for k in keys if k in store._claims or k in store._completed}


def test_rejects_bad_bounds() -> None:
    with pytest.raises(ValueError):
        InMemoryIdempotencyStore(max_entries=0)
    with pytest.raises(ValueError):
        InMemoryIdempotencyStore(max_result_bytes=0)


async def _other_agents_run(store: IdempotencyStore, now: float, runs: int) -> None:
    """Other agents sharing the store: each run claims its own token and completes it."""
    for i in range(runs):
        key = f"agent-{i % 4}#token-{i}"
        assert await store.claim(_claim(key, f"run-{i}", now), now) is None
        assert await store.complete(_completed(key, f"run-{i}", now))


async def test_a_running_claim_survives_more_claims_than_max_entries() -> None:
    """Issue 8 §3: during one long run, other agents' claims beyond ``max_entries`` never evict it."""
    await _running_claim_survives(InMemoryIdempotencyStore(max_entries=3))


async def _running_claim_survives(store: IdempotencyStore) -> None:
    now = time.time()
    assert await store.claim(_claim("booking#order-1", "primary", now), now) is None
    await _other_agents_run(store, now, runs=25)
    # a retry of the running invocation is still a duplicate: it must not run the tools a second time
    existing = await store.claim(_claim("booking#order-1", "retry", now), now)
    assert existing is not None and existing.owner == "primary" and existing.state is RecordState.IN_PROGRESS
    assert await store.complete(_completed("booking#order-1", "primary", now)) is True


class _OldLruStore(InMemoryIdempotencyStore):
    """Negative control: the previous store, one LRU over every record, running claims included."""

    def __init__(self, *, max_entries: int) -> None:
        super().__init__(max_entries=max_entries)
        self._lru: OrderedDict[str, IdempotencyRecord] = OrderedDict()

    async def claim(self, record: IdempotencyRecord, now: float) -> IdempotencyRecord | None:
        existing = self._lru.get(record.key)
        if existing is not None and not existing.expired(now):
            self._lru.move_to_end(record.key)
            return existing
        self._lru[record.key] = record
        while len(self._lru) > self.max_entries:
            self._lru.popitem(last=False)
        return None

    async def complete(self, record: IdempotencyRecord) -> bool:
        existing = self._lru.get(record.key)
        if existing is None or existing.owner != record.owner or existing.state is not RecordState.IN_PROGRESS:
            return False
        self._lru[record.key] = record
        return True


@pytest.mark.xfail(strict=True, raises=AssertionError)
async def test_negative_control_plain_lru_evicts_the_running_claim() -> None:
    await _running_claim_survives(_OldLruStore(max_entries=3))


async def test_full_of_running_claims_refuses_new_claims() -> None:
    store = InMemoryIdempotencyStore(max_entries=2)
    now = time.time()
    first = _claim("s#1", "a", now)
    assert await store.claim(first, now) is None
    assert await store.claim(_claim("s#2", "b", now), now) is None
    with pytest.raises(IdempotencyStoreError, match=r"full of running claims .*; raise max_entries"):
        await store.claim(_claim("s#3", "c", now), now)
    assert len(store) == 2
    # keys already held still answer: a duplicate sees its claim, the owner re-claims ...
    existing = await store.claim(_claim("s#1", "x", now), now)
    assert existing is not None and existing.owner == "a"
    assert await store.claim(first, now) is None
    # ... and a waiter that judged the owner gone takes it over: replacing a record needs no room
    taker = _claim("s#1", "taker", now)
    assert await store.take_over(taker, first.version) is True
    assert await store.get("s#1") == taker and len(store) == 2
    # a release frees a slot
    assert await store.release("s#2", "b") is True
    assert await store.claim(_claim("s#3", "c", now), now) is None


async def test_eviction_order_expired_then_lru_completed_then_abandoned_claims_never_a_live_one(clock: _Clock) -> None:
    """Expired results, then the least recently used result, then claims nobody holds; a live claim never."""
    store = InMemoryIdempotencyStore(max_entries=5)
    start = clock.wall
    # written in this order, so the claims are, oldest write first: silent, yielded, running
    assert await store.claim(_claim("s#silent", "a", start, lease=10), start) is None  # its owner never beats again
    assert await store.claim(_claim("s#yielded", "b", start, lease=10), start) is None
    assert await store.renew("s#yielded", "b", version=new_version(), lease_seconds=0, expires_at=start + 3600)
    assert await store.claim(_claim("s#running", "c", start, lease=10), start) is None
    for key, ttl in (("s#expired", 10.0), ("s#done", 3600.0)):
        assert await store.claim(_claim(key, "d", start), start) is None
        assert await store.complete(_completed(key, "d", start, ttl=ttl))
    clock.advance(9)
    assert await _renew(store, "s#running", "c", clock.wall, lease=10)  # the running owner's heartbeat
    clock.advance(2)  # s#silent has now been silent for 11 s, a whole lease; s#running for 2 s
    everything = ("s#expired", "s#done", "s#silent", "s#yielded", "s#running")

    assert await store.claim(_claim("s#new-1", "n", clock.wall), clock.wall) is None
    assert _held(store, *everything) == set(everything) - {"s#expired"}
    # a live result goes before a claim that would only be taken over: its token runs again on its next retry
    assert await store.claim(_claim("s#new-2", "n", clock.wall), clock.wall) is None
    assert _held(store, *everything) == {"s#silent", "s#yielded", "s#running"}
    # then the oldest-written claim, silent for a whole lease: its owner, should it come back, is fenced off
    assert await store.claim(_claim("s#new-3", "n", clock.wall), clock.wall) is None
    assert _held(store, *everything) == {"s#yielded", "s#running"}
    assert await _renew(store, "s#silent", "a", clock.wall, lease=10) is False
    # then a yielded one
    assert await store.claim(_claim("s#new-4", "n", clock.wall), clock.wall) is None
    assert _held(store, *everything) == {"s#running"}
    # the running claim is never evicted ...
    with pytest.raises(IdempotencyStoreError, match="full of running claims"):
        await store.claim(_claim("s#new-5", "n", clock.wall), clock.wall)
    assert _held(store, *everything) == {"s#running"} and len(store) == 5
    # ... until its owner falls silent for a whole lease
    clock.advance(10)
    assert await store.claim(_claim("s#new-5", "n", clock.wall), clock.wall) is None
    assert _held(store, *everything) == set()


async def _a_renewed_claim_is_not_evicted_at_its_old_deadline(store: InMemoryIdempotencyStore, clock: _Clock) -> None:
    start = clock.wall
    assert await store.claim(_claim("s#long", "a", start, lease=10), start) is None
    clock.advance(9)
    assert await _renew(store, "s#long", "a", clock.wall, lease=10)  # the heartbeat, within the lease
    clock.advance(5)  # 14 s after the claim, 5 s after the renewal
    with pytest.raises(IdempotencyStoreError, match="full of running claims"):
        await store.claim(_claim("s#new", "b", clock.wall), clock.wall)
    got = await store.get("s#long")
    assert got is not None and got.owner == "a"


async def test_a_renewed_claim_is_not_evicted_at_its_old_deadline(clock: _Clock) -> None:
    await _a_renewed_claim_is_not_evicted_at_its_old_deadline(InMemoryIdempotencyStore(max_entries=1), clock)


class _SilenceCountedFromTheClaim(InMemoryIdempotencyStore):
    """Negative control: a renewal keeps the claim's first write time, so silence is counted from the claim."""

    async def renew(self, key: str, owner: str, **kwargs: object) -> bool:
        first = self._claims.get(key)
        renewed = await super().renew(key, owner, **kwargs)  # type: ignore[arg-type]
        if renewed and first is not None:
            self._claims[key].written_at = first.written_at
        return renewed


@pytest.mark.xfail(strict=True, raises=pytest.fail.Exception)
async def test_negative_control_silence_counted_from_the_claim_evicts_a_renewed_claim(clock: _Clock) -> None:
    await _a_renewed_claim_is_not_evicted_at_its_old_deadline(_SilenceCountedFromTheClaim(max_entries=1), clock)


async def test_a_claim_is_collected_a_monotonic_duration_after_its_last_write(clock: _Clock) -> None:
    """``expires_at`` of a claim counts as a duration from its last write: a wall clock that steps collects nothing."""
    store = InMemoryIdempotencyStore()
    start = clock.wall
    assert await store.claim(_claim("s#k", "a", start, lease=10, ttl=20), start) is None  # collectable in 30 s
    clock.wall += 30 * 86_400.0  # the host's wall clock steps a month ahead
    assert await store.get("s#k") is not None
    # nor does a caller whose clock runs ahead: its claim meets the running one
    existing = await store.claim(_claim("s#k", "b", clock.wall), clock.wall)
    assert existing is not None and existing.owner == "a"
    clock.mono += 25
    # the owner's heartbeat moves expiry 30 s past its own (stepped) wall clock: collection moves to 30 s from now
    assert await store.renew("s#k", "a", version=new_version(), lease_seconds=10, expires_at=clock.wall + 30)
    clock.mono += 29
    assert await store.get("s#k") is not None
    clock.mono += 1
    assert await store.get("s#k") is None and len(store) == 0


async def test_get_drops_an_expired_record() -> None:
    store = InMemoryIdempotencyStore()
    now = time.time()
    await store.claim(_claim("s#k", "a", now - 100, lease=10, ttl=10), now - 100)
    assert len(store) == 1
    assert await store.get("s#k") is None
    assert len(store) == 0
    await store.claim(_claim("s#done", "a", now), now)
    await store.complete(_completed("s#done", "a", now - 100, ttl=10))
    assert await store.get("s#done") is None
    assert len(store) == 0


async def test_heartbeats_leave_the_heap_alone_and_it_stays_bounded_under_rewritten_results() -> None:
    store = InMemoryIdempotencyStore(max_entries=10)
    now = time.time()
    for i in range(5):
        await store.claim(_claim(f"s#{i}", "a", now), now)
    last = ""
    for beat in range(10_000):
        last = new_version()
        assert await store.renew(f"s#{beat % 5}", "a", version=last, lease_seconds=60, expires_at=now + 60 + beat)
    assert len(store) == 5 and store._deadlines == []  # the heap holds results' expiry only
    got = await store.get("s#4")
    assert got is not None and got.version == last and got.expires_at == now + 60 + 9_999
    # each result expires and its key runs again: every completion pushes a deadline, the old ones go stale
    for run in range(2_000):
        at = now + 2 * run
        key = f"s#result-{run % 5}"
        owner = f"run-{run}"
        assert await store.claim(_claim(key, owner, at), at) is None  # the previous result expired at `at`
        assert await store.complete(_completed(key, owner, at, ttl=2))
    assert len(store) == 10
    assert len(store._deadlines) <= 2 * 5 + 64 + 1


async def test_many_claims_on_a_full_store_of_completed_records_stay_fast() -> None:
    """The hot path when full: each new claim pops one LRU record, without a scan (a scan would be 20k x 20k)."""
    store = InMemoryIdempotencyStore(max_entries=20_000)
    now = time.time()
    for i in range(40_000):
        key = f"s#{i}"
        assert await store.claim(_claim(key, "o", now), now) is None
        assert await store.complete(_completed(key, "o", now))
    assert len(store) == 20_000
    assert await store.get("s#19999") is None and await store.get("s#20000") is not None
