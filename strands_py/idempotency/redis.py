"""``RedisIdempotencyStore``: records in Redis (or Valkey), shared by every process and host.

Needs redis-py: ``pip install 'strands-py[redis]'``. Importing this module without it raises ``ImportError`` with
that hint; ``strands_py`` and ``strands_py.idempotency`` import without it.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar, cast

try:
    import redis
    from redis.backoff import ExponentialBackoff
    from redis.exceptions import RedisError, ResponseError
    from redis.retry import Retry
except ImportError as e:  # pragma: no cover - exercised by the packaging test without the extra
    raise ImportError("RedisIdempotencyStore needs redis-py: pip install 'strands-py[redis]'") from e

from ..types.exceptions import IdempotencyRecordCorruptedError, IdempotencyStoreError
from .base import IdempotencyStore
from .record import IdempotencyRecord, RecordState

logger = logging.getLogger(__name__)

T = TypeVar("T")

# A replay returns the whole value in one reply, and Redis serves every client from one thread: results of many
# megabytes slow down everyone sharing the server. 8 MiB holds any conversation's final message with room to
# spare (images included); Redis itself refuses values over 512 MiB.
_DEFAULT_MAX_RESULT_BYTES = 8 * 1024 * 1024
_REDIS_MAX_VALUE_BYTES = 512 * 1024 * 1024

# Data layout: one hash per record, at key_prefix + record.key, its lifetime on the key itself. Fields (all text but
# payload, which is bytes):
#   status         IN_PROGRESS | COMPLETED
#   owner          the claim's owner id
#   version        unique to the write (record.version); take_over compares it
#   lease_seconds  record.lease_seconds (Python repr of the float: exact when read back; 0 is a yielded claim)
#   expires_at     record.expires_at, seconds since the epoch on the writer's clock (repr, exact); a claim compares a
#                  COMPLETED record's with the caller's now
#   fingerprint, payload, checkpoint   present only when not None
# A hash rather than one encoded string: the scripts compare status, owner, version and expiry without decoding
# anything (no cjson/cmsgpack in Lua), renew rewrites a few small fields instead of the whole payload, and the
# record is readable with redis-cli (HGETALL). A hash of the unreleased earlier layout (`lease`, no `version`) reads as
# corrupted: there is nothing to migrate.
#
# Lifetime: every write sets the key's TTL with PEXPIRE, a duration in milliseconds (rounded up, at least 1) that the
# caller computes as expires_at - now: the claim's own `now`, time.time() for the other writes. The writer's clock
# only measures a difference between two readings of itself, and the server counts that duration down on its own
# clock, so no host's skew (minutes ahead or behind) deletes a running claim early or keeps a record late. (An
# absolute PEXPIREAT would be judged on the server's clock against the writer's: a host ten minutes behind would
# write claims Redis deletes ten minutes early.) A write whose expires_at is already past gets the minimum TTL, 1 ms:
# written, then deleted by Redis, instead of an error for a record that simply stopped counting. Redis keeps the TTL
# as a time of its own clock, and hands that time to replicas and its append-only file: keep the servers' clocks in
# sync (NTP), as a failover to a replica whose clock is off moves every deadline by the difference.
#
# No script judges an IN_PROGRESS record by a clock: whether its owner is alive is the caller's judgement, by watching
# versions (IdempotencyRecord), and only take_over, a compare-and-set on the version, replaces another owner's claim.
#
# Each script is one atomic step on one key (KEYS[1], the record's key), so Redis Cluster works.

# claim: store the claim unless the key holds another owner's IN_PROGRESS record (whatever its age) or a COMPLETED
# record not yet expired at the caller's now.
#   ARGV[1]   the claiming owner
#   ARGV[2]   now: the caller's clock, seconds since the epoch, compared with a COMPLETED record's expires_at
#   ARGV[3]   the claim's TTL in milliseconds
#   ARGV[4..] the claim's hash fields, as name, value, name, value, ...
#   returns   nil if the claim was stored (the caller owns the key), else the record in the way (HGETALL's flat list)
# Replaced: the same owner's IN_PROGRESS record (a claim retried after its first attempt landed), or a COMPLETED
# record whose expires_at <= now. A record the script cannot read (a status it does not know, a missing owner or
# version, a lease or expiry that is not a number) is kept and returned: the caller reports it as corrupted instead
# of overwriting what it cannot read. HMGET raises WRONGTYPE on a key of another type.
_CLAIM = """
local unpack = unpack or table.unpack
local stored = redis.call('HMGET', KEYS[1], 'status', 'owner', 'version', 'lease_seconds', 'expires_at')
if redis.call('EXISTS', KEYS[1]) == 1 then
    local status, owner, expires_at = stored[1], stored[2], tonumber(stored[5])
    local free = false
    if owner and stored[3] and tonumber(stored[4]) ~= nil and expires_at ~= nil then
        if status == 'IN_PROGRESS' then
            free = owner == ARGV[1]
        elseif status == 'COMPLETED' then
            free = expires_at <= tonumber(ARGV[2])
        end
    end
    if not free then
        return redis.call('HGETALL', KEYS[1])
    end
    redis.call('DEL', KEYS[1])
