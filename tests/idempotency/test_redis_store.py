"""RedisIdempotencyStore beyond the shared contract (fakeredis with Lua): layout, lifetimes, construction, errors,
bad data, and the broken variants the tests must catch."""

from __future__ import annotations

import asyncio
import dataclasses
import math
import os
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Awaitable, Callable, Iterator
from typing import Any
from unittest import mock

import fakeredis
import pytest
import redis

import strands_py.idempotency.redis as redis_module
from strands_py.idempotency import (
    IdempotencyRecord,
    IdempotencyRecordCorruptedError,
    IdempotencyStoreError,
    RecordState,
)
from strands_py.idempotency.record import new_version
from strands_py.idempotency.redis import RedisIdempotencyStore
from strands_py.testing.store_contract import StoreContract

WAIT = 10.0
PREFIX = "strands-py:idempotency:"
# Bound on the time between a write and the PTTL read that checks it, under any load: far below the skews tested.
SLACK_MS = 60_000
SKEW = 600.0  # ten minutes


@pytest.fixture
def client() -> fakeredis.FakeRedis:
    return fakeredis.FakeRedis(server=fakeredis.FakeServer())


@pytest.fixture
def store(client: fakeredis.FakeRedis) -> Iterator[RedisIdempotencyStore]:
    with RedisIdempotencyStore(client) as store:
        yield store


def _claim(
    key: str, owner: str, now: float, *, lease: float = 60.0, ttl: float = 3600.0, checkpoint: str | None = None
) -> IdempotencyRecord:
    return IdempotencyRecord(
        key, RecordState.IN_PROGRESS, owner, new_version(), lease, now + lease + ttl, "fp", None, checkpoint
    )


def _completed(key: str, owner: str, now: float, *, ttl: float = 3600.0) -> IdempotencyRecord:
    return IdempotencyRecord(key, RecordState.COMPLETED, owner, new_version(), 0.0, now + ttl, "fp", b"\x00payload\xff")


def _assert_ttl(client: Any, key: str, seconds: float) -> None:
    """The key's remaining TTL on the server is ``seconds`` (rounded up to ms), less the little time since the write."""
    intended = math.ceil(seconds * 1000)
    pttl = client.pttl(PREFIX + key)
    assert intended - SLACK_MS < pttl <= intended, f"PTTL {pttl} ms, intended {intended} ms"


class _SkewedClock:
    """Stands in for the store module's ``time``: ``time()`` is this host's wall clock, ``offset`` seconds off."""

    def __init__(self, offset: float) -> None:
        self.offset = offset

    def time(self) -> float:
        return time.time() + self.offset


async def test_one_hash_per_record_with_its_lifetime_on_the_key(store: RedisIdempotencyStore, client: Any) -> None:
    now = time.time()
    claim = IdempotencyRecord("s#k", RecordState.IN_PROGRESS, "a", "v-1", 60.5, now + 3600.25, "fp", None, "cp")
    assert await store.claim(claim, now) is None
    assert client.hgetall(PREFIX + "s#k") == {
        b"status": b"IN_PROGRESS",
        b"owner": b"a",
        b"version": b"v-1",
        b"lease_seconds": b"60.5",
        b"expires_at": repr(now + 3600.25).encode(),
        b"fingerprint": b"fp",
        b"checkpoint": b"cp",
    }
    _assert_ttl(client, "s#k", 3600.25)
    # renew sets the version, lease and expiry as given: a later expiry raises the TTL, an earlier one lowers it
    assert await store.renew("s#k", "a", version="v-2", lease_seconds=0.0, expires_at=now + 7200.5) is True
    assert client.hmget(PREFIX + "s#k", "version", "lease_seconds", "checkpoint") == [b"v-2", b"0.0", b"cp"]
    _assert_ttl(client, "s#k", 7200.5)
    assert await store.renew("s#k", "a", version="v-3", lease_seconds=30.0, expires_at=now + 100) is True
    assert client.hget(PREFIX + "s#k", "expires_at") == repr(now + 100).encode()
    _assert_ttl(client, "s#k", 100)
    # a takeover replaces the whole hash (no stale checkpoint), with the new record's lifetime
    taken = _claim("s#k", "b", now, lease=10, ttl=20)
    assert await store.take_over(taken, "v-3") is True
    assert client.hget(PREFIX + "s#k", "checkpoint") is None
    assert client.hget(PREFIX + "s#k", "version") == taken.version.encode()
    _assert_ttl(client, "s#k", 30)
    # so does complete, with the completed record's
    assert await store.complete(_completed("s#k", "b", now, ttl=10)) is True
    assert client.hget(PREFIX + "s#k", "payload") == b"\x00payload\xff"
    assert client.hget(PREFIX + "s#k", "lease_seconds") == b"0.0"
    _assert_ttl(client, "s#k", 10)


