"""``RedisIdempotencyStore.use_event_loop``: a long-lived loop's calls on redis-py's asyncio client, on the loop.

What it holds: the loop's calls send nothing from the store's threads (the whole contract in that mode is in
``test_store_contract.py``); nested blocks share one client, closed by the last, after the calls in flight; other
loops, a store without an asyncio client, and calls after the block keep using the threads; errors are the store's;
a cancelled call leaves nothing waiting; a closed store refuses the loop's calls; ``from_url`` makes the loop's client
with the sync client's server, TLS, timeouts and retries, and none when that client refuses one of its options; a
burst of calls takes turns, ``max_workers`` at once. Broken variants beside the tests: a close that does not wait for
the calls in flight, an unbounded client, a client made with an option it refuses.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from typing import Any
from unittest import mock

import fakeredis
import pytest
import redis
import redis.asyncio
from conftest import ThreadWatchingRedis

import strands_py.idempotency._redis_clients as redis_clients
from strands_py.idempotency import (
    IdempotencyRecord,
    IdempotencyRecordCorruptedError,
    IdempotencyStoreError,
    RecordState,
)
from strands_py.idempotency.record import new_version
from strands_py.idempotency.redis import RedisIdempotencyStore

WAIT = 10.0


class _Clients:
    """The asyncio clients a store's factory made (on one fakeredis server), and how often each was closed."""

    def __init__(self, server: fakeredis.FakeServer) -> None:
        self.server = server
        self.made: list[fakeredis.FakeAsyncRedis] = []
        self.closed: list[int] = []

    def __call__(self) -> fakeredis.FakeAsyncRedis:
        client = fakeredis.FakeAsyncRedis(server=self.server)
        index = len(self.made)
        self.made.append(client)
        self.closed.append(0)
        name = "aclose" if hasattr(client, "aclose") else "close"  # redis-py 5.0.0 has only close()
        real = getattr(client, name)

        async def aclose(*args: Any, **kwargs: Any) -> None:
            self.closed[index] += 1
            await real(*args, **kwargs)

        setattr(client, name, aclose)
        return client


@pytest.fixture
def server() -> fakeredis.FakeServer:
    return fakeredis.FakeServer()


@pytest.fixture
def sync(server: fakeredis.FakeServer) -> ThreadWatchingRedis:
    return ThreadWatchingRedis(server=server)


@pytest.fixture
def clients(server: fakeredis.FakeServer) -> _Clients:
    return _Clients(server)


@pytest.fixture
def store(sync: ThreadWatchingRedis, clients: _Clients) -> Iterator[RedisIdempotencyStore]:
    with RedisIdempotencyStore(sync, asyncio_client=clients) as store:
        yield store


def _claim(key: str, owner: str, now: float) -> IdempotencyRecord:
    return IdempotencyRecord(
        key=key,
        state=RecordState.IN_PROGRESS,
        owner=owner,
        version=new_version(),
        lease_seconds=60.0,
        expires_at=now + 3600,
        fingerprint="fp",
    )


async def _every_primitive(store: RedisIdempotencyStore, key: str) -> None:
    """Each primitive once, with the outcome the contract gives it."""
    now = time.time()
    claim = _claim(key, "a", now)
    assert await store.claim(claim, now) is None
    assert await store.renew(key, "a", version=new_version(), lease_seconds=60, expires_at=now + 3600)
    assert await store.append(key, "a", b"step")
    assert await store.truncate(key, "a", 1)
    assert await store.journal(key) == [b"step"]
    taken = _claim(key, "b", now)
    stored = await store.get(key)
    assert stored is not None and await store.take_over(taken, stored.version)
    assert not await store.release(key, "a")
    done = IdempotencyRecord(**{**taken.__dict__, "state": RecordState.COMPLETED, "version": new_version()})
    assert await store.complete(done)
    assert await store.cancel(key) is not None
    stored = await store.get(key)
    assert stored is not None and stored.state is RecordState.COMPLETED


