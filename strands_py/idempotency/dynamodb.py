"""``DynamoDBIdempotencyStore``: records in a DynamoDB table, shared by every process and host."""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar, cast

import boto3
from botocore.config import Config

from ..types.exceptions import IdempotencyStoreError
from ._dynamodb_journal import _MAX_JOURNAL_ENTRY_BYTES, _Journal
from ._dynamodb_table import (
    _CANCELLED,
    _CLAIMABLE,
    _CLAIMABLE_NAMES,
    _COMPLETED,
    _IN_PROGRESS,
    _MARK,
    _MARK_NAMES,
    _MARK_VALUES,
    _MARKABLE,
    _OWNED_IN_PROGRESS,
    _OWNED_NAMES,
    _RUNNING,
    _RUNNING_NAMES,
    _SAME_VERSION,
    _claimable,
    _from_item,
    _n,
    _new_client,
    _outcome,
    _renewal,
    _Table,
    _take_over_update,
    _to_item,
)
from .base import IdempotencyStore
from .record import IdempotencyRecord, RecordState

logger = logging.getLogger(__name__)

T = TypeVar("T")

# DynamoDB's item limit is 400 KB including attribute names and the other attributes; keep a margin.
_MAX_RESULT_BYTES = 350_000
# A claim (or a cancel) whose condition failed on a server that returns no old item reads the item; it is tried again
# only when the item changed between the two calls (released, say), which takes another writer's progress each time.
_CLAIM_ATTEMPTS = 5


# Every store, so that a forked child gives each one threads of its own.
_instances: weakref.WeakSet[DynamoDBIdempotencyStore] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for store in list(_instances):
        store._after_fork()


if hasattr(os, "register_at_fork"):  # pragma: no branch - every POSIX Python we support has it
    os.register_at_fork(after_in_child=_after_fork_in_child)


