from __future__ import annotations

import functools
import threading
from collections.abc import Iterator
from typing import Any

import boto3
import pytest
from moto import mock_aws

from strands_py.idempotency import DynamoDBIdempotencyStore, IdempotencyStore, InMemoryIdempotencyStore

TABLE = "agent-idempotency"


class SerialisedClient:
    """A boto3 client whose calls run one at a time, as DynamoDB's per-item atomicity would have them.

    moto's in-process DynamoDB backend has no lock: two conditional PutItems on one item, on two threads, can both
    pass their condition (moto reads the item, checks, then writes), which DynamoDB never allows. Racing threads at
    moto would test moto, not the store; serialising each call gives the store the guarantee the real server gives.
    Everything else (attributes, ``meta``, assignments made by a test) passes through to the real client.
    """

    def __init__(self, client: Any) -> None:
        self._client = client
        self._lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._client, name)
        if not callable(attr):
            return attr

        @functools.wraps(attr)
        def serialised(*args: Any, **kwargs: Any) -> Any:
            with self._lock:
                return attr(*args, **kwargs)

        return serialised


def moto_client() -> Any:
    return boto3.client(
        "dynamodb", region_name="us-east-1", aws_access_key_id="testing", aws_secret_access_key="testing"
    )


def make_dynamodb_store(*, serialised: bool = True, **kwargs: Any) -> DynamoDBIdempotencyStore:
    """A store over moto (inside ``mock_aws``), its client serialised unless asked otherwise, table created."""
    client = SerialisedClient(moto_client()) if serialised else moto_client()
    store = DynamoDBIdempotencyStore(TABLE, client=client, **kwargs)
    store.create_table()
    return store


@pytest.fixture(params=["memory", "dynamodb"])
def store(request: pytest.FixtureRequest) -> Iterator[IdempotencyStore]:
    """Every contract test runs against both stores."""
    if request.param == "memory":
        yield InMemoryIdempotencyStore()
        return
    with mock_aws():
        ddb = make_dynamodb_store()
        yield ddb
        ddb.close()