async def test_a_loops_calls_are_made_on_it_and_the_threads_send_nothing(
    store: RedisIdempotencyStore, sync: ThreadWatchingRedis, clients: _Clients
) -> None:
    async with store.use_event_loop():
        await _every_primitive(store, "s#on-the-loop")
        assert sync.from_threads == 0
        assert len(clients.made) == 1 and clients.closed == [0]
    assert clients.closed == [1]
    # After the block, the loop's calls go through the threads again.
    await _every_primitive(store, "s#after")
    assert sync.from_threads > 0


async def test_nested_blocks_share_one_client_closed_by_the_last(
    store: RedisIdempotencyStore, clients: _Clients
) -> None:
    async with store.use_event_loop():
        async with store.use_event_loop():
            assert await store.get("s#k") is None
        assert clients.closed == [0]
        assert await store.get("s#k") is None
    assert len(clients.made) == 1 and clients.closed == [1]


async def test_other_loops_keep_using_the_threads(
    store: RedisIdempotencyStore, sync: ThreadWatchingRedis, clients: _Clients
) -> None:
    found: list[Any] = []
    async with store.use_event_loop():
        other = threading.Thread(target=lambda: found.append(asyncio.run(store.get("s#k"))))
        other.start()
        other.join(WAIT)
        assert not other.is_alive()
    assert found == [None]
    assert sync.from_threads == 1 and len(clients.made) == 1


async def test_without_an_asyncio_client_the_block_changes_nothing(sync: ThreadWatchingRedis) -> None:
    with RedisIdempotencyStore(sync) as store:
        async with store.use_event_loop():
            assert await store.get("s#k") is None
    assert sync.from_threads == 1


async def test_an_asyncio_client_that_decodes_responses_is_refused(server: fakeredis.FakeServer) -> None:
    decoding = RedisIdempotencyStore(
        fakeredis.FakeRedis(server=server),
        asyncio_client=lambda: fakeredis.FakeAsyncRedis(server=server, decode_responses=True),
    )
    with decoding, pytest.raises(ValueError, match="decode_responses=False"):
        async with decoding.use_event_loop():
            pass  # pragma: no cover - never entered


class _Held:
    """Holds every EVALSHA of one asyncio client until released, and says when one is held."""

    def __init__(self, client: fakeredis.FakeAsyncRedis) -> None:
        self.entered = asyncio.Event()
        self.release = asyncio.Event()
        self._real = client.evalsha

    async def evalsha(self, *args: Any) -> Any:
        self.entered.set()
        await self.release.wait()
        return await self._real(*args)


def _hold(client: fakeredis.FakeAsyncRedis) -> _Held:
    held = _Held(client)
    client.evalsha = held.evalsha  # type: ignore[method-assign]
    return held


async def _the_block_closes_after_the_call_in_flight(store: RedisIdempotencyStore, clients: _Clients) -> None:
    block = store.use_event_loop()
    await block.__aenter__()
    held = _hold(clients.made[0])
    now = time.time()
    call = asyncio.ensure_future(store.claim(_claim("s#k", "a", now), now))
    await asyncio.wait_for(held.entered.wait(), WAIT)
    leaving = asyncio.ensure_future(block.__aexit__(None, None, None))
    for _ in range(20):  # many turns of the loop: the exit waits for the call, however many it is given
        await asyncio.sleep(0)
    assert clients.closed == [0] and not leaving.done()
    held.release.set()
    assert await asyncio.wait_for(call, WAIT) is None
    await asyncio.wait_for(leaving, WAIT)
    assert clients.closed == [1]


async def test_the_client_is_closed_after_the_calls_in_flight(store: RedisIdempotencyStore, clients: _Clients) -> None:
    await _the_block_closes_after_the_call_in_flight(store, clients)


async def _close_at_once(self: redis_clients.LoopClient) -> None:
    """Broken variant: closes the client under the calls in flight."""
    await (getattr(self.client, "aclose", None) or self.client.close)()


@pytest.mark.xfail(strict=True, raises=AssertionError)
async def test_negative_control_a_close_that_does_not_wait_for_the_calls_in_flight(
    store: RedisIdempotencyStore, clients: _Clients
) -> None:
    with mock.patch.object(redis_clients.LoopClient, "aclose", _close_at_once):
        await _the_block_closes_after_the_call_in_flight(store, clients)


