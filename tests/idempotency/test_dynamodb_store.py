"""DynamoDBIdempotencyStore beyond the shared contract: construction, errors, odd servers, bad items, TTL, cancels."""

from __future__ import annotations

import asyncio
import dataclasses
import math
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any
from unittest import mock

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError
from botocore.stub import Stubber
from conftest import TABLE, make_dynamodb_store, moto_client
from moto import mock_aws

from strands_py.idempotency import (
    DynamoDBIdempotencyStore,
    IdempotencyRecord,
    IdempotencyRecordCorruptedError,
    IdempotencyStore,
    IdempotencyStoreError,
    RecordState,
)
from strands_py.idempotency import _dynamodb_journal as journal_module
from strands_py.idempotency import _dynamodb_table as table_module
from strands_py.idempotency import dynamodb as dynamodb_module
from strands_py.idempotency.record import new_version
from strands_py.testing.store_contract import SerialisedCalls, StoreContract

WAIT = 10.0
CONTRACT = StoreContract()
_to_item = table_module._to_item


@pytest.fixture
def aws() -> Iterator[None]:
    with mock_aws():
        yield


def _claim(key: str, owner: str, now: float, *, expires_at: float | None = None) -> IdempotencyRecord:
    expiry = now + 3600 if expires_at is None else expires_at
    return IdempotencyRecord(key, RecordState.IN_PROGRESS, owner, new_version(), 60.0, expiry, "fp")


def _completed(key: str, owner: str, expires_at: float, payload: bytes = b"z") -> IdempotencyRecord:
    return IdempotencyRecord(key, RecordState.COMPLETED, owner, new_version(), 0.0, expires_at, "fp", payload)


def _item(store: DynamoDBIdempotencyStore, key: str) -> dict[str, Any] | None:
    """The raw item, read behind the store's back."""
    item: dict[str, Any] | None = store._client.get_item(TableName=TABLE, Key={"id": {"S": key}}).get("Item")
    return item


