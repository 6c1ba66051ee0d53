"""``DynamoDBIdempotencyStore``: records in a DynamoDB table, shared by every process and host."""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import random
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeGuard, TypeVar, cast

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from ..types.exceptions import IdempotencyRecordCorruptedError, IdempotencyStoreError
from .base import IdempotencyStore
from .record import IdempotencyRecord, RecordState, new_version

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
# A write that meets a journal append's transaction on the same item is rejected (TransactionConflict), not queued,
# and botocore does not retry it: nothing was written, so it is tried again after a short jittered backoff.
_CONFLICT_ATTEMPTS = 5
_CONFLICT_BACKOFF_SECONDS = 0.01

# The journal. Its entries are items of their own, ``<key>#journal#<lineage>#<position>``; the record carries
# ``journal_id`` (the lineage: a fresh claim, a complete and a release drop it with the rest of the item, a takeover
# keeps it), ``journal_length``, ``journal_expiration`` (the TTL new entries get) and ``journal_expiration_floor``
# (the least TTL any entry has). See the class docstring.
_ENTRY_INFIX = "#journal#"
# DynamoDB's item limit is 400 KB (409,600 bytes), attribute names and the entry's id (at most 2,048 bytes) included.
_MAX_JOURNAL_ENTRY_BYTES = 400_000
# Entries' TTL lies this far beyond their record's, and is moved on when less than half of it is left.
_JOURNAL_HEADROOM_SECONDS = 86_400
# Writes on the record that met a concurrent append of the same owner (its tasks append concurrently) or a read
# that saw the record change under it: each retry follows another writer's progress.
_JOURNAL_ATTEMPTS = 8
_BATCH_GET_KEYS = 100
# Rounds of a BatchGetItem that returned nothing but unprocessed keys (throttled) before giving up.
_BATCH_GET_IDLE_ROUNDS = 5
_BATCH_GET_BACKOFF_SECONDS = 0.05
# Keys whose journal head this process remembers (a guess that saves a read per append; never trusted).
_REMEMBERED_HEADS = 1024
# Appends to one key from this process (an owner's tools finishing together) take turns: none fails on another's.
_APPEND_STRIPES = 64
_JOURNAL_NAMES = {
    "#journal_id": "journal_id",
    "#journal_length": "journal_length",
    "#journal_expiration": "journal_expiration",
    "#journal_floor": "journal_expiration_floor",
}
# append: the first entry of a lineage, and the next entry of a known one (the entry is stamped with the stored TTL).
_JOURNAL_STARTS = _OWNED_IN_PROGRESS + " AND attribute_not_exists(#journal_id)"
_JOURNAL_CONTINUES = (
    _OWNED_IN_PROGRESS
    + " AND #journal_id = :lineage AND #journal_length = :length AND #journal_expiration = :entry_expiration"
)
_START_JOURNAL = (
    "SET #journal_id = :lineage, #journal_length = :next, #journal_expiration = :entry_expiration,"
    " #journal_floor = :entry_expiration"
)
_CONTINUE_JOURNAL = "SET #journal_length = :next"


