"""RedisIdempotencyStore beyond the shared contract (fakeredis with Lua): layout, lifetimes, construction, errors,
bad data, and the broken variants the tests must catch."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
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
from hypothesis import given, settings
from hypothesis import strategies as st
from redis.crc import key_slot

import strands_py.idempotency._redis_layout as redis_layout
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


def _at(key: str) -> str:
    """The Redis key of the record of ``key`` (one without braces): the prefix, then the key as its hash tag."""
    return PREFIX + "{" + key + "}"


def _journal_at(key: str) -> str:
    """The Redis key of the journal of ``key`` (one without braces): the record's, then ``:journal``."""
    return _at(key) + ":journal"


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


def _assert_ttl(client: Any, key: str, seconds: float, *, journal: bool = False) -> None:
    """The key's remaining TTL on the server is ``seconds`` (rounded up to ms), less the little time since the write.

    With ``journal``, its journal's too.
    """
    intended = math.ceil(seconds * 1000)
    for redis_key in (_at(key), _journal_at(key)) if journal else (_at(key),):
        pttl = client.pttl(redis_key)
        assert intended - SLACK_MS < pttl <= intended, f"{redis_key}: PTTL {pttl} ms, intended {intended} ms"


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
    assert client.hgetall(_at("s#k")) == {
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
    assert client.hmget(_at("s#k"), "version", "lease_seconds", "checkpoint") == [b"v-2", b"0.0", b"cp"]
    _assert_ttl(client, "s#k", 7200.5)
    assert await store.renew("s#k", "a", version="v-3", lease_seconds=30.0, expires_at=now + 100) is True
    assert client.hget(_at("s#k"), "expires_at") == repr(now + 100).encode()
    _assert_ttl(client, "s#k", 100)
    # a takeover replaces the whole hash (no stale checkpoint), with the new record's lifetime
    taken = _claim("s#k", "b", now, lease=10, ttl=20)
    assert await store.take_over(taken, "v-3") is True
    assert client.hget(_at("s#k"), "checkpoint") is None
    assert client.hget(_at("s#k"), "version") == taken.version.encode()
    _assert_ttl(client, "s#k", 30)
    # so does complete, with the completed record's
    assert await store.complete(_completed("s#k", "b", now, ttl=10)) is True
    assert client.hget(_at("s#k"), "payload") == b"\x00payload\xff"
    assert client.hget(_at("s#k"), "lease_seconds") == b"0.0"
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
    with mock.patch.object(redis_layout, "_ttl_ms", _absolute_ms), _AbsoluteDeadlines(client) as variant:
        yield variant


@pytest.mark.parametrize("offset", [SKEW, -SKEW])
async def test_a_skewed_host_claims_for_the_intended_duration(
    lifetimes: RedisIdempotencyStore, client: Any, offset: float
) -> None:
    """A claim from a host ten minutes ahead or behind lives exactly its duration, measured from its own ``now``."""
    skewed = _SkewedClock(offset)
    with mock.patch.object(redis_layout, "time", skewed):
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
    with mock.patch.object(redis_layout, "time", skewed):
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
        assert sent[-1][4] == 1  # KEYS[1], KEYS[2], then owner, now, TTL
        await store.claim(_claim("s#k2", "a", now), now)
        assert await store.complete(_completed("s#k2", "a", now - 7200)) is True
        assert sent[-1][5] == 1  # KEYS[1], KEYS[2], owner, version, status, then TTL
    assert client.pttl(_at("s#k2")) in (-2, 0, 1)  # gone, or going within a millisecond


# No script judges an IN_PROGRESS record by a clock.


class _ClockJudgesClaims(RedisIdempotencyStore):
    """Negative control: a claim script that frees another owner's claim past its expires_at by the caller's now."""

    def __init__(self, client: Any) -> None:
        super().__init__(client)
        judged = redis_module._CLAIM.replace("free = own\n", "free = own or expires_at <= tonumber(ARGV[2])\n")
        if judged == redis_module._CLAIM:
            # Not an AssertionError: the xfail must not pass on a control that broke nothing.
            raise LookupError("the claim script changed: this control no longer breaks it")
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
    assert client.hget(_at("s#k"), "owner") == b"b" and client.hget(_at("s#k"), "payload") is None


async def test_key_prefix_namespaces_stores_sharing_a_server(client: Any) -> None:
    now = time.time()
    with RedisIdempotencyStore(client, key_prefix="app-1:") as one, RedisIdempotencyStore(client) as two:
        assert await one.claim(_claim("s#k", "a", now), now) is None
        assert await two.claim(_claim("s#k", "b", now), now) is None
        assert client.exists("app-1:{s#k}", _at("s#k")) == 2


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
        store.append(key, "a", b"entry"),
        store.truncate(key, "a", 0),
        store.cancel(key),
    ]