@pytest.mark.parametrize("bad", [{"table_name": ""}, {"table_name": "t", "max_workers": 0}])
def test_constructor_rejects_bad_arguments(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        DynamoDBIdempotencyStore(client=mock.Mock(), **bad)


def test_builds_its_own_client_with_standard_retries(aws: None) -> None:
    session = boto3.Session(region_name="eu-west-1", aws_access_key_id="x", aws_secret_access_key="y")
    with DynamoDBIdempotencyStore(TABLE, boto3_session=session) as store:
        config = store._client.meta.config
        assert config.retries["mode"] == "standard" and config.retries["total_max_attempts"] == 5
        assert store._client.meta.region_name == "eu-west-1"
    assert store._executor._shutdown


async def test_store_io_runs_on_the_stores_own_threads(aws: None) -> None:
    store = make_dynamodb_store()
    seen: list[str] = []
    real_get_item = store._client.get_item

    def spy(**kwargs: Any) -> Any:
        seen.append(threading.current_thread().name)
        return real_get_item(**kwargs)

    store._client.get_item = spy
    await store.get("s#k")
    assert seen and all(name.startswith("strands-py-idempotency") for name in seen)
    store.close()


def _stubbed_store() -> tuple[DynamoDBIdempotencyStore, Stubber]:
    client = boto3.client(
        "dynamodb", region_name="us-east-1", aws_access_key_id="testing", aws_secret_access_key="testing"
    )
    return DynamoDBIdempotencyStore(TABLE, client=client), Stubber(client)


async def _every_primitive(store: DynamoDBIdempotencyStore) -> list[Any]:
    """Call each primitive once; returns the exceptions (one per primitive)."""
    now = time.time()
    calls = [
        store.claim(_claim("s#k", "a", now), now),
        store.take_over(_claim("s#k", "b", now), new_version()),
        store.get("s#k"),
        store.complete(_completed("s#k", "a", now + 60)),
        store.release("s#k", "a"),
        store.renew("s#k", "a", version=new_version(), lease_seconds=60, expires_at=now + 60),
        store.append("s#k", "a", b"step"),  # without a known head: the record is read first
        store.journal("s#k"),
        store.truncate("s#k", "a", 0),
        store.cancel("s#k"),
    ]
    errors = []
    for call in calls:
        with pytest.raises(IdempotencyStoreError) as raised:
            await asyncio.wait_for(call, WAIT)
        errors.append(raised.value)
    return errors


OPERATIONS = [
    *("put_item", "update_item", "get_item", "put_item", "delete_item", "update_item"),
    *("get_item", "get_item", "update_item", "update_item"),
]


@pytest.mark.parametrize(
    "code, status",
    [
        ("ProvisionedThroughputExceededException", 400),
        ("AccessDeniedException", 400),
        ("ResourceNotFoundException", 400),
        ("InternalServerError", 500),
    ],
)
async def test_service_errors_from_every_primitive_are_store_errors(aws: None, code: str, status: int) -> None:
    store, stubber = _stubbed_store()
    for operation in [*OPERATIONS, "put_item"]:
        stubber.add_client_error(operation, service_error_code=code, http_status_code=status)
    with stubber:
        errors = await _every_primitive(store)
        now = time.time()
        with pytest.raises(IdempotencyStoreError) as blocking:
            store.claim_blocking(_claim("s#k", "a", now), now)
        errors.append(blocking.value)
        stubber.assert_no_pending_responses()
    for error in errors:
        assert isinstance(error.__cause__, ClientError) and error.__cause__.response["Error"]["Code"] == code
        assert TABLE in str(error) and code in str(error)
    store.close()


def _closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_an_unreachable_endpoint_is_a_store_error_from_every_primitive() -> None:
    # No moto here: a real client, pointed at a loopback port nobody listens on, one attempt, short timeouts.
    config = Config(retries={"total_max_attempts": 1}, connect_timeout=1, read_timeout=1)
    client = boto3.client(
        "dynamodb",
        region_name="us-east-1",
        endpoint_url=f"http://127.0.0.1:{_closed_port()}",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        config=config,
    )
    with DynamoDBIdempotencyStore(TABLE, client=client) as store:
        errors = await _every_primitive(store)
    assert all(isinstance(e.__cause__, BotoCoreError) for e in errors), [repr(e.__cause__) for e in errors]


async def test_a_closed_store_raises_a_store_error(aws: None) -> None:
    store = make_dynamodb_store()
    store.close()
    with pytest.raises(IdempotencyStoreError, match="closed"):
        await store.get("s#k")
    now = time.time()
    with pytest.raises(IdempotencyStoreError, match="closed"):
        store.claim_blocking(_claim("s#k", "a", now), now)


def test_a_blocking_claim_runs_on_the_callers_thread(aws: None) -> None:
    store = make_dynamodb_store()
    seen: list[str] = []
    real_put_item = store._client.put_item

    def spy(**kwargs: Any) -> Any:
        seen.append(threading.current_thread().name)
        return real_put_item(**kwargs)

    store._client.put_item = spy
    now = time.time()
    assert store.claim_blocking(_claim("s#k", "a", now), now) is None
    assert seen == [threading.current_thread().name]
    store.close()


async def test_other_runtime_errors_are_not_mistaken_for_a_closed_store(aws: None) -> None:
    store = make_dynamodb_store()
    store._client.get_item = mock.Mock(side_effect=RuntimeError("a bug"))
    with pytest.raises(RuntimeError, match="a bug"):
        await store.get("s#k")
    store._executor.shutdown()  # behind the store's back: not a closed store, a bug of the caller
    with pytest.raises(RuntimeError, match="shutdown"):
        await store.get("s#k")


def _condition_failed(operation: str) -> ClientError:
    return ClientError(
        {"Error": {"Code": "ConditionalCheckFailedException", "Message": "The conditional request failed"}}, operation
    )


class NoOldItems:
    """A DynamoDB-compatible server that does not return the old item with a failed condition (moto underneath)."""

    def __init__(self, client: Any) -> None:
        self._client = client

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    def _without_old_item(self, operation: str, kwargs: dict[str, Any]) -> Any:
        try:
            return getattr(self._client, operation)(**kwargs)
        except ClientError as e:
            e.response.pop("Item", None)
            for reason in e.response.get("CancellationReasons", ()):
                reason.pop("Item", None)
            raise

    def put_item(self, **kwargs: Any) -> Any:
        return self._without_old_item("put_item", kwargs)

    def update_item(self, **kwargs: Any) -> Any:
        return self._without_old_item("update_item", kwargs)

    def delete_item(self, **kwargs: Any) -> Any:
        return self._without_old_item("delete_item", kwargs)

    def transact_write_items(self, **kwargs: Any) -> Any:
        return self._without_old_item("transact_write_items", kwargs)


SERVERS = ["dynamodb", "no old item"]


def _store_on(server: str) -> DynamoDBIdempotencyStore:
    """A store over moto (inside ``mock_aws``), table created, on DynamoDB or on a server without old items."""
    client = moto_client() if server == "dynamodb" else NoOldItems(moto_client())
    store = DynamoDBIdempotencyStore(TABLE, client=SerialisedCalls(client))
    store.create_table()
    return store


class TestDynamoDBCompatibleServerWithoutOldItems(StoreContract):
    """The whole contract on a server that never returns the old item: claims read it instead."""

    @pytest.fixture
    def store(self) -> Iterator[IdempotencyStore]:
        with mock_aws():
            store = DynamoDBIdempotencyStore(TABLE, client=NoOldItems(moto_client()))
            store.create_table()
            yield store
            store.close()

    @pytest.fixture
    def racing_store(self, store: IdempotencyStore) -> Iterator[IdempotencyStore]:
        """moto's backend is not atomic under threads: each boto3 call runs alone, as DynamoDB's items would."""
        assert isinstance(store, DynamoDBIdempotencyStore)
        serialised = DynamoDBIdempotencyStore(TABLE, client=SerialisedCalls(store._client))
        yield serialised
        serialised.close()


async def test_claim_reads_the_record_when_the_server_does_not_return_it(aws: None) -> None:
    store = _store_on("no old item")
    now = time.time()
    first = _claim("s#k", "a", now)
    assert await store.claim(first, now) is None
    reads: list[dict[str, Any]] = []
    real_get = store._client.get_item

    def counted_get(**kwargs: Any) -> Any:
        reads.append(kwargs)
        return real_get(**kwargs)

    store._client.get_item = counted_get
    assert await store.claim(_claim("s#k", "b", now), now) == first
    assert len(reads) == 1 and reads[0]["ConsistentRead"] is True
    # our own claim, retried after its first attempt landed, is recognised from the read too
    assert await store.claim(first, now + 1) is None
    # a completed record past its expiry at ``now`` is replaced by the write itself, without a read
    assert await store.complete(_completed("s#k", "a", now + 10)) is True
    reads.clear()
    assert await store.claim(_claim("s#k", "c", now + 10), now + 10) is None
    assert reads == []
    store.close()


async def test_a_claim_released_between_its_write_and_its_read_is_tried_again(aws: None) -> None:
    store = _store_on("no old item")
    now = time.time()
    await store.claim(_claim("s#k", "a", now), now)
    real_put = store._client.put_item
    calls = {"n": 0}

    def put_racing_a_release(**kwargs: Any) -> Any:
        calls["n"] += 1
        try:
            return real_put(**kwargs)
        except ClientError:
            if calls["n"] == 1:
                store._client.delete_item(TableName=TABLE, Key={"id": {"S": "s#k"}})
            raise

    store._client.put_item = put_racing_a_release
    assert await store.claim(_claim("s#k", "c", now), now) is None
    got = await store.get("s#k")
    assert got is not None and got.owner == "c" and calls["n"] == 2
    store.close()


async def test_a_claim_gives_up_when_the_record_keeps_changing_under_it(aws: None) -> None:
    """Each retry takes another writer's progress; a server that never settles costs a store error, not a hang."""
    store = _store_on("no old item")
    puts = {"n": 0}

    def put_that_always_loses(**kwargs: Any) -> Any:
        puts["n"] += 1
        raise _condition_failed("PutItem")  # and the item is gone again by the time it is read

    store._client.put_item = put_that_always_loses
    now = time.time()
    with pytest.raises(IdempotencyStoreError, match="kept racing other writers"):
        await store.claim(_claim("s#k", "a", now), now)
    assert puts["n"] == dynamodb_module._CLAIM_ATTEMPTS
    store.close()


@pytest.mark.parametrize("server", SERVERS)
async def test_take_over_refuses_a_stale_version_and_an_absent_item(aws: None, server: str) -> None:
    store = _store_on(server)
    now = time.time()
    judged = _claim("s#k", "crashed", now)
    assert await store.claim(judged, now) is None
    # the owner renewed after the caller judged its record
    assert await store.renew("s#k", "crashed", version=new_version(), lease_seconds=60, expires_at=now + 600)
    before = _item(store, "s#k")
    assert await store.take_over(_claim("s#k", "late", now), judged.version) is False
    assert _item(store, "s#k") == before
    assert await store.take_over(_claim("s#gone", "late", now), judged.version) is False
    assert _item(store, "s#gone") is None
    # the version stored: replaced, by one UpdateItem conditional on it
    current = await store.get("s#k")
    assert current is not None
    updates: list[dict[str, Any]] = []
    real_update = store._client.update_item

    def spy(**kwargs: Any) -> Any:
        updates.append(kwargs)
        return real_update(**kwargs)

    store._client.update_item = spy
    new = _claim("s#k", "new", now)
    assert await store.take_over(new, current.version) is True
    assert await store.get("s#k") == new
    assert [(u["ConditionExpression"], u["ExpressionAttributeValues"][":version"]) for u in updates] == [
        ("#version = :version", {"S": current.version})
    ]
    store.close()


_LOOSE_VERSION_CONDITION = "attribute_exists(#version) OR #version = :version"  # any stored version


@pytest.mark.xfail(strict=True, raises=AssertionError)
def test_negative_control_a_take_over_not_conditional_on_the_version_replaces_a_newer_record(aws: None) -> None:
    # Patched where the store's take_over reads it (dynamodb.py imports it from _dynamodb_table.py).
    with mock.patch.object(dynamodb_module, "_SAME_VERSION", _LOOSE_VERSION_CONDITION):
        CONTRACT.test_take_over_replaces_exactly_the_judged_version(_store_on("dynamodb"))


# The previous claim condition's spirit: a claim frees another owner's IN_PROGRESS record by the caller's clock.
_CLOCK_JUDGED_CONDITION = table_module._CLAIMABLE + " OR (#status <> :completed AND #expires_at <= :now)"


@pytest.mark.xfail(strict=True, raises=AssertionError)
def test_negative_control_a_claim_condition_freeing_lapsed_claims_by_the_callers_clock(aws: None) -> None:
    # Patched where the store's claim reads it (dynamodb.py imports it from _dynamodb_table.py).
    with mock.patch.object(dynamodb_module, "_CLAIMABLE", _CLOCK_JUDGED_CONDITION):
        CONTRACT.test_no_clock_frees_another_owners_claim(_store_on("dynamodb"))


async def test_a_claim_met_by_a_malformed_item_is_a_corrupt_record(aws: None) -> None:
    store = make_dynamodb_store()
    store._client.put_item(TableName=TABLE, Item=_previous_release_item("s#old", "a", time.time()))
    now = time.time()
    with pytest.raises(IdempotencyRecordCorruptedError, match="s#old"):
        await store.claim(_claim("s#old", "b", now), now)
    store.close()


def _previous_release_item(key: str, owner: str, now: float) -> dict[str, Any]:
    """An item as the previous release wrote it: a lease deadline, no version (never released: no migration)."""
    return {
        "id": {"S": key},
        "status": {"S": "IN_PROGRESS"},
        "owner": {"S": owner},
        "lease": {"N": repr(now + 60)},
        "expires_at": {"N": repr(now + 3600)},
        "expiration": {"N": str(math.ceil(now + 3600))},
    }


def _good_item(key: str) -> dict[str, Any]:
    return _to_item(_claim(key, "a", time.time()))


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param(lambda key: {"id": {"S": key}, "status": {"S": "SOMETHING"}}, id="unknown-status"),
        pytest.param(lambda key: _previous_release_item(key, "a", time.time()), id="previous-release"),
        pytest.param(lambda key: {**_good_item(key), "lease_seconds": {"S": "sixty"}}, id="lease-not-a-number"),
        pytest.param(lambda key: {k: v for k, v in _good_item(key).items() if k != "expires_at"}, id="no-expiry"),
    ],
)
async def test_malformed_item_is_a_corrupt_record_naming_the_key(aws: None, bad: Any) -> None:
    store = make_dynamodb_store()
    store._client.put_item(TableName=TABLE, Item=bad("s#bad"))
    with pytest.raises(IdempotencyRecordCorruptedError, match="s#bad"):
        await store.get("s#bad")
    store.close()


class StrictTtlClient:
    """A moto client that refuses to enable TTL twice, as real DynamoDB does (moto does not check)."""

    def __init__(self, client: Any) -> None:
        self._client = client
        self.ttl_updates = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    def update_time_to_live(self, **kwargs: Any) -> Any:
        current = self._client.describe_time_to_live(TableName=kwargs["TableName"])["TimeToLiveDescription"]
        if current["TimeToLiveStatus"] in ("ENABLED", "ENABLING"):
            raise ClientError(
                {"Error": {"Code": "ValidationException", "Message": "TimeToLive is already enabled"}},
                "UpdateTimeToLive",
            )
        self.ttl_updates += 1
        return self._client.update_time_to_live(**kwargs)


def test_create_table_twice_enables_ttl_once(aws: None) -> None:
    client = StrictTtlClient(moto_client())
    store = DynamoDBIdempotencyStore(TABLE, client=client)
    store.create_table()
    store.create_table()  # on real DynamoDB, enabling TTL again raises ValidationException
    ttl = client.describe_time_to_live(TableName=TABLE)["TimeToLiveDescription"]
    assert ttl["AttributeName"] == "expiration" and ttl["TimeToLiveStatus"] == "ENABLED"
    assert client.ttl_updates == 1
    store.close()


