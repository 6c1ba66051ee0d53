"""DynamoDBIdempotencyStore beyond the shared contract: construction, errors, odd servers, bad items."""

from __future__ import annotations

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