end
redis.call('HSET', KEYS[1], unpack(ARGV, 4))
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return nil
"""

# take_over: replace the stored record only if its version is the one the caller judged (compare-and-set).
#   ARGV[1]   the judged version
#   ARGV[2]   the new record's TTL in milliseconds
#   ARGV[3..] the new record's hash fields, as name, value, ...
#   returns   1 if replaced, 0 if the key holds another version or nothing (nothing written)
_TAKE_OVER = """
local unpack = unpack or table.unpack
if redis.call('HGET', KEYS[1], 'version') ~= ARGV[1] then
    return 0
end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], unpack(ARGV, 3))
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""

# complete: replace the owner's IN_PROGRESS record with the completed record, fenced on owner and status.
#   ARGV[1]   the owner
#   ARGV[2]   the completed record's TTL in milliseconds
#   ARGV[3..] the completed record's hash fields, as name, value, ...
#   returns   1 if written, 0 if fenced off (taken over, completed, or gone)
_COMPLETE = """
local unpack = unpack or table.unpack
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] or redis.call('HGET', KEYS[1], 'status') ~= 'IN_PROGRESS' then
    return 0
end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], unpack(ARGV, 3))
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""

# release: delete the owner's IN_PROGRESS record, fenced on owner and status.
#   ARGV[1]   the owner
#   returns   1 if deleted, 0 if fenced off
_RELEASE = """
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] or redis.call('HGET', KEYS[1], 'status') ~= 'IN_PROGRESS' then
    return 0
end
redis.call('DEL', KEYS[1])
return 1
"""

# renew: a heartbeat, fenced on owner and status: a new version, lease and expiry (set as given, earlier or later
# than before), the key's TTL from that expiry, and the checkpoint if one is given. Payload and fingerprint stay.
#   ARGV[1]   the owner
#   ARGV[2]   the TTL in milliseconds
#   ARGV[3]   the new version
#   ARGV[4]   the new lease_seconds (repr)
#   ARGV[5]   the new expires_at (repr)
#   ARGV[6]   '1' to store ARGV[7] as the checkpoint, '0' to keep the stored one
#   ARGV[7]   the checkpoint
#   returns   1 if renewed, 0 if fenced off
_RENEW = """
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] or redis.call('HGET', KEYS[1], 'status') ~= 'IN_PROGRESS' then
    return 0
end
redis.call('HSET', KEYS[1], 'version', ARGV[3], 'lease_seconds', ARGV[4], 'expires_at', ARGV[5])
if ARGV[6] == '1' then
    redis.call('HSET', KEYS[1], 'checkpoint', ARGV[7])
end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""