class _OldCreateTable(DynamoDBIdempotencyStore):
    """Negative control: the previous create_table, which enabled TTL unconditionally."""

    def create_table(self) -> None:
        try:
            self._client.create_table(
                TableName=self.table_name,
                AttributeDefinitions=[{"AttributeName": "id", "AttributeType": "S"}],
                KeySchema=[{"AttributeName": "id", "KeyType": "HASH"}],
                BillingMode="PAY_PER_REQUEST",
            )
        except ClientError:
            pass
        self._client.update_time_to_live(
            TableName=self.table_name, TimeToLiveSpecification={"Enabled": True, "AttributeName": "expiration"}
        )


@pytest.mark.xfail(strict=True, raises=ClientError)
def test_negative_control_enabling_ttl_unconditionally_fails_the_second_time(aws: None) -> None:
    store = _OldCreateTable(TABLE, client=StrictTtlClient(moto_client()))
    store.create_table()
    store.create_table()


def test_create_table_refuses_ttl_on_another_attribute(aws: None) -> None:
    client = moto_client()
    client.create_table(
        TableName=TABLE,
        AttributeDefinitions=[{"AttributeName": "id", "AttributeType": "S"}],
        KeySchema=[{"AttributeName": "id", "KeyType": "HASH"}],
        BillingMode="PAY_PER_REQUEST",
    )
    client.update_time_to_live(TableName=TABLE, TimeToLiveSpecification={"Enabled": True, "AttributeName": "ttl"})
    with DynamoDBIdempotencyStore(TABLE, client=client) as store, pytest.raises(ValueError, match="'ttl'"):
        store.create_table()


def test_create_table_propagates_other_errors(aws: None) -> None:
    store = make_dynamodb_store()
    store._client.create_table = mock.Mock(
        side_effect=ClientError({"Error": {"Code": "LimitExceededException", "Message": "no"}}, "CreateTable")
    )
    with pytest.raises(ClientError):
        store.create_table()
    store.close()


async def test_get_returns_records_past_their_expiry_as_stored(aws: None) -> None:
    """The contract lets ``get`` return them; callers judge. And no clock frees the running claim."""
    store = make_dynamodb_store()
    now = time.time()
    running = _claim("s#run", "a", now - 100, expires_at=now - 1)
    assert await store.claim(running, now) is None
    assert await store.get("s#run") == running
    assert await store.claim(_claim("s#run", "b", now), now) == running
    await store.claim(_claim("s#done", "a", now - 100), now - 100)
    done = _completed("s#done", "a", now - 1)
    assert await store.complete(done) is True
    assert await store.get("s#done") == done
    store.close()


async def test_renew_is_one_update_item(aws: None) -> None:
    store = make_dynamodb_store()
    now = time.time()
    await store.claim(_claim("s#k", "a", now), now)
    calls: list[str] = []
    for name in ("put_item", "get_item", "update_item", "delete_item"):
        real = getattr(store._client, name)

        def spy(*, _name: str = name, _real: Any = real, **kwargs: Any) -> Any:
            calls.append(_name)
            return _real(**kwargs)

        setattr(store._client, name, spy)
    version = new_version()
    assert await store.renew("s#k", "a", version=version, lease_seconds=0, expires_at=now + 5, checkpoint="cp")
    fenced = await store.renew("s#k", "intruder", version=new_version(), lease_seconds=60, expires_at=now + 600)
    assert fenced is False  # fenced off by the same single call, no read to find out why
    assert calls == ["update_item", "update_item"]
    got = await store.get("s#k")
    assert got is not None and got.version == version and got.yielded and got.expires_at == now + 5
    assert got.checkpoint == "cp"
    store.close()


# The TTL attribute: the exact expiry rounded up, plus a day of grace.

DAY = 86_400


async def test_the_ttl_attribute_is_a_day_past_the_exact_expiry_for_every_write(aws: None) -> None:
    store = make_dynamodb_store()
    now = math.floor(time.time()) + 0.25

    def expiry_attributes(key: str) -> tuple[dict[str, str], int]:
        item = _item(store, key)
        assert item is not None
        return item["expires_at"], int(item["expiration"]["N"])

    assert await store.claim(_claim("s#k", "a", now, expires_at=now + 100), now) is None
    assert expiry_attributes("s#k") == ({"N": repr(now + 100)}, math.ceil(now + 100) + DAY)
    version = new_version()
    assert await store.renew("s#k", "a", version=version, lease_seconds=60, expires_at=now + 200.5)
    assert expiry_attributes("s#k") == ({"N": repr(now + 200.5)}, math.ceil(now + 200.5) + DAY)
    assert await store.take_over(_claim("s#k", "b", now, expires_at=now + 300), version) is True
    assert expiry_attributes("s#k") == ({"N": repr(now + 300)}, math.ceil(now + 300) + DAY)
    assert await store.complete(_completed("s#k", "b", now + 400)) is True
    assert expiry_attributes("s#k") == ({"N": repr(now + 400)}, math.ceil(now + 400) + DAY)
    store.close()


def _sweep(store: DynamoDBIdempotencyStore, key: str, aws_now: float) -> None:
    """DynamoDB's TTL sweeper, taking one item (in whatever order it likes): deleted if its TTL has passed."""
    item = _item(store, key)
    if item is not None and int(item["expiration"]["N"]) <= aws_now:
        store._client.delete_item(TableName=TABLE, Key={"id": {"S": key}})


async def _a_referred_record_outlives_the_record_referring_to_it() -> None:
    store = make_dynamodb_store()
    now = time.time()
    expires = now + 60  # tied lifetimes: the token's record lives as long as the lock record naming it
    await store.claim(_claim("s#token", "turn", now, expires_at=expires), now)
    await store.claim(_claim("s#lock", "turn", now, expires_at=expires), now)
    # A writer whose clock is an hour behind AWS's reads the lock record just before it expires (it still counts);
    # the sweeper, on AWS's clock, happens to take the token's record first.
    writer_now = expires - 1
    _sweep(store, "s#token", aws_now=writer_now + 3600)
    lock = await store.get("s#lock")
    assert lock is not None and not lock.expired(writer_now)
    assert await store.get("s#token") is not None, "the sweeper deleted a record another live record refers to"
    store.close()


async def test_the_sweeper_never_deletes_a_record_while_a_record_referring_to_it_counts(aws: None) -> None:
    await _a_referred_record_outlives_the_record_referring_to_it()


@pytest.mark.xfail(strict=True, raises=AssertionError)
async def test_negative_control_a_ttl_attribute_without_grace(aws: None) -> None:
    with mock.patch.object(table_module, "_TTL_GRACE_SECONDS", 0):
        await _a_referred_record_outlives_the_record_referring_to_it()


async def test_expiry_decisions_use_the_exact_expiry_not_whole_seconds(aws: None) -> None:
    """Issue 8 §3: the TTL attribute is in whole seconds; replaying until the next second was up to 1 s late."""
    await _expired_at_the_exact_instant()


async def _expired_at_the_exact_instant() -> None:
    store = make_dynamodb_store()
    second = math.floor(time.time())
    expires = second + 0.25  # the TTL attribute says second + 1 (and a day)
    await store.claim(_claim("s#k", "a", second - 10), second - 10)
    await store.complete(_completed("s#k", "a", expires))
    # just before the exact expiry: replayed; just after: claimable, though the TTL attribute is still ahead
    before = await store.claim(_claim("s#k", "b", second + 0.2), second + 0.2)
    assert before is not None and before.state is RecordState.COMPLETED
    assert await store.claim(_claim("s#k", "b", second + 0.5), second + 0.5) is None
    assert before.expires_at == expires  # stored exactly
    store.close()


def _whole_seconds_to_item(record: IdempotencyRecord) -> dict[str, Any]:
    item = _to_item(record)
    item["expires_at"] = {"N": str(math.ceil(record.expires_at))}
    return item


@pytest.mark.xfail(strict=True, raises=AssertionError)
async def test_negative_control_deciding_by_whole_seconds_replays_past_the_expiry(aws: None) -> None:
    # Patched where the store's claim and complete read it (dynamodb.py imports it from _dynamodb_table.py).
    with mock.patch.object(dynamodb_module, "_to_item", _whole_seconds_to_item):
        await _expired_at_the_exact_instant()


# The journal: entries as items of their own, under the claim's lineage.


class Hooked:
    """A client that records the operations called on it, and runs a hook (given the real call) where one is set."""

    def __init__(self, client: Any) -> None:
        self._client = client
        self.calls: list[str] = []
        self.hooks: dict[str, Any] = {}

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._client, name)
        if not callable(attr):
            return attr

        def hooked(*args: Any, **kwargs: Any) -> Any:
            self.calls.append(name)
            hook = self.hooks.get(name)
            return attr(*args, **kwargs) if hook is None else hook(attr, kwargs)

        return hooked


