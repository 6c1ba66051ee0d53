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
from conftest import TABLE, make_dynamodb_store
from moto import mock_aws

from strands_py.idempotency import (
    DynamoDBIdempotencyStore,
    IdempotencyRecord,
    IdempotencyStore,
    InMemoryIdempotencyStore,
    RecordState,
)
from strands_py.idempotency.redis import RedisIdempotencyStore
from strands_py.testing.counting import CountingStore
from strands_py.testing.store_contract import SerialisedCalls, StoreContract

WAIT = 10.0


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


def test_a_subclass_must_override_the_store_fixture() -> None:
    base_fixture = StoreContract.__dict__["store"].__wrapped__
    with pytest.raises(NotImplementedError, match="TestForgetful must override the `store` fixture"):
        base_fixture(type("TestForgetful", (StoreContract,), {})())


# Negative controls: broken stores that the contract must catch.

CONTRACT = StoreContract()


class _UnfencedStore(InMemoryIdempotencyStore):
    """Completes, releases and renews without checking the owner."""

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
    CONTRACT.test_lease_takeover_fences_the_old_owner(_UnfencedStore())


class _CheckThenActStore(InMemoryIdempotencyStore):
    """Checks under the lock, then writes under it again: every contender passes the check before anyone writes."""

    def __init__(self, contenders: int) -> None:
        super().__init__()
        self._all_checked = threading.Barrier(contenders)

    async def claim(self, record: IdempotencyRecord, now: float) -> IdempotencyRecord | None:
        with self._mutex:
            existing = self._lookup(record.key)
        if existing is not None and existing.is_live(now):
            return existing
        self._all_checked.wait(WAIT)  # deterministic interleaving: nobody writes before everyone has checked
        with self._mutex:
            self._put(record)
        return None


@pytest.mark.racing
@pytest.mark.xfail(strict=True, raises=AssertionError)
def test_negative_control_check_then_act_claims_have_many_winners() -> None:
    CONTRACT.test_claim_race_has_one_winner(_CheckThenActStore(CONTRACT.race_contenders))


class _RenewLowersExpiry(InMemoryIdempotencyStore):
    """Renews by setting the expiry to the lease, lowering it."""

    async def renew(self, key: str, owner: str, lease_expires_at: float, checkpoint: str | None = None) -> bool:
        with self._mutex:
            if not self._owned_in_progress(key, owner):
                return False
            record = self._claims[key]
            self._put(IdempotencyRecord(key, record.state, owner, lease_expires_at, lease_expires_at))
            return True


@pytest.mark.xfail(strict=True, raises=AssertionError)
def test_negative_control_a_renewal_that_lowers_the_expiry() -> None:
    CONTRACT.test_renew_extends_the_lease_and_never_lowers_the_expiry(_RenewLowersExpiry())


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
        return IdempotencyRecord("s#race", RecordState.IN_PROGRESS, owner, now + 60, now + 3600, "fp")

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

        async def renew(self, key: str, owner: str, lease_expires_at: float, checkpoint: str | None = None) -> bool:
            return False

    store = Minimal()
    assert store.supports_blocking_claims is False
    now = time.time()
    record = IdempotencyRecord("s#k", RecordState.IN_PROGRESS, "a", now + 60, now + 3600)
    with pytest.raises(NotImplementedError, match="Minimal does not support blocking claims"):
        store.claim_blocking(record, now)


def test_counting_store_counts_and_forwards_blocking_claims_and_renewals() -> None:
    bumps: list[int] = []
    counting = CountingStore(InMemoryIdempotencyStore(), on_claim=lambda: bumps.append(1))
    assert counting.supports_blocking_claims is True
    assert CountingStore(_AsyncOnlyStore()).supports_blocking_claims is False
    now = time.time()
    assert (
        counting.claim_blocking(IdempotencyRecord("s#k", RecordState.IN_PROGRESS, "a", now + 60, now + 90), now) is None
    )
    assert asyncio.run(counting.renew("s#k", "a", now + 120, checkpoint="cp")) is True
    got = asyncio.run(counting.get("s#k"))
    assert got is not None and got.expires_at == now + 120 and got.checkpoint == "cp"
    assert counting.calls == {"claim": 1, "renew": 1, "get": 1} and bumps == [1]
