"""The idempotency store of a run, and the one thing the checker reads from it: a conversation's session lock record.

Workers reach the store through the fault proxy; the final state is read from the server directly. Only public API
is used: the stores' constructors and ``IdempotencyStore.get`` (``record.state``, ``record.owner``).
"""

from __future__ import annotations

from typing import Any

import boto3

from strands_py.idempotency import DynamoDBIdempotencyStore, IdempotencyStore
from strands_py.idempotency.keys import session_lock_key

from .names import SCOPE, TABLE

REDIS, DYNAMODB = "redis", "dynamodb"
STORES = (REDIS, DYNAMODB)
REGION = "us-east-1"
CREDENTIALS = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}


def open_store(kind: str, endpoint: str) -> IdempotencyStore:
    """A store of ``kind`` on the server at ``endpoint`` (``host:port``), with the store's default client settings."""
    if kind == REDIS:
        from strands_py.idempotency import RedisIdempotencyStore

        return RedisIdempotencyStore.from_url(f"redis://{endpoint}")
    if kind == DYNAMODB:
        session = boto3.Session(region_name=REGION, **CREDENTIALS)
        return DynamoDBIdempotencyStore(TABLE, boto3_session=session, endpoint_url=f"http://{endpoint}")
    raise ValueError(f"unknown store {kind!r}")


def close_store(store: Any) -> None:
    """Stop the store's executor (and its own client)."""
    store.close()


def lock_key(conversation: str) -> str:
    """The store key of a conversation's session lock.

    Every agent of the run has ``IdempotencyConfig(scope=SCOPE)``, so its durable scope is ``SCOPE`` whatever the
    session (``Agent._scope_for`` uses a configured scope as is), and the lock is ``session_lock_key(SCOPE, session)``.
    """
    return session_lock_key(SCOPE, conversation)


async def lock_record(store: IdempotencyStore, conversation: str) -> dict[str, Any] | None:
    """A conversation's session lock record as ``{"state", "owner"}``, or None when there is none."""
    record = await store.get(lock_key(conversation))
    if record is None:
        return None
    return {"state": record.state.value, "owner": record.owner}