class DynamoDBIdempotencyStore(IdempotencyStore):
    """Idempotency records in a DynamoDB table, so retries are deduplicated across processes and hosts.

    The table needs a string partition key ``id`` and, to have old records deleted, DynamoDB TTL on the
    ``expiration`` attribute. An item holds the record's fields (``status``, ``owner``, ``version``,
    ``lease_seconds``, ``expires_at``, and ``fingerprint``, ``payload``, ``checkpoint`` when set) plus ``expiration``
    (and, once its owner journals, ``journal_id``, ``journal_length``, ``journal_expiration``,
    ``journal_expiration_floor``); each journal entry is an item of its own (see Journal below).

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
    extra read); a takeover is an ``UpdateItem`` conditional on the version the caller judged (it rewrites every
    field of the record and keeps the journal); completes (``PutItem``), releases (``DeleteItem``) and renewals (one
    ``UpdateItem``) are conditional on the owner and the ``IN_PROGRESS`` status, so an owner whose claim was taken
    over cannot overwrite, delete or renew the new owner's record. Throttling and transient errors are retried by
    botocore (``standard`` retry mode) unless you pass your own client or config; a write rejected because a journal
    append's transaction holds the same item (``TransactionConflict``) is retried here. What still fails (and any
    error but a failed condition) raises ``IdempotencyStoreError`` with the botocore error chained. A
    DynamoDB-compatible server that does not return the old item with a failed condition costs a claim (and a
    fenced-off or raced journal write) one extra read.

    Journal: each entry is an item of its own, ``<key>#journal#<lineage>#<position>`` (``entry``, binary, and the TTL
    attribute), so an entry may be as large as an item (``max_journal_entry_bytes``) and the table needs no other key.
    The record carries the lineage's id and length: ``append`` is one ``TransactWriteItems`` (an ``UpdateItem`` of the
    record conditional on the owner, the ``IN_PROGRESS`` status and the length, with the ``PutItem`` of the entry), so
    an entry is never written for an owner that lost the claim. A fresh claim, a complete and a release drop the
    lineage with the rest of the record; its entries are left to expire. Entries' TTL lies a day beyond their
    record's and is moved on by the renewals (in the background, once half of that day is used up), so a running
    journal is never swept, however long its run. ``journal`` is one consistent ``GetItem`` and one consistent
    ``BatchGetItem`` per 100 entries (more rounds if DynamoDB answers with unprocessed keys); ``truncate`` is one
    ``UpdateItem``. ``append`` is one round trip when this process knows where the journal stands (it claimed the
    key, read the journal, or appended last), one more otherwise; appends to one key from one process take turns.

    IAM actions needed on the table: ``dynamodb:PutItem``, ``dynamodb:GetItem``, ``dynamodb:DeleteItem``,
    ``dynamodb:UpdateItem``, ``dynamodb:BatchGetItem`` (``TransactWriteItems`` is authorised by the ``PutItem`` and
    ``UpdateItem`` it holds), and ``dynamodb:CreateTable``, ``dynamodb:DescribeTable``,
    ``dynamodb:DescribeTimeToLive``, ``dynamodb:UpdateTimeToLive`` for ``create_table``.

    Thread-safety: safe from any thread and event loop. All boto3 calls run on a small executor owned by the store,
    never on the event loop's default executor. Call ``close()`` (or use the store as a context manager) to stop
    its threads (it waits for calls in progress, and for the journals' TTL being moved on). Cancellation: cancelling
    a call stops the caller waiting; the boto3 calls finish on their thread (an append lands or not, whole).
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
        self._heads = _Heads(_REMEMBERED_HEADS)
        self._append_stripes = [threading.Lock() for _ in range(_APPEND_STRIPES)]
        self._restamping: set[str] = set()  # keys whose entries' TTL is being moved on, by this process
        self._restamping_mutex = threading.Lock()

    def close(self) -> None:
        """Stop the store's executor threads (waiting for calls and background jobs in progress); later calls raise."""
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
        return IdempotencyStoreError(
            f"DynamoDB table {self.table_name} could not be used: {type(error).__name__}: {error}"
        )

    def _closed_error(self) -> IdempotencyStoreError:
        return IdempotencyStoreError(f"the DynamoDB idempotency store of table {self.table_name} is closed")

    supports_blocking_claims = True
    supports_journal = True
    max_journal_entry_bytes = _MAX_JOURNAL_ENTRY_BYTES

    async def claim(self, record: IdempotencyRecord, now: float) -> IdempotencyRecord | None:
        """See ``IdempotencyStore.claim``: one conditional ``PutItem`` returning the old item on failure."""
        return await self._blocking(self._claim, record, now)

    def claim_blocking(self, record: IdempotencyRecord, now: float) -> IdempotencyRecord | None:
        """See ``IdempotencyStore.claim_blocking``: ``claim``'s ``PutItem`` on the calling thread."""
        if self._closed:
            raise self._closed_error()
        return self._claim(record, now)

    async def take_over(self, record: IdempotencyRecord, version: str) -> bool:
        """See ``IdempotencyStore.take_over``: an ``UpdateItem`` conditional on the version; the journal is kept."""
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

    async def append(self, key: str, owner: str, entry: bytes) -> bool:
        """See ``IdempotencyStore.append``: one ``TransactWriteItems`` (the record's fenced update, the entry's put)."""
        return await self._blocking(self._append, key, owner, entry)

    async def journal(self, key: str) -> list[bytes]:
        """See ``IdempotencyStore.journal``: a consistent ``GetItem``, then consistent ``BatchGetItem`` calls.

        Raises:
            IdempotencyRecordCorruptedError: The record names an entry that is not stored, or an entry is malformed.
        """
        return await self._blocking(self._journal, key)

    async def truncate(self, key: str, owner: str, length: int) -> bool:
        """See ``IdempotencyStore.truncate``: one ``UpdateItem`` of the record's journal length, fenced on the owner.

        Raises:
            ValueError: ``length`` is negative.
        """
        if length < 0:
            raise ValueError(f"length must not be negative, got {length}")
        return await self._blocking(self._truncate, key, owner, length)

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
                # A fresh item: no journal yet; its first entries will expire a headroom past the record.
                self._heads.remember(
                    record.key, _Head(None, 0, _ttl_seconds(record.expires_at) + _JOURNAL_HEADROOM_SECONDS)
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
        # Every field of the record is set (or removed when absent), so the item is ``record`` plus the journal's
        # attributes: the new owner resumes from the journal. No condition but the version: an absent item fails it.
        fields = _to_item(record)
        del fields["id"]
        names = {f"#{name}": name for name in fields}
        values = {f":new_{name}": value for name, value in fields.items()}
        update = "SET " + ", ".join(f"#{name} = :new_{name}" for name in fields)
        removed = [name for name in _OPTIONAL_FIELDS if name not in fields]
        if record.state is not RecordState.IN_PROGRESS:
            removed += _JOURNAL_NAMES.values()  # a journal lives with an IN_PROGRESS record only
        if removed:
            names.update({f"#{name}": name for name in removed})
            update += " REMOVE " + ", ".join(f"#{name}" for name in removed)
        written = self._written(
            self._client.update_item,
            TableName=self.table_name,
            Key={"id": {"S": record.key}},
            UpdateExpression=update,
            ConditionExpression=_SAME_VERSION,
            ExpressionAttributeNames=names,
            ExpressionAttributeValues={**values, ":version": {"S": version}},
            ReturnValues="ALL_NEW",  # free with the write: where the journal stands, for the new owner
        )
        if written is None:
            return False
        self._learn_head(record.key, written.get("Attributes"))
        return True

    def _get(self, key: str) -> IdempotencyRecord | None:
        item = self._record_item(key)
        return None if item is None else _from_item(item)

    def _record_item(self, key: str) -> dict[str, Any] | None:
        response = self._invoke(
            self._client.get_item, TableName=self.table_name, Key={"id": {"S": key}}, ConsistentRead=True
        )
        item: dict[str, Any] | None = response.get("Item")
        return item

    def _complete(self, record: IdempotencyRecord) -> bool:
        # The whole item is replaced: the journal's lineage goes with it (its entries expire).
        self._heads.forget(record.key)
        return self._fenced(
            self._client.put_item,
            TableName=self.table_name,
            Item=_to_item(record),
            ConditionExpression=_OWNED_IN_PROGRESS,
            ExpressionAttributeNames=_OWNED_NAMES,
            ExpressionAttributeValues={":owner": {"S": record.owner}, ":in_progress": _IN_PROGRESS},
        )

    def _release(self, key: str, owner: str) -> bool:
        self._heads.forget(key)
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
        head = self._heads.recall(key)
        written = self._written(
            self._client.update_item,
            TableName=self.table_name,
            Key={"id": {"S": key}},
            UpdateExpression=update,
            ConditionExpression=_OWNED_IN_PROGRESS,
            ExpressionAttributeNames=names,
            ExpressionAttributeValues=values,
            # Free with the write, the record tells whether its journal's TTL must move on. Not for a record known
            # to have no journal: a session lock's checkpoint may hold tens of KB, at every heartbeat.
            ReturnValues="NONE" if head is not None and head.lineage is None else "ALL_NEW",
        )
        if written is None:
            return False
        renewed = written.get("Attributes")
        if renewed is not None:
            if head is None:
                self._learn_head(key, renewed)
            self._keep_journal_alive(key, renewed)
        return True

    def _fenced(self, fn: Callable[..., Any], /, **kwargs: Any) -> bool:
        """A conditional write: True if written, False if its condition failed."""
        return self._written(fn, **kwargs) is not None

    def _written(self, fn: Callable[..., Any], /, **kwargs: Any) -> dict[str, Any] | None:
        """A conditional write: its response, or None if its condition failed."""
        try:
            response: dict[str, Any] = self._invoke(fn, **kwargs)
            return response
        except ClientError:  # only a failed condition reaches here (see _invoke)
            return None

    # The journal (see the class docstring). Each method runs whole on one executor thread.

    def _append(self, key: str, owner: str, entry: bytes) -> bool:
        with self._append_stripes[hash(key) % _APPEND_STRIPES]:
            return self._append_alone(key, owner, entry)

    def _append_alone(self, key: str, owner: str, entry: bytes) -> bool:
        head = self._heads.recall(key)
        for attempt in range(1, _JOURNAL_ATTEMPTS + 1):
            if head is None:
                item = self._record_item(key)
                if not _owned(item, owner):
                    return False
                head = _head_of(key, item)
            lineage = head.lineage or new_version()  # a new lineage's id is unique: never an earlier lineage's
            try:
                self._invoke(
                    self._client.transact_write_items,
                    TransactItems=[
                        {"Update": _append_update(self.table_name, key, owner, head, lineage)},
                        {"Put": {"TableName": self.table_name, "Item": _entry_item(key, lineage, head, entry)}},
                    ],
                )
            except ClientError as e:  # only a failed condition reaches here (see _invoke)
                # Fenced off, or the head assumed was stale (another append of the owner's, a truncate, a fresh
                # lineage, the entries' TTL moved on): the record says which.
                item = _old_item(e)
                if item is None:
                    item = self._record_item(key)  # a server that returns no old item
                if not _owned(item, owner):
                    self._heads.forget(key)
                    return False
                head = _head_of(key, item)
                logger.debug("attempt=<%d> | the journal moved on since it was last seen, appending again", attempt)
                continue
            self._heads.remember(key, _Head(lineage, head.length + 1, head.expiration))
            return True
        raise IdempotencyStoreError(
            f"journal append on DynamoDB table {self.table_name} kept racing ({_JOURNAL_ATTEMPTS} attempts)"
        )

    def _journal(self, key: str) -> list[bytes]:
        item = self._record_item(key)
        if item is None or "journal_id" not in item:
            return []
        head = _head_of(key, item)
        self._heads.remember(key, head)
        # The lineage read with the record: entries of a later lineage (a fresh claim meanwhile) are never mixed in.
        ids = [_entry_id(key, cast(str, head.lineage), position) for position in range(head.length)]
        entries = self._entries(key, ids)
        missing = [position for position, entry_id in enumerate(ids) if entry_id not in entries]
        if missing:
            raise IdempotencyRecordCorruptedError(key, f"journal entry {missing[0]} of {len(ids)} is missing")
        return [entries[entry_id] for entry_id in ids]

    def _entries(self, key: str, ids: list[str]) -> dict[str, bytes]:
        """The entries stored under ``ids`` (consistent reads), by id; absent ones are left out."""
        found: dict[str, bytes] = {}
        pending = [{"id": {"S": entry_id}} for entry_id in ids]
        idle = 0  # rounds in a row that returned nothing but unprocessed keys
        while pending:
            batch, pending = pending[:_BATCH_GET_KEYS], pending[_BATCH_GET_KEYS:]
            request = {"Keys": batch, "ConsistentRead": True, "ProjectionExpression": "id, entry"}
            response = self._invoke(self._client.batch_get_item, RequestItems={self.table_name: request})
            items = response.get("Responses", {}).get(self.table_name, [])
            for item in items:
                try:
                    found[item["id"]["S"]] = bytes(item["entry"]["B"])
                except (KeyError, TypeError) as e:
                    reason = f"malformed journal entry: {type(e).__name__}: {e}"
                    raise IdempotencyRecordCorruptedError(key, reason) from e
            # A response holds at most 16 MB, and throttled keys come back unprocessed: both are asked for again.
            unprocessed = response.get("UnprocessedKeys", {}).get(self.table_name, {}).get("Keys", [])
            pending = unprocessed + pending
            idle = 0 if items or not unprocessed else idle + 1
            if idle >= _BATCH_GET_IDLE_ROUNDS:
                raise IdempotencyStoreError(
                    f"DynamoDB table {self.table_name} left journal entries unprocessed {idle} times in a row"
                )
            if idle:
                time.sleep(random.uniform(0, _BATCH_GET_BACKOFF_SECONDS * 2**idle))
        return found

    def _truncate(self, key: str, owner: str, length: int) -> bool:
        self._heads.forget(key)  # read again by the next append
        for _ in range(_JOURNAL_ATTEMPTS):
            try:
                self._invoke(
                    self._client.update_item,
                    TableName=self.table_name,
                    Key={"id": {"S": key}},
                    UpdateExpression="SET #journal_length = :length",
                    # Only a longer journal is cut: a shorter one (or none) fails the condition as a fenced-off owner
                    # does, and the old item tells which.
                    ConditionExpression=_OWNED_IN_PROGRESS + " AND #journal_length > :length",
                    ExpressionAttributeNames={**_OWNED_NAMES, "#journal_length": "journal_length"},
                    ExpressionAttributeValues={
                        ":owner": {"S": owner},
                        ":in_progress": _IN_PROGRESS,
                        ":length": {"N": str(length)},
                    },
                    ReturnValuesOnConditionCheckFailure="ALL_OLD",
                )
                return True
            except ClientError as e:  # only a failed condition reaches here (see _invoke)
                item = _old_item(e)
                if item is None:
                    item = self._record_item(key)  # a server that returns no old item
                if not _owned(item, owner):
                    return False
                if _head_of(key, item).length <= length:
                    return True  # nothing to cut
                # Only a read after the failed write gets here: an append landed in between. Cut again.
        raise IdempotencyStoreError(
            f"journal truncate on DynamoDB table {self.table_name} kept racing ({_JOURNAL_ATTEMPTS} attempts)"
        )

    def _learn_head(self, key: str, item: dict[str, Any] | None) -> None:
        """Remember where the journal of ``item`` (just written) stands; forget it if the item does not say."""
        try:
            self._heads.remember(key, _head_of(key, item or {}))
        except IdempotencyRecordCorruptedError:  # a read of the journal reports it
            self._heads.forget(key)

    def _keep_journal_alive(self, key: str, record: dict[str, Any]) -> None:
        """After a renewal: move the entries' TTL on, in the background, once less than half the headroom is left."""
        if "journal_id" not in record:
            return
        try:
            lineage = record["journal_id"]["S"]
            stamped = int(record["journal_expiration"]["N"])
            due = int(record["journal_expiration_floor"]["N"]) - int(record["expiration"]["N"])
            expiration = int(record["expiration"]["N"]) + _JOURNAL_HEADROOM_SECONDS
        except (KeyError, TypeError, ValueError):
            # The renewal itself landed; a journal whose head cannot be read fails its next read instead.
            logger.warning("key=<%s> | malformed journal head, its time to live is not moved on", key)
            return
        if due >= _JOURNAL_HEADROOM_SECONDS // 2:
            return
        with self._restamping_mutex:
            if key in self._restamping:
                return
            self._restamping.add(key)
        try:
            self._executor.submit(self._restamp, key, lineage, stamped, expiration)
        except RuntimeError:  # the store is being closed: a later renewal (ours or the next owner's) does it
            self._restamped(key)

    def _restamp(self, key: str, lineage: str, stamped: int, expiration: int) -> None:
        """Give every entry of ``lineage`` the TTL ``expiration``: a background job of ``_keep_journal_alive``."""
        names = {"#journal_id": "journal_id", "#journal_expiration": "journal_expiration"}
        values = {":lineage": {"S": lineage}, ":expiration": {"N": str(expiration)}}
        try:
            # 1. Entries appended from now on get the new TTL (an append's condition checks the TTL it stamps).
            response = self._invoke(
                self._client.update_item,
                TableName=self.table_name,
                Key={"id": {"S": key}},
                UpdateExpression="SET #journal_expiration = :expiration",
                ConditionExpression="#journal_id = :lineage AND #journal_expiration = :stamped",
                ExpressionAttributeNames=names,
                ExpressionAttributeValues={**values, ":stamped": {"N": str(stamped)}},
                ReturnValues="ALL_NEW",
            )
            # 2. The entries appended before, up to the length the record had then (any later one has the new TTL).
            length = int(response["Attributes"]["journal_length"]["N"])
            for position in range(length):
                self._fenced(
                    self._client.update_item,
                    TableName=self.table_name,
                    Key={"id": {"S": _entry_id(key, lineage, position)}},
                    UpdateExpression="SET expiration = :expiration",
                    ConditionExpression="attribute_exists(id)",
                    ExpressionAttributeValues={":expiration": values[":expiration"]},
                )
            # 3. Only now does the record say that every entry has it: a failure before leaves the floor where it
            # was, and a later renewal starts over.
            self._fenced(
                self._client.update_item,
                TableName=self.table_name,
                Key={"id": {"S": key}},
                UpdateExpression="SET #journal_floor = :expiration",
                ConditionExpression="#journal_id = :lineage AND #journal_expiration = :expiration",
                ExpressionAttributeNames={**names, "#journal_floor": "journal_expiration_floor"},
                ExpressionAttributeValues=values,
            )
            logger.debug("entries=<%d> | the journal's time to live moved on", length)
        except ClientError:  # step 1's condition: the lineage ended, or another process moved the TTL on first
            logger.debug("key=<%s> | the journal's time to live was not ours to move on", key)
        except Exception:  # noqa: BLE001 - a background job: nobody else would hear of it
            logger.warning("key=<%s> | could not move the journal's time to live on; a later renewal will", key)
        finally:
            self._restamped(key)

    def _restamped(self, key: str) -> None:
        with self._restamping_mutex:
            self._restamping.discard(key)

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


def _n(value: float) -> dict[str, str]:
    # repr() is the shortest text that reads back as the same float: the exact value, never rounded.
    return {"N": repr(float(value))}


def _ttl_seconds(expires_at: float) -> int:
    # Whole seconds since the epoch, as DynamoDB TTL wants: rounded up, plus the grace (see the class docstring).
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


_OPTIONAL_FIELDS = ("fingerprint", "payload", "checkpoint")


def _entry_id(key: str, lineage: str, position: int) -> str:
    return f"{key}{_ENTRY_INFIX}{lineage}#{position}"


def _append_update(table: str, key: str, owner: str, head: _Head, lineage: str) -> dict[str, Any]:
    """The record's half of an append: fenced on the owner and on the head assumed, it moves the length on."""
    names = {**_OWNED_NAMES, **_JOURNAL_NAMES}
    values = {
        ":owner": {"S": owner},
        ":in_progress": _IN_PROGRESS,
        ":lineage": {"S": lineage},
        ":next": {"N": str(head.length + 1)},
        ":entry_expiration": {"N": str(head.expiration)},
    }
    if head.lineage is not None:
        values[":length"] = {"N": str(head.length)}
        del names["#journal_floor"]  # DynamoDB refuses names an expression does not use
    return {
        "TableName": table,
        "Key": {"id": {"S": key}},
        "UpdateExpression": _CONTINUE_JOURNAL if head.lineage else _START_JOURNAL,
        "ConditionExpression": _JOURNAL_CONTINUES if head.lineage else _JOURNAL_STARTS,
        "ExpressionAttributeNames": names,
        "ExpressionAttributeValues": values,
        "ReturnValuesOnConditionCheckFailure": "ALL_OLD",
    }


def _entry_item(key: str, lineage: str, head: _Head, entry: bytes) -> dict[str, Any]:
    """An entry's item, at the head's position, expiring when the head says its lineage's entries do."""
    return {
        "id": {"S": _entry_id(key, lineage, head.length)},
        "entry": {"B": entry},
        "expiration": {"N": str(head.expiration)},
    }


def _owned(item: dict[str, Any] | None, owner: str) -> TypeGuard[dict[str, Any]]:
    """The fence of the journal's writes: ``owner``'s ``IN_PROGRESS`` record."""
    return (
        item is not None
        and item.get("owner", {}).get("S") == owner
        and item.get("status", {}).get("S") == RecordState.IN_PROGRESS.value
    )


@dataclass(frozen=True)
class _Head:
    """Where a key's journal stands: its lineage (None before its first entry), its length, its entries' TTL."""

    lineage: str | None
    length: int
    expiration: int


def _head_of(key: str, item: dict[str, Any]) -> _Head:
    try:
        if "journal_id" not in item:
            return _Head(None, 0, int(item["expiration"]["N"]) + _JOURNAL_HEADROOM_SECONDS)
        return _Head(item["journal_id"]["S"], int(item["journal_length"]["N"]), int(item["journal_expiration"]["N"]))
    except (KeyError, TypeError, ValueError) as e:
        raise IdempotencyRecordCorruptedError(key, f"malformed journal head: {type(e).__name__}: {e}") from e


class _Heads:
    """The journal heads this process saw last, by key, the least recently used forgotten first.

    A guess that lets an append go in one round trip; never trusted: every append is conditional on the head it
    assumed, and a failed condition hands back the record to start again from. Thread-safe.
    """

    def __init__(self, size: int) -> None:
        self._size = size
        self._heads: OrderedDict[str, _Head] = OrderedDict()
        self._mutex = threading.Lock()

    def recall(self, key: str) -> _Head | None:
        with self._mutex:
            return self._heads.get(key)

    def remember(self, key: str, head: _Head) -> None:
        with self._mutex:
            self._heads[key] = head
            self._heads.move_to_end(key)
            if len(self._heads) > self._size:
                self._heads.popitem(last=False)

    def forget(self, key: str) -> None:
        with self._mutex:
            self._heads.pop(key, None)