def _hooked_store(server: str = "dynamodb") -> tuple[DynamoDBIdempotencyStore, Hooked]:
    """A store over moto (inside ``mock_aws``, calls serialised), table created, whose client records and hooks."""
    inner = moto_client() if server == "dynamodb" else NoOldItems(moto_client())
    client = Hooked(SerialisedCalls(inner))
    store = DynamoDBIdempotencyStore(TABLE, client=client)
    store.create_table()
    client.calls.clear()
    return store, client


def _cancelled(*reasons: dict[str, Any]) -> ClientError:
    return ClientError(
        {
            "Error": {"Code": "TransactionCanceledException", "Message": "Transaction cancelled"},
            "CancellationReasons": list(reasons),
        },
        "TransactWriteItems",
    )


def _scan(store: DynamoDBIdempotencyStore) -> dict[str, dict[str, Any]]:
    """Every item of the table, by id, read behind the store's back."""
    items = store._client.scan(TableName=TABLE, ConsistentRead=True)["Items"]
    return {item["id"]["S"]: item for item in items}


async def test_round_trips_of_each_journal_primitive(aws: None) -> None:
    store, client = _hooked_store()
    now = time.time()
    first = _claim("s#k", "a", now)

    async def calls(call: Any) -> tuple[Any, list[str]]:
        client.calls.clear()
        outcome = await call
        return outcome, list(client.calls)

    assert await calls(store.claim(first, now)) == (None, ["put_item"])
    # The claim told this process where the journal stands: each append is one transaction.
    assert await calls(store.append("s#k", "a", b"0")) == (True, ["transact_write_items"])
    assert await calls(store.append("s#k", "a", b"1")) == (True, ["transact_write_items"])
    assert await calls(store.append("s#k", "intruder", b"x")) == (False, ["transact_write_items"])
    assert await calls(store.journal("s#k")) == ([b"0", b"1"], ["get_item", "batch_get_item"])
    assert await calls(store.truncate("s#k", "a", 1)) == (True, ["update_item"])
    assert await calls(store.truncate("s#k", "a", 5)) == (True, ["update_item"])  # nothing to cut: one call too
    # After a cut, or in another process, the first append reads the record once.
    assert await calls(store.append("s#k", "a", b"1'")) == (True, ["get_item", "transact_write_items"])
    with DynamoDBIdempotencyStore(TABLE, client=client) as other:
        assert await calls(other.append("s#k", "a", b"2")) == (True, ["get_item", "transact_write_items"])
    renewed = store.renew("s#k", "a", version=new_version(), lease_seconds=60, expires_at=now + 3600)
    assert await calls(renewed) == (True, ["update_item"])
    # A takeover keeps the journal; the new owner reads it, then appends in one transaction.
    current = await store.get("s#k")
    assert current is not None
    assert await calls(store.take_over(_claim("s#k", "b", now), current.version)) == (True, ["update_item"])
    assert await calls(store.journal("s#k")) == ([b"0", b"1'", b"2"], ["get_item", "batch_get_item"])
    assert await calls(store.append("s#k", "b", b"3")) == (True, ["transact_write_items"])
    assert await calls(store.journal("s#none")) == ([], ["get_item"])
    store.close()


async def test_a_journal_of_more_than_a_batch_is_read_in_batches_of_100(aws: None) -> None:
    store, client = _hooked_store()
    now = time.time()
    await store.claim(_claim("s#k", "a", now), now)
    entries = [b"%d" % i for i in range(150)]
    for entry in entries:
        assert await store.append("s#k", "a", entry) is True
    sizes: list[int] = []

    def batch_get(real: Any, kwargs: dict[str, Any]) -> Any:
        sizes.append(len(kwargs["RequestItems"][TABLE]["Keys"]))
        assert kwargs["RequestItems"][TABLE]["ConsistentRead"] is True
        return real(**kwargs)

    client.hooks["batch_get_item"] = batch_get
    assert await store.journal("s#k") == entries
    assert sizes == [100, 50]
    store.close()


async def test_entries_are_items_of_the_claims_lineage_expiring_a_day_past_their_record(aws: None) -> None:
    store, _ = _hooked_store()
    now = time.time()
    await store.claim(_claim("s#k", "a", now), now)
    await store.append("s#k", "a", b"\x00zero")
    await store.append("s#k", "a", b"one")
    items = _scan(store)
    record = items.pop("s#k")
    lineage = record["journal_id"]["S"]
    assert record["journal_length"] == {"N": "2"}
    expiration = int(record["expiration"]["N"]) + DAY
    assert int(record["journal_expiration"]["N"]) == int(record["journal_expiration_floor"]["N"]) == expiration
    assert items == {
        f"s#k#journal#{lineage}#0": {
            "id": {"S": f"s#k#journal#{lineage}#0"},
            "entry": {"B": b"\x00zero"},
            "expiration": {"N": str(expiration)},
        },
        f"s#k#journal#{lineage}#1": {
            "id": {"S": f"s#k#journal#{lineage}#1"},
            "entry": {"B": b"one"},
            "expiration": {"N": str(expiration)},
        },
    }
    # A fresh claim forgets the lineage (its entries are left to expire); the next one is another lineage.
    await store.complete(_completed("s#k", "a", now - 1))
    assert "journal_id" not in (_item(store, "s#k") or {})
    await store.claim(_claim("s#k", "b", now), now)
    await store.append("s#k", "b", b"fresh")
    fresh = _item(store, "s#k")
    assert fresh is not None and fresh["journal_id"]["S"] != lineage
    assert await store.journal("s#k") == [b"fresh"]
    store.close()


async def test_a_take_over_sets_every_field_and_removes_the_absent_ones(aws: None) -> None:
    store, _ = _hooked_store()
    now = time.time()
    judged = IdempotencyRecord("s#k", RecordState.IN_PROGRESS, "a", new_version(), 60.0, now + 60, "fp", None, "cp")
    await store.claim(judged, now)
    full = IdempotencyRecord("s#k", RecordState.IN_PROGRESS, "b", new_version(), 7.5, now + 90.25, "fp2", b"", "cp2")
    assert await store.take_over(full, judged.version) is True
    assert await store.get("s#k") == full
    bare = IdempotencyRecord("s#k", RecordState.IN_PROGRESS, "c", new_version(), 30.0, now + 120)
    assert await store.take_over(bare, full.version) is True
    assert await store.get("s#k") == bare
    store.close()


async def test_a_take_over_by_a_completed_record_drops_the_journal(aws: None) -> None:
    """take_over rewrites the record's fields in place; a journal lives with an IN_PROGRESS record only."""
    store, _ = _hooked_store()
    now = time.time()
    judged = _claim("s#k", "a", now)
    await store.claim(judged, now)
    await store.append("s#k", "a", b"step")
    assert await store.take_over(_completed("s#k", "b", now + 60), judged.version) is True
    item = _item(store, "s#k")
    assert item is not None and not any(name.startswith("journal") for name in item)
    assert await store.journal("s#k") == []
    store.close()


# An append fenced by a read and not by its own write: a takeover between the two lets a dead owner's entry in.
_APPEND_CONDITIONS = {
    "_JOURNAL_STARTS": journal_module._JOURNAL_STARTS,
    "_JOURNAL_CONTINUES": journal_module._JOURNAL_CONTINUES,
}
_ANY_OWNER = "(#owner = :owner OR #owner <> :owner) AND #status = :in_progress"


def _unfenced(condition: str) -> str:
    return condition.replace(table_module._OWNED_IN_PROGRESS, _ANY_OWNER)


async def _an_append_raced_by_a_takeover() -> None:
    store, client = _hooked_store()
    now = time.time()
    judged = _claim("s#k", "crashed", now)
    await store.claim(judged, now)
    await store.append("s#k", "crashed", b"model-0")
    store._journal.forget("s#k")  # as in a process that has not seen the journal: it reads the record first

    def read_then_taken_over(real: Any, kwargs: dict[str, Any]) -> Any:
        item = real(**kwargs)
        client.hooks.pop("get_item")
        # Between the dead owner's read and its write, a waiter takes the claim over.
        with DynamoDBIdempotencyStore(TABLE, client=client) as waiter:
            assert asyncio.run(waiter.take_over(_claim("s#k", "new", now), judged.version)) is True
        return item

    client.hooks["get_item"] = read_then_taken_over
    assert await store.append("s#k", "crashed", b"late") is False
    assert await store.journal("s#k") == [b"model-0"]
    store.close()


async def test_an_append_is_fenced_by_its_own_write_not_by_a_read_before_it(aws: None) -> None:
    await _an_append_raced_by_a_takeover()


@pytest.mark.xfail(strict=True, raises=AssertionError)
async def test_negative_control_an_append_not_conditional_on_the_owner(aws: None) -> None:
    with (
        mock.patch.object(journal_module, "_JOURNAL_STARTS", _unfenced(_APPEND_CONDITIONS["_JOURNAL_STARTS"])),
        mock.patch.object(journal_module, "_JOURNAL_CONTINUES", _unfenced(_APPEND_CONDITIONS["_JOURNAL_CONTINUES"])),
    ):
        await _an_append_raced_by_a_takeover()