async def test_an_unreachable_server_is_a_store_error_from_every_primitive() -> None:
    store = RedisIdempotencyStore.from_url(f"redis://127.0.0.1:{_closed_port()}", retries=0, socket_connect_timeout=1)
    now = time.time()
    for call in [*_every_primitive(store, "s#k", now), store.journal("s#k")]:
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
        redis.exceptions.RedisClusterException("EVALSHA - all keys must map to the same key slot"),
        redis.exceptions.ClusterDownError("CLUSTERDOWN The cluster is down"),
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
        with pytest.raises(IdempotencyStoreError):
            await store.journal("s#k")


async def test_a_key_of_another_type_is_a_corrupt_record_to_every_primitive(
    store: RedisIdempotencyStore, client: Any
) -> None:
    client.set(_at("s#bad"), "not a hash")
    for call in _every_primitive(store, "s#bad", time.time()):
        with pytest.raises(IdempotencyRecordCorruptedError, match="s#bad"):
            await call
    assert client.get(_at("s#bad")) == b"not a hash"


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
        {**_GOOD, "cancelled": "0"},  # the scripts write the mark as '1' only
        {**_GOOD, "status": "CANCELLED", "cancelled": ""},  # a tombstone frees its key, but only one that reads
    ],
)
async def test_a_malformed_record_is_reported_and_never_overwritten_by_a_claim(
    store: RedisIdempotencyStore, client: Any, fields: dict[str, Any]
) -> None:
    client.hset(_at("s#bad"), mapping=fields)
    now = time.time()
    with pytest.raises(IdempotencyRecordCorruptedError, match="s#bad"):
        await store.get("s#bad")
    with pytest.raises(IdempotencyRecordCorruptedError, match="s#bad"):
        await store.claim(_claim("s#bad", "a", now), now)  # "a": not even by the owner the hash names
    with pytest.raises(IdempotencyRecordCorruptedError, match="s#bad"):
        await store.cancel("s#bad")  # nor marked
    assert client.hgetall(_at("s#bad")) == {
        k.encode(): v if isinstance(v, bytes) else v.encode() for k, v in fields.items()
    }


async def test_a_well_formed_hash_is_read_back(store: RedisIdempotencyStore, client: Any) -> None:
    """The positive control of the malformed records: ``_GOOD`` itself is a record."""
    client.hset(_at("s#good"), mapping=_GOOD)
    expected = IdempotencyRecord("s#good", RecordState.IN_PROGRESS, "a", "v", 60.0, 1e12)
    assert await store.get("s#good") == expected
    now = time.time()
    assert await store.claim(_claim("s#good", "b", now), now) == expected
    retried = dataclasses.replace(_claim("s#good", "a", now), version="w")
    assert await store.claim(retried, now) is None  # its own owner's claim, retried
    assert await store.cancel("s#good") == dataclasses.replace(retried, cancelled=True)
    client.hset(_at("s#tombstone"), mapping={**_GOOD, "status": "CANCELLED"})
    assert await store.get("s#tombstone") == dataclasses.replace(
        expected, key="s#tombstone", state=RecordState.CANCELLED
    )
    assert await store.claim(_claim("s#tombstone", "b", now), now) is None  # whatever its expiry


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


# The journal: a list beside the record, its lifetime the record's, written only by the record's owner.


async def test_the_journal_is_a_list_beside_the_record(store: RedisIdempotencyStore, client: Any) -> None:
    now = time.time()
    assert await store.claim(_claim("s#k", "a", now), now) is None
    assert client.exists(_journal_at("s#k")) == 0  # nothing until the first append
    assert await store.append("s#k", "a", b"\x00one") is True
    assert await store.append("s#k", "a", b"two\xff") is True
    assert client.type(_journal_at("s#k")) == b"list"
    assert client.lrange(_journal_at("s#k"), 0, -1) == [b"\x00one", b"two\xff"]
    assert sorted(client.keys("*")) == sorted([_at("s#k").encode(), _journal_at("s#k").encode()])
    assert await store.get("s#k") == (await store.claim(_claim("s#k", "b", now), now))  # still the same record


def _journal_ttl_follows_the_record(store: RedisIdempotencyStore, client: Any) -> None:
    """Every write that sets the record's TTL sets the journal's to the same duration; an append copies it."""

    async def scenario() -> None:
        now = time.time()
        first = _claim("s#k", "a", now, lease=60, ttl=3540.25)
        await store.claim(first, now)
        assert await store.append("s#k", "a", b"0") is True
        _assert_ttl(client, "s#k", 3600.25, journal=True)
        assert await store.renew("s#k", "a", version="v-2", lease_seconds=30, expires_at=now + 7200.5) is True
        _assert_ttl(client, "s#k", 7200.5, journal=True)
        assert await store.take_over(_claim("s#k", "b", now, lease=10, ttl=20), "v-2") is True
        _assert_ttl(client, "s#k", 30, journal=True)
        retried = _claim("s#k", "b", now, lease=10, ttl=490)
        assert await store.claim(retried, now) is None  # b's own claim, retried: the journal stays, with its TTL
        _assert_ttl(client, "s#k", 500, journal=True)
        assert await store.append("s#k", "b", b"1") is True
        _assert_ttl(client, "s#k", 500, journal=True)
        assert await store.journal("s#k") == [b"0", b"1"]

    asyncio.run(scenario())


