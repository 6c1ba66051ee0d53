"""The store contract (``strands_py.testing.store_contract``) on every store of ours, and its negative controls.

In-memory, DynamoDB (moto) and Redis (fakeredis with Lua) here; real Redis in
``integ_tests/test_redis_store_integ.py``.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any
from unittest import mock

import fakeredis
import pytest
from conftest import TABLE, ThreadWatchingRedis, make_dynamodb_store
from moto import mock_aws

from strands_py.idempotency import (
    DynamoDBIdempotencyStore,
    IdempotencyRecord,
    IdempotencyStore,
    InMemoryIdempotencyStore,
    RecordState,
)
from strands_py.idempotency.record import new_version
from strands_py.idempotency.redis import RedisIdempotencyStore
from strands_py.testing.counting import CountingStore
from strands_py.testing.store_contract import SerialisedCalls, StoreContract

WAIT = 10.0


def _record(key: str, owner: str, now: float) -> IdempotencyRecord:
    """A claim leased for a minute, collectable an hour after that."""
    return IdempotencyRecord(
        key=key,
        state=RecordState.IN_PROGRESS,
        owner=owner,
        version=new_version(),
        lease_seconds=60.0,
        expires_at=now + 3660,
        fingerprint="fp",
    )


class TestInMemoryStore(StoreContract):
    @pytest.fixture
    def store(self) -> IdempotencyStore:
        return InMemoryIdempotencyStore()


class TestDynamoDBStore(StoreContract):
    @pytest.fixture
    def store(self) -> Iterator[IdempotencyStore]:
        with mock_aws():
            store = make_dynamodb_store(serialised=False)
            yield store
            store.close()

    @pytest.fixture
    def racing_store(self, store: IdempotencyStore) -> Iterator[IdempotencyStore]:
        """moto's backend is not atomic under threads: each boto3 call runs alone, as DynamoDB's items would."""
        assert isinstance(store, DynamoDBIdempotencyStore)
        serialised = DynamoDBIdempotencyStore(TABLE, client=SerialisedCalls(store._client))
        yield serialised
        serialised.close()


class TestFakeRedisStore(StoreContract):
    """fakeredis runs each command (a whole script included) under one server lock: the race stays real."""

    @pytest.fixture
    def store(self) -> Iterator[IdempotencyStore]:
        with RedisIdempotencyStore(fakeredis.FakeRedis(server=fakeredis.FakeServer())) as store:
            yield store


class TestFakeRedisStoreOnItsLoop(StoreContract):
    """The same store with each call on the test loop's asyncio client (``use_event_loop``), none on its threads."""

    use_event_loop = True

    @pytest.fixture
    def store(self) -> Iterator[IdempotencyStore]:
        server = fakeredis.FakeServer()
        sync = ThreadWatchingRedis(server=server)
        with RedisIdempotencyStore(sync, asyncio_client=lambda: fakeredis.FakeAsyncRedis(server=server)) as store:
            yield store
        assert sync.from_threads == 0


@pytest.mark.xfail(strict=True, raises=AssertionError)
def test_negative_control_without_use_event_loop_the_calls_go_through_the_threads() -> None:
    """The watcher of the class above sees calls on the threads when the loop does not use its asyncio client."""
    server = fakeredis.FakeServer()
    sync = ThreadWatchingRedis(server=server)
    with RedisIdempotencyStore(sync, asyncio_client=lambda: fakeredis.FakeAsyncRedis(server=server)) as store:
        CONTRACT.test_first_claim_wins_and_others_see_it(store)
    assert sync.from_threads == 0


def test_a_subclass_must_override_the_store_fixture() -> None:
    base_fixture = StoreContract.__dict__["store"].__wrapped__
    with pytest.raises(NotImplementedError, match="TestForgetful must override the `store` fixture"):
        base_fixture(type("TestForgetful", (StoreContract,), {})())


# Negative controls: broken stores that the contract must catch.

CONTRACT = StoreContract()


class _UnfencedStore(InMemoryIdempotencyStore):
    """Completes and releases without checking the owner."""

    async def complete(self, record: IdempotencyRecord) -> bool:
        with self._mutex:
            self._put(record)
        return True

    async def release(self, key: str, owner: str) -> bool:
        with self._mutex:
            self._remove(key)
        return True


@pytest.mark.xfail(strict=True, raises=AssertionError)
def test_negative_control_unfenced_store_lets_a_taken_over_primary_overwrite() -> None:
    CONTRACT.test_take_over_replaces_exactly_the_judged_version(_UnfencedStore())


