"""RedisIdempotencyStore beyond the shared contract (fakeredis with Lua): layout, construction, errors, bad data."""

from __future__ import annotations

import asyncio
import math
import os
import socket
import subprocess
import sys
import threading
import time
import traceback
from typing import Any
from unittest import mock

import fakeredis
import pytest
import redis

from strands_py.idempotency import (
    IdempotencyRecord,
    IdempotencyRecordCorruptedError,
    IdempotencyStoreError,
    RecordState,
)
from strands_py.idempotency.redis import RedisIdempotencyStore

WAIT = 10.0
PREFIX = "strands-py:idempotency:"


@pytest.fixture
def client() -> fakeredis.FakeRedis:
    return fakeredis.FakeRedis(server=fakeredis.FakeServer())


@pytest.fixture
def store(client: fakeredis.FakeRedis) -> Any:
    with RedisIdempotencyStore(client) as store:
        yield store


def _claim(key: str, owner: str, now: float, *, lease: float = 60.0, ttl: float = 3600.0) -> IdempotencyRecord:
    return IdempotencyRecord(key, RecordState.IN_PROGRESS, owner, now + lease, now + lease + ttl, "fp")


def _completed(key: str, owner: str, now: float, *, ttl: float = 3600.0) -> IdempotencyRecord:
    return IdempotencyRecord(key, RecordState.COMPLETED, owner, now, now + ttl, "fp", b"\x00payload\xff")


async def test_one_hash_per_record_with_its_expiry_on_the_key(store: RedisIdempotencyStore, client: Any) -> None:
    now = time.time()
    claim = IdempotencyRecord("s#k", RecordState.IN_PROGRESS, "a", now + 60.5, now + 3600.25, "fp", None, "cp")
    assert await store.claim(claim, now) is None
    assert client.hgetall(PREFIX + "s#k") == {
        b"status": b"IN_PROGRESS",
        b"owner": b"a",
        b"lease": repr(now + 60.5).encode(),
        b"expires_at": repr(now + 3600.25).encode(),
        b"fingerprint": b"fp",
        b"checkpoint": b"cp",
    }
    expire_ms = client.pexpiretime(PREFIX + "s#k")
    assert (now + 3600.25) * 1000 < expire_ms <= (now + 3600.25) * 1000 + 1
    # renew past the expiry moves the key's expiry too; a shorter lease leaves it
    assert await store.renew("s#k", "a", now + 7200.5) is True
    assert client.pexpiretime(PREFIX + "s#k") == math.floor((now + 7200.5) * 1000) + 1
    assert await store.renew("s#k", "a", now + 100) is True
    assert client.pexpiretime(PREFIX + "s#k") == math.floor((now + 7200.5) * 1000) + 1
    # complete replaces the whole hash (no stale checkpoint), with the completed record's expiry
    assert await store.complete(_completed("s#k", "a", now, ttl=10)) is True
    assert client.hget(PREFIX + "s#k", "checkpoint") is None
    assert client.hget(PREFIX + "s#k", "payload") == b"\x00payload\xff"
    assert client.pexpiretime(PREFIX + "s#k") == math.floor((now + 10) * 1000) + 1


async def test_an_expiry_in_the_past_deletes_the_key(store: RedisIdempotencyStore, client: Any) -> None:
    now = time.time()
    await store.claim(_claim("s#k", "a", now - 100), now - 100)
    assert await store.complete(_completed("s#k", "a", now - 100, ttl=10)) is True
    assert client.exists(PREFIX + "s#k") == 0
    assert await store.get("s#k") is None


async def test_key_prefix_namespaces_stores_sharing_a_server(client: Any) -> None:
    now = time.time()
    with RedisIdempotencyStore(client, key_prefix="app-1:") as one, RedisIdempotencyStore(client) as two:
        assert await one.claim(_claim("s#k", "a", now), now) is None
        assert await two.claim(_claim("s#k", "b", now), now) is None
        assert client.exists("app-1:s#k", PREFIX + "s#k") == 2


async def test_scripts_are_loaded_again_after_a_script_flush(store: RedisIdempotencyStore, client: Any) -> None:
    now = time.time()
    assert await store.claim(_claim("s#1", "a", now), now) is None
    client.script_flush()  # as after a server restart
    assert await store.claim(_claim("s#2", "a", now), now) is None
    assert await store.renew("s#2", "a", now + 90) is True


