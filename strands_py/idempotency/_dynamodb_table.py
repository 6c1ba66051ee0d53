"""The table under ``DynamoDBIdempotencyStore``: a record as an item, the writes' conditions, DynamoDB's errors.

Pure functions and constants, and ``_Table``: one call to the table with the store's retries and errors. The store
(``dynamodb.py``) and its journal (``_dynamodb_journal.py``) build their requests from these and call through it.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable
from typing import Any, TypeVar

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from ..types.exceptions import IdempotencyRecordCorruptedError, IdempotencyStoreError
from .record import IdempotencyRecord, RecordState

# The store's logger: one name to configure for everything the store does.
logger = logging.getLogger("strands_py.idempotency.dynamodb")

T = TypeVar("T")

# The TTL attribute ``expiration`` lies this far beyond ``expires_at``: see ``DynamoDBIdempotencyStore``'s docstring.
_TTL_GRACE_SECONDS = 86_400
_IN_PROGRESS = {"S": RecordState.IN_PROGRESS.value}
_COMPLETED = {"S": RecordState.COMPLETED.value}
_CANCELLED = {"S": RecordState.CANCELLED.value}
# claim: the key is free when it holds nothing, a CANCELLED tombstone, or a COMPLETED record expired at the caller's
# ``now``. No clause frees an IN_PROGRESS record, whatever its age: only take_over replaces another owner's claim. Our
# own claim (a retried PutItem whose first attempt landed) fails the condition and comes back as the old item, which
# the store's claim recognises by its owner: no clause for it here, so the condition stays short on the hot path
# (every replay).
_CLAIMABLE = "attribute_not_exists(#id) OR #status = :cancelled OR (#status = :completed AND #expires_at <= :now)"
_CLAIMABLE_NAMES = {"#id": "id", "#status": "status", "#expires_at": "expires_at"}
# take_over: exactly the version the caller judged; an absent item has no version, so it fails too.
_SAME_VERSION = "#version = :version"
# complete (of a tombstone), release: the owner's IN_PROGRESS record, marked cancelled or not.
_OWNED_IN_PROGRESS = "#owner = :owner AND #status = :in_progress"
_OWNED_NAMES = {"#owner": "owner", "#status": "status"}
# renew, complete (of a result) and the journal's writes: the owner's IN_PROGRESS record, unless it is marked
# cancelled. The mark is an attribute written only when true, so its absence is the whole test.
_RUNNING = _OWNED_IN_PROGRESS + " AND attribute_not_exists(#cancelled)"
_RUNNING_NAMES = {**_OWNED_NAMES, "#cancelled": "cancelled"}
# cancel: any IN_PROGRESS record is marked, whoever owns it; nothing else is touched (a mark is no heartbeat, so the
# version stays), and marking twice writes the same mark. Any other record, or none, fails the condition.
_MARK = "SET #cancelled = :true"
_MARKABLE = "#status = :in_progress"
_MARK_NAMES = {"#cancelled": "cancelled", "#status": "status"}
_MARK_VALUES = {":true": {"BOOL": True}, ":in_progress": _IN_PROGRESS}

# A record as an item: ``id`` (the key), ``status``, ``owner``, ``version``, ``lease_seconds``, ``expires_at``, the
# optional fields below when set (``cancelled`` is a BOOL, there only when true), the TTL attribute ``expiration``,
# and, once its owner journals, the journal's attributes below (see ``_dynamodb_journal.py``).
_OPTIONAL_FIELDS = ("fingerprint", "payload", "checkpoint", "cancelled")
_JOURNAL_NAMES = {
    "#journal_id": "journal_id",
    "#journal_length": "journal_length",
    "#journal_expiration": "journal_expiration",
    "#journal_floor": "journal_expiration_floor",
}


def _n(value: float) -> dict[str, str]:
    # repr() is the shortest text that reads back as the same float: the exact value, never rounded.
    return {"N": repr(float(value))}


def _ttl_seconds(expires_at: float) -> int:
    # Whole seconds since the epoch, as DynamoDB TTL wants: rounded up, plus the grace (see the store's docstring).
    return math.ceil(expires_at) + _TTL_GRACE_SECONDS


def _ttl(expires_at: float) -> dict[str, str]:
    return {"N": str(_ttl_seconds(expires_at))}


def _to_item(record: IdempotencyRecord) -> dict[str, Any]:
    item: dict[str, Any] = {
        "id": {"S": record.key},
        "status": {"S": record.state.value},
        "owner": {"S": record.owner},
        "version": {"S": record.version},
        "lease_seconds": _n(record.lease_seconds),
        "expires_at": _n(record.expires_at),
        "expiration": _ttl(record.expires_at),
    }
    if record.fingerprint is not None:
        item["fingerprint"] = {"S": record.fingerprint}
    if record.payload is not None:
        item["payload"] = {"B": record.payload}
    if record.checkpoint is not None:
        item["checkpoint"] = {"S": record.checkpoint}
    if record.cancelled:
        item["cancelled"] = {"BOOL": True}
    return item


def _from_item(item: dict[str, Any]) -> IdempotencyRecord:
    key = item.get("id", {}).get("S", "<no id>")
    try:
        return IdempotencyRecord(
            key=key,
            state=RecordState(item["status"]["S"]),
            owner=item["owner"]["S"],
            version=item["version"]["S"],
            lease_seconds=float(item["lease_seconds"]["N"]),
            expires_at=float(item["expires_at"]["N"]),
            fingerprint=item["fingerprint"]["S"] if "fingerprint" in item else None,
            payload=bytes(item["payload"]["B"]) if "payload" in item else None,
            checkpoint=item["checkpoint"]["S"] if "checkpoint" in item else None,
            cancelled="cancelled" in item,  # as the fences read it: the attribute is there only when true
        )
    except (KeyError, TypeError, ValueError) as e:
        raise IdempotencyRecordCorruptedError(key, f"malformed item: {type(e).__name__}: {e}") from e


def _claimable(record: IdempotencyRecord, now: float) -> bool:
    """Whether a claim's condition (``_CLAIMABLE``) frees ``record``: a tombstone, or a result expired at ``now``."""
    return record.state is RecordState.CANCELLED or record.expired(now)