async def test_a_cancelled_call_leaves_nothing_for_the_close_to_wait_for(
    store: RedisIdempotencyStore, clients: _Clients
) -> None:
    async with store.use_event_loop():
        held = _hold(clients.made[0])
        now = time.time()
        call = asyncio.ensure_future(store.claim(_claim("s#k", "a", now), now))
        await asyncio.wait_for(held.entered.wait(), WAIT)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
    assert clients.closed == [1]


async def test_a_cancelled_exit_still_closes_the_client(store: RedisIdempotencyStore, clients: _Clients) -> None:
    block = store.use_event_loop()
    await block.__aenter__()
    held = _hold(clients.made[0])
    now = time.time()
    call = asyncio.ensure_future(store.claim(_claim("s#k", "a", now), now))
    await asyncio.wait_for(held.entered.wait(), WAIT)
    leaving = asyncio.ensure_future(block.__aexit__(None, None, None))
    await asyncio.sleep(0)
    leaving.cancel()
    with pytest.raises(asyncio.CancelledError):
        await leaving
    assert clients.closed == [1]
    held.release.set()
    # The call's connection went with the client: the call ends (an outage, or its reply if it was in), never hangs.
    done, _ = await asyncio.wait([call], timeout=WAIT)
    assert done


@pytest.mark.parametrize(
    "error",
    [
        redis.ResponseError("OOM command not allowed when used memory > 'maxmemory'"),
        redis.TimeoutError("Timeout reading from socket"),
        ConnectionResetError("reset by peer"),
        redis.exceptions.RedisClusterException("EVALSHA - all keys must map to the same key slot"),
    ],
)
async def test_errors_on_the_loop_are_store_errors(
    store: RedisIdempotencyStore, clients: _Clients, error: Exception
) -> None:
    now = time.time()
    async with store.use_event_loop():
        with mock.patch.object(clients.made[0], "evalsha", side_effect=error):
            with pytest.raises(IdempotencyStoreError) as raised:
                await store.claim(_claim("s#k", "a", now), now)
            assert raised.value.__cause__ is error
            with pytest.raises(IdempotencyStoreError):
                await store.append("s#k", "a", b"entry")


async def test_a_key_of_another_type_is_a_corrupt_record_on_the_loop(
    store: RedisIdempotencyStore, sync: ThreadWatchingRedis
) -> None:
    sync.set(store.redis_keys("s#k")[0], b"not a hash")
    async with store.use_event_loop():
        with pytest.raises(IdempotencyRecordCorruptedError):
            await store.get("s#k")


async def test_a_bug_is_not_dressed_as_an_outage(store: RedisIdempotencyStore, clients: _Clients) -> None:
    async with store.use_event_loop():
        with mock.patch.object(clients.made[0], "hgetall", side_effect=RuntimeError("a bug")):
            with pytest.raises(RuntimeError, match="a bug"):
                await store.get("s#k")


async def test_a_closed_store_refuses_the_loops_calls(store: RedisIdempotencyStore) -> None:
    async with store.use_event_loop():
        store.close()
        with pytest.raises(IdempotencyStoreError, match="closed"):
            await store.get("s#k")


async def test_from_url_makes_the_loops_client_like_its_own() -> None:
    store = RedisIdempotencyStore.from_url("rediss://user:pw@cache.example:6380/2", ssl_cert_reqs="required")
    made: list[Any] = []
    real = redis.asyncio.Redis.from_url

    def spy(*args: Any, **kwargs: Any) -> Any:
        made.append(real(*args, **kwargs))
        return made[-1]

    with store, mock.patch.object(redis.asyncio.Redis, "from_url", spy):
        async with store.use_event_loop():  # nothing is sent: no connection is made
            (client,) = made
            kwargs = client.connection_pool.connection_kwargs
            where = (kwargs["host"], kwargs["port"], kwargs["db"], kwargs["username"])
            assert where == ("cache.example", 6380, 2, "user")
            assert kwargs["socket_timeout"] == 5.0 and kwargs["socket_connect_timeout"] == 5.0
            assert client.connection_pool.connection_class is redis.asyncio.SSLConnection
            assert client.get_retry()._retries == 3


