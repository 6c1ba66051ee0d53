"""A moto DynamoDB server on 127.0.0.1 for multi-process tests, serving one request at a time.

moto's own ThreadedMotoServer handles requests on concurrent threads, and its DynamoDB backend has no lock: two
conditional PutItems can both pass their condition, which real DynamoDB never allows (each write to an item is
atomic); two processes were seen both claiming one token. Serving requests one at a time restores DynamoDB's
atomicity. The werkzeug server then speaks HTTP/1.0, so no client can hold the connection between requests, and a
client that stops in the middle of a request (SIGSTOP, SIGKILL) holds the server for at most ``REQUEST_TIMEOUT``.
"""

from __future__ import annotations

import copy
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType
from typing import Any

import boto3
import moto.dynamodb.models as _moto_dynamodb
from moto.dynamodb.models.dynamo_type import DynamoType
from moto.dynamodb.models.table import Table
from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
from werkzeug.serving import make_server

from strands_py.idempotency import DynamoDBIdempotencyStore

STOP_TIMEOUT = 10.0
# A request that has not arrived in full after this long is dropped (its client was stopped or killed mid-send).
REQUEST_TIMEOUT = 3.0
REGION = "us-east-1"
CREDENTIALS = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}


def free_port() -> int:
    """A TCP port of 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# moto's TransactWriteItems backs up every table it touches with a deep copy of the whole table (to roll back a
# cancelled transaction), once per item of the transaction: each journal append copies the table twice. That is time
# in the table's size per append, and the copies, full of reference cycles, wait for the cyclic collector: a 30-minute
# chaos run grew the server to 24 GB and had it killed. The backup below holds the table's items shallowly, and deep
# copies of only the items the transaction names: a rollback restores exactly what the transaction could change.
_transaction = threading.local()


def _lean_backup(table: Table) -> Table:
    backup = copy.copy(table)
    items = copy.copy(table.items)
    for hash_value in _transaction.keys.get(table.name, ()):
        if hash_value in items:
            items[hash_value] = copy.deepcopy(items[hash_value])
    backup.items = items
    return backup


class _CopyForTransactions(ModuleType):
    """The ``copy`` module as moto's DynamoDB backend sees it: a table backed up for a transaction is backed up lean."""

    def __init__(self) -> None:
        super().__init__("copy")

    def deepcopy(self, x: Any, memo: Any = None) -> Any:
        if isinstance(x, Table) and getattr(_transaction, "keys", None) is not None:
            return _lean_backup(x)
        return copy.deepcopy(x, memo)

    def __getattr__(self, name: str) -> Any:
        return getattr(copy, name)


def _named_keys(backend: Any, transact_items: list[dict[str, Any]]) -> dict[str, list[DynamoType]]:
    keys: dict[str, list[DynamoType]] = {}
    for entry in transact_items:
        _, op = next(iter(entry.items()))
        table = backend.tables.get(op.get("TableName"))
        attributes = op.get("Key") or op.get("Item") or {}
        if table is not None and table.hash_key_attr in attributes:
            keys.setdefault(table.name, []).append(DynamoType(attributes[table.hash_key_attr]))
    return keys


_transact_write_items = _moto_dynamodb.DynamoDBBackend.transact_write_items


def _lean_transact_write_items(self: Any, transact_items: list[dict[str, Any]]) -> None:
    _transaction.keys = _named_keys(self, transact_items)
    try:
        _transact_write_items(self, transact_items)
    finally:
        _transaction.keys = None


_moto_dynamodb.copy = _CopyForTransactions()  # type: ignore[attr-defined]
_moto_dynamodb.DynamoDBBackend.transact_write_items = _lean_transact_write_items  # type: ignore[method-assign]


class _TimedRequestHandler(MotoRequestHandler):
    # StreamRequestHandler applies this to the connection's socket: a half-sent request cannot block the server.
    timeout = REQUEST_TIMEOUT


class SerialMotoServer:
    """moto's server app on 127.0.0.1 and a random free port, one request at a time (see the module docstring)."""

    def __init__(self, port: int = 0) -> None:
        self.port = port or free_port()
        app = DomainDispatcherApplication(create_backend_app)
        self._server = make_server("127.0.0.1", self.port, app, threaded=False, request_handler=_TimedRequestHandler)
        self._thread = threading.Thread(target=self._server.serve_forever, name="moto-server", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> SerialMotoServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._thread.join(STOP_TIMEOUT)
        self._server.server_close()


def dynamodb_store(endpoint: str, table: str) -> DynamoDBIdempotencyStore:
    """A store on ``table`` of the server at ``endpoint`` (dummy credentials, the store's default client config)."""
    session = boto3.Session(region_name=REGION, **CREDENTIALS)
    return DynamoDBIdempotencyStore(table, boto3_session=session, endpoint_url=endpoint)


@contextmanager
def running_moto(*tables: str) -> Iterator[SerialMotoServer]:
    """A started ``SerialMotoServer`` with ``tables`` created; stopped on exit, whatever happens."""
    server = SerialMotoServer().start()
    try:
        for table in tables:
            with dynamodb_store(server.url, table) as store:
                store.create_table()
        yield server
    finally:
        server.stop()
