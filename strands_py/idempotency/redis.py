"""``RedisIdempotencyStore``: records in Redis (or Valkey), shared by every process and host.

Needs redis-py: ``pip install 'strands-py[redis]'``. Importing this module without it raises ``ImportError`` with
that hint; ``strands_py`` and ``strands_py.idempotency`` import without it.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Sequence
from typing import Any, TypeVar, cast

try:
    import redis
    from redis.cluster import RedisCluster
except ImportError as e:  # pragma: no cover - exercised by the packaging test without the extra
    raise ImportError("RedisIdempotencyStore needs redis-py: pip install 'strands-py[redis]'") from e

from ..types.exceptions import IdempotencyStoreError
from ._redis_clients import HGETALL, LoopClients, mapped
from ._redis_clients import from_url as clients_from_url
from ._redis_layout import (
    _APPEND,
    _CANCEL,
    _CLAIM,
    _COMPLETE,
    _JOURNAL,
    _RELEASE,
    _RENEW,
    _TAKE_OVER,
    _TRUNCATE,
    _claim_args,
    _from_fields,
    _hash_tag,
    _pairs,
    _renew_args,
    _write_args,
)
from ._workers import Workers
from .base import IdempotencyStore
from .record import IdempotencyRecord, new_version

logger = logging.getLogger(__name__)

T = TypeVar("T")

# A replay returns the whole value in one reply, and Redis serves every client from one thread: results of many
# megabytes slow down everyone sharing the server. 8 MiB holds any conversation's final message with room to
# spare (images included); Redis itself refuses values over 512 MiB.
_DEFAULT_MAX_RESULT_BYTES = 8 * 1024 * 1024
_REDIS_MAX_VALUE_BYTES = 512 * 1024 * 1024
# An entry passes through Lua on its way into the list (the fence and the append are one script), and Lua copies it:
# measured on redis-server 7.0 (server time, INFO commandstats), an append holds the server ~0.5 ms at 256 KiB, ~1 ms
# at 512 KiB, ~2 ms at 1 MiB and ~8 ms at 4 MiB, and every other client of the server waits meanwhile. 512 KiB keeps
# each append near a millisecond; a larger step is split by the layer above (a step of the default
# journal_max_step_bytes, 4 MiB, is 8 appends: ~2 ms each end to end on 127.0.0.1).
_DEFAULT_MAX_JOURNAL_ENTRY_BYTES = 512 * 1024
_JOURNAL_SUFFIX = ":journal"
# The store's scripts by the name of the attribute holding each (a subclass may replace one: its threads' calls use it).
_SCRIPTS = {
    "_claim": _CLAIM,
    "_take_over": _TAKE_OVER,
    "_complete": _COMPLETE,
    "_release": _RELEASE,
    "_renew": _RENEW,
    "_append": _APPEND,
    "_truncate": _TRUNCATE,
    "_journal": _JOURNAL,
    "_cancel": _CANCEL,
}

# The data layout, the scripts and the encoding of records: see _redis_layout.py.


class RedisIdempotencyStore(IdempotencyStore):
    """Idempotency records in Redis or Valkey, standalone or Cluster, so retries are deduplicated across hosts.

    One hash per record, its lifetime on the key, and beside it the claim's journal, a list (see the data layout
    above the scripts in this module). Each primitive is one Lua script on the record's two keys, so one round trip
    and one atomic step: ``claim`` stores the claim or returns the record in the way; ``take_over`` is a
    compare-and-set on the version; ``complete``, ``release``, ``renew``, ``append`` and ``truncate`` are fenced on the
    owner and the ``IN_PROGRESS`` status, so a primary whose claim was taken over cannot overwrite, delete or extend
    the new owner's record, nor write to its journal. ``cancel`` marks a running claim (a ``cancelled`` field; its
    version stays), and from then on ``renew``, ``append`` and ``truncate`` refuse its owner and ``complete`` takes
    only its ``CANCELLED`` tombstone, which a fresh ``claim`` replaces at once. Scripts are sent by SHA
    (``EVALSHA``, via redis-py's ``register_script``) and loaded again when the server does not know them (after a
    restart or ``SCRIPT FLUSH``).

    Journal: kept by ``take_over``, ``renew``, ``cancel`` and a claim retried by its owner; deleted by ``complete``,
    ``release`` and a fresh ``claim``; its TTL always the record's. Entries are at most ``max_journal_entry_bytes``
    (512 KiB by default: an entry passes through Lua, which holds the server about 1 ms per 512 KiB; larger steps are
    split by the layer above).

    Redis Cluster and Valkey cluster: a record's two keys share a hash tag (the escaped record key), so both live in
    one slot and every script runs on the node owning it; the keys of different invocations spread over all slots.
    Pass a ``redis.cluster.RedisCluster`` client, or ``from_url(..., cluster=True)``. redis-py follows ``MOVED`` and
    ``ASK`` redirections and loads a script on every primary when one does not know it.

    Clocks: no script judges a running claim by time. Records are deleted by Redis on its own clock, after a duration
    each write sets (``expires_at`` minus the writer's ``now``), so a host whose clock is minutes ahead or behind
    neither frees a running claim nor keeps a finished one late. Only a ``COMPLETED`` record's replay window is
    compared with a caller's clock (``claim``'s ``now``), as the contract says. A record written with its
    ``expires_at`` already past lives 1 ms.

    Durability is the server's: a Redis without persistence (no AOF, no snapshots) forgets every record when it
    restarts, claims of running invocations included, and their retries run again. Give the server
    ``appendonly yes`` to keep them.

    Errors: a server that cannot be reached, times out or answers with an error raises ``IdempotencyStoreError``
    (the redis-py error chained); a key holding something else than a record raises
    ``IdempotencyRecordCorruptedError``.

    Thread-safety: safe from any thread and event loop. strands' sync ``agent(...)`` runs each call on a new event
    loop in a new thread, and redis-py's asyncio connections belong to the loop that made them, so the store uses
    the sync client (thread-safe, with its connection pool) on ``max_workers`` threads of its own, never on the event
    loop's default executor: each call is an item on their queue, and its outcome one thread-safe hop back to the
    caller's loop (5-15 % less CPU per call than ``run_in_executor``; ``hatch run bench:store`` measures it beside
    redis-py's asyncio client). The ``redis`` extra installs ``hiredis``, so redis-py parses replies in C. A loop
    that lives as long as a server does makes its calls on itself instead, inside ``use_event_loop()`` (the lifespans
    of ``AgentApp`` and ``A2AApp`` enter it): with a redis-py asyncio client of its own, no thread crossed.
    Cancellation: cancelling a call stops the caller waiting; a call cancelled before one of the threads took it is
    not sent, and a script sent runs to its end on the server. Call ``close()`` (or use the store as a context
    manager) to stop its threads; a store never closed stops them when it is collected or the interpreter exits,
    after the calls already made.

    Attributes:
        key_prefix: Prepended to every Redis key (namespacing the store inside a shared Redis).
        max_result_bytes: Largest encoded result stored.
        max_journal_entry_bytes: Largest journal entry stored.
    """

    supports_blocking_claims = True
    supports_journal = True
    supports_cancel = True
    max_result_bytes: int
    max_journal_entry_bytes: int
    # The scripts, registered on the sync client (see _SCRIPTS).
    _claim: Any
    _take_over: Any
    _complete: Any
    _release: Any
    _renew: Any
    _append: Any
    _truncate: Any
    _journal: Any
    _cancel: Any

    def __init__(
        self,
        client: redis.Redis | RedisCluster,
        *,
        key_prefix: str = "strands-py:idempotency:",
        max_result_bytes: int | None = _DEFAULT_MAX_RESULT_BYTES,
        max_journal_entry_bytes: int | None = _DEFAULT_MAX_JOURNAL_ENTRY_BYTES,
        max_workers: int = 4,
        close_client: bool = False,
        asyncio_client: Callable[[], Any] | None = None,
    ) -> None:
        """Create a store over a sync redis-py client of yours (``from_url`` builds one).

        Args:
            client: A ``redis.Redis`` or ``redis.cluster.RedisCluster`` client, created with
                ``decode_responses=False`` (the default): results are bytes. Its timeouts and retry policy apply as
                configured.
            key_prefix: Prepended to every key; without ``{`` or ``}`` (the store places the hash tag itself).
            max_result_bytes: Largest encoded result stored (default 8 MiB); None for Redis's own limit, 512 MiB.
            max_journal_entry_bytes: Largest journal entry stored (default 512 KiB, see the class docstring); None
                for Redis's own limit, 512 MiB.
            max_workers: The store's own threads, and the most calls at once on a loop's asyncio client.
            close_client: Whether ``close()`` closes ``client`` too.
            asyncio_client: Makes a redis-py asyncio client of the same server (``redis.asyncio.Redis`` or
                ``redis.asyncio.cluster.RedisCluster``, ``decode_responses=False``), called on the event loop that
                will use it: see ``use_event_loop``. ``from_url`` passes one; without it, every call uses the
                store's threads.

        Raises:
            ValueError: ``client`` decodes responses, ``key_prefix`` holds a brace, ``max_workers`` is not positive,
                or ``max_result_bytes`` or ``max_journal_entry_bytes`` is not in 1..512 MiB.
        """
        if max_workers < 1:
            raise ValueError(f"max_workers must be at least 1, got {max_workers}")
        for name, limit in (
            ("max_result_bytes", max_result_bytes),
            ("max_journal_entry_bytes", max_journal_entry_bytes),
        ):
            if limit is not None and not 0 < limit <= _REDIS_MAX_VALUE_BYTES:
                raise ValueError(f"{name} must be in 1..{_REDIS_MAX_VALUE_BYTES}, got {limit}")
        if "{" in key_prefix or "}" in key_prefix:
            # A brace in the prefix would move the hash tag into it, or empty it: see the data layout.
            raise ValueError(f"key_prefix must not contain '{{' or '}}', got {key_prefix!r}")
        if client.get_encoder().decode_responses:
            raise ValueError("the redis client must be created with decode_responses=False: results are bytes")
        self.key_prefix = key_prefix
        self.max_result_bytes = max_result_bytes if max_result_bytes is not None else _REDIS_MAX_VALUE_BYTES
        self.max_journal_entry_bytes = (
            max_journal_entry_bytes if max_journal_entry_bytes is not None else _REDIS_MAX_VALUE_BYTES
        )
        self._client = client
        self._close_client = close_client
        for name, source in _SCRIPTS.items():
            setattr(self, name, client.register_script(source))
        self._loops = LoopClients(asyncio_client, _SCRIPTS, max_workers)
        self._workers = Workers(max_workers, "strands-py-idempotency-redis", _closed_error)
        self._closed = False

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        key_prefix: str = "strands-py:idempotency:",
        max_result_bytes: int | None = _DEFAULT_MAX_RESULT_BYTES,
        max_journal_entry_bytes: int | None = _DEFAULT_MAX_JOURNAL_ENTRY_BYTES,
        max_workers: int = 4,
        socket_timeout: float = 5.0,
        socket_connect_timeout: float = 5.0,
        retries: int = 3,
        cluster: bool = False,
        **client_kwargs: Any,
    ) -> RedisIdempotencyStore:
        """Create a store with a client of its own, closed by ``close()``.

        Args:
            url: ``redis://[[user]:password@]host[:port][/db]``, ``rediss://`` for TLS (certificate options as
                ``ssl_*`` keyword arguments), or ``unix://path``. With ``cluster=True``, any node of the cluster
                (``redis://host:port``, no db).
            key_prefix: Prepended to every key; without ``{`` or ``}``.
            max_result_bytes: Largest encoded result stored (default 8 MiB); None for Redis's own limit.
            max_journal_entry_bytes: Largest journal entry stored (default 512 KiB); None for Redis's own limit.
            max_workers: The store's own threads, and the most calls at once on a loop's asyncio client.
            socket_timeout: Seconds to wait for a reply.
            socket_connect_timeout: Seconds to wait for a connection.
            retries: Retries of a command after a connection error or timeout (exponential backoff from 50 ms,
                capped at 1 s), so an outage fails within seconds. Retrying is safe: a claim retried after its
                first attempt landed is still the caller's own, and an append carries an id that makes it land once.
            cluster: Connect to a Redis Cluster (or Valkey cluster) with ``redis.cluster.RedisCluster``, which reads
                the cluster's slot map from the node in ``url`` now, and follows it from then on.
            **client_kwargs: More ``redis.Redis`` (or ``RedisCluster``) arguments (``ssl_ca_certs``, ``username``,
                ...).

        Raises:
            ValueError: An argument is out of range, or ``decode_responses=True`` was passed.
            IdempotencyStoreError: With ``cluster=True``: no node of the cluster answered, or redis-py refused the
                arguments for a cluster (the redis-py error chained).
        """
        timeouts = {"socket_timeout": socket_timeout, "socket_connect_timeout": socket_connect_timeout}
        client, asyncio_client = clients_from_url(
            url, retries=retries, cluster=cluster, timeouts=timeouts, options=client_kwargs
        )
        try:
            return cls(
                client,
                key_prefix=key_prefix,
                max_result_bytes=max_result_bytes,
                max_journal_entry_bytes=max_journal_entry_bytes,
                max_workers=max_workers,
                close_client=True,
                asyncio_client=asyncio_client,
            )
        except BaseException:
            client.close()
            raise

    def close(self) -> None:
        """Stop the store's threads (after the calls already made, waiting for them), and close its own client.

        An event loop's asyncio client (``use_event_loop``) is closed by the end of its block; from now on its calls
        are refused too.
        """
        self._closed = True
        self._workers.close()
        if self._close_client:
            self._client.close()

    def __enter__(self) -> RedisIdempotencyStore:
        """Use the store as a context manager; ``close()`` on exit."""
        return self

    def __exit__(self, *_: object) -> None:
        """Close the store."""
        self.close()

    def use_event_loop(self) -> contextlib.AbstractAsyncContextManager[None]:
        """Make this event loop's calls with redis-py's asyncio client, on the loop itself, until the block ends.

        For a loop that lives as long as a server does: ``AgentApp``'s lifespan enters it. The client is made
        (``asyncio_client``) when the block is entered, shared by nested blocks of the same loop, and closed when the
        last one ends, after the calls in flight on it; calls made by other loops (a sync ``agent(...)``'s) keep
        using the store's threads. At most ``max_workers`` calls are in flight on the client at once, as on the
        threads; more wait for their turn (redis-py's pool fails when it is full). Without ``asyncio_client`` (a
        client of yours passed without one, or ``from_url`` options the asyncio client does not take, which it logs
        as a warning), nothing changes. A call through the asyncio client costs about a fifth less CPU than one
        through the threads (``hatch run bench:store``): it crosses no thread.

        Raises:
            ValueError: On entering: the asyncio client decodes responses.
        """
        return self._loops.use()

    async def claim(self, record: IdempotencyRecord, now: float) -> IdempotencyRecord | None:
        """See ``IdempotencyStore.claim``: one script, one round trip."""
        existing = await self._call(record.key, "_claim", _claim_args(record, now))
        return None if existing is None else _from_fields(record.key, _pairs(existing))

    def claim_blocking(self, record: IdempotencyRecord, now: float) -> IdempotencyRecord | None:
        """See ``IdempotencyStore.claim_blocking``: ``claim``'s script on the calling thread."""
        if self._closed:
            raise _closed_error()
        existing = self._execute(record.key, self._claim, _claim_args(record, now))
        return None if existing is None else _from_fields(record.key, _pairs(existing))

    async def take_over(self, record: IdempotencyRecord, version: str) -> bool:
        """See ``IdempotencyStore.take_over``: one script, a compare-and-set on the stored version."""
        return bool(await self._call(record.key, "_take_over", _write_args([version, record.version], record)))

    async def get(self, key: str) -> IdempotencyRecord | None:
        """See ``IdempotencyStore.get``: one ``HGETALL``, no clock.

        Redis deletes a record when its TTL runs out; until then a ``COMPLETED`` record is returned even if the
        reader's clock says it expired (``record.expired(now)`` tells).
        """
        fields = await self._call(key, HGETALL, None)
        return _from_fields(key, fields) if fields else None

    async def complete(self, record: IdempotencyRecord) -> bool:
        """See ``IdempotencyStore.complete``: one script, fenced on owner and status (and the mark: tombstones only)."""
        head = [record.owner, record.version, record.state.value]
        return bool(await self._call(record.key, "_complete", _write_args(head, record)))

    async def cancel(self, key: str) -> IdempotencyRecord | None:
        """See ``IdempotencyStore.cancel``: one script; the claim's version, TTL and journal stay as they are."""
        fields = await self._call(key, "_cancel", [])
        return _from_fields(key, _pairs(fields)) if fields else None

    async def release(self, key: str, owner: str) -> bool:
        """See ``IdempotencyStore.release``: one script, fenced on owner and status."""
        return bool(await self._call(key, "_release", [owner]))

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
        """See ``IdempotencyStore.renew``: one script, fenced on owner and status, refused on a marked claim."""
        args = _renew_args(owner, version, lease_seconds, expires_at, checkpoint)
        return bool(await self._call(key, "_renew", args))

    async def append(self, key: str, owner: str, entry: bytes) -> bool:
        """See ``IdempotencyStore.append``: one script, fenced on owner, status and mark; safe to resend.

        Raises:
            ValueError: ``entry`` is larger than ``max_journal_entry_bytes`` (nothing is sent).
        """
        entry = bytes(entry)
        if len(entry) > self.max_journal_entry_bytes:
            raise ValueError(
                f"a journal entry of {len(entry)} bytes is larger than max_journal_entry_bytes "
                f"({self.max_journal_entry_bytes})"
            )
        # The id is made here, once per call: redis-py resends the very same arguments when a reply is lost.
        return bool(await self._call(key, "_append", [owner, entry, new_version()]))

    async def journal(self, key: str) -> list[bytes]:
        """See ``IdempotencyStore.journal``: one script (one ``LRANGE``); empty when the key holds no record."""
        return cast(list[bytes], await self._call(key, "_journal", []))

    async def truncate(self, key: str, owner: str, length: int) -> bool:
        """See ``IdempotencyStore.truncate``: one script, fenced on owner, status and mark.

        Raises:
            ValueError: ``length`` is negative (nothing is sent).
        """
        if length < 0:
            raise ValueError(f"length must not be negative, got {length}")
        return bool(await self._call(key, "_truncate", [owner, length]))

    def _write(self, script: Callable[..., Any], key: str, head: list[str], record: IdempotencyRecord) -> Any:
        """Run ``script`` with ``head``, then ``record``'s TTL from now and its fields; on the calling thread."""
        return self._execute(key, script, _write_args(head, record)())

    async def _call(self, key: str, name: str, args: Sequence[Any] | Callable[[], Sequence[Any]] | None) -> Any:
        """Script ``name`` (of ``_SCRIPTS``), or ``HGETALL``, on ``key``: on this loop's asyncio client, or threads.

        ``args`` may be a function, called just before the call is sent.
        """
        bound = self._loops.bound()
        if bound is None:
            command = self._client.hgetall if name == HGETALL else getattr(self, name)
            return await self._blocking(self._execute, key, command, args)
        if self._closed:
            raise _closed_error()
        return await bound.call(key, self.redis_keys(key), name, args() if callable(args) else args)

    async def _blocking(self, fn: Callable[..., T], /, *args: Any) -> T:
        """Run ``fn(*args)`` on the store's own threads."""
        result, error = await self._workers.run(functools.partial(fn, *args))
        if error is not None:
            raise error
        return cast(T, result)

    def redis_keys(self, key: str) -> tuple[str, str]:
        """The Redis keys of a record key: its record's and its journal's (one hash tag: one cluster slot)."""
        record = f"{self.key_prefix}{{{_hash_tag(key)}}}"
        return record, record + _JOURNAL_SUFFIX

    def _execute(
        self, key: str, command: Callable[..., Any], args: Sequence[Any] | Callable[[], Sequence[Any]] | None
    ) -> Any:
        """Run a script on both keys (``args`` given) or a command on the record's key, on this thread; map errors."""
        keys = self.redis_keys(key)
        try:
            if callable(args):
                args = args()
            return command(keys=keys, args=args) if args is not None else command(keys[0])
        except Exception as e:
            error = mapped(key, e)
            if error is e:
                raise
            raise error from e


def _closed_error() -> IdempotencyStoreError:
    return IdempotencyStoreError("the Redis idempotency store is closed")
