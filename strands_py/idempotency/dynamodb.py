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
# The TTL attribute ``expiration`` lies this far beyond ``expires_at``: see the class docstring.
_TTL_GRACE_SECONDS = 86_400
_IN_PROGRESS = {"S": RecordState.IN_PROGRESS.value}
_COMPLETED = {"S": RecordState.COMPLETED.value}
# claim: the key is free when it holds nothing or a COMPLETED record expired at the caller's ``now``. No clause frees
# an IN_PROGRESS record, whatever its age: only take_over replaces another owner's claim. Our own claim (a retried
# PutItem whose first attempt landed) fails the condition and comes back as the old item, which ``_claim``
# recognises by its owner: no clause for it here, so the condition stays short on the hot path (every replay).
_CLAIMABLE = "attribute_not_exists(#id) OR (#status = :completed AND #expires_at <= :now)"
_CLAIMABLE_NAMES = {"#id": "id", "#status": "status", "#expires_at": "expires_at"}
# take_over: exactly the version the caller judged; an absent item has no version, so it fails too.
_SAME_VERSION = "#version = :version"
# complete, release, renew: the owner's IN_PROGRESS record.
_OWNED_IN_PROGRESS = "#owner = :owner AND #status = :in_progress"
_OWNED_NAMES = {"#owner": "owner", "#status": "status"}
# A claim whose condition failed on a server that returns no old item reads the item; it is tried again only when
# the item changed between the two calls (released, say), which takes another writer's progress each time.
_CLAIM_ATTEMPTS = 5