def _take_over_update(record: IdempotencyRecord) -> tuple[str, dict[str, str], dict[str, Any]]:
    """A takeover's ``UpdateExpression``, names and values: the item becomes ``record`` plus the journal's attributes.

    Every field of the record is set (or removed when absent), so the new owner resumes from the journal; a journal
    lives with an ``IN_PROGRESS`` record only, so a record in another state drops it.
    """
    fields = _to_item(record)
    del fields["id"]
    names = {f"#{name}": name for name in fields}
    values = {f":new_{name}": value for name, value in fields.items()}
    update = "SET " + ", ".join(f"#{name} = :new_{name}" for name in fields)
    removed = [name for name in _OPTIONAL_FIELDS if name not in fields]
    if record.state is not RecordState.IN_PROGRESS:
        removed += _JOURNAL_NAMES.values()
    if removed:
        names.update({f"#{name}": name for name in removed})
        update += " REMOVE " + ", ".join(f"#{name}" for name in removed)
    return update, names, values


def _renewal(
    owner: str, version: str, lease_seconds: float, expires_at: float, checkpoint: str | None
) -> tuple[str, dict[str, str], dict[str, Any]]:
    """A renewal's ``UpdateExpression``, names and values (with those of ``_RUNNING``, its condition)."""
    update = "SET #version = :version, #lease_seconds = :lease_seconds, #expires_at = :expires_at, #ttl = :ttl"
    names = {
        **_RUNNING_NAMES,
        "#version": "version",
        "#lease_seconds": "lease_seconds",
        "#expires_at": "expires_at",
        "#ttl": "expiration",
    }
    values: dict[str, Any] = {
        ":owner": {"S": owner},
        ":in_progress": _IN_PROGRESS,
        ":version": {"S": version},
        ":lease_seconds": _n(lease_seconds),
        ":expires_at": _n(expires_at),
        ":ttl": _ttl(expires_at),
    }
    if checkpoint is not None:
        update += ", #checkpoint = :checkpoint"
        names["#checkpoint"] = "checkpoint"
        values[":checkpoint"] = {"S": checkpoint}
    return update, names, values


# Calls and errors.


def _new_client(
    session: boto3.Session | None,
    region_name: str | None,
    endpoint_url: str | None,
    config: Config | None,
    max_workers: int,
) -> Any:
    """The store's own ``dynamodb`` client, with ``config`` or ours (standard retries, short timeouts)."""
    config = config or Config(
        # Every request is built by the store, from validated records: botocore's own validation is redundant.
        parameter_validation=False,
        retries={"mode": "standard", "total_max_attempts": 5},
        connect_timeout=5,
        read_timeout=10,
        max_pool_connections=max_workers,
    )
    return (session or boto3.Session()).client(
        "dynamodb", region_name=region_name, endpoint_url=endpoint_url, config=config
    )


# A write that meets a journal append's transaction on the same item is rejected (TransactionConflict), not queued,
# and botocore does not retry it: nothing was written, so it is tried again after a short jittered backoff.
_CONFLICT_ATTEMPTS = 5
_CONFLICT_BACKOFF_SECONDS = 0.01