class RedisIdempotencyStore(IdempotencyStore):
    """Idempotency records in Redis or Valkey, so retries are deduplicated across processes and hosts.

    One hash per record, its lifetime on the key (see the data layout above the scripts in this module). Each
    primitive is one Lua script on one key, so one round trip and one atomic step, and Redis Cluster works:
    ``claim`` stores the claim or returns the record in the way; ``take_over`` is a compare-and-set on the version;
    ``complete``, ``release`` and ``renew`` are fenced on the owner and the ``IN_PROGRESS`` status, so a primary whose
    claim was taken over cannot overwrite, delete or extend the new owner's record. Scripts are sent by SHA
    (``EVALSHA``, via redis-py's ``register_script``) and loaded again when the server does not know them (after a
    restart or ``SCRIPT FLUSH``).

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
    the sync client (thread-safe, with its connection pool) on a small executor of its own, never on the event
    loop's default executor. Cancellation: cancelling a call stops the caller waiting; the script runs to its end
    on the server. Call ``close()`` (or use the store as a context manager) to stop its threads.

    Attributes:
        key_prefix: Prepended to every record's key (namespacing the store inside a shared Redis).
        max_result_bytes: Largest encoded result stored.
    """

    def __init__(
        self,
        client: redis.Redis,
        *,
        key_prefix: str = "strands-py:idempotency:",
        max_result_bytes: int | None = _DEFAULT_MAX_RESULT_BYTES,
        max_workers: int = 4,
        close_client: bool = False,
    ) -> None:
        """Create a store over a sync redis-py client of yours (``from_url`` builds one).

        Args:
            client: A ``redis.Redis`` client, created with ``decode_responses=False`` (the default): results are
                bytes. Its timeouts and retry policy apply as configured.
            key_prefix: Prepended to every key.
            max_result_bytes: Largest encoded result stored (default 8 MiB); None for Redis's own limit, 512 MiB.
            max_workers: Threads of the store's own executor.
            close_client: Whether ``close()`` closes ``client`` too.

        Raises:
            ValueError: ``client`` decodes responses, ``max_workers`` is not positive, or ``max_result_bytes`` is
                not in 1..512 MiB.
        """
        if max_workers < 1:
            raise ValueError(f"max_workers must be at least 1, got {max_workers}")
        if max_result_bytes is not None and not 0 < max_result_bytes <= _REDIS_MAX_VALUE_BYTES:
            raise ValueError(f"max_result_bytes must be in 1..{_REDIS_MAX_VALUE_BYTES}, got {max_result_bytes}")
        if client.get_encoder().decode_responses:
            raise ValueError("the redis client must be created with decode_responses=False: results are bytes")
        self.key_prefix = key_prefix
        self.max_result_bytes = max_result_bytes if max_result_bytes is not None else _REDIS_MAX_VALUE_BYTES
        self._client = client
        self._close_client = close_client
        self._claim = client.register_script(_CLAIM)
        self._take_over = client.register_script(_TAKE_OVER)
        self._complete = client.register_script(_COMPLETE)
        self._release = client.register_script(_RELEASE)
        self._renew = client.register_script(_RENEW)
        self._executor = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="strands-py-idempotency-redis")
        self._closed = False

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        key_prefix: str = "strands-py:idempotency:",
        max_result_bytes: int | None = _DEFAULT_MAX_RESULT_BYTES,
        max_workers: int = 4,
        socket_timeout: float = 5.0,
        socket_connect_timeout: float = 5.0,
        retries: int = 3,
        **client_kwargs: Any,
    ) -> RedisIdempotencyStore:
        """Create a store with a client of its own, closed by ``close()``.

        Args:
            url: ``redis://[[user]:password@]host[:port][/db]``, ``rediss://`` for TLS (certificate options as
                ``ssl_*`` keyword arguments), or ``unix://path``.
            key_prefix: Prepended to every key.
            max_result_bytes: Largest encoded result stored (default 8 MiB); None for Redis's own limit.
            max_workers: Threads of the store's own executor.
            socket_timeout: Seconds to wait for a reply.
            socket_connect_timeout: Seconds to wait for a connection.
            retries: Retries of a command after a connection error or timeout (exponential backoff from 50 ms,
                capped at 1 s), so an outage fails within seconds. Retrying is safe: a claim retried after its
                first attempt landed is still the caller's own.
            **client_kwargs: More ``redis.Redis`` arguments (``ssl_ca_certs``, ``username``, ...).

        Raises:
            ValueError: An argument is out of range, or ``decode_responses=True`` was passed.
        """
        client = redis.Redis.from_url(
            url,
            socket_timeout=socket_timeout,
            socket_connect_timeout=socket_connect_timeout,
            retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), retries),
            **client_kwargs,
        )
        try:
            return cls(
                client,
                key_prefix=key_prefix,
                max_result_bytes=max_result_bytes,
                max_workers=max_workers,
                close_client=True,
            )
        except BaseException:
            client.close()
            raise

    def close(self) -> None:
        """Stop the store's executor threads (waiting for calls in progress), and close its own client."""
        self._closed = True
        self._executor.shutdown(wait=True)
        if self._close_client:
            self._client.close()

    def __enter__(self) -> RedisIdempotencyStore:
        """Use the store as a context manager; ``close()`` on exit."""
        return self

    def __exit__(self, *_: object) -> None:
        """Close the store."""
        self.close()

    supports_blocking_claims = True

    async def claim(self, record: IdempotencyRecord, now: float) -> IdempotencyRecord | None:
        """See ``IdempotencyStore.claim``: one script, one round trip."""
        return await self._blocking(self._claim_record, record, now)

    def claim_blocking(self, record: IdempotencyRecord, now: float) -> IdempotencyRecord | None:
        """See ``IdempotencyStore.claim_blocking``: ``claim``'s script on the calling thread."""
        if self._closed:
            raise _closed_error()
        return self._claim_record(record, now)

    async def take_over(self, record: IdempotencyRecord, version: str) -> bool:
        """See ``IdempotencyStore.take_over``: one script, a compare-and-set on the stored version."""
        return bool(await self._blocking(self._write, self._take_over, record.key, [version], record))

    async def get(self, key: str) -> IdempotencyRecord | None:
        """See ``IdempotencyStore.get``: one ``HGETALL``, no clock.

        Redis deletes a record when its TTL runs out; until then a ``COMPLETED`` record is returned even if the
        reader's clock says it expired (``record.expired(now)`` tells).
        """
        fields = await self._blocking(self._execute, key, self._client.hgetall, None)
        return _from_fields(key, fields) if fields else None

    async def complete(self, record: IdempotencyRecord) -> bool:
        """See ``IdempotencyStore.complete``: one script, fenced on owner and status."""
        return bool(await self._blocking(self._write, self._complete, record.key, [record.owner], record))

    async def release(self, key: str, owner: str) -> bool:
        """See ``IdempotencyStore.release``: one script, fenced on owner and status."""
        return bool(await self._blocking(self._execute, key, self._release, [owner]))

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
        """See ``IdempotencyStore.renew``: one script, fenced on owner and status."""
        return bool(
            await self._blocking(self._renew_record, key, owner, version, lease_seconds, expires_at, checkpoint)
        )

    def _claim_record(self, record: IdempotencyRecord, now: float) -> IdempotencyRecord | None:
        # The claim's duration is measured from the caller's own ``now``: the very reading its expires_at came from.
        args = [record.owner, repr(float(now)), _ttl_ms(record.expires_at, now), *_fields(record)]
        existing = self._execute(record.key, self._claim, args)
        return None if existing is None else _from_fields(record.key, _pairs(existing))

    def _write(self, script: Callable[..., Any], key: str, head: list[str], record: IdempotencyRecord) -> Any:
        """Run ``script`` with ``head``, then ``record``'s TTL from now and its fields; on the calling thread."""
        # time.time() read here, on the worker, just before the call: time spent queued is not added to the TTL.
        return self._execute(key, script, [*head, _ttl_ms(record.expires_at, time.time()), *_fields(record)])

    def _renew_record(
        self, key: str, owner: str, version: str, lease_seconds: float, expires_at: float, checkpoint: str | None
    ) -> Any:
        args = [
            owner,
            _ttl_ms(expires_at, time.time()),
            version,
            repr(float(lease_seconds)),
            repr(float(expires_at)),
            "0" if checkpoint is None else "1",
            checkpoint or "",
        ]
        return self._execute(key, self._renew, args)

    async def _blocking(self, fn: Callable[..., T], /, *args: Any) -> T:
        """Run ``fn(*args)`` on the store's executor."""
        try:
            result, error = await asyncio.get_running_loop().run_in_executor(
                self._executor, functools.partial(_outcome, functools.partial(fn, *args))
            )
        except RuntimeError as e:
            if not self._closed:
                raise
            raise _closed_error() from e
        if error is not None:
            raise error
        return cast(T, result)

    def _execute(self, key: str, command: Callable[..., Any], args: Sequence[Any] | None) -> Any:
        """Run a script (``args`` given) or a one-key command on this thread; map errors."""
        redis_key = self.key_prefix + key
        try:
            return command(keys=[redis_key], args=args) if args is not None else command(redis_key)
        except ResponseError as e:
            if str(e).startswith("WRONGTYPE"):
                raise IdempotencyRecordCorruptedError(key, f"the Redis key holds another type: {e}") from e
            raise _outage(key, e) from e
        except (RedisError, OSError) as e:
            raise _outage(key, e) from e