def _a_vanished_record_leaves_no_journal_to_read(store: RedisIdempotencyStore, client: Any) -> None:
    """A journal whose record is gone (evicted, deleted by hand) reads as none."""

    async def scenario() -> None:
        now = time.time()
        await store.claim(_claim("s#k", "a", now), now)
        assert await store.append("s#k", "a", b"step") is True
        client.delete(_at("s#k"))
        assert await store.journal("s#k") == []

    asyncio.run(scenario())


def _a_fresh_claim_starts_an_empty_journal(store: RedisIdempotencyStore, client: Any) -> None:
    """A journal left by a record that vanished is not the next claim's."""

    async def scenario() -> None:
        now = time.time()
        await store.claim(_claim("s#k", "a", now), now)
        assert await store.append("s#k", "a", b"stale") is True
        client.delete(_at("s#k"))
        assert await store.claim(_claim("s#k", "b", now), now) is None
        assert await store.append("s#k", "b", b"fresh") is True
        assert await store.journal("s#k") == [b"fresh"]

    asyncio.run(scenario())


def _an_owners_retried_claim_keeps_its_journal(store: RedisIdempotencyStore, client: Any) -> None:
    async def scenario() -> None:
        now = time.time()
        await store.claim(_claim("s#k", "a", now), now)
        assert await store.append("s#k", "a", b"step") is True
        assert await store.claim(_claim("s#k", "a", now), now) is None
        assert await store.journal("s#k") == [b"step"]

    asyncio.run(scenario())


def _a_completed_claim_takes_no_appends(store: RedisIdempotencyStore, client: Any) -> None:
    """The fence is on the status too: the owner of a COMPLETED record appends nothing."""

    async def scenario() -> None:
        now = time.time()
        await store.claim(_claim("s#k", "a", now), now)
        assert await store.complete(_completed("s#k", "a", now)) is True
        assert await store.append("s#k", "a", b"late") is False
        assert await store.truncate("s#k", "a", 0) is False
        assert client.exists(_journal_at("s#k")) == 0

    asyncio.run(scenario())


def _a_released_claim_leaves_nothing(store: RedisIdempotencyStore, client: Any) -> None:
    """Release deletes the journal with the record: no list is left behind to wait for its TTL."""

    async def scenario() -> None:
        now = time.time()
        await store.claim(_claim("s#k", "a", now), now)
        assert await store.append("s#k", "a", b"step") is True
        assert await store.release("s#k", "a") is True
        assert client.keys("*") == []

    asyncio.run(scenario())


def _replies_lost(client: Any) -> Any:
    """While active, every script runs twice, as when redis-py sends a command again after losing its reply."""
    real = client.evalsha

    def reply_lost_then_resent(sha: Any, numkeys: Any, *keys_and_args: Any) -> Any:
        real(sha, numkeys, *keys_and_args)  # ran on the server; its reply never came back
        return real(sha, numkeys, *keys_and_args)  # the same command, sent again by the client's retry

    return mock.patch.object(client, "evalsha", reply_lost_then_resent)


def _resent_writes_report_what_landed(store: RedisIdempotencyStore, client: Any) -> None:
    """A takeover or a completion resent after it landed finds its own write (by its version): True, not fenced."""

    async def scenario() -> None:
        now = time.time()
        first = _claim("s#k", "a", now)
        await store.claim(first, now)
        await store.complete(_completed("s#warm", "a", now))  # scripts loaded: the spy sees only EVALSHA
        await store.take_over(_claim("s#warm", "a", now), "v")
        taken = _claim("s#k", "b", now)
        with _replies_lost(client):
            assert await store.take_over(taken, first.version) is True
            assert await store.get("s#k") == taken
            done = _completed("s#k", "b", now)
            assert await store.complete(done) is True
            assert await store.get("s#k") == done
            assert await store.take_over(_claim("s#k", "c", now), taken.version) is False  # still a compare-and-set
            assert await store.complete(_completed("s#k", "c", now)) is False  # still fenced on the owner

    asyncio.run(scenario())