class _UnfencedRenewal(InMemoryIdempotencyStore):
    """Renews whichever ``IN_PROGRESS`` record holds the key, whoever owns it."""

    async def renew(self, key: str, owner: str, **fields: Any) -> bool:
        claim = self._claims.get(key)
        return claim is not None and await super().renew(key, claim.record.owner, **fields)


@pytest.mark.xfail(strict=True, raises=AssertionError)
def test_negative_control_an_unfenced_renewal_keeps_a_taken_over_claim_alive() -> None:
    CONTRACT.test_renew_is_fenced_on_owner_and_in_progress(_UnfencedRenewal())


class _CheckThenActStore(InMemoryIdempotencyStore):
    """Checks under the lock, then writes under it again: every contender passes the check before anyone writes."""

    def __init__(self, contenders: int) -> None:
        super().__init__()
        self._all_checked = threading.Barrier(contenders)

    async def claim(self, record: IdempotencyRecord, now: float) -> IdempotencyRecord | None:
        with self._mutex:
            existing = self._lookup(record.key, now)
        if existing is not None and not existing.expired(now):
            return existing
        self._all_checked.wait(WAIT)  # deterministic interleaving: nobody writes before everyone has checked
        with self._mutex:
            self._put(record)
        return None


class _CheckThenActTakeOver(InMemoryIdempotencyStore):
    """Compares the version under the lock, then writes under it again: every contender sees the judged version."""

    def __init__(self, contenders: int) -> None:
        super().__init__()
        self._all_checked = threading.Barrier(contenders)

    async def take_over(self, record: IdempotencyRecord, version: str) -> bool:
        with self._mutex:
            existing = self._lookup(record.key, time.time())
        if existing is None or existing.version != version:
            return False
        self._all_checked.wait(WAIT)
        with self._mutex:
            self._put(record)
        return True


@pytest.mark.racing
@pytest.mark.xfail(strict=True, raises=AssertionError)
def test_negative_control_check_then_act_claims_have_many_winners() -> None:
    CONTRACT.test_claim_race_has_one_winner(_CheckThenActStore(CONTRACT.race_contenders))


@pytest.mark.racing
@pytest.mark.xfail(strict=True, raises=AssertionError)
def test_negative_control_check_then_act_takeovers_have_many_winners() -> None:
    CONTRACT.test_take_over_race_has_one_winner(_CheckThenActTakeOver(CONTRACT.race_contenders))


class _ClaimJudgedByTheCallersClock(InMemoryIdempotencyStore):
    """The old rule, on the new records: a claim whose expiry (or lease) is past on the *caller's* clock is free."""

    def __init__(self, judge: str) -> None:
        super().__init__()
        self.judge = judge

    async def claim(self, record: IdempotencyRecord, now: float) -> IdempotencyRecord | None:
        with self._mutex:
            claim = self._claims.get(record.key)
            if claim is not None and claim.record.owner != record.owner:
                held = claim.record
                # "expiry": the collection horizon read as a deadline; "yielded": a yielded record taken as free
                free = held.expires_at <= now if self.judge == "expiry" else held.yielded
                if free:
                    self._remove(record.key)
        return await super().claim(record, now)


@pytest.mark.parametrize("judge", ["expiry", "yielded"])
@pytest.mark.xfail(strict=True, raises=AssertionError)
def test_negative_control_a_claim_that_frees_claims_by_a_clock(judge: str) -> None:
    CONTRACT.test_no_clock_frees_another_owners_claim(_ClaimJudgedByTheCallersClock(judge))


class _TakeOverWithoutTheVersion(InMemoryIdempotencyStore):
    """``take_over`` that writes over whatever the key holds ("any"), or also over an empty key ("absent")."""

    def __init__(self, ignores: str) -> None:
        super().__init__()
        self.ignores = ignores

    async def take_over(self, record: IdempotencyRecord, version: str) -> bool:
        with self._mutex:
            existing = self._lookup(record.key, time.time())
            if (existing is None and self.ignores == "absent") or (existing is not None and self.ignores == "any"):
                self._put(record)
                return True
        return await super().take_over(record, version)


@pytest.mark.parametrize("ignores", ["any", "absent"])
@pytest.mark.xfail(strict=True, raises=AssertionError)
def test_negative_control_a_take_over_that_ignores_the_version(ignores: str) -> None:
    CONTRACT.test_take_over_replaces_exactly_the_judged_version(_TakeOverWithoutTheVersion(ignores))


