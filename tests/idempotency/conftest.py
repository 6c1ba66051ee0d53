from __future__ import annotations

from collections.abc import Iterator

import boto3
import pytest
from moto import mock_aws

from strands_py.idempotency import DynamoDBIdempotencyStore, IdempotencyStore, InMemoryIdempotencyStore

TABLE = "agent-idempotency"


def make_dynamodb_store(**kwargs: object) -> DynamoDBIdempotencyStore:
    client = boto3.client(
        "dynamodb", region_name="us-east-1", aws_access_key_id="testing", aws_secret_access_key="testing"
    )
    store = DynamoDBIdempotencyStore(TABLE, client=client, **kwargs)  # type: ignore[arg-type]
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