@pytest.mark.xfail(strict=True, raises=AssertionError)
def test_negative_control_an_append_not_conditional_on_the_owner_fails_the_contract(aws: None) -> None:
    with (
        mock.patch.object(journal_module, "_JOURNAL_STARTS", _unfenced(_APPEND_CONDITIONS["_JOURNAL_STARTS"])),
        mock.patch.object(journal_module, "_JOURNAL_CONTINUES", _unfenced(_APPEND_CONDITIONS["_JOURNAL_CONTINUES"])),
    ):
        CONTRACT.test_journal_appends_are_fenced_on_the_owner_and_read_back_in_order(_store_on("dynamodb"))


class _InPlaceRecordWrites(DynamoDBIdempotencyStore):
    """Negative control: claims and completes update the record's fields in place instead of replacing the item,
    so the journal's attributes outlive the claim they belonged to."""

    def _in_place(
        self, record: IdempotencyRecord, condition: str, names: dict[str, str], values: dict[str, Any]
    ) -> Any:
        fields = {name: value for name, value in _to_item(record).items() if name != "id"}
        return self._table.invoke(
            self._client.update_item,
            TableName=self.table_name,
            Key={"id": {"S": record.key}},
            UpdateExpression="SET " + ", ".join(f"#{name} = :new_{name}" for name in fields),
            ConditionExpression=condition,
            ExpressionAttributeNames={**names, **{f"#{name}": name for name in fields}},
            ExpressionAttributeValues={**values, **{f":new_{name}": value for name, value in fields.items()}},
        )

    def _claim(self, record: IdempotencyRecord, now: float) -> IdempotencyRecord | None:
        values = {":now": table_module._n(now), ":completed": {"S": "COMPLETED"}, ":cancelled": {"S": "CANCELLED"}}
        try:
            self._in_place(record, table_module._CLAIMABLE, table_module._CLAIMABLE_NAMES, values)
            return None
        except ClientError:
            return self._get(record.key)

    def _complete(self, record: IdempotencyRecord) -> bool:
        values = {":owner": {"S": record.owner}, ":in_progress": {"S": "IN_PROGRESS"}}
        try:
            self._in_place(record, table_module._OWNED_IN_PROGRESS, table_module._OWNED_NAMES, values)
            return True
        except ClientError:
            return False


@pytest.mark.xfail(strict=True, raises=AssertionError)
@pytest.mark.parametrize("end", ["complete", "expiry and a fresh claim"])
def test_negative_control_a_journal_that_outlives_its_claim(aws: None, end: str) -> None:
    store = _InPlaceRecordWrites(TABLE, client=moto_client())
    store.create_table()
    CONTRACT.test_the_journal_ends_with_its_claim(store, end)


# The entries' TTL: renewals move it on, so a running journal outlives the sweeper however long its run.


def _sweep_all(store: DynamoDBIdempotencyStore, aws_now: float) -> None:
    """DynamoDB's TTL sweeper, at ``aws_now``: every item whose TTL has passed is deleted."""
    for key, item in _scan(store).items():
        if int(item["expiration"]["N"]) <= aws_now:
            store._client.delete_item(TableName=TABLE, Key={"id": {"S": key}})


def _traced_restamps(store: DynamoDBIdempotencyStore, gate: threading.Event | None = None) -> list[Future[Any]]:
    """The background re-stamp jobs the store starts, as futures (recorded when submitted; held at ``gate`` first)."""
    real_restamp, real_submit = store._journal._restamp, store._executor.submit
    jobs: list[Future[Any]] = []

    def held(*args: Any) -> None:
        assert gate is None or gate.wait(WAIT)
        real_restamp(*args)

    def submit(fn: Any, /, *args: Any) -> Future[Any]:
        if fn != real_restamp:
            return real_submit(fn, *args)
        job = real_submit(held, *args)
        jobs.append(job)
        return job

    store._executor.submit = submit  # type: ignore[method-assign]
    return jobs


async def _a_journal_running_for_two_days() -> None:
    store, _ = _hooked_store()
    jobs = _traced_restamps(store)
    now = time.time()
    await store.claim(_claim("s#k", "a", now), now)  # the record's TTL: now + 1 h + a day
    for entry in (b"0", b"1", b"2"):
        await store.append("s#k", "a", entry)
    first_stamp = int(
        _scan(store)[f"s#k#journal#{(_item(store, 's#k') or {})['journal_id']['S']}#0"]["expiration"]["N"]
    )
    # Two days of heartbeats later, the record's TTL has moved on by two days.
    assert await store.renew("s#k", "a", version=new_version(), lease_seconds=60, expires_at=now + 2 * DAY)
    for job in jobs:
        job.result(WAIT)
    await store.append("s#k", "a", b"3")  # the head this process knew is stale: the append finds the new TTL
    # The sweeper, past the TTL the entries were first given, while the record still counts:
    _sweep_all(store, aws_now=first_stamp + 1)
    assert _item(store, "s#k") is not None
    assert await store.journal("s#k") == [b"0", b"1", b"2", b"3"]
    store.close()


async def test_renewals_move_the_entries_ttl_on_before_the_sweeper_takes_them(aws: None) -> None:
    await _a_journal_running_for_two_days()


@pytest.mark.xfail(strict=True, raises=IdempotencyRecordCorruptedError)
async def test_negative_control_entries_that_keep_the_ttl_of_their_append(aws: None) -> None:
    with mock.patch.object(journal_module._Journal, "keep_alive", lambda *_: None):
        await _a_journal_running_for_two_days()