@pytest.mark.racing
@pytest.mark.xfail(strict=True, raises=AssertionError)
def test_negative_control_unserialised_moto_lets_two_claims_win() -> None:
    """Why the DynamoDB race is serialised: moto checks a condition, then writes, with no lock between.

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

    def claim(owner: str, now: float) -> IdempotencyRecord:
        return _record("s#race", owner, now)

    async def race(store: IdempotencyStore) -> list[IdempotencyRecord | None]:
        now = time.time()
        first = asyncio.ensure_future(store.claim(claim("first", now), now))
        assert await asyncio.wait_for(asyncio.get_running_loop().run_in_executor(None, first_checked.wait, WAIT), WAIT)
        try:
            second = await asyncio.wait_for(store.claim(claim("second", now), now), WAIT)
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


def test_strands_py_testing_imports_without_pytest() -> None:
    code = (
        "import sys; sys.modules['pytest'] = None\n"
        "import strands_py.testing\n"
        "try:\n"
        "    import strands_py.testing.store_contract\n"
        "except ImportError as e:\n"
        "    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert "store_contract needs pytest: pip install pytest" in out.stdout, out.stderr


def test_serialised_calls_run_under_one_lock_and_pass_attributes_through() -> None:
    class Client:
        region = "eu-west-1"

        def __init__(self) -> None:
            self.wrapper: SerialisedCalls | None = None

        def call(self, value: int) -> bool:
            assert self.wrapper is not None
            return bool(self.wrapper._lock.locked()) and value == 1

    client = Client()
    wrapper = client.wrapper = SerialisedCalls(client)
    assert wrapper.region == "eu-west-1"
    assert wrapper.call(1) is True and not wrapper._lock.locked()
    assert wrapper.call.__name__ == "call"


class _FailingClaims(InMemoryIdempotencyStore):
    async def claim(self, record: IdempotencyRecord, now: float) -> IdempotencyRecord | None:
        raise ConnectionError(f"store unreachable for {record.owner}")


def test_the_race_reports_errors_raised_on_its_threads() -> None:
    with pytest.raises(AssertionError, match="store unreachable for owner-"):
        CONTRACT.test_claim_race_has_one_winner(_FailingClaims())


class _AsyncOnlyStore(InMemoryIdempotencyStore):
    supports_blocking_claims = False


class TestAStoreWithoutBlockingClaims(StoreContract):
    @pytest.fixture
    def store(self) -> IdempotencyStore:
        return _AsyncOnlyStore()


def test_claim_blocking_is_optional() -> None:
    class Minimal(IdempotencyStore):
        async def claim(self, record: IdempotencyRecord, now: float) -> IdempotencyRecord | None:
            return None

        async def get(self, key: str) -> IdempotencyRecord | None:
            return None

        async def complete(self, record: IdempotencyRecord) -> bool:
            return False

        async def release(self, key: str, owner: str) -> bool:
            return False

        async def take_over(self, record: IdempotencyRecord, version: str) -> bool:
            return False

        async def renew(self, key: str, owner: str, **fields: Any) -> bool:
            return False

    store = Minimal()
    assert store.supports_blocking_claims is False
    now = time.time()
    record = _record("s#k", "a", now)
    with pytest.raises(NotImplementedError, match="Minimal does not support blocking claims"):
        store.claim_blocking(record, now)


def test_counting_store_counts_and_forwards_blocking_claims_and_renewals() -> None:
    bumps: list[int] = []
    counting = CountingStore(InMemoryIdempotencyStore(), on_claim=lambda: bumps.append(1))
    assert counting.supports_blocking_claims is True
    assert CountingStore(_AsyncOnlyStore()).supports_blocking_claims is False
    now = time.time()
    first = _record("s#k", "a", now)
    assert counting.claim_blocking(first, now) is None
    version = new_version()
    renewed = counting.renew("s#k", "a", version=version, lease_seconds=0.5, expires_at=now + 120, checkpoint="cp")
    assert asyncio.run(renewed) is True
    got = asyncio.run(counting.get("s#k"))
    assert got is not None and (got.version, got.lease_seconds, got.expires_at, got.checkpoint) == (
        version,
        0.5,
        now + 120,
        "cp",
    )
    assert asyncio.run(counting.take_over(_record("s#k", "b", now), first.version)) is False  # renewed since
    assert asyncio.run(counting.take_over(_record("s#k", "b", now), version)) is True
    assert counting.calls == {"claim": 1, "renew": 1, "get": 1, "take_over": 2} and bumps == [1]
