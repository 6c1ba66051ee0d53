"""A Redis store's redis-py clients: how ``from_url`` makes them, an asyncio client per loop, their errors.

A call through the store's own threads costs two thread hops, and the idle thread it wakes is most of a call's cost
(``_workers.py``). redis-py's asyncio client makes the call on the event loop itself, but its connections belong to
the loop that opened them, and strands' sync ``agent(...)`` runs each call on a new loop. So an asyncio client is made
only for a loop that says it will live (``RedisIdempotencyStore.use_event_loop``: a server's lifespan), and closed when
that loop is done with it; every other loop's calls keep using the threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any

import redis
import redis.asyncio
import redis.asyncio.cluster
import redis.asyncio.retry
from redis.backoff import ExponentialBackoff
from redis.cluster import RedisCluster, RedisClusterException
from redis.exceptions import AskError, RedisError, ResponseError
from redis.retry import Retry

from ..types.exceptions import IdempotencyRecordCorruptedError, IdempotencyStoreError

logger = logging.getLogger(__name__)

# Instead of a script's name: the record's fields, one HGETALL.
HGETALL = "hgetall"


def from_url(
    url: str, *, retries: int, cluster: bool, timeouts: Mapping[str, float], options: Mapping[str, Any]
) -> tuple[redis.Redis | RedisCluster, Callable[[], Any] | None]:
    """A sync client of ``url``, and a function making asyncio clients of the same server, TLS, timeouts and retries.

    Retries: exponential backoff from 50 ms, capped at 1 s. The function is None when the asyncio client does not
    take every one of ``options`` (redis-py's two clients differ on a few): the store's calls then all keep its
    threads, as they did before asyncio clients were used, rather than fail inside a server's lifespan.

    Raises:
        IdempotencyStoreError: With ``cluster``: no node of the cluster answered, or redis-py refused the arguments.
    """
    retry = Retry(ExponentialBackoff(cap=1.0, base=0.05), retries)
    client: redis.Redis | RedisCluster
    if cluster:
        try:
            client = RedisCluster.from_url(url, retry=retry, **timeouts, **options)
        except (RedisError, RedisClusterException, OSError) as e:
            # Unlike redis.Redis, the cluster client connects as it is made (it reads the slot map).
            raise IdempotencyStoreError(f"Redis Cluster could not be used: {type(e).__name__}: {e}") from e
    else:
        client = redis.Redis.from_url(url, retry=retry, **timeouts, **options)

    def asyncio_client() -> Any:
        # Made on the loop that will use it (its connections are that loop's): see LoopClients.use.
        retrying = redis.asyncio.retry.Retry(ExponentialBackoff(cap=1.0, base=0.05), retries)
        made: Any = redis.asyncio.cluster.RedisCluster if cluster else redis.asyncio.Redis
        return made.from_url(url, retry=retrying, **timeouts, **options)

    try:
        probe = asyncio_client()  # no I/O: a cluster client reads its slot map at its first command
        if not cluster:
            probe.connection_pool.make_connection()  # a connection object, not connected: checks its options
    except TypeError as e:
        logger.warning("error=<%s> | redis-py's asyncio client refuses an option: every call keeps the threads", e)
        return client, None
    return client, asyncio_client


def mapped(key: str, error: Exception) -> Exception:
    """The store's error for what redis-py raised (``error`` itself when it is none of redis-py's)."""
    if isinstance(error, ResponseError) and str(error).startswith("WRONGTYPE"):
        return IdempotencyRecordCorruptedError(key, f"the Redis key holds another type: {error}")
    # RedisClusterException is not a RedisError: no node reachable, no slot map, keys of several slots.
    if isinstance(error, RedisError | RedisClusterException | OSError):
        logger.debug("key=<%s>, error=<%s> | redis call failed", key, type(error).__name__)
        # MOVED or ASK reach the store only through a plain client talking to a cluster node: say what to use instead.
        hint = ""
        if isinstance(error, AskError):
            hint = "; the server is a Redis Cluster node: use from_url(..., cluster=True)"
        return IdempotencyStoreError(f"Redis could not be used: {type(error).__name__}: {error}{hint}")
    return error


class LoopClient:
    """One event loop's asyncio client and its scripts, with the calls in flight on it.

    Thread-safety: used on its own loop only.
    """

    def __init__(self, client: Any, scripts: Mapping[str, str], limit: int) -> None:
        """Register ``scripts`` (name to source) on ``client``, which ``aclose`` closes; ``limit`` calls at once."""
        self.client = client
        self.users = 0
        self._scripts = {name: client.register_script(source) for name, source in scripts.items()}
        # A connection pool fails when it is full (redis-py's default), and one call holds one connection: a burst
        # of calls (a retry storm's) waits for its turn here, as it would for the store's threads, never failing for
        # want of a connection nor opening one per call.
        self._slots = asyncio.Semaphore(limit)
        self._calls = 0  # in flight or waiting for a slot
        self._idle: asyncio.Event | None = None

    async def call(self, key: str, keys: Sequence[str], name: str, args: Sequence[Any] | None) -> Any:
        """Run script ``name`` on ``keys`` (or ``HGETALL`` of the first key) on this loop; errors as the store's.

        Cancellation: cancelling the call stops it waiting, and redis-py drops the connection whose reply it was
        reading; a script already sent runs to its end on the server, as with the store's threads.
        """
        self._calls += 1
        try:
            async with self._slots:
                if name == HGETALL:
                    return await self.client.hgetall(keys[0])
                return await self._scripts[name](keys=keys, args=args)
        except Exception as e:
            error = mapped(key, e)
            if error is e:
                raise
            raise error from e
        finally:
            self._calls -= 1
            if self._calls == 0 and self._idle is not None:
                self._idle.set()

    async def aclose(self) -> None:
        """Wait for the calls in flight (each bounded by the client's timeouts), then close the client.

        Cancellation: the client is closed all the same, under the calls still in flight (they fail as an outage).
        """
        try:
            if self._calls:
                self._idle = asyncio.Event()
                await self._idle.wait()
        finally:
            close = getattr(self.client, "aclose", None) or self.client.close  # redis-py 5.0.0 has only close()
            await close()


class LoopClients:
    """The asyncio clients of one store, by event loop.

    Thread-safety: ``bound`` is safe from any thread (a dict read); ``use`` from any loop.
    """

    def __init__(self, factory: Callable[[], Any] | None, scripts: Mapping[str, str], limit: int) -> None:
        """``factory()`` makes an asyncio client for the running loop (None: the store has none to make).

        ``limit``: the most calls at once on one loop's client (more wait for their turn).
        """
        self._factory = factory
        self._scripts = scripts
        self._limit = limit
        self._by_loop: dict[asyncio.AbstractEventLoop, LoopClient] = {}
        self._lock = threading.Lock()

    def bound(self) -> LoopClient | None:
        """The running loop's client, or None (its calls go through the store's threads)."""
        if not self._by_loop:
            return None  # the common case without any: no loop lookup at all
        return self._by_loop.get(asyncio.get_running_loop())

    @contextlib.asynccontextmanager
    async def use(self) -> AsyncIterator[None]:
        """The running loop's calls use an asyncio client until the block ends (nested blocks share one)."""
        if self._factory is None:
            yield
            return
        loop = asyncio.get_running_loop()
        with self._lock:
            bound = self._by_loop.get(loop)
            if bound is None:
                client = self._factory()
                if client.get_encoder().decode_responses:
                    raise ValueError("the asyncio client must be made with decode_responses=False: results are bytes")
                bound = self._by_loop[loop] = LoopClient(client, self._scripts, self._limit)
            bound.users += 1
        try:
            yield
        finally:
            with self._lock:
                bound.users -= 1
                last = bound.users == 0
                if last:
                    # New calls of this loop go through the threads from here on; the ones in flight end first.
                    del self._by_loop[loop]
            if last:
                await bound.aclose()