def _a_resent_append_lands_once(store: RedisIdempotencyStore, client: Any) -> None:
    """redis-py sends a command again when its reply is lost: the second copy of an append appends nothing."""

    async def scenario() -> None:
        now = time.time()
        await store.claim(_claim("s#k", "a", now), now)
        await store.append("s#k", "a", b"warm-up")  # scripts loaded: the spy sees only EVALSHA
        with _replies_lost(client):
            assert await store.append("s#k", "a", b"once") is True
            assert await store.append("s#k", "a", b"once") is True  # a second step with the same bytes: its own
        assert await store.journal("s#k") == [b"warm-up", b"once", b"once"]

    asyncio.run(scenario())


def _contract(name: str) -> Callable[[RedisIdempotencyStore, Any], None]:
    def check(store: RedisIdempotencyStore, client: Any) -> None:
        test = getattr(StoreContract(), name)
        if name == "test_the_journal_ends_with_its_claim":
            for end in ("complete", "release", "expiry and a fresh claim"):
                client.flushall()  # each run expects a store without its keys
                test(store, end)
        else:
            test(store)

    check.__name__ = name
    return check


_FENCE = (
    "if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] or redis.call('HGET', KEYS[1], 'status') ~= 'IN_PROGRESS' then"
)
_CHECKS = {
    "fenced and ordered": _contract("test_journal_appends_are_fenced_on_the_owner_and_read_back_in_order"),
    "kept by a takeover": _contract("test_a_takeover_keeps_the_journal_and_fences_the_old_owner"),
    "truncated to a prefix": _contract("test_truncate_keeps_a_prefix"),
    "ended with its claim": _contract("test_the_journal_ends_with_its_claim"),
    "ttl follows the record": _journal_ttl_follows_the_record,
    "vanished record": _a_vanished_record_leaves_no_journal_to_read,
    "fresh claim": _a_fresh_claim_starts_an_empty_journal,
    "own claim retried": _an_owners_retried_claim_keeps_its_journal,
    "completed claim": _a_completed_claim_takes_no_appends,
    "released claim": _a_released_claim_leaves_nothing,
    "resent append": _a_resent_append_lands_once,
    "resent takeover and completion": _resent_writes_report_what_landed,
}
# Broken variants of the scripts, and the check that must catch each: (script, text replaced, replacement, check).
_BROKEN = {
    "append without the fence": ("_APPEND", _FENCE, "if false then", "fenced and ordered"),
    "append fenced on the owner only": (
        "_APPEND",
        _FENCE,
        "if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] then",
        "completed claim",
    ),
    "truncate without the fence": ("_TRUNCATE", _FENCE, "if false then", "kept by a takeover"),
    "truncate to 0 as LTRIM 0 -1": ("_TRUNCATE", "if length == 0 then", "if false then", "truncated to a prefix"),
    "take_over drops the journal": (
        "_TAKE_OVER",
        "redis.call('DEL', KEYS[1])",
        "redis.call('DEL', KEYS[1], KEYS[2])",
        "kept by a takeover",
    ),
    "complete keeps the journal": (
        "_COMPLETE",
        "redis.call('DEL', KEYS[1], KEYS[2])",
        "redis.call('DEL', KEYS[1])",
        "ended with its claim",
    ),
    "release keeps the journal": (
        "_RELEASE",
        "redis.call('DEL', KEYS[1], KEYS[2])",
        "redis.call('DEL', KEYS[1])",
        "released claim",
    ),
    "a fresh claim keeps a stale journal": ("_CLAIM", "if not own then", "if false then", "fresh claim"),
    "a retried claim drops its journal": ("_CLAIM", "if not own then", "if true then", "own claim retried"),
    "journal read without its record": ("_JOURNAL", "== 0 then", "== -1 then", "vanished record"),
    "renew leaves the journal's ttl": (
        "_RENEW",
        "redis.call('PEXPIRE', KEYS[2], ARGV[2])",
        "",
        "ttl follows the record",
    ),
    "append leaves the journal without a ttl": (
        "_APPEND",
        "redis.call('PEXPIRE', KEYS[2], ttl)",
        "",
        "ttl follows the record",
    ),
    "append without its call id": ("_APPEND", "== ARGV[3] then", "== false then", "resent append"),
    "take_over blind to its own write": (
        "_TAKE_OVER",
        "if stored == ARGV[2] then",
        "if false then",
        "resent takeover and completion",
    ),
    "complete blind to its own write": (
        "_COMPLETE",
        "if redis.call('HGET', KEYS[1], 'version') == ARGV[2] then",
        "if false then",
        "resent takeover and completion",
    ),
}


class _Broken(RedisIdempotencyStore):
    """The store with one script replaced by a broken variant of it."""

    def __init__(self, client: Any, script: str, old: str, new: str) -> None:
        super().__init__(client)
        source = getattr(redis_module, script)
        broken = source.replace(old, new)
        if broken == source:  # not an AssertionError: a control that breaks nothing must not pass as caught
            raise LookupError(f"{script} does not contain {old!r}")
        setattr(self, script.lower(), client.register_script(broken))