# Lifetimes are durations, counted down on the server's clock: a writer's skew never moves them.


class _AbsoluteDeadlines(RedisIdempotencyStore):
    """Negative control (the layout before this one): PEXPIREAT at expires_at, a time of the writer's clock."""

    def __init__(self, client: Any) -> None:
        super().__init__(client)
        self._claim, self._take_over, self._complete, self._renew = (
            client.register_script(script.replace("'PEXPIRE'", "'PEXPIREAT'"))
            for script in (redis_module._CLAIM, redis_module._TAKE_OVER, redis_module._COMPLETE, redis_module._RENEW)
        )


def _absolute_ms(expires_at: float, now: float) -> int:
    return math.floor(expires_at * 1000) + 1


@pytest.fixture(
    params=[
        "durations",
        pytest.param("absolute-deadlines", marks=pytest.mark.xfail(strict=True, raises=AssertionError)),
    ]
)
def lifetimes(request: pytest.FixtureRequest, client: Any) -> Iterator[RedisIdempotencyStore]:
    """The store, and (xfail) the variant that writes absolute deadlines of the writer's clock."""
    if request.param == "durations":
        with RedisIdempotencyStore(client) as store:
            yield store
        return
    with mock.patch.object(redis_module, "_ttl_ms", _absolute_ms), _AbsoluteDeadlines(client) as variant:
        yield variant


@pytest.mark.parametrize("offset", [SKEW, -SKEW])
async def test_a_skewed_host_claims_for_the_intended_duration(
    lifetimes: RedisIdempotencyStore, client: Any, offset: float
) -> None:
    """A claim from a host ten minutes ahead or behind lives exactly its duration, measured from its own ``now``."""
    skewed = _SkewedClock(offset)
    with mock.patch.object(redis_module, "time", skewed):
        now = skewed.time()
        assert await lifetimes.claim(_claim("s#k", "a", now, lease=30, ttl=270), now) is None
    _assert_ttl(client, "s#k", 300)


def _renew(store: RedisIdempotencyStore, now: float, judged: IdempotencyRecord) -> Awaitable[bool]:
    return store.renew("s#k", "a", version=new_version(), lease_seconds=30, expires_at=now + 400)


def _take_over(store: RedisIdempotencyStore, now: float, judged: IdempotencyRecord) -> Awaitable[bool]:
    return store.take_over(_claim("s#k", "b", now, lease=30, ttl=370), judged.version)


def _complete(store: RedisIdempotencyStore, now: float, judged: IdempotencyRecord) -> Awaitable[bool]:
    return store.complete(_completed("s#k", "a", now, ttl=400))


@pytest.mark.parametrize("write", [_renew, _take_over, _complete], ids=["renew", "take_over", "complete"])
@pytest.mark.parametrize("offset", [SKEW, -SKEW])
async def test_a_skewed_host_writes_records_for_their_intended_duration(
    lifetimes: RedisIdempotencyStore,
    client: Any,
    offset: float,
    write: Callable[[RedisIdempotencyStore, float, IdempotencyRecord], Awaitable[bool]],
) -> None:
    """A host ten minutes ahead or behind renews, takes over and completes records that live exactly their duration."""
    now = time.time()
    claim = _claim("s#k", "a", now)
    assert await lifetimes.claim(claim, now) is None  # by a host whose clock is right
    skewed = _SkewedClock(offset)
    with mock.patch.object(redis_module, "time", skewed):
        assert await write(lifetimes, skewed.time(), claim) is True
    _assert_ttl(client, "s#k", 400)


