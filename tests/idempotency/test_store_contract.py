"""The storage contract, run against InMemoryIdempotencyStore and DynamoDBIdempotencyStore (moto)."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any
from unittest import mock

import pytest
from conftest import make_dynamodb_store
from moto import mock_aws

from strands_py.idempotency import IdempotencyRecord, IdempotencyStore, InMemoryIdempotencyStore, RecordState

WAIT = 10.0


def _claim(key: str, owner: str, *, now: float, lease: float = 60.0, ttl: float = 3600.0, fp: str = "fp") -> Any:
    return IdempotencyRecord(key, RecordState.IN_PROGRESS, owner, now + lease, now + lease + ttl, fp)


def _completed(key: str, owner: str, *, now: float, ttl: float = 3600.0, payload: bytes = b"z") -> Any:
    return IdempotencyRecord(key, RecordState.COMPLETED, owner, now, now + ttl, "fp", payload)


async def test_first_claim_wins_and_others_see_it(store: IdempotencyStore) -> None:
    now = time.time()
    assert await store.claim(_claim("s#k", "a", now=now), now) is None
    existing = await store.claim(_claim("s#k", "b", now=now), now)
    assert existing is not None and existing.owner == "a" and existing.state is RecordState.IN_PROGRESS
    assert existing.fingerprint == "fp"
    got = await store.get("s#k")
    assert got is not None and got.owner == "a"
    assert await store.get("s#missing") is None


@pytest.mark.racing
def test_claim_race_sixteen_threads_one_owner(store: IdempotencyStore) -> None:
    # The DynamoDB store's client is serialised (conftest.SerialisedClient): moto is not atomic under threads.
    start = threading.Barrier(16)
    winners: list[str] = []
    mutex = threading.Lock()

    def contender(owner: str) -> None:
        start.wait(WAIT)
        now = time.time()
        if asyncio.run(store.claim(_claim("s#race", owner, now=now), now)) is None:
            with mutex:
                winners.append(owner)

    threads = [threading.Thread(target=contender, args=(f"owner-{i}",)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT)
    assert len(winners) == 1


async def test_complete_and_release_are_fenced_on_the_owner(store: IdempotencyStore) -> None:
    now = time.time()
    await store.claim(_claim("s#k", "a", now=now), now)
    assert await store.complete(_completed("s#k", "intruder", now=now)) is False
    assert await store.release("s#k", "intruder") is False
    got = await store.get("s#k")
    assert got is not None and got.owner == "a" and got.state is RecordState.IN_PROGRESS
    assert await store.complete(_completed("s#k", "a", now=now, payload=b"zdata")) is True
    done = await store.get("s#k")
    assert done is not None and done.state is RecordState.COMPLETED and done.payload == b"zdata"
    # a completed record is no longer releasable, not even by its owner
    assert await store.release("s#k", "a") is False
    assert await store.complete(_completed("s#k", "a", now=now)) is False


async def test_release_lets_the_next_claim_run(store: IdempotencyStore) -> None:
    now = time.time()
    await store.claim(_claim("s#k", "a", now=now), now)
    assert await store.release("s#k", "a") is True
    assert await store.get("s#k") is None
    assert await store.claim(_claim("s#k", "b", now=now), now) is None


async def test_lease_takeover_fences_the_old_owner(store: IdempotencyStore) -> None:
    now = time.time()
    await store.claim(_claim("s#k", "crashed", now=now - 10, lease=5), now - 10)
    # the lease lapsed 5 s ago: the claim is not live any more and is taken over
    assert await store.claim(_claim("s#k", "new", now=now), now) is None
    assert await store.complete(_completed("s#k", "crashed", now=now)) is False
    assert await store.release("s#k", "crashed") is False
    got = await store.get("s#k")
    assert got is not None and got.owner == "new"


async def test_expired_completed_record_is_replaced(store: IdempotencyStore) -> None:
    now = time.time()
    await store.claim(_claim("s#k", "a", now=now - 100), now - 100)
    await store.complete(_completed("s#k", "a", now=now - 100, ttl=10))
    assert await store.claim(_claim("s#k", "b", now=now), now) is None


async def test_live_completed_record_blocks_claims(store: IdempotencyStore) -> None:
    now = time.time()
    await store.claim(_claim("s#k", "a", now=now), now)
    await store.complete(_completed("s#k", "a", now=now))
    existing = await store.claim(_claim("s#k", "b", now=now), now)
    assert existing is not None and existing.state is RecordState.COMPLETED


async def test_keys_of_different_scopes_are_independent(store: IdempotencyStore) -> None:
    now = time.time()
    assert await store.claim(_claim("tenant-a#same-hash", "a", now=now), now) is None
    assert await store.claim(_claim("tenant-b#same-hash", "b", now=now), now) is None
    got_a, got_b = await store.get("tenant-a#same-hash"), await store.get("tenant-b#same-hash")
    assert got_a is not None and got_b is not None and (got_a.owner, got_b.owner) == ("a", "b")


async def test_renew_extends_the_lease_and_never_lowers_the_expiry(store: IdempotencyStore) -> None:
    now = time.time()
    await store.claim(_claim("s#k", "a", now=now, lease=10, ttl=100), now)
    # a lease still inside the expiry: the lease moves, the expiry stays
    assert await store.renew("s#k", "a", now + 50) is True
    got = await store.get("s#k")
    assert got is not None and got.lease_expires_at == now + 50 and got.expires_at == now + 110
    # a lease past the expiry: the expiry is raised to the lease
    assert await store.renew("s#k", "a", now + 500.25) is True
    got = await store.get("s#k")
    assert got is not None and got.lease_expires_at == now + 500.25 and got.expires_at == now + 500.25
    # a shorter lease again: the expiry is not lowered
    assert await store.renew("s#k", "a", now + 20) is True
    got = await store.get("s#k")
    assert got is not None and got.lease_expires_at == now + 20 and got.expires_at == now + 500.25
    assert got.state is RecordState.IN_PROGRESS and got.owner == "a" and got.fingerprint == "fp"


async def test_renew_stores_the_checkpoint_and_none_keeps_it(store: IdempotencyStore) -> None:
    now = time.time()
    await store.claim(_claim("s#k", "a", now=now), now)
    assert await store.renew("s#k", "a", now + 60, checkpoint="messages=3") is True
    got = await store.get("s#k")
    assert got is not None and got.checkpoint == "messages=3"
    assert await store.renew("s#k", "a", now + 90) is True
    got = await store.get("s#k")
    assert got is not None and got.checkpoint == "messages=3" and got.lease_expires_at == now + 90
    assert await store.renew("s#k", "a", now + 90, checkpoint="") is True
    got = await store.get("s#k")
    assert got is not None and got.checkpoint == ""


async def test_renew_is_fenced_on_owner_and_in_progress(store: IdempotencyStore) -> None:
    now = time.time()
    assert await store.renew("s#missing", "a", now + 60) is False
    await store.claim(_claim("s#k", "a", now=now - 10, lease=5), now - 10)
    assert await store.renew("s#k", "intruder", now + 60) is False
    # taken over after the lease lapsed: the old owner's heartbeat is fenced off, the new owner's is not
    assert await store.claim(_claim("s#k", "b", now=now), now) is None
    assert await store.renew("s#k", "a", now + 600, checkpoint="stale") is False
    got = await store.get("s#k")
    assert got is not None and got.owner == "b" and got.checkpoint is None and got.lease_expires_at == now + 60
    assert await store.renew("s#k", "b", now + 120) is True
    # completed: nothing to renew
    assert await store.complete(_completed("s#k", "b", now=now)) is True
    assert await store.renew("s#k", "b", now + 180) is False
    done = await store.get("s#k")
    assert done is not None and done.state is RecordState.COMPLETED and done.lease_expires_at == now
    # released: gone
    await store.claim(_claim("s#other", "c", now=now), now)
    assert await store.release("s#other", "c") is True
    assert await store.renew("s#other", "c", now + 60) is False


async def test_a_renewed_lease_keeps_others_out_until_it_lapses(store: IdempotencyStore) -> None:
    now = time.time()
    await store.claim(_claim("s#k", "a", now=now - 10, lease=5), now - 10)
    # lapsed 5 s ago but not taken over yet: the owner's heartbeat catches up and the claim is live again
    assert await store.renew("s#k", "a", now + 30) is True
    existing = await store.claim(_claim("s#k", "b", now=now), now)
    assert existing is not None and existing.owner == "a"
    assert await store.claim(_claim("s#k", "b", now=now + 31), now + 31) is None


async def test_a_claim_by_its_own_owner_is_its_own(store: IdempotencyStore) -> None:
    """A retried claim whose first attempt landed (its response lost) must not wait for itself."""
    now = time.time()
    assert await store.claim(_claim("s#k", "a", now=now), now) is None
    assert await store.claim(_claim("s#k", "a", now=now + 1), now + 1) is None
    got = await store.get("s#k")
    assert got is not None and got.owner == "a" and got.lease_expires_at == now + 61
    # but a completed record is never re-claimed, not even by the owner that completed it
    assert await store.complete(_completed("s#k", "a", now=now)) is True
    existing = await store.claim(_claim("s#k", "a", now=now), now)
    assert existing is not None and existing.state is RecordState.COMPLETED


async def test_checkpoint_and_payload_round_trip(store: IdempotencyStore) -> None:
    now = time.time()
    claim = IdempotencyRecord("s#k", RecordState.IN_PROGRESS, "a", now + 60, now + 3600, None, None, "cp-1")
    assert await store.claim(claim, now) is None
    assert await store.get("s#k") == claim
    payload = bytes(range(256)) * 4
    done = IdempotencyRecord("s#k", RecordState.COMPLETED, "a", now, now + 3600.125, "fp", payload, None)
    assert await store.complete(done) is True
    assert await store.get("s#k") == done


class _UnfencedStore(InMemoryIdempotencyStore):
    """Negative control: completes and releases without checking the owner."""

    async def complete(self, record: IdempotencyRecord) -> bool:
        with self._mutex:
            self._put(record)
        return True

    async def release(self, key: str, owner: str) -> bool:
        with self._mutex:
            self._remove(key)
        return True


@pytest.mark.xfail(strict=True, raises=AssertionError)
async def test_negative_control_unfenced_store_lets_a_taken_over_primary_overwrite() -> None:
    await test_lease_takeover_fences_the_old_owner(_UnfencedStore())


@pytest.mark.racing
@pytest.mark.xfail(strict=True, raises=AssertionError)
def test_negative_control_unserialised_moto_lets_two_claims_win() -> None:
    """Why the contract serialises moto: its backend checks a condition, then writes, with no lock between.

    Deterministic interleaving: the first claim passes its condition check and waits inside moto until the second
    claim (on another thread of the store's executor) has passed its own check and written; then the first writes
    too. DynamoDB evaluates the condition and writes atomically, so it never has two winners.
    """
    import moto.dynamodb.models.table as moto_table

    real_filter = moto_table.get_filter_expression
    first_checked, second_done = threading.Event(), threading.Event()
    entered = {"n": 0}

    def pausing_filter(*args: Any, **kwargs: Any) -> Any:
        op = real_filter(*args, **kwargs)
        entered["n"] += 1
        if entered["n"] != 1:
            return op
        real_expr = op.expr

        def expr_then_wait(item: Any) -> Any:
            passed = real_expr(item)
            first_checked.set()
            second_done.wait(WAIT)
            return passed

        op.expr = expr_then_wait
        return op

    async def race(store: IdempotencyStore) -> list[IdempotencyRecord | None]:
        now = time.time()
        first = asyncio.ensure_future(store.claim(_claim("s#race", "first", now=now), now))
        assert await asyncio.wait_for(asyncio.get_running_loop().run_in_executor(None, first_checked.wait, WAIT), WAIT)
        try:
            second = await asyncio.wait_for(store.claim(_claim("s#race", "second", now=now), now), WAIT)
        finally:
            second_done.set()
        return [await asyncio.wait_for(first, WAIT), second]

    with mock_aws(), mock.patch.object(moto_table, "get_filter_expression", pausing_filter):
        store = make_dynamodb_store(serialised=False)
        try:
            outcomes = asyncio.run(race(store))
        finally:
            store.close()
    assert [o is None for o in outcomes].count(True) == 1, "two claims won"
