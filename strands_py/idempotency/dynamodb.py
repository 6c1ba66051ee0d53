"""``DynamoDBIdempotencyStore``: records in a DynamoDB table, shared by every process and host."""

from __future__ import annotations

import asyncio
import functools
import logging
import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar, cast

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from ..types.exceptions import IdempotencyRecordCorruptedError, IdempotencyStoreError
from .base import IdempotencyStore
from .record import IdempotencyRecord, RecordState

logger = logging.getLogger(__name__)

T = TypeVar("T")

# DynamoDB's item limit is 400 KB including attribute names and the other attributes; keep a margin.
_MAX_RESULT_BYTES = 350_000
# Attributes: ``expires_at`` is the exact expiry (decimal seconds) every decision uses; ``expiration`` is the same
# instant rounded up to whole seconds, only for DynamoDB's TTL sweeper. Items written before ``expires_at`` existed
# carry ``expiration`` alone, and are judged by it.
_NAMES = {
    "#id": "id",
    "#status": "status",
    "#owner": "owner",
    "#lease": "lease",
    "#expires_at": "expires_at",
    "#expiration": "expiration",
}
# Claimable: absent, expired, or a lapsed claim.
# The condition is kept short: it is evaluated on every claim, replays included. Items from before ``expires_at``
# existed are rare and short-lived, so they get a second attempt of their own (``_CLAIMABLE_LEGACY``) only when
# the first one failed on such an item whose ``expiration`` has passed.
# Our own live claim (a retried PutItem whose first attempt landed) fails the condition and comes back as the old
# item, which ``_claim`` recognises by its owner: no clause for it here.
_CLAIMABLE = "attribute_not_exists(#id) OR #expires_at <= :now OR (#status = :in_progress AND #lease <= :now)"
_CLAIM_NAMES = {k: v for k, v in _NAMES.items() if k not in ("#expiration", "#owner")}
_CLAIMABLE_LEGACY = "attribute_not_exists(#expires_at) AND #expiration <= :now"
_LEGACY_NAMES = {"#expires_at": "expires_at", "#expiration": "expiration"}
_OWNED_IN_PROGRESS = "#owner = :owner AND #status = :in_progress"
# renew, common case: the record already expires after the new lease, so only the lease (and checkpoint) change.
_OWNED_EXPIRING_AFTER_LEASE = _OWNED_IN_PROGRESS + " AND #expires_at >= :lease"
# renew, raising the expiry: compare-and-set against the expiry read back from the failed first attempt.
_OWNED_EXPIRY_UNCHANGED = _OWNED_IN_PROGRESS + " AND #expires_at = :seen"
_OWNED_LEGACY_EXPIRY_UNCHANGED = _OWNED_IN_PROGRESS + " AND attribute_not_exists(#expires_at) AND #expiration = :seen"
# Each retry of renew's compare-and-set means the record changed between two writes while still ours, which only
# a concurrent renewal by the same owner can do; a few attempts are plenty.
_RENEW_ATTEMPTS = 3
_IN_PROGRESS = {"S": RecordState.IN_PROGRESS.value}