async def test_a_record_written_past_its_expiry_lives_one_millisecond(
    store: RedisIdempotencyStore, client: Any
) -> None:
    """A write whose expires_at has passed lands (no error) with the minimum TTL, and Redis deletes it."""
    now = time.time()
    sent: list[Any] = []
    real = client.evalsha

    def spy(sha: Any, numkeys: Any, *keys_and_args: Any) -> Any:
        sent.append(keys_and_args)
        return real(sha, numkeys, *keys_and_args)

    with mock.patch.object(client, "evalsha", spy):
        assert await store.claim(_claim("s#k", "a", now - 7200), now) is None
        assert sent[-1][3] == 1  # KEYS[1], then owner, now, TTL
        await store.claim(_claim("s#k2", "a", now), now)
        assert await store.complete(_completed("s#k2", "a", now - 7200)) is True
        assert sent[-1][2] == 1  # KEYS[1], owner, then TTL
    assert client.pttl(PREFIX + "s#k2") in (-2, 0, 1)  # gone, or going within a millisecond


# No script judges an IN_PROGRESS record by a clock.


class _ClockJudgesClaims(RedisIdempotencyStore):
    """Negative control: a claim script that frees another owner's claim past its expires_at by the caller's now."""

    def __init__(self, client: Any) -> None:
        super().__init__(client)
        judged = redis_module._CLAIM.replace(
            "free = owner == ARGV[1]", "free = owner == ARGV[1] or expires_at <= tonumber(ARGV[2])"
        )
        assert judged != redis_module._CLAIM
        self._claim = client.register_script(judged)


@pytest.mark.xfail(strict=True, raises=AssertionError)
def test_negative_control_a_claim_script_that_judges_leases_by_the_callers_clock(client: Any) -> None:
    with _ClockJudgesClaims(client) as store:
        StoreContract().test_no_clock_frees_another_owners_claim(store)


async def test_an_expired_completed_record_is_judged_by_the_callers_now(
    store: RedisIdempotencyStore, client: Any
) -> None:
    """Still on the server (its TTL runs on the server's clock), a completed record is replaced when ``now`` says so."""
    now = time.time()
    await store.claim(_claim("s#k", "a", now), now)
    assert await store.complete(_completed("s#k", "a", now, ttl=100)) is True
    existing = await store.claim(_claim("s#k", "b", now + 99), now + 99)
    assert existing is not None and existing.state is RecordState.COMPLETED
    assert await store.claim(_claim("s#k", "b", now + 100), now + 100) is None
    assert client.hget(PREFIX + "s#k", "owner") == b"b" and client.hget(PREFIX + "s#k", "payload") is None


async def test_key_prefix_namespaces_stores_sharing_a_server(client: Any) -> None:
    now = time.time()
    with RedisIdempotencyStore(client, key_prefix="app-1:") as one, RedisIdempotencyStore(client) as two:
        assert await one.claim(_claim("s#k", "a", now), now) is None
        assert await two.claim(_claim("s#k", "b", now), now) is None
        assert client.exists("app-1:s#k", PREFIX + "s#k") == 2


async def test_scripts_are_loaded_again_after_a_script_flush(store: RedisIdempotencyStore, client: Any) -> None:
    now = time.time()
    first = _claim("s#1", "a", now)
    assert await store.claim(first, now) is None
    client.script_flush()  # as after a server restart
    assert await store.claim(_claim("s#2", "a", now), now) is None
    client.script_flush()
    assert await store.renew("s#2", "a", version=new_version(), lease_seconds=60, expires_at=now + 90) is True
    client.script_flush()
    assert await store.take_over(_claim("s#1", "b", now), first.version) is True


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
    now = time.time()
    with pytest.raises(IdempotencyStoreError, match="closed"):
        await store.get("s#k")
    with pytest.raises(IdempotencyStoreError, match="closed"):
        await store.take_over(_claim("s#k", "a", now), "v")
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