class DynamoDBIdempotencyStore(IdempotencyStore):
    """Idempotency records in a DynamoDB table, so retries are deduplicated across processes and hosts.

    The table needs a string partition key ``id`` and, to have old records deleted, DynamoDB TTL on the
    ``expiration`` attribute. An item holds the record's fields (``status``, ``owner``, ``version``,
    ``lease_seconds``, ``expires_at``; ``fingerprint``, ``payload``, ``checkpoint`` when set; ``cancelled`` when
    true) plus ``expiration`` (and, once its owner journals, ``journal_id``, ``journal_length``,
    ``journal_expiration``, ``journal_expiration_floor``); each journal entry is an item of its own (see Journal).

    Expiry: every decision uses the exact ``expires_at`` (decimal seconds): a claim replaces a ``COMPLETED`` record
    past it at the caller's ``now``, and a ``CANCELLED`` tombstone at once; no clock ever frees an ``IN_PROGRESS``
    record (only ``take_over`` replaces another owner's claim). ``get`` returns an item as stored, even past its
    ``expires_at``: callers judge it.

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
    over cannot overwrite, delete or renew the new owner's record. ``cancel`` is one ``UpdateItem``, conditional on
    the ``IN_PROGRESS`` status, that sets ``cancelled`` and nothing else (a mark is no heartbeat: the version stays);
    renewals, journal writes and the ``PutItem`` of a result are also conditional on ``cancelled`` being absent, so
    a marked claim's owner can only release it or leave its ``CANCELLED`` tombstone. Throttling and transient errors
    are retried by botocore (``standard`` retry mode) unless you pass your own client or config; a write rejected
    because a journal append's transaction holds the same item (``TransactionConflict``) is retried here. What still
    fails (and any error but a failed condition) raises ``IdempotencyStoreError`` with the botocore error chained. A
    DynamoDB-compatible server that does not return the old item with a failed condition costs a claim, a cancel of a
    finished record, and a fenced-off or raced journal write one extra read (a cancel of an absent key costs one
    anywhere).

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
    its threads (it waits for calls in progress, and for the journals' TTL being moved on). A store used before
    ``os.fork()`` (a pre-forking server) gives the child threads of its own. Cancellation: cancelling
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
            client = _new_client(boto3_session, region_name, endpoint_url, boto_config, max_workers)
        self._client = client
        self._table = _Table(client, table_name)  # every call goes through it: its retries, its errors
        self._max_workers = max_workers
        self._executor = self._new_executor()
        self._closed = False
        self._journal = _Journal(self._table, self._executor)  # append, journal, truncate, and the entries' TTL
        _instances.add(self)

    def _new_executor(self) -> ThreadPoolExecutor:
        return ThreadPoolExecutor(max_workers=self._max_workers, thread_name_prefix="strands-py-idempotency")

    def _after_fork(self) -> None:
        # The parent's threads do not run in the child, and its executor counts them as idle: every call would wait
        # for them for ever. The child gets threads of its own (and none of the parent's locks, held or not).
        if not self._closed:
            self._executor = self._new_executor()
            self._journal.after_fork(self._executor)

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

    # Each primitive is a blocking method (below, or the journal's) run whole on the store's executor: one thread hop
    # per primitive, however many calls it makes. ``claim_blocking`` runs the same method on the caller's thread.

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

    def _closed_error(self) -> IdempotencyStoreError:
        return IdempotencyStoreError(f"the DynamoDB idempotency store of table {self.table_name} is closed")

    supports_blocking_claims = True
    supports_journal = True
    supports_cancel = True
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
        """See ``IdempotencyStore.complete``: a ``PutItem`` conditional on owner and status (a result: and no mark)."""
        return await self._blocking(self._complete, record)

    async def cancel(self, key: str) -> IdempotencyRecord | None:
        """See ``IdempotencyStore.cancel``: one ``UpdateItem`` conditional on the status; a read if there is no item."""
        return await self._blocking(self._cancel, key)

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
        """See ``IdempotencyStore.renew``: one ``UpdateItem`` conditional on owner and status, and no mark."""
        return await self._blocking(self._renew, key, owner, version, lease_seconds, expires_at, checkpoint)

    async def append(self, key: str, owner: str, entry: bytes) -> bool:
        """See ``IdempotencyStore.append``: one ``TransactWriteItems`` (the record's fenced update, the entry's put)."""
        return await self._blocking(self._journal.append, key, owner, entry)

    async def journal(self, key: str) -> list[bytes]:
        """See ``IdempotencyStore.journal``: a consistent ``GetItem``, then consistent ``BatchGetItem`` calls.

        Raises:
            IdempotencyRecordCorruptedError: The record names an entry that is not stored, or an entry is malformed.
        """
        return await self._blocking(self._journal.read, key)

    async def truncate(self, key: str, owner: str, length: int) -> bool:
        """See ``IdempotencyStore.truncate``: one ``UpdateItem`` of the record's journal length, fenced on the owner.

        Raises:
            ValueError: ``length`` is negative.
        """
        if length < 0:
            raise ValueError(f"length must not be negative, got {length}")
        return await self._blocking(self._journal.truncate, key, owner, length)

    def _claim(self, record: IdempotencyRecord, now: float) -> IdempotencyRecord | None:
        item = _to_item(record)
        values = {":now": _n(now), ":completed": _COMPLETED, ":cancelled": _CANCELLED}
        for attempt in range(1, _CLAIM_ATTEMPTS + 1):
            written, old = self._table.conditional(
                self._client.put_item,
                record.key,
                TableName=self.table_name,
                Item=item,
                ConditionExpression=_CLAIMABLE,
                ExpressionAttributeNames=_CLAIMABLE_NAMES,
                ExpressionAttributeValues=values,
            )
            if written is not None:
                self._journal.fresh(record.key, record.expires_at)
                return None
            existing = None if old is None else _from_item(old)
            if existing is None or _claimable(existing, now):
                # Only a read finds these (an old item returned failed the condition): the record was removed, or
                # replaced by one the claim frees, between our write and our read.
                logger.debug("attempt=<%d> | record changed during the claim, claiming again", attempt)
                continue
            # Our own claim, met by a retry of the very write that made it, is ours; any other record is in the way.
            own = existing.state is RecordState.IN_PROGRESS and existing.owner == record.owner
            return None if own else existing
        raise self._racing("claim")

    def _racing(self, primitive: str) -> IdempotencyStoreError:
        return IdempotencyStoreError(
            f"{primitive} on DynamoDB table {self.table_name} kept racing other writers ({_CLAIM_ATTEMPTS} attempts)"
        )

    def _take_over(self, record: IdempotencyRecord, version: str) -> bool:
        # The item becomes ``record`` plus the journal's attributes: the new owner resumes from the journal. No
        # condition but the version: an absent item fails it.
        update, names, values = _take_over_update(record)
        written = self._table.written(
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
        self._journal.learn(record.key, written.get("Attributes"))
        return True

    def _get(self, key: str) -> IdempotencyRecord | None:
        item = self._table.record_item(key)
        return None if item is None else _from_item(item)

    def _complete(self, record: IdempotencyRecord) -> bool:
        # The whole item is replaced: the journal's lineage goes with it (its entries expire), a tombstone's too.
        self._journal.forget(record.key)
        # A result never lands on a claim marked cancelled, checked by the write itself: a cancel between the owner's
        # last heartbeat and its complete wins. The owner's tombstone lands either way.
        tombstone = record.state is RecordState.CANCELLED
        return self._table.fenced(
            self._client.put_item,
            TableName=self.table_name,
            Item=_to_item(record),
            ConditionExpression=_OWNED_IN_PROGRESS if tombstone else _RUNNING,
            ExpressionAttributeNames=_OWNED_NAMES if tombstone else _RUNNING_NAMES,
            ExpressionAttributeValues={":owner": {"S": record.owner}, ":in_progress": _IN_PROGRESS},
        )

    def _cancel(self, key: str) -> IdempotencyRecord | None:
        for attempt in range(1, _CLAIM_ATTEMPTS + 1):
            written, old = self._table.conditional(
                self._client.update_item,
                key,
                TableName=self.table_name,
                Key={"id": {"S": key}},
                UpdateExpression=_MARK,
                ConditionExpression=_MARKABLE,
                ExpressionAttributeNames=_MARK_NAMES,
                ExpressionAttributeValues=_MARK_VALUES,
                ReturnValues="ALL_NEW",  # the marked record, free with the write
            )
            item = old if written is None else written["Attributes"]
            existing = None if item is None else _from_item(item)
            if existing is None or existing.state is not RecordState.IN_PROGRESS or existing.cancelled:
                return existing  # marked, or left as it is: finished, or absent
            # Only a read finds an unmarked claim (an old item returned failed the condition): it landed between our
            # write and our read, and the cancel is for it (the call takes effect now).
            logger.debug("attempt=<%d> | a claim landed during the cancel, marking again", attempt)
        raise self._racing("cancel")

    def _release(self, key: str, owner: str) -> bool:
        self._journal.forget(key)
        return self._table.fenced(
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
        update, names, values = _renewal(owner, version, lease_seconds, expires_at, checkpoint)
        head = self._journal.recall(key)
        written = self._table.written(
            self._client.update_item,
            TableName=self.table_name,
            Key={"id": {"S": key}},
            UpdateExpression=update,
            ConditionExpression=_RUNNING,  # refused once marked cancelled: its owner learns of the cancel here
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
                self._journal.learn(key, renewed)
            self._journal.keep_alive(key, renewed)
        return True

    def create_table(self) -> None:
        """Create the table (on-demand capacity) with TTL on ``expiration``, unless it exists. Blocking.

        Safe to call again on an existing table: TTL is enabled only if it is not already (DynamoDB refuses to
        enable it twice). Meant for local development and tests; production tables belong in infrastructure code
        (see README).

        Raises:
            ValueError: The table has TTL enabled on another attribute.
            botocore.exceptions.ClientError: DynamoDB refused a call (permissions, limits).
        """
        self._table.create()