async def test_the_ttl_moves_on_once_half_the_headroom_is_used_and_only_then(aws: None) -> None:
    store, _ = _hooked_store()
    jobs = _traced_restamps(store)
    now = time.time()
    await store.claim(_claim("s#k", "a", now), now)
    await store.append("s#k", "a", b"0")
    stamped = int((_item(store, "s#k") or {})["journal_expiration"]["N"])
    # Up to half a day past the record's TTL when the entries were stamped: nothing to do.
    for ahead in (3600, 3600 + DAY // 2):
        assert await store.renew("s#k", "a", version=new_version(), lease_seconds=60, expires_at=now + ahead)
    assert jobs == []
    assert await store.renew("s#k", "a", version=new_version(), lease_seconds=60, expires_at=now + 3601 + DAY // 2)
    assert len(jobs) == 1 and jobs[0].result(WAIT) is None
    record = _item(store, "s#k")
    assert record is not None
    moved = int(record["expiration"]["N"]) + DAY
    assert int(record["journal_expiration"]["N"]) == int(record["journal_expiration_floor"]["N"]) == moved > stamped
    assert {int(item["expiration"]["N"]) for key, item in _scan(store).items() if key != "s#k"} == {moved}
    store.close()


async def test_one_job_per_journal_moves_its_ttl_on(aws: None) -> None:
    store, client = _hooked_store()
    gate = threading.Event()
    jobs = _traced_restamps(store, gate)
    now = time.time()
    await store.claim(_claim("s#k", "a", now), now)
    await store.append("s#k", "a", b"0")
    for _ in range(3):  # renewals while the first job is held
        assert await store.renew("s#k", "a", version=new_version(), lease_seconds=60, expires_at=now + 2 * DAY)
    gate.set()
    assert len(jobs) == 1 and jobs[0].result(WAIT) is None
    assert store._journal._restamping == set()
    store.close()


async def test_a_journal_that_ended_meanwhile_keeps_its_ttl(aws: None) -> None:
    store, _ = _hooked_store()
    gate = threading.Event()
    jobs = _traced_restamps(store, gate)
    now = time.time()
    await store.claim(_claim("s#k", "a", now), now)
    await store.append("s#k", "a", b"0")
    before = {key: item["expiration"] for key, item in _scan(store).items() if key != "s#k"}
    assert await store.renew("s#k", "a", version=new_version(), lease_seconds=60, expires_at=now + 2 * DAY)
    assert await store.release("s#k", "a") is True  # before the job runs: the lineage is gone
    gate.set()
    assert len(jobs) == 1 and jobs[0].result(WAIT) is None
    assert {key: item["expiration"] for key, item in _scan(store).items()} == before
    assert store._journal._restamping == set()
    store.close()


async def test_a_job_that_fails_midway_leaves_the_floor_and_the_next_renewal_finishes(aws: None) -> None:
    store, client = _hooked_store()
    jobs = _traced_restamps(store)
    now = time.time()
    await store.claim(_claim("s#k", "a", now), now)
    for entry in (b"0", b"1"):
        await store.append("s#k", "a", entry)
    floor = (_item(store, "s#k") or {})["journal_expiration_floor"]

    def entry_update_fails_once(real: Any, kwargs: dict[str, Any]) -> Any:
        if "#journal#" in kwargs["Key"]["id"]["S"]:
            client.hooks.pop("update_item")
            raise ClientError({"Error": {"Code": "InternalServerError", "Message": "oops"}}, "UpdateItem")
        return real(**kwargs)

    client.hooks["update_item"] = entry_update_fails_once
    assert await store.renew("s#k", "a", version=new_version(), lease_seconds=60, expires_at=now + 2 * DAY)
    assert len(jobs) == 1 and jobs[0].result(WAIT) is None
    record = _item(store, "s#k")
    assert record is not None and record["journal_expiration_floor"] == floor  # not every entry has the new TTL
    assert await store.renew("s#k", "a", version=new_version(), lease_seconds=60, expires_at=now + 2 * DAY)
    assert len(jobs) == 2 and jobs[1].result(WAIT) is None
    record = _item(store, "s#k")
    assert record is not None
    moved = int(record["expiration"]["N"]) + DAY
    assert int(record["journal_expiration_floor"]["N"]) == moved
    assert {int(item["expiration"]["N"]) for key, item in _scan(store).items() if key != "s#k"} == {moved}
    assert await store.journal("s#k") == [b"0", b"1"]
    store.close()


async def test_a_renewal_of_a_record_with_a_malformed_journal_head_still_renews(aws: None) -> None:
    store, client = _hooked_store()
    now = time.time()
    await store.claim(_claim("s#k", "a", now), now)
    store._client.update_item(
        TableName=TABLE,
        Key={"id": {"S": "s#k"}},
        UpdateExpression="SET journal_id = :lineage",  # no length, no TTLs
        ExpressionAttributeValues={":lineage": {"S": "l"}},
    )
    with DynamoDBIdempotencyStore(TABLE, client=client) as other:  # a process that knows nothing of the journal
        assert await other.renew("s#k", "a", version=new_version(), lease_seconds=60, expires_at=now + 2 * DAY)
        assert other._journal._restamping == set()
        with pytest.raises(IdempotencyRecordCorruptedError, match="s#k"):
            await other.journal("s#k")
    store.close()


async def test_a_renewal_returns_the_record_only_where_a_journal_may_be(aws: None) -> None:
    """A session lock's checkpoint may hold tens of KB: its renewals return nothing, a journaled claim's its item."""
    store, client = _hooked_store()
    returned: list[str] = []

    def update(real: Any, kwargs: dict[str, Any]) -> Any:
        returned.append(kwargs.get("ReturnValues", "NONE"))
        return real(**kwargs)

    client.hooks["update_item"] = update
    now = time.time()

    async def renew(on: DynamoDBIdempotencyStore, key: str) -> None:
        assert await on.renew(key, "a", version=new_version(), lease_seconds=60, expires_at=now + 60)

    lock = _claim("s#lock", "a", now)
    await store.claim(lock, now)
    await store.claim(_claim("s#token", "a", now), now)
    await renew(store, "s#lock")
    await renew(store, "s#token")
    await store.append("s#token", "a", b"0")
    await renew(store, "s#token")
    assert returned == ["NONE", "NONE", "ALL_NEW"]
    with DynamoDBIdempotencyStore(TABLE, client=client) as other:  # knows nothing: asks once, then knows
        returned.clear()
        await renew(other, "s#lock")
        await renew(other, "s#lock")
        await renew(other, "s#token")
        assert returned == ["ALL_NEW", "NONE", "ALL_NEW"]
        # A takeover learns where the journal stands from the item it wrote.
        current = await other.get("s#lock")
        assert current is not None
        returned.clear()
        assert await other.take_over(_claim("s#lock", "a", now), current.version) is True
        with DynamoDBIdempotencyStore(TABLE, client=client) as third:
            current = await third.get("s#lock")
            assert current is not None
            assert await third.take_over(_claim("s#lock", "a", now), current.version) is True
            await renew(third, "s#lock")
        assert returned == ["ALL_NEW", "ALL_NEW", "NONE"]
    store.close()


def test_no_job_is_started_on_a_store_being_closed(aws: None) -> None:
    # A renewal in flight while ``close()`` runs: the executor takes no new work; a later renewal does it.
    store, _ = _hooked_store()
    store._executor.shutdown()
    due = {
        "journal_id": {"S": "l"},
        "journal_expiration": {"N": "100"},
        "journal_expiration_floor": {"N": "100"},
        "expiration": {"N": "100"},
    }
    store._journal.keep_alive("s#k", due)
    assert store._journal._restamping == set()


# Writes that meet a journal append's transaction on the same item: DynamoDB rejects them; they are retried.


def _conflict() -> ClientError:
    message = "Transaction is ongoing for the item"
    return ClientError({"Error": {"Code": "TransactionConflictException", "Message": message}}, "UpdateItem")


def _failing(times: int, error: Any) -> Any:
    """A hook failing its first ``times`` calls with ``error()``, then making the real call."""
    failures = {"left": times}

    def hook(real: Any, kwargs: dict[str, Any]) -> Any:
        if failures["left"] > 0:
            failures["left"] -= 1
            raise error()
        return real(**kwargs)

    return hook


@pytest.fixture
def no_backoff() -> Iterator[None]:
    with (
        mock.patch.object(table_module, "_CONFLICT_BACKOFF_SECONDS", 0),
        mock.patch.object(journal_module, "_BATCH_GET_BACKOFF_SECONDS", 0),
    ):
        yield


async def test_writes_meeting_a_transaction_are_tried_again(aws: None, no_backoff: None) -> None:
    store, client = _hooked_store()
    now = time.time()
    await store.claim(_claim("s#k", "a", now), now)
    client.hooks["update_item"] = _failing(2, _conflict)
    client.calls.clear()
    assert await store.renew("s#k", "a", version=new_version(), lease_seconds=60, expires_at=now + 600) is True
    assert client.calls == ["update_item"] * 3
    # A transaction cancelled because another one holds an item: tried again too.
    client.hooks["transact_write_items"] = _failing(1, lambda: _cancelled({"Code": "TransactionConflict"}, {}))
    assert await store.append("s#k", "a", b"0") is True
    assert await store.journal("s#k") == [b"0"]
    store.close()


async def test_a_conflict_that_does_not_end_is_a_store_error(aws: None, no_backoff: None) -> None:
    store, client = _hooked_store()
    now = time.time()
    await store.claim(_claim("s#k", "a", now), now)
    client.hooks["update_item"] = _failing(100, _conflict)
    client.calls.clear()
    with pytest.raises(IdempotencyStoreError, match="TransactionConflictException") as raised:
        await store.renew("s#k", "a", version=new_version(), lease_seconds=60, expires_at=now + 600)
    assert isinstance(raised.value.__cause__, ClientError)
    assert client.calls == ["update_item"] * table_module._CONFLICT_ATTEMPTS
    store.close()


@pytest.mark.parametrize(
    "reasons",
    [
        pytest.param(
            [{"Code": "ValidationError", "Message": "Item size has exceeded"}, {"Code": "None"}], id="invalid"
        ),
        pytest.param([{"Code": "ThrottlingError"}, {"Code": "None"}], id="throttled"),
        pytest.param(None, id="no-reasons"),
    ],
)
async def test_a_transaction_cancelled_for_another_reason_is_a_store_error(aws: None, reasons: Any) -> None:
    store, client = _hooked_store()
    now = time.time()
    await store.claim(_claim("s#k", "a", now), now)
    client.hooks["transact_write_items"] = _failing(1, lambda: _cancelled(*(reasons or ())))
    with pytest.raises(IdempotencyStoreError, match="TransactionCanceledException"):
        await store.append("s#k", "a", b"0")
    assert await store.journal("s#k") == []
    store.close()


# Reading the journal: unprocessed keys, missing and malformed entries.


def _partly_processed(rounds: list[int | None]) -> Any:
    """A batch_get_item hook: each call serves only ``rounds.pop(0)`` keys (all when None), the rest unprocessed."""

    def hook(real: Any, kwargs: dict[str, Any]) -> Any:
        served = rounds.pop(0) if rounds else None
        request = kwargs["RequestItems"][TABLE]
        keys = request["Keys"]
        response = real(RequestItems={TABLE: {**request, "Keys": keys[:served]}}) if served != 0 else {}
        if served is not None and keys[served:]:
            response["UnprocessedKeys"] = {TABLE: {**request, "Keys": keys[served:]}}
        return response

    return hook


async def test_unprocessed_keys_are_asked_for_again(aws: None, no_backoff: None) -> None:
    store, client = _hooked_store()
    now = time.time()
    await store.claim(_claim("s#k", "a", now), now)
    entries = [b"%d" % i for i in range(5)]
    for entry in entries:
        await store.append("s#k", "a", entry)
    client.hooks["batch_get_item"] = _partly_processed([2, 0, 0, 1])  # some, none twice (throttled), one, the rest
    client.calls.clear()
    assert await store.journal("s#k") == entries
    assert client.calls == ["get_item"] + ["batch_get_item"] * 5
    store.close()


async def test_keys_left_unprocessed_round_after_round_are_a_store_error(aws: None, no_backoff: None) -> None:
    store, client = _hooked_store()
    now = time.time()
    await store.claim(_claim("s#k", "a", now), now)
    await store.append("s#k", "a", b"0")
    client.hooks["batch_get_item"] = _partly_processed([0] * 100)
    client.calls.clear()
    with pytest.raises(IdempotencyStoreError, match="unprocessed"):
        await store.journal("s#k")
    assert client.calls == ["get_item"] + ["batch_get_item"] * journal_module._BATCH_GET_IDLE_ROUNDS
    store.close()


def _lineage(store: DynamoDBIdempotencyStore, key: str) -> str:
    item = _item(store, key)
    assert item is not None
    lineage: str = item["journal_id"]["S"]
    return lineage


@pytest.mark.parametrize("damage", ["missing", "no-entry-attribute"])
async def test_a_journal_with_a_lost_or_malformed_entry_is_corrupt(aws: None, damage: str) -> None:
    store, _ = _hooked_store()
    now = time.time()
    await store.claim(_claim("s#k", "a", now), now)
    for entry in (b"0", b"1", b"2"):
        await store.append("s#k", "a", entry)
    entry_id = f"s#k#journal#{_lineage(store, 's#k')}#1"
    if damage == "missing":
        store._client.delete_item(TableName=TABLE, Key={"id": {"S": entry_id}})
    else:
        store._client.put_item(TableName=TABLE, Item={"id": {"S": entry_id}, "expiration": {"N": "1"}})
    with pytest.raises(IdempotencyRecordCorruptedError, match="s#k") as raised:
        await store.journal("s#k")
    assert ("entry 1 of 3 is missing" in str(raised.value)) is (damage == "missing")
    store.close()


async def test_a_malformed_journal_head_is_a_corrupt_record(aws: None) -> None:
    store, _ = _hooked_store()
    now = time.time()
    await store.claim(_claim("s#k", "a", now), now)
    store._client.update_item(
        TableName=TABLE,
        Key={"id": {"S": "s#k"}},
        UpdateExpression="SET journal_id = :lineage, journal_length = :length",
        ExpressionAttributeValues={":lineage": {"S": "l"}, ":length": {"S": "two"}},
    )
    store._journal.forget("s#k")
    with pytest.raises(IdempotencyRecordCorruptedError, match="s#k"):
        await store.journal("s#k")
    with pytest.raises(IdempotencyRecordCorruptedError, match="s#k"):
        await store.append("s#k", "a", b"0")
    store.close()


# Appends and cuts that keep meeting other writers; what this process remembers.


def _owned_item(store: DynamoDBIdempotencyStore, key: str) -> dict[str, Any]:
    item = _item(store, key)
    assert item is not None
    return item


async def test_an_append_that_keeps_meeting_a_moved_journal_gives_up(aws: None) -> None:
    store, client = _hooked_store()
    now = time.time()
    await store.claim(_claim("s#k", "a", now), now)
    await store.append("s#k", "a", b"0")
    record = _owned_item(store, "s#k")
    stale = {**record, "journal_length": {"N": "7"}}  # as if another append always landed first
    client.hooks["transact_write_items"] = _failing(
        100, lambda: _cancelled({"Code": "ConditionalCheckFailed", "Item": stale}, {"Code": "None"})
    )
    client.calls.clear()
    with pytest.raises(IdempotencyStoreError, match="kept racing"):
        await store.append("s#k", "a", b"1")
    assert client.calls == ["transact_write_items"] * journal_module._JOURNAL_ATTEMPTS
    store.close()


async def test_concurrent_appends_of_one_owner_take_turns(aws: None) -> None:
    """Tools finishing together append at once: each lands, in one transaction, none failing on another's."""
    await _appends_at_once()


# Appends racing each other from one process: they fail on each other's transactions, and run out of attempts (12
# appends on 4 threads failed in 100 runs of 100).
@pytest.mark.xfail(strict=True, raises=(AssertionError, IdempotencyStoreError))
async def test_negative_control_concurrent_appends_not_taking_turns(aws: None) -> None:
    with mock.patch.object(journal_module._Journal, "append", journal_module._Journal._append_alone):
        await _appends_at_once()


async def _appends_at_once() -> None:
    store, client = _hooked_store()
    now = time.time()
    await store.claim(_claim("s#k", "a", now), now)
    entries = [b"tool-%d" % i for i in range(12)]
    client.calls.clear()
    outcomes = await asyncio.gather(*(store.append("s#k", "a", entry) for entry in entries))
    assert outcomes == [True] * len(entries)
    assert client.calls == ["transact_write_items"] * len(entries)
    assert sorted(await store.journal("s#k")) == sorted(entries)
    store.close()


@pytest.mark.parametrize("server", SERVERS)
async def test_appends_of_two_processes_to_one_journal_all_land(aws: None, server: str) -> None:
    """Each store is another process: an append on a journal the other moved on meanwhile finds where it stands."""
    store, client = _hooked_store(server)
    now = time.time()
    await store.claim(_claim("s#k", "a", now), now)
    with DynamoDBIdempotencyStore(TABLE, client=client) as other:
        for i in range(3):
            assert await store.append("s#k", "a", b"here-%d" % i) is True
            assert await other.append("s#k", "a", b"there-%d" % i) is True
        expected = [b"here-0", b"there-0", b"here-1", b"there-1", b"here-2", b"there-2"]
        assert await store.journal("s#k") == await other.journal("s#k") == expected
    store.close()


async def test_a_cut_raced_by_an_append_on_a_server_without_old_items_cuts_again(aws: None) -> None:
    store, client = _hooked_store("no old item")
    now = time.time()
    await store.claim(_claim("s#k", "a", now), now)
    for entry in (b"0", b"1", b"2"):
        await store.append("s#k", "a", entry)
    client.hooks["update_item"] = _failing(1, lambda: _condition_failed("UpdateItem"))
    client.calls.clear()
    assert await store.truncate("s#k", "a", 1) is True
    assert client.calls == ["update_item", "get_item", "update_item"]
    assert await store.journal("s#k") == [b"0"]
    client.hooks["update_item"] = _failing(100, lambda: _condition_failed("UpdateItem"))
    await store.append("s#k", "a", b"1")
    with pytest.raises(IdempotencyStoreError, match="kept racing"):
        await store.truncate("s#k", "a", 0)
    store.close()


async def test_truncate_refuses_a_negative_length(aws: None) -> None:
    store, _ = _hooked_store()
    with pytest.raises(ValueError, match="negative"):
        await store.truncate("s#k", "a", -1)
    store.close()


async def test_the_heads_remembered_are_bounded(aws: None) -> None:
    with mock.patch.object(journal_module, "_REMEMBERED_HEADS", 2):
        store, client = _hooked_store()
    now = time.time()
    for key in ("s#1", "s#2", "s#3"):
        await store.claim(_claim(key, "a", now), now)
    client.calls.clear()
    assert await store.append("s#3", "a", b"x") is True
    assert client.calls == ["transact_write_items"]
    client.calls.clear()
    assert await store.append("s#1", "a", b"x") is True  # the least recently used head was forgotten
    assert client.calls == ["get_item", "transact_write_items"]
    store.close()


# Cancels: a mark on the running claim (its version kept), a fence on its owner, a tombstone that frees the key.


def _tombstone(key: str, owner: str, now: float) -> IdempotencyRecord:
    return IdempotencyRecord(key, RecordState.CANCELLED, owner, new_version(), 0.0, now + 60, "fp")


@pytest.mark.parametrize("server", SERVERS)
async def test_a_cancel_is_one_update_item_that_sets_the_mark_and_nothing_else(aws: None, server: str) -> None:
    store, client = _hooked_store(server)
    now = time.time()
    first = IdempotencyRecord("s#k", RecordState.IN_PROGRESS, "a", new_version(), 60.0, now + 3600, "fp", None, "cp")
    await store.claim(first, now)
    await store.append("s#k", "a", b"step")
    before = _owned_item(store, "s#k")
    client.calls.clear()
    assert await store.cancel("s#k") == dataclasses.replace(first, cancelled=True)
    assert client.calls == ["update_item"]  # the marked record comes back with the write
    # the version, the TTL, the journal's head: as they were (a mark is no heartbeat)
    assert _owned_item(store, "s#k") == {**before, "cancelled": {"BOOL": True}}
    # the owner's claim, resent after its first attempt landed, is still its own, and still marked
    assert await store.claim(first, now) is None
    assert await store.get("s#k") == dataclasses.replace(first, cancelled=True)
    # a finished record comes back with the failed condition (a server without old items costs a read)
    tombstone = _tombstone("s#k", "a", now)
    assert await store.complete(tombstone) is True
    client.calls.clear()
    assert await store.cancel("s#k") == tombstone
    assert client.calls == (["update_item"] if server == "dynamodb" else ["update_item", "get_item"])
    # an absent key fails the condition without an item on any server: a read says so, and writes nothing
    client.calls.clear()
    assert await store.cancel("s#none") is None
    assert client.calls == ["update_item", "get_item"]
    assert _item(store, "s#none") is None
    store.close()


async def test_the_mark_is_an_attribute_there_only_when_true_and_a_take_over_writes_what_it_is_given(
    aws: None,
) -> None:
    store, _ = _hooked_store()
    now = time.time()
    first = _claim("s#k", "a", now)
    await store.claim(first, now)
    assert "cancelled" not in _owned_item(store, "s#k")
    await store.cancel("s#k")
    unmarked = _claim("s#k", "b", now)
    assert await store.take_over(unmarked, first.version) is True
    assert "cancelled" not in _owned_item(store, "s#k")
    assert await store.get("s#k") == unmarked
    # every optional field set, the mark too: nothing to remove
    marked = IdempotencyRecord(
        "s#k", RecordState.IN_PROGRESS, "c", new_version(), 60.0, now + 60, "fp", b"", "cp", True
    )
    assert await store.take_over(marked, unmarked.version) is True
    assert _owned_item(store, "s#k")["cancelled"] == {"BOOL": True}
    assert await store.get("s#k") == marked
    # its owner is fenced as any marked claim's: no heartbeat, no result; its tombstone lands
    assert await store.renew("s#k", "c", version=new_version(), lease_seconds=60, expires_at=now + 60) is False
    assert await store.complete(_completed("s#k", "c", now + 60)) is False
    tombstone = _tombstone("s#k", "c", now)
    assert await store.complete(tombstone) is True
    assert "cancelled" not in _owned_item(store, "s#k")
    assert await store.get("s#k") == tombstone
    store.close()


@pytest.mark.parametrize("server", SERVERS)
async def test_a_claim_over_a_tombstone_starts_a_fresh_lineage(aws: None, server: str) -> None:
    store, client = _hooked_store(server)
    now = time.time()
    await store.claim(_claim("s#k", "a", now), now)
    await store.append("s#k", "a", b"a-0")
    lineage = _lineage(store, "s#k")
    await store.cancel("s#k")
    assert await store.append("s#k", "a", b"a-1") is False
    assert await store.complete(_tombstone("s#k", "a", now)) is True
    assert not any(name.startswith("journal") for name in _owned_item(store, "s#k"))
    with DynamoDBIdempotencyStore(TABLE, client=client) as other:  # another process, which remembers nothing
        client.calls.clear()
        assert await other.claim(_claim("s#k", "b", now), now) is None
        assert client.calls == ["put_item"]  # the tombstone frees the key by the write's own condition
        assert await other.journal("s#k") == []
        assert await other.append("s#k", "b", b"b-0") is True
    assert _lineage(store, "s#k") != lineage
    assert await store.journal("s#k") == [b"b-0"]
    assert await store.append("s#k", "a", b"late") is False
    store.close()


async def test_a_claim_meeting_a_tombstone_left_between_its_write_and_its_read_claims_again(aws: None) -> None:
    store, client = _hooked_store("no old item")
    now = time.time()
    await store.claim(_claim("s#k", "a", now), now)

    def put_racing_the_owners_tombstone(real: Any, kwargs: dict[str, Any]) -> Any:
        client.hooks.pop("put_item")
        try:
            return real(**kwargs)
        finally:
            real(TableName=TABLE, Item=_to_item(_tombstone("s#k", "a", now)))  # the cancelled run ends meanwhile

    client.hooks["put_item"] = put_racing_the_owners_tombstone
    client.calls.clear()
    claim = _claim("s#k", "b", now)
    assert await store.claim(claim, now) is None
    assert client.calls == ["put_item", "get_item", "put_item"]
    assert await store.get("s#k") == claim
    store.close()


@pytest.mark.parametrize("server", SERVERS)
async def test_a_cancel_meeting_a_claim_landed_after_its_write_marks_that_claim(aws: None, server: str) -> None:
    """The first write found no running claim; the read after it finds one: the cancel is for it, as it would be
    had the call come a moment later, and the caller is never told of an unmarked running claim."""
    store, client = _hooked_store(server)
    now = time.time()
    claim = _claim("s#k", "b", now)

    def update_racing_a_claim(real: Any, kwargs: dict[str, Any]) -> Any:
        client.hooks.pop("update_item")
        try:
            return real(**kwargs)
        finally:
            assert store.claim_blocking(claim, now) is None

    client.hooks["update_item"] = update_racing_a_claim
    client.calls.clear()
    assert await store.cancel("s#k") == dataclasses.replace(claim, cancelled=True)
    assert client.calls == ["update_item", "put_item", "get_item", "update_item"]
    assert await store.get("s#k") == dataclasses.replace(claim, cancelled=True)
    store.close()


async def test_a_cancel_gives_up_when_the_record_keeps_changing_under_it(aws: None) -> None:
    store, client = _hooked_store("no old item")
    now = time.time()
    await store.claim(_claim("s#k", "a", now), now)
    client.hooks["update_item"] = _failing(100, lambda: _condition_failed("UpdateItem"))  # and unmarked when read
    client.calls.clear()
    with pytest.raises(IdempotencyStoreError, match="cancel on DynamoDB table .* kept racing other writers"):
        await store.cancel("s#k")
    assert client.calls == ["update_item", "get_item"] * dynamodb_module._CLAIM_ATTEMPTS
    store.close()


# Negative controls: each broken variant fails the contract's cancel test.

# Every owner's IN_PROGRESS record, marked or not (the names the real condition uses, so DynamoDB accepts it).
_IGNORING_THE_MARK = (
    table_module._OWNED_IN_PROGRESS + " AND (attribute_not_exists(#cancelled) OR attribute_exists(#cancelled))"
)


class _RenewIgnoringTheMark(DynamoDBIdempotencyStore):
    """A heartbeat that keeps a marked claim alive: its owner never learns of the cancel."""

    def _renew(self, *args: Any) -> bool:
        with mock.patch.object(dynamodb_module, "_RUNNING", _IGNORING_THE_MARK):
            return super()._renew(*args)


class _CompleteIgnoringTheMark(DynamoDBIdempotencyStore):
    """A result that lands after the mark (the owner checked at its last heartbeat, not in its write)."""

    def _complete(self, record: IdempotencyRecord) -> bool:
        with mock.patch.object(dynamodb_module, "_RUNNING", _IGNORING_THE_MARK):
            return super()._complete(record)


@pytest.mark.xfail(strict=True, raises=AssertionError)
@pytest.mark.parametrize("broken", [_RenewIgnoringTheMark, _CompleteIgnoringTheMark])
def test_negative_control_a_write_that_ignores_the_mark(aws: None, broken: type[DynamoDBIdempotencyStore]) -> None:
    store = broken(TABLE, client=moto_client())
    store.create_table()
    CONTRACT.test_a_cancel_marks_a_running_claim_and_fences_its_owner(store)


@pytest.mark.xfail(strict=True, raises=AssertionError)
def test_negative_control_a_cancel_that_changes_the_version(aws: None) -> None:
    """A mark as a heartbeat: a waiter watching the version would see a live owner in a cancelled run."""
    with (
        mock.patch.object(dynamodb_module, "_MARK", "SET #cancelled = :true, #version = :bumped"),
        mock.patch.object(dynamodb_module, "_MARK_NAMES", {**table_module._MARK_NAMES, "#version": "version"}),
        mock.patch.object(
            dynamodb_module, "_MARK_VALUES", {**table_module._MARK_VALUES, ":bumped": {"S": new_version()}}
        ),
    ):
        CONTRACT.test_a_cancel_marks_a_running_claim_and_fences_its_owner(_store_on("dynamodb"))


_FORKED = """
import asyncio, os, sys, time
sys.path.insert(0, sys.argv[2])
from moto import mock_aws
from conftest import make_dynamodb_store

with mock_aws():
    store = make_dynamodb_store()
    asyncio.run(store.get("s#k"))  # the store's threads exist in the parent now
    parents = store._executor
    # A worker marks itself idle only after its call's outcome is out: fork once it has, as a store used a while ago
    # would (the parent's executor then counts an idle thread that the child does not have).
    deadline = time.monotonic() + 10
    while parents._idle_semaphore._value < 1:
        assert time.monotonic() < deadline, "the store's thread never went idle"
        time.sleep(0.001)
    pid = os.fork()
    if pid == 0:
        if sys.argv[1] == "parents-threads":
            store._executor = parents  # the broken variant: the parent's executor, whose threads are not here
        try:
            found = asyncio.run(asyncio.wait_for(store.get("s#k"), 10))
            os._exit(0 if found is None else 2)
        except asyncio.TimeoutError:  # not the builtin TimeoutError on Python 3.10
            os._exit(3)
    _, status = os.waitpid(pid, 0)
    store.close()
    sys.exit(os.waitstatus_to_exitcode(status))
"""


@pytest.mark.parametrize(
    "variant", ["own-threads", pytest.param("parents-threads", marks=pytest.mark.xfail(strict=True))]
)
def test_a_store_used_before_a_fork_serves_the_child(variant: str) -> None:
    """A store used in a process that then forks (a pre-forking server): the child's calls answer, never hang."""
    here = str(Path(__file__).parent)
    done = subprocess.run([sys.executable, "-c", _FORKED, variant, here], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"the child's call ended with {done.returncode} (3: it hung): {done.stderr}"
