"""DynamoDBIdempotencyStore beyond the shared contract: construction, errors, odd servers, bad items."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator
from typing import Any
from unittest import mock

import boto3
import pytest
from botocore.exceptions import ClientError
from conftest import TABLE, make_dynamodb_store
from moto import mock_aws

from strands_py.idempotency import (
    DynamoDBIdempotencyStore,
    IdempotencyRecord,
    IdempotencyRecordCorruptedError,
    IdempotencyStoreError,
    RecordState,
)


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


async def test_errors_other_than_a_failed_condition_propagate(aws: None) -> None:
    store = make_dynamodb_store()
    denied = ClientError({"Error": {"Code": "AccessDeniedException", "Message": "no"}}, "PutItem")
    store._client.put_item = mock.Mock(side_effect=denied)
    store._client.delete_item = mock.Mock(side_effect=denied)
    now = time.time()
    with pytest.raises(ClientError):
        await store.claim(_claim("s#k", "a", now), now)
    with pytest.raises(ClientError):
        await store.release("s#k", "a")
    store.close()


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


def test_create_table_is_idempotent_and_enables_ttl(aws: None) -> None:
    store = make_dynamodb_store()
    store.create_table()
    ttl = store._client.describe_time_to_live(TableName=TABLE)["TimeToLiveDescription"]
    assert ttl["AttributeName"] == "expiration" and ttl["TimeToLiveStatus"] == "ENABLED"
    store._client.create_table = mock.Mock(
        side_effect=ClientError({"Error": {"Code": "LimitExceededException", "Message": "no"}}, "CreateTable")
    )
    with pytest.raises(ClientError):
        store.create_table()
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