class DynamoDBIdempotencyStore(IdempotencyStore):
    """Idempotency records in a DynamoDB table, so retries are deduplicated across processes and hosts.

    The table needs a string partition key ``id`` and, to have old records deleted, DynamoDB TTL on the
    ``expiration`` attribute. An item holds the record's fields (``status``, ``owner``, ``version``,
    ``lease_seconds``, ``expires_at``, and ``fingerprint``, ``payload``, ``checkpoint`` when set) plus ``expiration``.

    Expiry: every decision uses the exact ``expires_at`` (decimal seconds): a claim replaces a ``COMPLETED`` record
    past it at the caller's ``now``; no clock ever frees an ``IN_PROGRESS`` record (only ``take_over`` replaces
    another owner's claim). ``get`` returns an item as stored, even past its ``expires_at``: callers judge it.

    ``expiration`` serves DynamoDB's TTL sweeper only (which also collects abandoned claims: a running owner moves
    ``expires_at`` forward at every heartbeat). The sweeper runs on AWS's clock, not the writers', lags by up to days
    and deletes items in no particular order. So ``expiration`` is ``expires_at`` rounded up to whole seconds plus
    one day of grace, for every record: records refer to each other (a session's lock record names the record of
    the token its turn runs under) and their lifetimes are tied through ``expires_at``, and a day is far beyond any
    skew between those clocks or lag between two items' deletions, so whatever order the sweeper takes, it never
    deletes a referred-to record while a record referring to it still counts.

    Writes: a claim is one conditional ``PutItem`` that returns the record in the way when its condition fails (no
    extra read); a takeover is a ``PutItem`` conditional on the version the caller judged; completes
    (``PutItem``), releases (``DeleteItem``) and renewals (one ``UpdateItem``) are conditional on the owner and the
    ``IN_PROGRESS`` status, so an owner whose claim was taken over cannot overwrite, delete or renew the new owner's
    record. Throttling and transient errors are retried by botocore (``standard`` retry mode) unless you pass your
    own client or config; what still fails (and any error but a failed condition) raises ``IdempotencyStoreError``
    with the botocore error chained. A DynamoDB-compatible server that does not return the old item with a failed
    condition costs a claim one extra read.

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

    async def take_over(self, record: IdempotencyRecord, version: str) -> bool:
        """See ``IdempotencyStore.take_over``: a ``PutItem`` conditional on the stored version."""
        return await self._blocking(self._take_over, record, version)

    async def get(self, key: str) -> IdempotencyRecord | None:
        """See ``IdempotencyStore.get``: a strongly consistent read; the item as stored, even past its expiry."""
        return await self._blocking(self._get, key)

    async def complete(self, record: IdempotencyRecord) -> bool:
        """See ``IdempotencyStore.complete``: a ``PutItem`` conditional on owner and status."""
        return await self._blocking(self._complete, record)

    async def release(self, key: str, owner: str) -> bool:
        """See ``IdempotencyStore.release``: a ``DeleteItem`` conditional on owner and status."""
        return await self._blocking(self._release, key, owner)

    async def renew(
        self,
        key: str,
        owner: str,
        *,
        version: str,
        lease_seconds: float,
        expires_at: float,
        checkpoint: str | None = None,
    ) -> bool:
        """See ``IdempotencyStore.renew``: one ``UpdateItem`` conditional on owner and status."""
        return await self._blocking(self._renew, key, owner, version, lease_seconds, expires_at, checkpoint)

    def _claim(self, record: IdempotencyRecord, now: float) -> IdempotencyRecord | None:
        item = _to_item(record)
        for attempt in range(1, _CLAIM_ATTEMPTS + 1):
            try:
                self._invoke(
                    self._client.put_item,
                    TableName=self.table_name,
                    Item=item,
                    ConditionExpression=_CLAIMABLE,
                    ExpressionAttributeNames=_CLAIMABLE_NAMES,
                    ExpressionAttributeValues={":now": _n(now), ":completed": _COMPLETED},
                    ReturnValuesOnConditionCheckFailure="ALL_OLD",
                )
                return None
            except ClientError as e:  # only a failed condition reaches here (see _invoke)
                old = e.response.get("Item")
            if old is None:
                # Some DynamoDB-compatible servers do not return the old item: read it.
                existing = self._get(record.key)
                if existing is None or existing.expired(now):
                    # Removed, or replaced by a record expired at ``now``, between our write and our read.
                    logger.debug("attempt=<%d> | record changed during the claim, claiming again", attempt)
                    continue
            else:
                existing = _from_item(old)
            # Our own claim, met by a retry of the very write that made it, is ours; any other record is in the way.
            own = existing.state is RecordState.IN_PROGRESS and existing.owner == record.owner
            return None if own else existing
        raise IdempotencyStoreError(
            f"claim on DynamoDB table {self.table_name} kept racing other writers ({_CLAIM_ATTEMPTS} attempts)"
        )

    def _take_over(self, record: IdempotencyRecord, version: str) -> bool:
        return self._fenced(
            self._client.put_item,
            TableName=self.table_name,
            Item=_to_item(record),
            ConditionExpression=_SAME_VERSION,
            ExpressionAttributeNames={"#version": "version"},
            ExpressionAttributeValues={":version": {"S": version}},
        )

    def _get(self, key: str) -> IdempotencyRecord | None:
        response = self._invoke(
            self._client.get_item, TableName=self.table_name, Key={"id": {"S": key}}, ConsistentRead=True
        )
        item: dict[str, Any] | None = response.get("Item")
        return None if item is None else _from_item(item)

    def _complete(self, record: IdempotencyRecord) -> bool:
        return self._fenced(
            self._client.put_item,
            TableName=self.table_name,
            Item=_to_item(record),
            ConditionExpression=_OWNED_IN_PROGRESS,
            ExpressionAttributeNames=_OWNED_NAMES,
            ExpressionAttributeValues={":owner": {"S": record.owner}, ":in_progress": _IN_PROGRESS},
        )

    def _release(self, key: str, owner: str) -> bool:
        return self._fenced(
            self._client.delete_item,
            TableName=self.table_name,
            Key={"id": {"S": key}},
            ConditionExpression=_OWNED_IN_PROGRESS,
            ExpressionAttributeNames=_OWNED_NAMES,
            ExpressionAttributeValues={":owner": {"S": owner}, ":in_progress": _IN_PROGRESS},
        )

    def _renew(
        self, key: str, owner: str, version: str, lease_seconds: float, expires_at: float, checkpoint: str | None
    ) -> bool:
        update = "SET #version = :version, #lease_seconds = :lease_seconds, #expires_at = :expires_at, #ttl = :ttl"
        names = {
            **_OWNED_NAMES,
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
        return self._fenced(
            self._client.update_item,
            TableName=self.table_name,
            Key={"id": {"S": key}},
            UpdateExpression=update,
            ConditionExpression=_OWNED_IN_PROGRESS,
            ExpressionAttributeNames=names,
            ExpressionAttributeValues=values,
        )

    def _fenced(self, fn: Callable[..., Any], /, **kwargs: Any) -> bool:
        """A conditional write: True if written, False if its condition failed."""
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
    # Whole seconds since the epoch, as DynamoDB TTL wants: rounded up, plus the grace (see the class docstring).
    return {"N": str(math.ceil(expires_at) + _TTL_GRACE_SECONDS)}


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
        )
    except (KeyError, TypeError, ValueError) as e:
        raise IdempotencyRecordCorruptedError(key, f"malformed item: {type(e).__name__}: {e}") from e