class _Table:
    """One table and its client, called on the calling thread with the store's rules for errors. Thread-safe.

    A failed condition raises its ``ClientError`` (the caller reads the old item from it); a write that met a journal
    append's transaction is tried again; every other failure raises ``IdempotencyStoreError`` with the cause chained.
    """

    def __init__(self, client: Any, name: str) -> None:
        self.client = client
        self.name = name

    def invoke(self, fn: Callable[..., T], /, **kwargs: Any) -> T:
        """One boto3 call on this thread; every failure but a failed condition is an outage."""
        attempt = 0
        while True:
            attempt += 1
            try:
                return fn(**kwargs)
            except ClientError as e:
                if _is_condition_failure(e):
                    raise
                if _is_transaction_conflict(e) and attempt < _CONFLICT_ATTEMPTS:
                    # The item is in a journal append's transaction, which ends within milliseconds; nothing of
                    # this call was written.
                    time.sleep(random.uniform(0, _CONFLICT_BACKOFF_SECONDS * 2**attempt))
                    continue
                raise self._outage(e) from e
            except BotoCoreError as e:  # no answer at all: connection refused, timeouts, bad credentials, ...
                raise self._outage(e) from e

    def _outage(self, error: Exception) -> IdempotencyStoreError:
        return IdempotencyStoreError(f"DynamoDB table {self.name} could not be used: {type(error).__name__}: {error}")

    def written(self, fn: Callable[..., Any], /, **kwargs: Any) -> dict[str, Any] | None:
        """A conditional write: its response, or None if its condition failed."""
        try:
            response: dict[str, Any] = self.invoke(fn, **kwargs)
            return response
        except ClientError:  # only a failed condition reaches here (see invoke)
            return None

    def conditional(
        self, fn: Callable[..., Any], key: str, /, **kwargs: Any
    ) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        """A conditional write on the record of ``key``: ``(response, None)``, or ``(None, the item in the way)``.

        The item in the way comes with the failed condition (``ALL_OLD``); a server that returns none costs a read,
        which may find the item changed since (or gone: None), as does a failed condition on an absent item.
        """
        try:
            return self.invoke(fn, ReturnValuesOnConditionCheckFailure="ALL_OLD", **kwargs), None
        except ClientError as e:  # only a failed condition reaches here (see invoke)
            old = _old_item(e)
        return None, old if old is not None else self.record_item(key)

    def fenced(self, fn: Callable[..., Any], /, **kwargs: Any) -> bool:
        """A conditional write: True if written, False if its condition failed."""
        return self.written(fn, **kwargs) is not None

    def create(self) -> None:
        """``DynamoDBIdempotencyStore.create_table``: the table, unless it exists, then TTL unless it is enabled."""
        try:
            self.client.create_table(
                TableName=self.name,
                AttributeDefinitions=[{"AttributeName": "id", "AttributeType": "S"}],
                KeySchema=[{"AttributeName": "id", "KeyType": "HASH"}],
                BillingMode="PAY_PER_REQUEST",
            )
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") != "ResourceInUseException":
                raise
            logger.debug("table=<%s> | table exists already", self.name)
        self.client.get_waiter("table_exists").wait(TableName=self.name)
        ttl = self.client.describe_time_to_live(TableName=self.name).get("TimeToLiveDescription", {})
        if ttl.get("TimeToLiveStatus") in ("ENABLED", "ENABLING"):
            if ttl.get("AttributeName") != "expiration":
                raise ValueError(
                    f"table {self.name} has TTL on {ttl.get('AttributeName')!r}; the store needs it on 'expiration'"
                )
            logger.debug("table=<%s> | time to live is enabled already", self.name)
            return
        # DynamoDB refuses to enable TTL twice: only a table without it gets here.
        self.client.update_time_to_live(
            TableName=self.name, TimeToLiveSpecification={"Enabled": True, "AttributeName": "expiration"}
        )

    def record_item(self, key: str) -> dict[str, Any] | None:
        """The record's item under ``key`` (a consistent ``GetItem``), or None."""
        response = self.invoke(self.client.get_item, TableName=self.name, Key={"id": {"S": key}}, ConsistentRead=True)
        item: dict[str, Any] | None = response.get("Item")
        return item


def _outcome(fn: Callable[..., T], args: tuple[Any, ...]) -> tuple[T | None, Exception | None]:
    """Run ``fn`` on a worker thread and hand back its error as a value instead of raising it across the await.

    An exception crossing the await reaches the awaiting coroutines through ``throw()``, and on Python 3.11 a frame
    resumed by ``throw()`` emits no trace ``call`` event, so coverage loses every line after the await. Re-raising
    on the event loop's side keeps those lines measured; the error object (and its traceback) is the same.
    """
    try:
        return fn(*args), None
    except Exception as e:
        return None, e


def _is_condition_failure(error: ClientError) -> bool:
    code = error.response.get("Error", {}).get("Code")
    if code == "TransactionCanceledException":
        return _cancelled_for(error, "ConditionalCheckFailed")
    return bool(code == "ConditionalCheckFailedException")


def _is_transaction_conflict(error: ClientError) -> bool:
    code = error.response.get("Error", {}).get("Code")
    if code == "TransactionCanceledException":
        return _cancelled_for(error, "TransactionConflict")
    return bool(code == "TransactionConflictException")


def _cancelled_for(error: ClientError, reason: str) -> bool:
    """Whether a cancelled transaction names ``reason`` for one of its actions."""
    return any(r.get("Code") == reason for r in error.response.get("CancellationReasons") or ())


def _old_item(error: ClientError) -> dict[str, Any] | None:
    """The item a failed condition returned (``ALL_OLD``): a transaction's is its first action's, the record's."""
    reasons = error.response.get("CancellationReasons")
    item: dict[str, Any] | None = (reasons[0] if reasons else error.response).get("Item")
    return item