class _HeldGets:
    """Holds every HGETALL of one asyncio client until released; counts those in flight, and the most at once."""

    def __init__(self, client: fakeredis.FakeAsyncRedis) -> None:
        self.release = asyncio.Event()
        self.in_flight = 0
        self.most = 0
        self._real = client.hgetall
        client.hgetall = self.hgetall  # type: ignore[method-assign]

    async def hgetall(self, *args: Any) -> Any:
        self.in_flight += 1
        self.most = max(self.most, self.in_flight)
        try:
            await self.release.wait()
            return await self._real(*args)
        finally:
            self.in_flight -= 1


async def _a_burst_on_the_loop(server: fakeredis.FakeServer) -> int:
    """Twenty calls at once on a store of two workers: all answered; how many were in flight at once."""
    sync = fakeredis.FakeRedis(server=server)
    with RedisIdempotencyStore(sync, max_workers=2, asyncio_client=_Clients(server)) as store:
        async with store.use_event_loop():
            held = _HeldGets(store._loops.bound().client)  # type: ignore[union-attr]
            calls = [asyncio.ensure_future(store.get(f"s#{n}")) for n in range(20)]
            for _ in range(50):  # many turns of the loop: every call that may start has started
                await asyncio.sleep(0)
            most = held.most
            held.release.set()
            assert await asyncio.wait_for(asyncio.gather(*calls), WAIT) == [None] * 20
    return most


async def test_a_burst_of_calls_on_the_loop_takes_turns_as_on_the_threads(server: fakeredis.FakeServer) -> None:
    # redis-py's pool fails when it is full (MaxConnectionsError), and one call holds one connection: a retry
    # storm's burst must wait for its turn, as it does for the store's max_workers threads.
    assert await _a_burst_on_the_loop(server) == 2


class _Unbounded:
    """Broken variant of the calls' limit: none."""

    def __init__(self, limit: int) -> None:
        pass

    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, *exc: object) -> None:
        return None


@pytest.mark.xfail(strict=True, raises=AssertionError)
async def test_negative_control_an_unbounded_loop_client(server: fakeredis.FakeServer) -> None:
    with mock.patch.object(redis_clients.asyncio, "Semaphore", _Unbounded):
        assert await _a_burst_on_the_loop(server) == 2


async def test_from_url_options_the_asyncio_client_refuses_keep_the_threads(caplog: pytest.LogCaptureFixture) -> None:
    # redis-py's two clients differ on a few options (OCSP here, some cluster ones): a store made with one must serve
    # as before, on its threads, rather than fail every call, or a server's lifespan, on the loop.
    with caplog.at_level("WARNING", logger="strands_py.idempotency._redis_clients"):
        store = RedisIdempotencyStore.from_url(
            "rediss://127.0.0.1:1", ssl_validate_ocsp=True, socket_connect_timeout=0.5, retries=0
        )
    assert "refuses an option" in caplog.text and "ssl_validate_ocsp" in caplog.text
    with store:
        async with store.use_event_loop():
            with pytest.raises(IdempotencyStoreError, match="Redis could not be used"):
                await store.get("s#k")


@pytest.mark.xfail(strict=True, raises=TypeError)
async def test_negative_control_an_asyncio_client_made_with_an_option_it_refuses() -> None:
    """Without the check ``from_url`` makes, every call on the loop fails with a TypeError."""
    sync = redis.Redis.from_url("rediss://127.0.0.1:1", ssl_validate_ocsp=True, socket_connect_timeout=0.5)
    made = lambda: redis.asyncio.Redis.from_url("rediss://127.0.0.1:1", ssl_validate_ocsp=True)  # noqa: E731
    with RedisIdempotencyStore(sync, asyncio_client=made, close_client=True) as store:
        async with store.use_event_loop():
            with pytest.raises(IdempotencyStoreError):
                await store.get("s#k")