@pytest.mark.parametrize("check", list(_CHECKS), ids=list(_CHECKS))
def test_the_journal(check: str, client: Any) -> None:
    with RedisIdempotencyStore(client) as store:
        _CHECKS[check](store, client)


@pytest.mark.parametrize("variant", list(_BROKEN), ids=list(_BROKEN))
def test_negative_control_a_broken_journal_script_is_caught(variant: str, client: Any) -> None:
    """Each broken variant fails the check named beside it (which the store passes: ``test_the_journal``)."""
    script, old, new, check = _BROKEN[variant]
    with _Broken(client, script, old, new) as broken, pytest.raises(AssertionError):
        _CHECKS[check](broken, client)


async def test_journal_entries_up_to_max_journal_entry_bytes(client: Any) -> None:
    now = time.time()
    with RedisIdempotencyStore(client, max_journal_entry_bytes=4) as store:
        assert store.max_journal_entry_bytes == 4
        await store.claim(_claim("s#k", "a", now), now)
        assert await store.append("s#k", "a", bytearray(b"four")) is True
        with pytest.raises(ValueError, match="5 bytes is larger than max_journal_entry_bytes"):
            await store.append("s#k", "a", b"fives")
        assert await store.journal("s#k") == [b"four"]
        with pytest.raises(ValueError, match="negative"):
            await store.truncate("s#k", "a", -1)
        assert await store.journal("s#k") == [b"four"]
    with RedisIdempotencyStore(client) as default, RedisIdempotencyStore(client, max_journal_entry_bytes=None) as big:
        assert default.max_journal_entry_bytes == 512 * 1024
        assert big.max_journal_entry_bytes == 512 * 1024 * 1024
        assert default.supports_journal


async def test_a_journal_key_of_another_type_is_a_corrupt_record(store: RedisIdempotencyStore, client: Any) -> None:
    now = time.time()
    await store.claim(_claim("s#bad", "a", now), now)
    client.set(_journal_at("s#bad"), "not a list")
    for call in [store.append("s#bad", "a", b"x"), store.journal("s#bad"), store.truncate("s#bad", "a", 1)]:
        with pytest.raises(IdempotencyRecordCorruptedError, match="s#bad"):
            await call
    assert client.get(_journal_at("s#bad")) == b"not a list"


# Cancels: a `cancelled` field marks a running claim; from then on its owner may only leave its tombstone.


def _tombstone(key: str, owner: str, now: float, *, ttl: float = 600.0) -> IdempotencyRecord:
    return IdempotencyRecord(key, RecordState.CANCELLED, owner, new_version(), 0.0, now + ttl, "fp")


def _a_cancel_sets_one_field(store: RedisIdempotencyStore, client: Any) -> None:
    """The mark is one field: the version, the TTL and the journal stay; the tombstone then replaces the whole hash."""

    async def scenario() -> None:
        now = time.time()
        claim = _claim("s#k", "a", now, lease=60, ttl=3540.25)
        await store.claim(claim, now)
        assert await store.append("s#k", "a", b"step") is True
        before = client.hgetall(_at("s#k"))
        assert await store.cancel("s#k") == dataclasses.replace(claim, cancelled=True)
        assert client.hgetall(_at("s#k")) == {**before, b"cancelled": b"1"}
        _assert_ttl(client, "s#k", 3600.25, journal=True)
        assert await store.journal("s#k") == [b"step"]
        tombstone = _tombstone("s#k", "a", now, ttl=600)
        assert await store.complete(tombstone) is True
        assert client.hgetall(_at("s#k")) == {
            b"status": b"CANCELLED",
            b"owner": b"a",
            b"version": tombstone.version.encode(),
            b"lease_seconds": b"0.0",
            b"expires_at": repr(now + 600).encode(),
            b"fingerprint": b"fp",
        }
        _assert_ttl(client, "s#k", 600)
        assert client.exists(_journal_at("s#k")) == 0
        assert await store.get("s#k") == tombstone
        assert await store.cancel("s#k") == tombstone  # a finished record is left alone
        assert client.hget(_at("s#k"), "cancelled") is None

    asyncio.run(scenario())


