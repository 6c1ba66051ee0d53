from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import boto3
import fakeredis
import pytest
from moto import mock_aws

from strands_py.idempotency import DynamoDBIdempotencyStore, IdempotencyStore, InMemoryIdempotencyStore
from strands_py.testing.store_contract import SerialisedCalls

TABLE = "agent-idempotency"


class ThreadWatchingRedis(fakeredis.FakeRedis):
    """A sync fakeredis client counting the commands sent from the Redis store's own threads.

    ``claim_blocking`` sends from its caller's thread: not counted.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.from_threads = 0

    def execute_command(self, *args: Any, **options: Any) -> Any:
        if threading.current_thread().name.startswith("strands-py-idempotency-redis"):
            self.from_threads += 1
        return super().execute_command(*args, **options)


def moto_client() -> Any:
    return boto3.client(
        "dynamodb", region_name="us-east-1", aws_access_key_id="testing", aws_secret_access_key="testing"
    )


def make_dynamodb_store(*, serialised: bool = True, **kwargs: Any) -> DynamoDBIdempotencyStore:
    """A store over moto (inside ``mock_aws``), table created.

    Its client is serialised unless asked otherwise: moto's DynamoDB backend is not atomic under threads (two
    conditional writes on one item can both pass), so every boto3 call runs alone, as DynamoDB's per-item
    atomicity would have it (``strands_py.testing.store_contract.SerialisedCalls``).
    """
    client = SerialisedCalls(moto_client()) if serialised else moto_client()
    store = DynamoDBIdempotencyStore(TABLE, client=client, **kwargs)
    store.create_table()
    return store


@pytest.fixture(params=["memory", "dynamodb"])
def store(request: pytest.FixtureRequest) -> Iterator[IdempotencyStore]:
    """Tests taking a ``store`` run against both stores (the contract suite's classes override this fixture)."""
    if request.param == "memory":
        yield InMemoryIdempotencyStore()
        return
    with mock_aws():
        ddb = make_dynamodb_store()
        yield ddb
        ddb.close()
