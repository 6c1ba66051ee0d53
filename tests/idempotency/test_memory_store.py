"""InMemoryIdempotencyStore beyond the shared contract: its bound on entries, and what it evicts."""

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
)


def _claim(key: str, owner: str, now: float, *, lease: float = 60.0, ttl: float = 3600.0) -> IdempotencyRecord:
    return IdempotencyRecord(key, RecordState.IN_PROGRESS, owner, now + lease, now + lease + ttl, "fp")


def _completed(key: str, owner: str, now: float, *, ttl: float = 3600.0) -> IdempotencyRecord:
    return IdempotencyRecord(key, RecordState.COMPLETED, owner, now, now + ttl, "fp", b"z")


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
        if existing is not None and existing.is_live(now):
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
    assert await store.claim(_claim("s#1", "a", now), now) is None
    assert await store.claim(_claim("s#2", "b", now), now) is None
    with pytest.raises(IdempotencyStoreError, match=r"full of running claims .*; raise max_entries"):
        await store.claim(_claim("s#3", "c", now), now)
    assert len(store) == 2
    # keys already held still answer: a duplicate sees its claim, the owner re-claims, takes over when lapsed
    existing = await store.claim(_claim("s#1", "x", now), now)
    assert existing is not None and existing.owner == "a"
    assert await store.claim(_claim("s#1", "a", now), now) is None
    # a release frees a slot
    assert await store.release("s#2", "b") is True
    assert await store.claim(_claim("s#3", "c", now), now) is None


async def test_expired_records_and_lapsed_claims_go_before_live_completed_ones() -> None:
    store = InMemoryIdempotencyStore(max_entries=4)
    now = time.time()
    await store.claim(_claim("s#expired", "a", now - 100), now - 100)
    await store.complete(_completed("s#expired", "a", now - 100, ttl=10))
    await store.claim(_claim("s#lapsed", "b", now - 100, lease=10), now - 100)
    await store.claim(_claim("s#done", "c", now), now)
    await store.complete(_completed("s#done", "c", now))
    await store.claim(_claim("s#running", "d", now), now)
    assert len(store) == 4
    # the one claim that needs room evicts both records that no longer decide anything, and nothing else
    assert await store.claim(_claim("s#new", "e", now), now) is None
    assert len(store) == 3
    assert {k for k in ("s#expired", "s#lapsed", "s#done", "s#running", "s#new") if store._lookup(k)} == {
        "s#done",
        "s#running",
        "s#new",
    }
    # the lapsed claim's owner comes back: fenced off
    assert await store.renew("s#lapsed", "b", now + 60) is False


async def test_least_recently_used_completed_record_goes_when_nothing_expired() -> None:
    store = InMemoryIdempotencyStore(max_entries=4)
    now = time.time()
    for key in ("s#1", "s#2", "s#3"):
        await store.claim(_claim(key, "o", now), now)
        await store.complete(_completed(key, "o", now))
    await store.claim(_claim("s#run", "r", now), now)
    # s#1 is replayed (a claim that finds it) and s#2 polled (a read): s#3 is now the least recently used
    assert (await store.claim(_claim("s#1", "x", now), now)) is not None
    assert await store.get("s#2") is not None
    assert await store.claim(_claim("s#new", "n", now), now) is None
    assert await store.get("s#3") is None
    assert all([await store.get(k) for k in ("s#1", "s#2", "s#run", "s#new")])
    assert await store.claim(_claim("s#newer", "n", now), now) is None
    assert await store.get("s#1") is None  # then the next least recently used one


async def test_a_renewed_claim_is_not_evicted_at_its_old_deadline() -> None:
    store = InMemoryIdempotencyStore(max_entries=2)
    now = time.time()
    await store.claim(_claim("s#long", "a", now - 20, lease=10), now - 20)  # lapsed at now - 10 ...
    assert await store.renew("s#long", "a", now + 60) is True  # ... but renewed (the heartbeat caught up)
    await store.claim(_claim("s#other", "b", now), now)
    with pytest.raises(IdempotencyStoreError):
        await store.claim(_claim("s#new", "c", now), now)
    got = await store.get("s#long")
    assert got is not None and got.owner == "a"


async def test_get_drops_an_expired_record() -> None:
    store = InMemoryIdempotencyStore()
    now = time.time()
    await store.claim(_claim("s#k", "a", now - 100, lease=10, ttl=10), now - 100)
    assert len(store) == 1
    assert await store.get("s#k") is None
    assert len(store) == 0


async def test_the_heap_of_deadlines_stays_bounded_under_heartbeats() -> None:
    store = InMemoryIdempotencyStore(max_entries=10)
    now = time.time()
    for i in range(5):
        await store.claim(_claim(f"s#{i}", "a", now), now)
    for beat in range(10_000):
        assert await store.renew(f"s#{beat % 5}", "a", now + 60 + beat)
    assert len(store) == 5
    assert len(store._deadlines) <= 2 * len(store) + 64 + 1
    got = await store.get("s#4")
    assert got is not None and got.lease_expires_at == now + 60 + 9_999


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