def _a_tombstone_frees_the_key_for_a_fresh_claim(store: RedisIdempotencyStore, client: Any) -> None:
    """A tombstone left by a waiter (a takeover: the journal kept) gives way to a claim at once, which drops it.

    The waiter judged the marked claim's owner gone and replaced the claim by a compare-and-set, as the turn layer does;
    a claim then replaces the tombstone long before it expires, even one by the dead owner's id (a tombstone is nobody's
    claim), and starts an empty journal: a cancelled run is not resumed.
    """

    async def scenario() -> None:
        now = time.time()
        first = _claim("s#k", "a", now)
        await store.claim(first, now)
        assert await store.append("s#k", "a", b"stale") is True
        await store.cancel("s#k")
        tombstone = dataclasses.replace(first, state=RecordState.CANCELLED, version=new_version(), lease_seconds=0.0)
        assert await store.take_over(tombstone, first.version) is True
        assert await store.get("s#k") == tombstone
        fresh = _claim("s#k", "a", now)
        assert store.claim_blocking(fresh, now) is None
        assert await store.get("s#k") == fresh
        assert await store.journal("s#k") == []

    asyncio.run(scenario())


def _a_resent_own_claim_keeps_the_mark(store: RedisIdempotencyStore, client: Any) -> None:
    """A cancel that lands between a claim and its resent copy (redis-py's retry after a lost reply) stays landed.

    The cancel's caller was told the claim is marked; the resent claim, the same arguments again, must not erase that.
    """

    async def scenario() -> None:
        now = time.time()
        claim = _claim("s#k", "a", now)
        assert await store.claim(claim, now) is None
        assert await store.append("s#k", "a", b"step") is True
        marked = await store.cancel("s#k")
        assert await store.claim(claim, now) is None  # the resent copy: still the caller's own claim
        assert await store.get("s#k") == marked
        assert await store.renew("s#k", "a", version=new_version(), lease_seconds=60, expires_at=now + 600) is False
        assert await store.journal("s#k") == [b"step"]

    asyncio.run(scenario())


def _resent_cancel_and_tombstone_report_what_landed(store: RedisIdempotencyStore, client: Any) -> None:
    """A cancel resent after it landed finds its mark; a tombstone resent after it landed finds itself (its version)."""

    async def scenario() -> None:
        now = time.time()
        claim = _claim("s#k", "a", now)
        await store.claim(claim, now)
        await store.cancel("s#warm")  # scripts loaded: the spy sees only EVALSHA
        await store.complete(_tombstone("s#warm", "a", now))
        with _replies_lost(client):
            assert await store.cancel("s#k") == dataclasses.replace(claim, cancelled=True)
            tombstone = _tombstone("s#k", "a", now)
            assert await store.complete(tombstone) is True
        assert await store.get("s#k") == tombstone

    asyncio.run(scenario())


def _an_unreadable_record_is_not_marked(store: RedisIdempotencyStore, client: Any) -> None:
    """A hash the scripts cannot read is reported as corrupted, and left exactly as it was."""

    async def scenario() -> None:
        unreadable = {**_GOOD, "lease_seconds": "soon"}
        client.hset(_at("s#bad"), mapping=unreadable)
        with pytest.raises(IdempotencyRecordCorruptedError, match="s#bad"):
            await store.cancel("s#bad")
        assert client.hgetall(_at("s#bad")) == {k.encode(): v.encode() for k, v in unreadable.items()}

    asyncio.run(scenario())


async def test_a_takeover_writes_the_record_it_is_given_mark_included(
    store: RedisIdempotencyStore, client: Any
) -> None:
    """A takeover by a record carrying the mark (and no fingerprint) writes both as given: the new owner is fenced."""
    now = time.time()
    first = _claim("s#k", "a", now)
    await store.claim(first, now)
    marked = dataclasses.replace(_claim("s#k", "b", now), fingerprint=None, cancelled=True)
    assert await store.take_over(marked, first.version) is True
    assert client.hmget(_at("s#k"), "cancelled", "fingerprint") == [b"1", None]
    assert await store.get("s#k") == marked
    assert await store.renew("s#k", "b", version=new_version(), lease_seconds=60, expires_at=now + 600) is False
    assert await store.complete(_completed("s#k", "b", now)) is False
    assert await store.complete(_tombstone("s#k", "b", now)) is True