def _every_primitive(store: RedisIdempotencyStore, key: str, now: float) -> list[Any]:
    return [
        store.claim(_claim(key, "a", now), now),
        store.take_over(_claim(key, "a", now), "v"),
        store.get(key),
        store.complete(_completed(key, "a", now)),
        store.release(key, "a"),
        store.renew(key, "a", version=new_version(), lease_seconds=60, expires_at=now + 60),
    ]


async def test_an_unreachable_server_is_a_store_error_from_every_primitive() -> None:
    store = RedisIdempotencyStore.from_url(f"redis://127.0.0.1:{_closed_port()}", retries=0, socket_connect_timeout=1)
    now = time.time()
    for call in _every_primitive(store, "s#k", now):
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
            await store.take_over(_claim("s#k", "a", now), "v")
        with pytest.raises(IdempotencyStoreError):
            await store.renew("s#k", "a", version="v", lease_seconds=60, expires_at=now)


async def test_a_key_of_another_type_is_a_corrupt_record_to_every_primitive(
    store: RedisIdempotencyStore, client: Any
) -> None:
    client.set(PREFIX + "s#bad", "not a hash")
    for call in _every_primitive(store, "s#bad", time.time()):
        with pytest.raises(IdempotencyRecordCorruptedError, match="s#bad"):
            await call
    assert client.get(PREFIX + "s#bad") == b"not a hash"


_GOOD = {"status": "IN_PROGRESS", "owner": "a", "version": "v", "lease_seconds": "60.0", "expires_at": "1e12"}


@pytest.mark.parametrize(
    "fields",
    [
        {**_GOOD, "lease_seconds": "soon"},
        {**_GOOD, "expires_at": "later"},
        {k: v for k, v in _GOOD.items() if k != "lease_seconds"},
        {k: v for k, v in _GOOD.items() if k != "version"},
        {k: v for k, v in _GOOD.items() if k != "status"},
        {k: v for k, v in _GOOD.items() if k != "owner"},
        {**_GOOD, "status": "SOMETHING"},
        {**_GOOD, "status": "COMPLETED", "owner": b"\xff"},
        {**_GOOD, "status": "COMPLETED", "lease_seconds": "none", "expires_at": "1"},  # expired, but unreadable
    ],
)
async def test_a_malformed_record_is_reported_and_never_overwritten_by_a_claim(
    store: RedisIdempotencyStore, client: Any, fields: dict[str, Any]
) -> None:
    client.hset(PREFIX + "s#bad", mapping=fields)
    now = time.time()
    with pytest.raises(IdempotencyRecordCorruptedError, match="s#bad"):
        await store.get("s#bad")
    with pytest.raises(IdempotencyRecordCorruptedError, match="s#bad"):
        await store.claim(_claim("s#bad", "a", now), now)  # "a": not even by the owner the hash names
    assert client.hgetall(PREFIX + "s#bad") == {
        k.encode(): v if isinstance(v, bytes) else v.encode() for k, v in fields.items()
    }


async def test_a_well_formed_hash_is_read_back(store: RedisIdempotencyStore, client: Any) -> None:
    """The positive control of the malformed records: ``_GOOD`` itself is a record."""
    client.hset(PREFIX + "s#good", mapping=_GOOD)
    expected = IdempotencyRecord("s#good", RecordState.IN_PROGRESS, "a", "v", 60.0, 1e12)
    assert await store.get("s#good") == expected
    now = time.time()
    assert await store.claim(_claim("s#good", "b", now), now) == expected
    retried = dataclasses.replace(_claim("s#good", "a", now), version="w")
    assert await store.claim(retried, now) is None  # its own owner's claim, retried


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