async def test_store_io_runs_on_the_stores_own_threads(store: RedisIdempotencyStore) -> None:
    seen: list[str] = []
    real = store._client.hgetall

    def spy(*args: Any) -> Any:
        seen.append(threading.current_thread().name)
        return real(*args)

    with mock.patch.object(store._client, "hgetall", spy):
        await store.get("s#k")
    assert seen and all(name.startswith("strands-py-idempotency-redis") for name in seen)


def test_a_sync_agent_style_call_from_many_loops_and_threads(store: RedisIdempotencyStore) -> None:
    """Like strands' sync ``agent(...)``: every call on a new event loop in a new thread, one store."""
    now = time.time()
    results: list[Any] = []

    def call(i: int) -> None:
        results.append(asyncio.run(store.claim(_claim(f"s#{i}", "a", now), now)))

    threads = [threading.Thread(target=call, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT)
    assert results == [None] * 8


def test_constructor_validation(client: Any) -> None:
    with pytest.raises(ValueError, match="max_workers"):
        RedisIdempotencyStore(client, max_workers=0)
    with pytest.raises(ValueError, match="max_result_bytes"):
        RedisIdempotencyStore(client, max_result_bytes=0)
    with pytest.raises(ValueError, match="max_result_bytes"):
        RedisIdempotencyStore(client, max_result_bytes=513 * 1024 * 1024)
    with pytest.raises(ValueError, match="decode_responses"):
        RedisIdempotencyStore(fakeredis.FakeRedis(decode_responses=True))
    with RedisIdempotencyStore(client) as default, RedisIdempotencyStore(client, max_result_bytes=None) as unlimited:
        assert default.max_result_bytes == 8 * 1024 * 1024
        assert unlimited.max_result_bytes == 512 * 1024 * 1024


def test_from_url_builds_a_client_with_short_timeouts_and_few_retries() -> None:
    store = RedisIdempotencyStore.from_url("rediss://user:pw@cache.example:6380/2", ssl_cert_reqs="required")
    kwargs = store._client.connection_pool.connection_kwargs
    assert (kwargs["host"], kwargs["port"], kwargs["db"], kwargs["username"]) == ("cache.example", 6380, 2, "user")
    assert kwargs["socket_timeout"] == 5.0 and kwargs["socket_connect_timeout"] == 5.0
    assert store._client.connection_pool.connection_class is redis.SSLConnection
    assert store._client.get_retry()._retries == 3
    with mock.patch.object(store._client, "close") as close:
        store.close()
    close.assert_called_once_with()


def test_from_url_closes_its_client_when_the_store_cannot_be_made() -> None:
    closed_by: list[str] = []

    def close(self: redis.Redis) -> None:
        closed_by.extend(frame.name for frame in traceback.extract_stack())

    with mock.patch.object(redis.Redis, "close", close), pytest.raises(ValueError, match="decode_responses"):
        RedisIdempotencyStore.from_url("redis://127.0.0.1:1", decode_responses=True)
    assert "from_url" in closed_by  # closed by the store, not left to the garbage collector


def test_close_leaves_a_client_of_yours_open(client: Any) -> None:
    with mock.patch.object(client, "close") as close:
        RedisIdempotencyStore(client).close()
    close.assert_not_called()


async def test_a_closed_store_raises_a_store_error(client: Any) -> None:
    store = RedisIdempotencyStore(client)
    store.close()
    with pytest.raises(IdempotencyStoreError, match="closed"):
        await store.get("s#k")
    now = time.time()
    with pytest.raises(IdempotencyStoreError, match="closed"):
        store.claim_blocking(_claim("s#k", "a", now), now)


def test_a_blocking_claim_runs_on_the_callers_thread(store: RedisIdempotencyStore) -> None:
    seen: list[str] = []
    real = store._client.evalsha

    def spy(*args: Any) -> Any:
        seen.append(threading.current_thread().name)
        return real(*args)

    now = time.time()
    with mock.patch.object(store._client, "evalsha", spy):
        assert store.claim_blocking(_claim("s#k", "a", now), now) is None
    assert seen and set(seen) == {threading.current_thread().name}  # EVALSHA, and again after loading the script


async def test_other_runtime_errors_propagate_as_they_are(store: RedisIdempotencyStore) -> None:
    with (
        mock.patch.object(store._client, "hgetall", side_effect=RuntimeError("a bug")),
        pytest.raises(RuntimeError, match="a bug"),
    ):
        await store.get("s#k")
    store._executor.shutdown()  # behind the store's back: not a closed store
    with pytest.raises(RuntimeError, match="shutdown"):
        await store.get("s#k")


def _closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_an_unreachable_server_is_a_store_error_from_every_primitive() -> None:
    store = RedisIdempotencyStore.from_url(f"redis://127.0.0.1:{_closed_port()}", retries=0, socket_connect_timeout=1)
    now = time.time()
    calls = [
        store.claim(_claim("s#k", "a", now), now),
        store.get("s#k"),
        store.complete(_completed("s#k", "a", now)),
        store.release("s#k", "a"),
        store.renew("s#k", "a", now + 60),
    ]
    for call in calls:
        with pytest.raises(IdempotencyStoreError, match="ConnectionError") as raised:
            await asyncio.wait_for(call, WAIT)
        assert isinstance(raised.value.__cause__, redis.ConnectionError)
    with pytest.raises(IdempotencyStoreError, match="ConnectionError"):
        store.claim_blocking(_claim("s#k", "a", now), now)
    store.close()


@pytest.mark.parametrize(
    "error",
    [
        redis.ResponseError("OOM command not allowed when used memory > 'maxmemory'"),
        redis.ResponseError("NOPERM this user has no permissions to run the 'evalsha' command"),
        redis.TimeoutError("Timeout reading from socket"),
        redis.AuthenticationError("invalid password"),
        ConnectionResetError("reset by peer"),
    ],
)
async def test_server_errors_are_store_errors(store: RedisIdempotencyStore, error: Exception) -> None:
    now = time.time()
    with mock.patch.object(store._client, "evalsha", side_effect=error):
        with pytest.raises(IdempotencyStoreError) as raised:
            await store.claim(_claim("s#k", "a", now), now)
        assert raised.value.__cause__ is error
        with pytest.raises(IdempotencyStoreError):
            await store.renew("s#k", "a", now)


async def test_a_key_of_another_type_is_a_corrupt_record(store: RedisIdempotencyStore, client: Any) -> None:
    client.set(PREFIX + "s#bad", "not a hash")
    now = time.time()
    with pytest.raises(IdempotencyRecordCorruptedError, match="s#bad"):
        await store.get("s#bad")
    with pytest.raises(IdempotencyRecordCorruptedError, match="s#bad"):
        await store.claim(_claim("s#bad", "a", now), now)


@pytest.mark.parametrize(
    "fields",
    [
        {"status": "IN_PROGRESS", "owner": "a", "lease": "soon", "expires_at": "1e12"},
        {"status": "IN_PROGRESS", "owner": "a", "expires_at": "1e12"},
        {"status": "SOMETHING", "owner": "a", "lease": "1", "expires_at": "1e12"},
        {"status": "COMPLETED", "owner": b"\xff", "lease": "1", "expires_at": "1e12"},
    ],
)
async def test_a_malformed_record_is_reported_and_never_overwritten(
    store: RedisIdempotencyStore, client: Any, fields: dict[str, Any]
) -> None:
    client.hset(PREFIX + "s#bad", mapping=fields)
    now = time.time()
    with pytest.raises(IdempotencyRecordCorruptedError, match="s#bad"):
        await store.get("s#bad")
    with pytest.raises(IdempotencyRecordCorruptedError, match="s#bad"):
        await store.claim(_claim("s#bad", "a", now), now)
    assert client.hgetall(PREFIX + "s#bad") == {
        k.encode(): v if isinstance(v, bytes) else v.encode() for k, v in fields.items()
    }


def test_the_package_imports_without_redis_py() -> None:
    code = (
        "import sys; sys.modules['redis'] = None\n"
        "import strands_py, strands_py.idempotency\n"
        "try:\n"
        "    import strands_py.idempotency.redis\n"
        "except ImportError as e:\n"
        "    print(e)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env={**os.environ}, check=True
    )
    assert "pip install 'strands-py[redis]'" in out.stdout, out.stderr
