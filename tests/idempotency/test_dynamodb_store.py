"""DynamoDBIdempotencyStore beyond the shared contract: construction, errors, odd servers, bad items."""

from __future__ import annotations

import asyncio
import math
import socket
import threading
import time
from collections.abc import Iterator
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
    IdempotencyStoreError,
    RecordState,
)
from strands_py.idempotency import dynamodb as dynamodb_module

WAIT = 10.0


@pytest.fixture
def aws() -> Iterator[None]:
    with mock_aws():
        yield


def _claim(key: str, owner: str, now: float) -> IdempotencyRecord:
    return IdempotencyRecord(key, RecordState.IN_PROGRESS, owner, now + 60, now + 3600, "fp")


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
        store.get("s#k"),
        store.complete(IdempotencyRecord("s#k", RecordState.COMPLETED, "a", now, now + 60, None, b"z")),
        store.release("s#k", "a"),
        store.renew("s#k", "a", now + 60),
    ]
    errors = []
    for call in calls:
        with pytest.raises(IdempotencyStoreError) as raised:
            await asyncio.wait_for(call, WAIT)
        errors.append(raised.value)
    return errors


OPERATIONS = ["put_item", "get_item", "put_item", "delete_item", "update_item"]


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


async def test_claim_reads_the_record_when_the_server_does_not_return_it(aws: None) -> None:
    store = make_dynamodb_store()
    now = time.time()
    await store.claim(_claim("s#k", "a", now), now)
    real_put = store._client.put_item

    def put_without_old_item(**kwargs: Any) -> Any:
        try:
            return real_put(**kwargs)
        except ClientError as e:
            e.response.pop("Item", None)
            raise

    store._client.put_item = put_without_old_item
    existing = await store.claim(_claim("s#k", "b", now), now)
    assert existing is not None and existing.owner == "a"
    # released between the failed write and the read: the claim is tried again, and succeeds
    calls = {"n": 0}

    def put_racing_a_release(**kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 1:
            try:
                return real_put(**kwargs)
            except ClientError as e:
                e.response.pop("Item", None)
                store._client.delete_item(TableName=TABLE, Key={"id": {"S": "s#k"}})
                raise
        return real_put(**kwargs)

    store._client.put_item = put_racing_a_release
    assert await store.claim(_claim("s#k", "c", now), now) is None
    got = await store.get("s#k")
    assert got is not None and got.owner == "c"
    store.close()


async def test_malformed_item_is_a_corrupt_record_naming_the_key(aws: None) -> None:
    store = make_dynamodb_store()
    store._client.put_item(TableName=TABLE, Item={"id": {"S": "s#bad"}, "status": {"S": "SOMETHING"}})
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


async def test_expiry_decisions_use_the_exact_expiry_not_the_ttl_attribute(aws: None) -> None:
    """Issue 8 §3: the TTL attribute is rounded up to whole seconds; replaying until then was up to 1 s late."""
    await _expired_at_the_exact_instant()


async def _expired_at_the_exact_instant() -> None:
    store = make_dynamodb_store()
    second = math.floor(time.time())
    expires = second + 0.25  # the TTL attribute says second + 1
    await store.claim(_claim("s#k", "a", second - 10), second - 10)
    await store.complete(IdempotencyRecord("s#k", RecordState.COMPLETED, "a", second, expires, "fp", b"z"))
    item = store._client.get_item(TableName=TABLE, Key={"id": {"S": "s#k"}})["Item"]
    assert item["expiration"] == {"N": str(second + 1)}
    got = await store.get("s#k")
    assert got is not None and got.expires_at == expires
    # just before the exact expiry: replayed; just after: claimable, though the TTL attribute is still ahead
    before = await store.claim(_claim("s#k", "b", second + 0.2), second + 0.2)
    assert before is not None and before.state is RecordState.COMPLETED
    assert await store.claim(_claim("s#k", "b", second + 0.5), second + 0.5) is None
    store.close()


_to_item = dynamodb_module._to_item


def _old_to_item(record: IdempotencyRecord) -> dict[str, Any]:
    item = _to_item(record)
    del item["expires_at"]
    item["expiration"] = {"N": str(int(record.expires_at) + 1)}
    return item


@pytest.mark.xfail(strict=True, raises=AssertionError)
async def test_negative_control_deciding_by_the_ttl_attribute_replays_past_the_expiry(aws: None) -> None:
    with mock.patch.object(dynamodb_module, "_to_item", _old_to_item):
        await _expired_at_the_exact_instant()


async def test_items_without_exact_expiry_are_judged_by_the_ttl_attribute(aws: None) -> None:
    store = make_dynamodb_store()
    second = math.floor(time.time())
    item = {**_legacy_item("s#old", "a", lease=second - 100, expiration=second + 1)}
    item["status"] = {"S": "COMPLETED"}
    item["payload"] = {"B": b"z"}
    store._client.put_item(TableName=TABLE, Item=item)
    got = await store.get("s#old")
    assert got is not None and got.expires_at == second + 1 and got.state is RecordState.COMPLETED
    blocked = await store.claim(_claim("s#old", "b", second + 0.5), second + 0.5)
    assert blocked is not None and blocked.owner == "a"
    assert await store.claim(_claim("s#old", "b", second + 1), second + 1) is None
    store.close()


def _legacy_item(key: str, owner: str, *, lease: float, expiration: int) -> dict[str, Any]:
    """An item as the previous version wrote it: no exact ``expires_at``, only the rounded-up TTL attribute."""
    return {
        "id": {"S": key},
        "status": {"S": "IN_PROGRESS"},
        "owner": {"S": owner},
        "lease": {"N": repr(lease)},
        "expiration": {"N": str(expiration)},
        "fingerprint": {"S": "fp"},
    }


async def test_renew_of_an_item_without_exact_expiry_raises_it_from_the_ttl_attribute(aws: None) -> None:
    store = make_dynamodb_store()
    now = time.time()
    store._client.put_item(TableName=TABLE, Item=_legacy_item("s#old", "a", lease=now + 10, expiration=int(now) + 100))
    # within the old expiry: the lease moves, the expiry is kept (and now written exactly)
    assert await store.renew("s#old", "a", now + 50) is True
    got = await store.get("s#old")
    assert got is not None and got.lease_expires_at == now + 50 and got.expires_at == int(now) + 100
    item = store._client.get_item(TableName=TABLE, Key={"id": {"S": "s#old"}})["Item"]
    assert item["expires_at"] == {"N": repr(float(int(now) + 100))}
    # past it: raised
    store._client.put_item(TableName=TABLE, Item=_legacy_item("s#old2", "a", lease=now, expiration=int(now) + 5))
    assert await store.renew("s#old2", "a", now + 50.5) is True
    got = await store.get("s#old2")
    assert got is not None and got.expires_at == now + 50.5
    assert store._client.get_item(TableName=TABLE, Key={"id": {"S": "s#old2"}})["Item"]["expiration"] == {
        "N": str(math.ceil(now + 50.5))
    }
    assert await store.renew("s#old2", "intruder", now + 60) is False
    store.close()


async def test_renew_compare_and_set_retries_when_the_expiry_moved_meanwhile(aws: None) -> None:
    store = make_dynamodb_store()
    now = time.time()
    await store.claim(IdempotencyRecord("s#k", RecordState.IN_PROGRESS, "a", now + 10, now + 20), now)
    real_update = store._client.update_item
    moved = {"n": 0}

    def update_after_a_concurrent_renewal(**kwargs: Any) -> Any:
        # Just before our compare-and-set, another renewal by the same owner raises the expiry.
        if ":seen" in kwargs["ExpressionAttributeValues"] and moved["n"] == 0:
            moved["n"] += 1
            real_update(
                TableName=TABLE,
                Key={"id": {"S": "s#k"}},
                UpdateExpression="SET expires_at = :e",
                ExpressionAttributeValues={":e": {"N": repr(now + 40)}},
            )
        return real_update(**kwargs)

    store._client.update_item = update_after_a_concurrent_renewal
    assert await store.renew("s#k", "a", now + 30) is True
    got = await store.get("s#k")
    assert moved["n"] == 1 and got is not None and got.lease_expires_at == now + 30 and got.expires_at == now + 40
    store.close()


async def test_renew_gives_up_when_its_compare_and_set_keeps_losing(aws: None) -> None:
    store = make_dynamodb_store()
    now = time.time()
    await store.claim(IdempotencyRecord("s#k", RecordState.IN_PROGRESS, "a", now + 10, now + 20), now)
    real_update = store._client.update_item
    bump = {"n": 0}

    def update_always_raced(**kwargs: Any) -> Any:
        if ":seen" in kwargs["ExpressionAttributeValues"]:
            bump["n"] += 1
            real_update(
                TableName=TABLE,
                Key={"id": {"S": "s#k"}},
                UpdateExpression="SET expires_at = :e",
                ExpressionAttributeValues={":e": {"N": repr(now + 20 - bump["n"])}},
            )
        return real_update(**kwargs)

    store._client.update_item = update_always_raced
    with pytest.raises(IdempotencyStoreError, match="kept racing"):
        await store.renew("s#k", "a", now + 30)
    store.close()


async def test_renew_fenced_after_the_compare_and_set_lost_to_a_takeover(aws: None) -> None:
    store = make_dynamodb_store()
    now = time.time()
    await store.claim(IdempotencyRecord("s#k", RecordState.IN_PROGRESS, "a", now + 10, now + 20), now)
    real_update = store._client.update_item

    def update_after_a_takeover(**kwargs: Any) -> Any:
        if ":seen" in kwargs["ExpressionAttributeValues"]:
            store._client.put_item(
                TableName=TABLE,
                Item={**_legacy_item("s#k", "b", lease=now + 60, expiration=int(now) + 99)},
            )
        return real_update(**kwargs)

    store._client.update_item = update_after_a_takeover
    assert await store.renew("s#k", "a", now + 30) is False
    store.close()


async def test_renew_reads_the_item_when_the_server_does_not_return_it(aws: None) -> None:
    store = make_dynamodb_store()
    now = time.time()
    await store.claim(IdempotencyRecord("s#k", RecordState.IN_PROGRESS, "a", now + 10, now + 20), now)
    real_update = store._client.update_item

    def update_without_old_item(**kwargs: Any) -> Any:
        try:
            return real_update(**kwargs)
        except ClientError as e:
            e.response.pop("Item", None)
            raise

    store._client.update_item = update_without_old_item
    assert await store.renew("s#k", "a", now + 30) is True  # first attempt fails (expires too early): read, raise
    assert await store.renew("s#k", "b", now + 30) is False
    assert await store.renew("s#gone", "a", now + 30) is False
    got = await store.get("s#k")
    assert got is not None and got.expires_at == now + 30
    store.close()