_CANCEL_CHECKS = {
    "contract: marks and fences": _contract("test_a_cancel_marks_a_running_claim_and_fences_its_owner"),
    "contract: leaves finished keys alone": _contract("test_a_cancel_leaves_finished_and_absent_keys_alone"),
    "contract: released or taken over": _contract("test_a_marked_claim_is_released_or_taken_over_as_any_other"),
    "one field": _a_cancel_sets_one_field,
    "tombstone frees the key": _a_tombstone_frees_the_key_for_a_fresh_claim,
    "resent own claim": _a_resent_own_claim_keeps_the_mark,
    "resent cancel and tombstone": _resent_cancel_and_tombstone_report_what_landed,
    "unreadable record": _an_unreadable_record_is_not_marked,
}
_MARK_FENCE = "if redis.call('HEXISTS', KEYS[1], 'cancelled') == 1 then"
_TOMBSTONES_ONLY = "and ARGV[3] ~= 'CANCELLED' then"
_MARK = "redis.call('HSET', KEYS[1], 'cancelled', '1')"
# Broken variants of the scripts, and the check that must catch each: (script, text replaced, replacement, check).
_CANCEL_BROKEN = {
    "renew ignores the mark": ("_RENEW", _MARK_FENCE, "if false then", "contract: marks and fences"),
    "append ignores the mark": ("_APPEND", _MARK_FENCE, "if false then", "contract: marks and fences"),
    "truncate ignores the mark": ("_TRUNCATE", _MARK_FENCE, "if false then", "contract: marks and fences"),
    "a result lands after the mark": ("_COMPLETE", _TOMBSTONES_ONLY, "and false then", "contract: marks and fences"),
    "the tombstone refused too": ("_COMPLETE", _TOMBSTONES_ONLY, "then", "contract: marks and fences"),
    "cancel changes the version": (
        "_CANCEL",
        _MARK,
        "redis.call('HSET', KEYS[1], 'cancelled', '1', 'version', 'bumped')",
        "contract: marks and fences",
    ),
    "cancel marks finished records": (
        "_CANCEL",
        "stored[1] == 'IN_PROGRESS' and ",
        "",
        "contract: leaves finished keys alone",
    ),
    "cancel marks what it cannot read": ("_CANCEL", "and readable and", "and", "unreadable record"),
    "cancel drops the journal": ("_CANCEL", _MARK, _MARK + " redis.call('DEL', KEYS[2])", "one field"),
    "a tombstone blocks claims until it expires": (
        "_CLAIM",
        "elseif status == 'CANCELLED' then\n            free = true",
        "elseif status == 'CANCELLED' then\n            free = expires_at <= tonumber(ARGV[2])",
        "contract: marks and fences",
    ),
    "a claim over a tombstone keeps its journal": (
        "_CLAIM",
        "elseif status == 'CANCELLED' then\n            free = true",
        "elseif status == 'CANCELLED' then\n            free = true\n            own = true",
        "tombstone frees the key",
    ),
    "a resent own claim drops the mark": ("_CLAIM", "if marked then", "if false then", "resent own claim"),
    "take_over keeps the old mark": (
        "_TAKE_OVER",
        "redis.call('DEL', KEYS[1])\n",
        "",
        "contract: released or taken over",
    ),
    "release refuses a marked claim": (
        "_RELEASE",
        "~= 'IN_PROGRESS' then",
        "~= 'IN_PROGRESS' or redis.call('HEXISTS', KEYS[1], 'cancelled') == 1 then",
        "contract: released or taken over",
    ),
    "a tombstone blind to its own write": (
        "_COMPLETE",
        "if redis.call('HGET', KEYS[1], 'version') == ARGV[2] then",
        "if false then",
        "resent cancel and tombstone",
    ),
}


@pytest.mark.parametrize("check", list(_CANCEL_CHECKS), ids=list(_CANCEL_CHECKS))
def test_cancels(check: str, client: Any) -> None:
    with RedisIdempotencyStore(client) as store:
        _CANCEL_CHECKS[check](store, client)


@pytest.mark.parametrize("variant", list(_CANCEL_BROKEN), ids=list(_CANCEL_BROKEN))
def test_negative_control_a_broken_cancel_script_is_caught(variant: str, client: Any) -> None:
    """Each broken variant fails the check named beside it (which the store passes: ``test_cancels``)."""
    script, old, new, check = _CANCEL_BROKEN[variant]
    with _Broken(client, script, old, new) as broken, pytest.raises(AssertionError):
        _CANCEL_CHECKS[check](broken, client)


# Keys: a record and its journal share one Redis Cluster hash slot, whatever the key; keys spread over all slots.

_NASTY_KEYS = ["", "}", "{", "{}", "}{", "s}#d", "s{#d", "{s}#d", "s{}#d", "%7B", "%", "a%b{c}d}e{", "\u00e9{\u00e8}"]
_TEXT = st.text(st.characters(blacklist_categories=("Cs",)))  # what a key can be: any text UTF-8 can encode


def _slot(key: str) -> int:
    return key_slot(key.encode())


def _naive_keys(key: str) -> tuple[str, str]:
    """Negative control: the raw key as the hash tag."""
    return PREFIX + "{" + key + "}", PREFIX + "{" + key + "}:journal"


def test_keys_without_braces_keep_their_readable_layout(client: Any) -> None:
    with RedisIdempotencyStore(client) as store:
        assert store.redis_keys("s#k") == (_at("s#k"), _journal_at("s#k"))
        assert store.redis_keys("a{b}%c") == (PREFIX + "{a%7Bb%7D%25c}", PREFIX + "{a%7Bb%7D%25c}:journal")