class DynamoDBIdempotencyStore(IdempotencyStore):
    """Idempotency records in a DynamoDB table, so retries are deduplicated across processes and hosts.

    The table needs a string partition key ``id`` and, to have expired records deleted, DynamoDB TTL on the
    ``expiration`` attribute. Every decision uses the exact expiry kept in ``expires_at`` (decimal seconds);
    ``expiration`` is that instant rounded up to whole seconds, for the TTL sweeper only, which lags by up to days.
    Items written by versions before ``expires_at`` existed are judged by ``expiration``.

    Claims are one conditional ``PutItem`` that returns the live record when its condition fails (no extra read);
    completes (``PutItem``), releases (``DeleteItem``) and renewals (``UpdateItem``) are conditional on the owner
    and the ``IN_PROGRESS`` status, so a primary whose lease was taken over cannot overwrite, delete or extend the
    new owner's record. Throttling and transient errors are retried by botocore (``standard`` retry mode) unless
    you pass your own client or config; what still fails (and any error but a failed condition) raises
    ``IdempotencyStoreError`` with the botocore error chained.

    IAM actions needed on the table: ``dynamodb:PutItem``, ``dynamodb:GetItem``, ``dynamodb:DeleteItem``,
    ``dynamodb:UpdateItem`` (and ``dynamodb:CreateTable``, ``dynamodb:DescribeTable``,
    ``dynamodb:DescribeTimeToLive``, ``dynamodb:UpdateTimeToLive`` for ``create_table``).

    Thread-safety: safe from any thread and event loop. All boto3 calls run on a small executor owned by the store,
    never on the event loop's default executor. Call ``close()`` (or use the store as a context manager) to stop
    its threads. Cancellation: cancelling a call stops the caller waiting; the boto3 call finishes on its thread.
    """

    def __init__(
        self,
        table_name: str,
        *,
        client: Any = None,
        boto3_session: boto3.Session | None = None,
        region_name: str | None = None,
        endpoint_url: str | None = None,
        boto_config: Config | None = None,
        max_workers: int = 4,
    ) -> None:
        """Create a store over an existing table (see ``create_table`` for local development).

        Args:
            table_name: The table's name.
            client: A ready ``dynamodb`` boto3 client; the other connection arguments are then ignored.
            boto3_session: Session to create the client from (default: a new ``boto3.Session()``).
            region_name: Region of the table.
            endpoint_url: Endpoint override (DynamoDB Local, moto server).
            boto_config: botocore ``Config``; default: standard retry mode, 5 attempts, short timeouts.
            max_workers: Threads of the store's own executor.

        Raises:
            ValueError: ``table_name`` is empty or ``max_workers`` is not positive.
        """
        if not table_name:
            raise ValueError("table_name must not be empty")
        if max_workers < 1:
            raise ValueError(f"max_workers must be at least 1, got {max_workers}")
        self.table_name = table_name
        self.max_result_bytes = _MAX_RESULT_BYTES
        if client is None:
            config = boto_config or Config(
                # Every request is built here, from validated records: botocore's own validation is redundant.
                parameter_validation=False,
                retries={"mode": "standard", "total_max_attempts": 5},
                connect_timeout=5,
                read_timeout=10,
                max_pool_connections=max_workers,
            )
            session = boto3_session or boto3.Session()
            client = session.client("dynamodb", region_name=region_name, endpoint_url=endpoint_url, config=config)
        self._client = client
        self._executor = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="strands-py-idempotency")
        self._closed = False

    def close(self) -> None:
        """Stop the store's executor threads (waiting for calls in progress); later calls raise."""
        self._closed = True
        self._executor.shutdown(wait=True)

    def __enter__(self) -> DynamoDBIdempotencyStore:
        """Use the store as a context manager; ``close()`` on exit."""
        return self

    def __exit__(self, *_: object) -> None:
        """Close the store."""
        self.close()

    # Each primitive is a blocking method (below) run whole on the store's executor: one thread hop per primitive,
    # however many calls it makes. ``claim_blocking`` runs the same method on the caller's thread.

    async def _blocking(self, fn: Callable[..., T], /, *args: Any) -> T:
        """Run ``fn(*args)`` on the store's executor."""
        try:
            result, error = await asyncio.get_running_loop().run_in_executor(
                self._executor, functools.partial(_outcome, fn, args)
            )
        except RuntimeError as e:
            if not self._closed:
                raise
            raise self._closed_error() from e
        if error is not None:
            raise error
        return cast(T, result)

    def _invoke(self, fn: Callable[..., T], /, **kwargs: Any) -> T:
        """One boto3 call on this thread; every failure but a failed condition is an outage."""
        try:
            return fn(**kwargs)
        except ClientError as e:
            if _is_condition_failure(e):
                raise
            raise self._outage(e) from e
        except BotoCoreError as e:  # no answer at all: connection refused, timeouts, bad credentials, ...
            raise self._outage(e) from e

    def _outage(self, error: Exception) -> IdempotencyStoreError:
        return IdempotencyStoreError(
            f"DynamoDB table {self.table_name} could not be used: {type(error).__name__}: {error}"
        )

    def _closed_error(self) -> IdempotencyStoreError:
        return IdempotencyStoreError(f"the DynamoDB idempotency store of table {self.table_name} is closed")

    supports_blocking_claims = True

    async def claim(self, record: IdempotencyRecord, now: float) -> IdempotencyRecord | None:
        """See ``IdempotencyStore.claim``: one conditional ``PutItem`` returning the old item on failure."""
        return await self._blocking(self._claim, record, now)

    def claim_blocking(self, record: IdempotencyRecord, now: float) -> IdempotencyRecord | None:
        """See ``IdempotencyStore.claim_blocking``: ``claim``'s ``PutItem`` on the calling thread."""
        if self._closed:
            raise self._closed_error()
        return self._claim(record, now)

    async def get(self, key: str) -> IdempotencyRecord | None:
        """See ``IdempotencyStore.get``; a strongly consistent read."""
        return await self._blocking(self._get, key)

    async def complete(self, record: IdempotencyRecord) -> bool:
        """See ``IdempotencyStore.complete``: a ``PutItem`` conditional on owner and status."""
        return await self._blocking(self._complete, record)

    async def release(self, key: str, owner: str) -> bool:
        """See ``IdempotencyStore.release``: a ``DeleteItem`` conditional on owner and status."""
        return await self._blocking(self._release, key, owner)

    async def renew(self, key: str, owner: str, lease_expires_at: float, checkpoint: str | None = None) -> bool:
        """See ``IdempotencyStore.renew``: one ``UpdateItem`` conditional on owner and status, usually.

        DynamoDB has no ``max()`` in update expressions, so "raise the expiry to at least the lease, never lower it"
        is done with conditions. First, the common case (the expiry is already past the new lease, as it is while
        ``expires_after_seconds`` exceeds the lease): set the lease only, on condition that the record is ours and
        expires after the lease. If that condition fails, the item returned with the failure tells why: not ours
        any more (False), or it expires too early (or has no exact expiry yet, written by an older version). Then
        compare-and-set: write ``max(seen expiry, lease)`` on condition that the expiry is still the one seen.
        """
        return await self._blocking(self._renew, key, owner, lease_expires_at, checkpoint)

    def _claim(self, record: IdempotencyRecord, now: float) -> IdempotencyRecord | None:
        try:
            self._invoke(
                self._client.put_item,
                TableName=self.table_name,
                Item=_to_item(record),
                ConditionExpression=_CLAIMABLE,
                ExpressionAttributeNames=_CLAIM_NAMES,
                ExpressionAttributeValues={":now": _n(now), ":in_progress": _IN_PROGRESS},
                ReturnValuesOnConditionCheckFailure="ALL_OLD",
            )
            return None
        except ClientError as e:  # only a failed condition reaches here (see _invoke)
            old = e.response.get("Item")
        if old is not None and old.get("owner", {}).get("S") == record.owner and old.get("status") == _IN_PROGRESS:
            return None  # our own claim, met by a retry of the very write that made it
        if old is not None and "expires_at" not in old and "expiration" in old:
            legacy = _from_item(old)
            if not legacy.is_live(now):
                return self._claim_legacy(record, now)
            return legacy
        if old is not None:
            return _from_item(old)
        # Some DynamoDB-compatible servers do not return the old item: read it.
        existing = self._get(record.key)
        if existing is None or not existing.is_live(now):
            # Removed or expired between our write and our read: try again from the top.
            return self._claim(record, now)
        return existing

    def _claim_legacy(self, record: IdempotencyRecord, now: float) -> IdempotencyRecord | None:
        """Replace an expired item written before ``expires_at`` existed (judged by ``expiration``)."""
        try:
            self._invoke(
                self._client.put_item,
                TableName=self.table_name,
                Item=_to_item(record),
                ConditionExpression=_CLAIMABLE_LEGACY,
                ExpressionAttributeNames=_LEGACY_NAMES,
                ExpressionAttributeValues={":now": _n(now)},
            )
            return None
        except ClientError:
            # Changed meanwhile (claimed or rewritten in the new format): decide again from the top.
            return self._claim(record, now)

    def _get(self, key: str) -> IdempotencyRecord | None:
        item = self._get_item(key)
        return None if item is None else _from_item(item)

    def _get_item(self, key: str) -> dict[str, Any] | None:
        response = self._invoke(
            self._client.get_item, TableName=self.table_name, Key={"id": {"S": key}}, ConsistentRead=True
        )
        item: dict[str, Any] | None = response.get("Item")
        return item

    def _complete(self, record: IdempotencyRecord) -> bool:
        return self._fenced(
            self._client.put_item,
            TableName=self.table_name,
            Item=_to_item(record),
            ConditionExpression=_OWNED_IN_PROGRESS,
            ExpressionAttributeNames={"#owner": "owner", "#status": "status"},
            ExpressionAttributeValues={":owner": {"S": record.owner}, ":in_progress": _IN_PROGRESS},
        )

    def _release(self, key: str, owner: str) -> bool:
        return self._fenced(
            self._client.delete_item,
            TableName=self.table_name,
            Key={"id": {"S": key}},
            ConditionExpression=_OWNED_IN_PROGRESS,
            ExpressionAttributeNames={"#owner": "owner", "#status": "status"},
            ExpressionAttributeValues={":owner": {"S": owner}, ":in_progress": _IN_PROGRESS},
        )

    def _renew(self, key: str, owner: str, lease_expires_at: float, checkpoint: str | None) -> bool:
        lease = _n(lease_expires_at)
        update = "SET #lease = :lease"
        values: dict[str, Any] = {":owner": {"S": owner}, ":in_progress": _IN_PROGRESS, ":lease": lease}
        names = {"#owner": "owner", "#status": "status", "#lease": "lease", "#expires_at": "expires_at"}
        if checkpoint is not None:
            update += ", #checkpoint = :checkpoint"
            values[":checkpoint"] = {"S": checkpoint}
            names["#checkpoint"] = "checkpoint"
        for _ in range(_RENEW_ATTEMPTS):
            old = self._update(key, update, _OWNED_EXPIRING_AFTER_LEASE, names, values)
            if old is None:
                return True
            if not _owned_in_progress(old, owner):
                return False
            seen = old.get("expires_at")
            new_expiry = max(_expiry_of(old), lease_expires_at)
            raise_names = {**names, "#expiration": "expiration"}
            raise_values = {
                **values,
                ":seen": seen if seen is not None else old["expiration"],
                ":expires_at": _n(new_expiry),
                ":expiration": _ttl(new_expiry),
            }
            old = self._update(
                key,
                update + ", #expires_at = :expires_at, #expiration = :expiration",
                _OWNED_EXPIRY_UNCHANGED if seen is not None else _OWNED_LEGACY_EXPIRY_UNCHANGED,
                raise_names,
                raise_values,
            )
            if old is None:
                return True
            if not _owned_in_progress(old, owner):
                return False
            logger.debug("key=<%s> | expiry changed during renewal, renewing again", key)
        raise IdempotencyStoreError(f"renewal of idempotency key {key} kept racing another renewal by its owner")

    def _update(
        self, key: str, update: str, condition: str, names: dict[str, str], values: dict[str, Any]
    ) -> dict[str, Any] | None:
        """A conditional ``UpdateItem``: None if written, else the item as it is (empty if absent)."""
        try:
            self._invoke(
                self._client.update_item,
                TableName=self.table_name,
                Key={"id": {"S": key}},
                UpdateExpression=update,
                ConditionExpression=condition,
                ExpressionAttributeNames=names,
                ExpressionAttributeValues=values,
                ReturnValuesOnConditionCheckFailure="ALL_OLD",
            )
            return None
        except ClientError as e:  # only a failed condition reaches here (see _invoke)
            old: dict[str, Any] | None = e.response.get("Item")
        if old is None:
            # Absent, or a DynamoDB-compatible server that does not return the old item: read it.
            old = self._get_item(key)
        return old or {}

    def _fenced(self, fn: Callable[..., Any], /, **kwargs: Any) -> bool:
        try:
            self._invoke(fn, **kwargs)
            return True
        except ClientError:  # only a failed condition reaches here (see _invoke)
            return False

    def create_table(self) -> None:
        """Create the table (on-demand capacity) with TTL on ``expiration``, unless it exists. Blocking.

        Safe to call again on an existing table: TTL is enabled only if it is not already (DynamoDB refuses to
        enable it twice). Meant for local development and tests; production tables belong in infrastructure code
        (see README).

        Raises:
            ValueError: The table has TTL enabled on another attribute.
            botocore.exceptions.ClientError: DynamoDB refused a call (permissions, limits).
        """
        try:
            self._client.create_table(
                TableName=self.table_name,
                AttributeDefinitions=[{"AttributeName": "id", "AttributeType": "S"}],
                KeySchema=[{"AttributeName": "id", "KeyType": "HASH"}],
                BillingMode="PAY_PER_REQUEST",
            )
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") != "ResourceInUseException":
                raise
            logger.debug("table=<%s> | table exists already", self.table_name)
        self._client.get_waiter("table_exists").wait(TableName=self.table_name)
        ttl = self._client.describe_time_to_live(TableName=self.table_name).get("TimeToLiveDescription", {})
        if ttl.get("TimeToLiveStatus") in ("ENABLED", "ENABLING"):
            if ttl.get("AttributeName") != "expiration":
                raise ValueError(
                    f"table {self.table_name} has TTL on {ttl.get('AttributeName')!r}; the store needs it on "
                    "'expiration'"
                )
            logger.debug("table=<%s> | time to live is enabled already", self.table_name)
            return
        self._client.update_time_to_live(
            TableName=self.table_name, TimeToLiveSpecification={"Enabled": True, "AttributeName": "expiration"}
        )


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
    return bool(error.response.get("Error", {}).get("Code") == "ConditionalCheckFailedException")


