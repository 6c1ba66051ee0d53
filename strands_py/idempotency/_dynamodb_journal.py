"""The journal of ``DynamoDBIdempotencyStore``: entries as items of their own, appended and read under the record.

``_Journal`` holds the journal's primitives and what this process remembers of the journals it saw; the store holds
one and runs each primitive whole on the store's executor. See ``DynamoDBIdempotencyStore``'s docstring.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import OrderedDict
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, TypeGuard, cast

from botocore.exceptions import ClientError

from ..types.exceptions import IdempotencyRecordCorruptedError, IdempotencyStoreError
from ._dynamodb_table import (
    _IN_PROGRESS,
    _JOURNAL_NAMES,
    _RUNNING,
    _RUNNING_NAMES,
    _old_item,
    _Table,
    _ttl_seconds,
)
from .record import RecordState, new_version

# The store's logger: one name to configure for everything the store does.
logger = logging.getLogger("strands_py.idempotency.dynamodb")

# Entries are items of their own, ``<key>#journal#<lineage>#<position>`` (``entry``, binary, and ``expiration``); the
# record carries ``journal_id`` (the lineage: a fresh claim, a complete and a release drop it with the rest of the
# item, a takeover keeps it), ``journal_length``, ``journal_expiration`` (the TTL new entries get) and
# ``journal_expiration_floor`` (the least TTL any entry has).
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
# append: the first entry of a lineage, and the next entry of a known one (the entry is stamped with the stored TTL);
# both fenced on the owner's running claim, not marked cancelled.
_JOURNAL_STARTS = _RUNNING + " AND attribute_not_exists(#journal_id)"
_JOURNAL_CONTINUES = (
    _RUNNING + " AND #journal_id = :lineage AND #journal_length = :length AND #journal_expiration = :entry_expiration"
)
_START_JOURNAL = (
    "SET #journal_id = :lineage, #journal_length = :next, #journal_expiration = :entry_expiration,"
    " #journal_floor = :entry_expiration"
)
_CONTINUE_JOURNAL = "SET #journal_length = :next"


class _Journal:
    """The journals in one table: ``append``, ``read``, ``truncate``, and their entries' TTL moved on by renewals.

    Calls go through the store's ``_Table`` (its retries, its errors); ``keep_alive`` starts its job on the store's
    executor. Thread-safe.
    """

    def __init__(self, table: _Table, executor: Executor) -> None:
        self._table = table
        self._client = table.client
        self._executor = executor
        self._heads = _Heads(_REMEMBERED_HEADS)
        self._append_stripes = [threading.Lock() for _ in range(_APPEND_STRIPES)]
        self._restamping: set[str] = set()  # keys whose entries' TTL is being moved on, by this process
        self._restamping_mutex = threading.Lock()

    def after_fork(self, executor: Executor) -> None:
        """In a forked child: the child's executor, and no lock or job of the parent's threads (none run here)."""
        self._executor = executor
        self._heads = _Heads(_REMEMBERED_HEADS)
        self._append_stripes = [threading.Lock() for _ in range(_APPEND_STRIPES)]
        self._restamping = set()
        self._restamping_mutex = threading.Lock()

    # What this process knows of where a key's journal stands; the store tells it of the record's writes.

    def fresh(self, key: str, expires_at: float) -> None:
        """A fresh claim of ``key``: no journal yet; its first entries will expire a headroom past the record."""
        self._heads.remember(key, _Head(None, 0, _ttl_seconds(expires_at) + _JOURNAL_HEADROOM_SECONDS))

    def recall(self, key: str) -> _Head | None:
        """Where ``key``'s journal stood when this process last saw it, if it remembers."""
        return self._heads.recall(key)

    def forget(self, key: str) -> None:
        """Forget where ``key``'s journal stands (the record was replaced or deleted, or the journal cut)."""
        self._heads.forget(key)

    def learn(self, key: str, item: dict[str, Any] | None) -> None:
        """Remember where the journal of ``item`` (just written) stands; forget it if the item does not say."""
        try:
            self._heads.remember(key, _head_of(key, item or {}))
        except IdempotencyRecordCorruptedError:  # a read of the journal reports it
            self._heads.forget(key)

    # The primitives. Each runs whole on one executor thread.

    def append(self, key: str, owner: str, entry: bytes) -> bool:
        """``IdempotencyStore.append``: the entry's ``PutItem`` in one transaction with the record's fenced update."""
        with self._append_stripes[hash(key) % _APPEND_STRIPES]:
            return self._append_alone(key, owner, entry)

    def _append_alone(self, key: str, owner: str, entry: bytes) -> bool:
        head = self._heads.recall(key)
        for attempt in range(1, _JOURNAL_ATTEMPTS + 1):
            if head is None:
                item = self._table.record_item(key)
                if not _running(item, owner):
                    return False
                head = _head_of(key, item)
            lineage = head.lineage or new_version()  # a new lineage's id is unique: never an earlier lineage's
            try:
                self._table.invoke(
                    self._client.transact_write_items,
                    TransactItems=[
                        {"Update": _append_update(self._table.name, key, owner, head, lineage)},
                        {"Put": {"TableName": self._table.name, "Item": _entry_item(key, lineage, head, entry)}},
                    ],
                )
            except ClientError as e:  # only a failed condition reaches here (see _Table.invoke)
                # Fenced off, or the head assumed was stale (another append of the owner's, a truncate, a fresh
                # lineage, the entries' TTL moved on): the record says which.
                item = _old_item(e)
                if item is None:
                    item = self._table.record_item(key)  # a server that returns no old item
                if not _running(item, owner):
                    self._heads.forget(key)
                    return False
                head = _head_of(key, item)
                logger.debug("attempt=<%d> | the journal moved on since it was last seen, appending again", attempt)
                continue
            self._heads.remember(key, _Head(lineage, head.length + 1, head.expiration))
            return True
        raise IdempotencyStoreError(
            f"journal append on DynamoDB table {self._table.name} kept racing ({_JOURNAL_ATTEMPTS} attempts)"
        )

    def read(self, key: str) -> list[bytes]:
        """``IdempotencyStore.journal``: the record, then its lineage's entries (consistent reads)."""
        item = self._table.record_item(key)
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
            response = self._table.invoke(self._client.batch_get_item, RequestItems={self._table.name: request})
            items = response.get("Responses", {}).get(self._table.name, [])
            for item in items:
                try:
                    found[item["id"]["S"]] = bytes(item["entry"]["B"])
                except (KeyError, TypeError) as e:
                    reason = f"malformed journal entry: {type(e).__name__}: {e}"
                    raise IdempotencyRecordCorruptedError(key, reason) from e
            # A response holds at most 16 MB, and throttled keys come back unprocessed: both are asked for again.
            unprocessed = response.get("UnprocessedKeys", {}).get(self._table.name, {}).get("Keys", [])
            pending = unprocessed + pending
            idle = 0 if items or not unprocessed else idle + 1
            if idle >= _BATCH_GET_IDLE_ROUNDS:
                raise IdempotencyStoreError(
                    f"DynamoDB table {self._table.name} left journal entries unprocessed {idle} times in a row"
                )
            if idle:
                time.sleep(random.uniform(0, _BATCH_GET_BACKOFF_SECONDS * 2**idle))
        return found

    def truncate(self, key: str, owner: str, length: int) -> bool:
        """``IdempotencyStore.truncate``: one ``UpdateItem`` of the record's journal length, fenced on the owner."""
        self._heads.forget(key)  # read again by the next append
        for _ in range(_JOURNAL_ATTEMPTS):
            written, item = self._table.conditional(
                self._client.update_item,
                key,
                TableName=self._table.name,
                Key={"id": {"S": key}},
                UpdateExpression="SET #journal_length = :length",
                # Only a longer journal is cut: a shorter one (or none) fails the condition as a fenced-off owner
                # does, and the old item tells which.
                ConditionExpression=_RUNNING + " AND #journal_length > :length",
                ExpressionAttributeNames={**_RUNNING_NAMES, "#journal_length": "journal_length"},
                ExpressionAttributeValues={
                    ":owner": {"S": owner},
                    ":in_progress": _IN_PROGRESS,
                    ":length": {"N": str(length)},
                },
            )
            if written is not None:
                return True
            if not _running(item, owner):
                return False
            if _head_of(key, item).length <= length:
                return True  # nothing to cut
            # Only a read after the failed write gets here: an append landed in between. Cut again.
        raise IdempotencyStoreError(
            f"journal truncate on DynamoDB table {self._table.name} kept racing ({_JOURNAL_ATTEMPTS} attempts)"
        )

    # The entries' TTL: renewals move it on, so a running journal outlives the sweeper however long its run.

    def keep_alive(self, key: str, record: dict[str, Any]) -> None:
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
        """Give every entry of ``lineage`` the TTL ``expiration``: a background job of ``keep_alive``."""
        names = {"#journal_id": "journal_id", "#journal_expiration": "journal_expiration"}
        values = {":lineage": {"S": lineage}, ":expiration": {"N": str(expiration)}}
        try:
            # 1. Entries appended from now on get the new TTL (an append's condition checks the TTL it stamps).
            response = self._table.invoke(
                self._client.update_item,
                TableName=self._table.name,
                Key={"id": {"S": key}},
                UpdateExpression="SET #journal_expiration = :expiration",
                ConditionExpression="#journal_id = :lineage AND #journal_expiration = :stamped",
                ExpressionAttributeNames=names,
                ExpressionAttributeValues={**values, ":stamped": {"N": str(stamped)}},
                ReturnValues="ALL_NEW",
            )
            # 2. The entries appended before, up to the length the record had then (any later one has the new TTL).
            # An entry that is gone stays gone: a read of the journal reports it.
            length = int(response["Attributes"]["journal_length"]["N"])
            for position in range(length):
                self._table.fenced(
                    self._client.update_item,
                    TableName=self._table.name,
                    Key={"id": {"S": _entry_id(key, lineage, position)}},
                    UpdateExpression="SET expiration = :expiration",
                    ConditionExpression="attribute_exists(id)",
                    ExpressionAttributeValues={":expiration": values[":expiration"]},
                )
            # 3. Only now does the record say that every entry has it: a failure before leaves the floor where it
            # was, and a later renewal starts over.
            self._table.fenced(
                self._client.update_item,
                TableName=self._table.name,
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


def _entry_id(key: str, lineage: str, position: int) -> str:
    return f"{key}{_ENTRY_INFIX}{lineage}#{position}"


def _append_update(table: str, key: str, owner: str, head: _Head, lineage: str) -> dict[str, Any]:
    """The record's half of an append: fenced on the owner and on the head assumed, it moves the length on."""
    names = {**_RUNNING_NAMES, **_JOURNAL_NAMES}
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


def _running(item: dict[str, Any] | None, owner: str) -> TypeGuard[dict[str, Any]]:
    """The fence of the journal's writes (``_RUNNING``): ``owner``'s ``IN_PROGRESS`` record, not marked cancelled."""
    return (
        item is not None
        and item.get("owner", {}).get("S") == owner
        and item.get("status", {}).get("S") == RecordState.IN_PROGRESS.value
        and "cancelled" not in item
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