# A raw key as the tag breaks for a key holding "}" (the tag is cut short: keys spread by a part of the key) or an empty
# one (no tag: Redis hashes the record's and the journal's key each whole, into different slots).
_LAYOUTS = [pytest.param("escaped", key, id=f"escaped-{key}") for key in _NASTY_KEYS] + [
    pytest.param("raw", key, id=f"raw-{key}", marks=pytest.mark.xfail(strict=True))
    for key in _NASTY_KEYS
    if "}" in key or not key
]


@pytest.mark.parametrize(("layout", "key"), _LAYOUTS)
def test_a_record_and_its_journal_share_a_slot_whatever_braces_the_key_holds(
    client: Any, layout: str, key: str
) -> None:
    """The hash tag is the whole (escaped) key; a raw key as the tag is the negative control (xfail)."""
    with RedisIdempotencyStore(client) as store:
        record, journal = store.redis_keys(key) if layout == "escaped" else _naive_keys(key)
        intended = record[len(PREFIX) + 1 : -1]  # what the layout puts between its braces
        assert _slot(record) == _slot(journal) == _slot(intended)


@settings(max_examples=300, deadline=None)
@given(key=_TEXT, other=_TEXT)
def test_hash_tags_hold_for_any_key_and_never_collide(key: str, other: str) -> None:
    with RedisIdempotencyStore(fakeredis.FakeRedis()) as store:
        record, journal = store.redis_keys(key)
        assert _slot(record) == _slot(journal)
        assert record.startswith(PREFIX + "{") and record.endswith("}") and journal == record + ":journal"
        tag = record[len(PREFIX) + 1 : -1]
        assert "{" not in tag and "}" not in tag and tag
        if key != other:  # the escape is one-to-one: two keys never share a record, nor a journal
            assert store.redis_keys(other)[0] not in (record, journal)


@pytest.mark.parametrize("layout", ["escaped", pytest.param("raw", marks=pytest.mark.xfail(strict=True))])
def test_keys_of_a_scope_with_braces_spread_over_the_slots(client: Any, layout: str) -> None:
    """1,000 keys of a tenant named "{acme}" land in about as many slots (a raw tag puts them all in one, xfail)."""
    with RedisIdempotencyStore(client) as store:
        keys = [f"{{acme}}#{hashlib.sha256(str(i).encode()).hexdigest()}" for i in range(1000)]
        slots = {_slot((store.redis_keys(k) if layout == "escaped" else _naive_keys(k))[0]) for k in keys}
        # 1,000 random draws from 16,384 slots give ~970 distinct ones; 900 is far below any honest spread.
        assert len(slots) > 900, f"{len(slots)} slots"


@pytest.mark.parametrize("prefix", ["app{1}:", "app}:", "{", "a{}"])
def test_a_key_prefix_with_a_brace_is_refused(client: Any, prefix: str) -> None:
    with pytest.raises(ValueError, match="key_prefix must not contain"):
        RedisIdempotencyStore(client, key_prefix=prefix)


def test_from_url_with_cluster_builds_a_cluster_client(client: Any) -> None:
    with mock.patch.object(redis_module.RedisCluster, "from_url", return_value=client) as from_url:
        store = RedisIdempotencyStore.from_url(
            "redis://node-1:7000", cluster=True, socket_timeout=2.0, retries=5, max_journal_entry_bytes=1024
        )
    (url,), kwargs = from_url.call_args
    assert url == "redis://node-1:7000"
    assert kwargs["socket_timeout"] == 2.0 and kwargs["socket_connect_timeout"] == 5.0
    assert kwargs["retry"]._retries == 5
    assert store._client is client and store.max_journal_entry_bytes == 1024
    with mock.patch.object(client, "close") as close:
        store.close()
    close.assert_called_once_with()


async def test_a_plain_client_on_a_cluster_node_is_told_to_use_the_cluster_client(store: RedisIdempotencyStore) -> None:
    now = time.time()
    with mock.patch.object(store._client, "evalsha", side_effect=redis.exceptions.MovedError("9406 10.0.0.2:6379")):
        with pytest.raises(IdempotencyStoreError, match=r"MovedError: 9406 10\.0\.0\.2:6379; .* cluster=True"):
            await store.claim(_claim("s#k", "a", now), now)


def test_from_url_with_cluster_and_no_node_answering_is_a_store_error() -> None:
    """The cluster client reads the slot map as it is made: no node answering is an outage, at once."""
    url = f"redis://127.0.0.1:{_closed_port()}"
    with pytest.raises(IdempotencyStoreError, match="Redis Cluster could not be used") as raised:
        RedisIdempotencyStore.from_url(url, cluster=True, retries=0, socket_connect_timeout=1)
    assert isinstance(raised.value.__cause__, redis.exceptions.RedisClusterException)