def _outage(key: str, error: Exception) -> IdempotencyStoreError:
    logger.debug("key=<%s>, error=<%s> | redis call failed", key, type(error).__name__)
    return IdempotencyStoreError(f"Redis could not be used: {type(error).__name__}: {error}")


def _closed_error() -> IdempotencyStoreError:
    return IdempotencyStoreError("the Redis idempotency store is closed")


def _outcome(call: Callable[[], T]) -> tuple[T | None, Exception | None]:
    """Run ``call`` on a worker thread and hand back its error as a value instead of raising it across the await.

    An exception crossing the await reaches the awaiting coroutines through ``throw()``, and on Python 3.11 a frame
    resumed by ``throw()`` emits no trace ``call`` event, so coverage loses every line after the await.
    """
    try:
        return call(), None
    except Exception as e:
        return None, e


def _ttl_ms(expires_at: float, now: float) -> int:
    """``expires_at - now`` in milliseconds for PEXPIRE: rounded up (Redis never deletes a record early), at least 1.

    A record already past its expiry gets 1 ms: its write lands as any other, and Redis deletes it a millisecond later
    (a PEXPIRE of zero or less would delete the key inside the very script that wrote it).
    """
    return max(1, math.ceil((expires_at - now) * 1000))


def _fields(record: IdempotencyRecord) -> list[str | bytes]:
    fields: list[str | bytes] = [
        "status",
        record.state.value,
        "owner",
        record.owner,
        "version",
        record.version,
        "lease_seconds",
        repr(float(record.lease_seconds)),
        "expires_at",
        repr(float(record.expires_at)),
    ]
    if record.fingerprint is not None:
        fields += ["fingerprint", record.fingerprint]
    if record.payload is not None:
        fields += ["payload", record.payload]
    if record.checkpoint is not None:
        fields += ["checkpoint", record.checkpoint]
    return fields


def _pairs(flat: Any) -> dict[bytes, bytes]:
    items = cast(list[bytes], flat)
    return dict(zip(items[::2], items[1::2], strict=True))


def _text(fields: Mapping[bytes, bytes], name: bytes) -> str | None:
    value = fields.get(name)
    return None if value is None else value.decode()


def _from_fields(key: str, fields: Mapping[bytes, bytes]) -> IdempotencyRecord:
    try:
        return IdempotencyRecord(
            key=key,
            state=RecordState(fields[b"status"].decode()),
            owner=fields[b"owner"].decode(),
            version=fields[b"version"].decode(),
            lease_seconds=float(fields[b"lease_seconds"]),
            expires_at=float(fields[b"expires_at"]),
            fingerprint=_text(fields, b"fingerprint"),
            payload=fields.get(b"payload"),
            checkpoint=_text(fields, b"checkpoint"),
        )
    except (KeyError, TypeError, ValueError) as e:  # UnicodeDecodeError is a ValueError
        raise IdempotencyRecordCorruptedError(key, f"malformed record: {type(e).__name__}: {e}") from e