def _n(value: float) -> dict[str, str]:
    # repr() is the shortest text that reads back as the same float: the exact value, never rounded.
    return {"N": repr(float(value))}


def _ttl(expires_at: float) -> dict[str, str]:
    # DynamoDB TTL wants whole seconds since the epoch: round up, so the sweeper never deletes a live record.
    return {"N": str(math.ceil(expires_at))}


def _expiry_of(item: dict[str, Any]) -> float:
    exact = item.get("expires_at")
    return float((exact if exact is not None else item["expiration"])["N"])


def _owned_in_progress(item: dict[str, Any], owner: str) -> bool:
    return bool(item.get("owner", {}).get("S") == owner and item.get("status") == _IN_PROGRESS)


def _to_item(record: IdempotencyRecord) -> dict[str, Any]:
    item: dict[str, Any] = {
        "id": {"S": record.key},
        "status": {"S": record.state.value},
        "owner": {"S": record.owner},
        "lease": _n(record.lease_expires_at),
        "expires_at": _n(record.expires_at),
        "expiration": _ttl(record.expires_at),
    }
    if record.fingerprint is not None:
        item["fingerprint"] = {"S": record.fingerprint}
    if record.payload is not None:
        item["payload"] = {"B": record.payload}
    if record.checkpoint is not None:
        item["checkpoint"] = {"S": record.checkpoint}
    return item


def _from_item(item: dict[str, Any]) -> IdempotencyRecord:
    key = item.get("id", {}).get("S", "<no id>")
    try:
        return IdempotencyRecord(
            key=key,
            state=RecordState(item["status"]["S"]),
            owner=item["owner"]["S"],
            lease_expires_at=float(item["lease"]["N"]),
            expires_at=_expiry_of(item),
            fingerprint=item["fingerprint"]["S"] if "fingerprint" in item else None,
            payload=bytes(item["payload"]["B"]) if "payload" in item else None,
            checkpoint=item["checkpoint"]["S"] if "checkpoint" in item else None,
        )
    except (KeyError, TypeError, ValueError) as e:
        raise IdempotencyRecordCorruptedError(key, f"malformed item: {type(e).__name__}: {e}") from e
