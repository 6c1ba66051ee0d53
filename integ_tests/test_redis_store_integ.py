"""RedisIdempotencyStore on a real redis-server (127.0.0.1, random port): many OS processes, crashes, restarts."""

from __future__ import annotations

import asyncio
import dataclasses
import math
import multiprocessing
import os
import queue
import signal
import socket
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from typing import Any
from unittest import mock

import pytest
import redis
import redis_worker as worker
from _servers import RedisServer, running_redis
from redis.backoff import NoBackoff
from redis.retry import Retry

import strands_py.idempotency._redis_layout as redis_layout
import strands_py.idempotency.redis as redis_module
from strands_py.idempotency import (
    IdempotencyRecord,
    IdempotencyRecordCorruptedError,
    IdempotencyStore,
    IdempotencyStoreError,
    IdempotencyWaitTimeoutError,
    RecordState,
    ReplayedAgentResult,
)
from strands_py.idempotency.keys import make_key
from strands_py.idempotency.record import new_version
from strands_py.idempotency.redis import RedisIdempotencyStore
from strands_py.testing.bedrock import STUB_ANSWER
from strands_py.testing.store_contract import StoreContract

WAIT = 60.0
SPAWN = multiprocessing.get_context("spawn")
PREFIX = "strands-py:idempotency:"


def _at(key: str) -> str:
    """The Redis key of the record of ``key`` (one without braces): the prefix, then the key as its hash tag."""
    return PREFIX + "{" + key + "}"


def _journal_at(key: str) -> str:
    """The Redis key of the journal of ``key`` (one without braces): the record's, then ``:journal``."""
    return _at(key) + ":journal"


SKEW = 600.0  # ten minutes
# Bound on the time between a write and the PTTL read that checks it, under any load: far below the skews tested.
SLACK_MS = 60_000


@pytest.fixture(scope="module")
def server() -> Iterator[RedisServer]:
    """One redis-server for the module (no persistence), stopped after it."""
    with running_redis() as server:
        yield server


@pytest.fixture
def url(server: RedisServer) -> Iterator[str]:
    """The server's URL, emptied before each test."""
    client = redis.Redis.from_url(server.url)
    client.flushall()
    client.close()
    yield server.url


class TestRealRedisContract(StoreContract):
    """The store contract on a real redis-server (the claim race included: the server is atomic)."""

    @pytest.fixture
    def store(self, url: str) -> Iterator[IdempotencyStore]:
        with RedisIdempotencyStore.from_url(url) as store:
            yield store


class TestRealRedisContractOnItsLoop(TestRealRedisContract):
    """The same, each call on its loop's redis-py asyncio client (``use_event_loop``: ``from_url`` makes it)."""

    use_event_loop = True


def test_a_burst_on_the_loop_waits_for_its_turn_and_never_for_a_connection(url: str) -> None:
    """400 calls at once on a loop's asyncio client with an 8-connection pool (which fails when full): all answer,
    and the server sees no more than ``max_workers`` connections of it, as through the store's threads."""

    async def burst() -> tuple[list[Any], int]:
        with RedisIdempotencyStore.from_url(url, max_connections=8) as store:
            async with store.use_event_loop():
                outcomes = await asyncio.gather(*(store.get(f"s#{n}") for n in range(400)), return_exceptions=True)
                with redis.Redis.from_url(url) as observer:
                    connections = len(observer.client_list()) - 1  # the observer's own
        return outcomes, connections

    outcomes, connections = asyncio.run(burst())
    assert outcomes == [None] * 400
    assert connections <= 4


def _wait_for(predicate: Any, what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def _stop(*procs: Any) -> None:
    for p in procs:
        p.join(WAIT)
        if p.is_alive():
            p.kill()
            p.join(WAIT)


class _Stamp:
    """An ``entered`` for ScriptedBedrock that remembers when (monotonic) the model was first called."""

    def __init__(self) -> None:
        self.at: float | None = None
        self._event = threading.Event()

    def set(self) -> None:
        if self.at is None:
            self.at = time.monotonic()
        self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()


@pytest.mark.racing
def test_eight_processes_four_calls_each_run_the_agent_once(url: str) -> None:
    processes, calls = 8, 4
    claims = SPAWN.Value("i", 0)
    gate, entered, out = SPAWN.Event(), SPAWN.Event(), SPAWN.Queue()
    procs = [
        SPAWN.Process(target=worker.run, args=(i, url, "order-1234", calls, claims, gate, entered, out))
        for i in range(processes)
    ]
    for p in procs:
        p.start()
    try:
        # One process's primary is in its model call, and every process has tried its claim: release the model.
        _wait_for(lambda: entered.is_set() and claims.value >= processes, "the claims of all processes")
        gate.set()
        reports = [out.get(timeout=WAIT) for _ in procs]
    finally:
        gate.set()
        _stop(*procs)
    results = [r for report in reports for r in report["results"]]
    assert results == [STUB_ANSWER + "\n"] * (processes * calls)
    assert sum(r["model_calls"] for r in reports) == 2  # one tool-use cycle, in one process only
    assert sum(r["tool_calls"] for r in reports) == 1
    primaries = [r for r in reports if r["model_calls"]]
    others = [r for r in reports if not r["model_calls"]]
    assert len(primaries) == 1 and len(others) == processes - 1
    assert all(r["replayed"] == calls for r in others)
    assert primaries[0]["store_calls"]["claim"] == 1 and primaries[0]["store_calls"]["complete"] == 1
    # Every other process: one claim attempt (a script that returns the live record), then reads until completed.
    assert all(r["store_calls"]["claim"] == 1 and "complete" not in r["store_calls"] for r in others)
    totals: Counter[str] = Counter()
    for r in others:
        totals.update(r["store_calls"])
    print(f"redis store calls: primary process {primaries[0]['store_calls']}, other processes in total {dict(totals)}")


@pytest.mark.racing
def test_a_killed_owner_is_taken_over_after_its_lease_and_runs_once(url: str) -> None:
    lease = 5.0
    claims = SPAWN.Value("i", 0)
    gate, entered = SPAWN.Event(), SPAWN.Event()
    impatient, impatient_script, impatient_store = worker.make_agent(url, claims, wait_timeout_seconds=0.2)
    agent, script, store = worker.make_agent(url, claims)
    doomed = SPAWN.Process(target=worker.hold_claim, args=(url, "order-crash", claims, gate, entered, lease))
    doomed.start()
    try:
        _wait_for(entered.is_set, "the doomed primary's model call")
        # While the owner lives (in its model call, heartbeating), a retry with a deadline waits, then gives up,
        # however long that takes: the owner's lease is renewed all along, so no clock decides this.
        with pytest.raises(IdempotencyWaitTimeoutError):
            impatient(worker.PROMPT, idempotency_token="order-crash")
        assert impatient_script.model_calls == 0
        worker.close(impatient_store)
        os.kill(doomed.pid or 0, signal.SIGKILL)
        doomed.join(WAIT)
        killed_at = time.monotonic()
    finally:
        _stop(doomed)
    assert doomed.exitcode == -signal.SIGKILL

    key = make_key(worker.SCOPE, "order-crash")
    held = asyncio.run(store.inner.get(key))
    assert held is not None and held.state is RecordState.IN_PROGRESS and held.lease_seconds == lease

    # A patient retry takes the claim over only after it has seen the dead owner's last version for a whole lease
    # (it began watching after the kill, on its own monotonic clock), and runs exactly once.
    stamp = _Stamp()
    script.entered = stamp
    result = agent(worker.PROMPT, idempotency_token="order-crash")
    assert not isinstance(result, ReplayedAgentResult)
    assert script.model_calls == 2 and script.tool_calls == 1 and store.calls["complete"] == 1
    assert stamp.at is not None and stamp.at - killed_at >= lease
    # A measurement, not an assertion (how soon after the lease depends on the machine's load and the poll).
    print(f"takeover: {stamp.at - killed_at:.2f}s after SIGKILL (lease {lease}s)")
    worker.close(store)

    later, later_script, later_store = worker.make_agent(url, claims)
    assert isinstance(later(worker.PROMPT, idempotency_token="order-crash"), ReplayedAgentResult)
    assert later_script.model_calls == 0
    worker.close(later_store)


@pytest.mark.racing
def test_a_redis_restart_mid_run_is_a_clear_error_and_no_duplicate_run() -> None:
    """With persistence (``appendonly yes``), what users should run: the claim survives the restart.

    What a user sees: while Redis is down, every call with any token raises ``IdempotencyStoreError`` at once and
    runs nothing (an HTTP layer answers 503, retry later); the primary, in its model call, is unaffected. After the
    restart, a retry finds the running claim and waits (or gives up after its deadline); when the primary
    completes, its result is stored and replayed. One run in all.
    """
    token = "order-restart"
    with running_redis(persistent=True) as server:
        claims = SPAWN.Value("i", 0)
        gate, entered, out = SPAWN.Event(), SPAWN.Event(), SPAWN.Queue()
        primary = SPAWN.Process(target=worker.run, args=(0, server.url, token, 1, claims, gate, entered, out))
        primary.start()
        try:
            _wait_for(entered.is_set, "the primary's model call")
            server.stop()

            retry, retry_script, retry_store = worker.make_agent(server.url, claims)
            with pytest.raises(IdempotencyStoreError) as raised:
                retry(worker.PROMPT, idempotency_token=token)
            assert isinstance(raised.value.__cause__, redis.ConnectionError)
            assert retry_script.model_calls == 0

            server.start()  # same port, same append-only file
            impatient, impatient_script, impatient_store = worker.make_agent(
                server.url, claims, wait_timeout_seconds=0.2
            )
            with pytest.raises(IdempotencyWaitTimeoutError):
                impatient(worker.PROMPT, idempotency_token=token)
            assert impatient_script.model_calls == 0

            gate.set()
            report = out.get(timeout=WAIT)
        finally:
            gate.set()
            _stop(primary)
        assert report["results"] == [STUB_ANSWER + "\n"]
        assert report["model_calls"] == 2 and report["store_calls"]["complete"] == 1

        replay = retry(worker.PROMPT, idempotency_token=token)
        assert isinstance(replay, ReplayedAgentResult) and retry_script.model_calls == 0
        for store in (retry_store, impatient_store):
            worker.close(store)


@pytest.mark.racing
def test_a_restart_without_persistence_forgets_the_claim_and_fences_the_primary() -> None:
    """Without persistence a restart empties Redis: documented behaviour, not a guarantee we can give.

    The primary's next fenced write (its journal append of the model's response) finds no claim: it stops before its
    tool runs, nothing is stored, its caller gets ``IdempotencyLeaseLostError``, and a retry after the restart runs
    again.
    """
    token = "order-forgotten"
    with running_redis() as server:
        claims = SPAWN.Value("i", 0)
        gate, entered, out = SPAWN.Event(), SPAWN.Event(), SPAWN.Queue()
        primary = SPAWN.Process(target=worker.run, args=(0, server.url, token, 1, claims, gate, entered, out))
        primary.start()
        try:
            _wait_for(entered.is_set, "the primary's model call")
            server.stop()
            server.start()
            gate.set()
            report = out.get(timeout=WAIT)
        finally:
            gate.set()
            _stop(primary)
        # Its next journal append (the model's response), or a heartbeat, finds the claim gone: the primary stops
        # there, before its tool runs, and stores nothing.
        [outcome] = report["results"]
        assert outcome.startswith("IdempotencyLeaseLostError"), outcome
        assert report["tool_calls"] == 0 and "complete" not in report["store_calls"], report
        client = redis.Redis.from_url(server.url)
        assert client.keys("*") == []
        client.close()

        retry, retry_script, retry_store = worker.make_agent(server.url, claims)
        assert not isinstance(retry(worker.PROMPT, idempotency_token=token), ReplayedAgentResult)
        assert retry_script.model_calls == 2
        worker.close(retry_store)


def test_the_server_fixture_stops_what_it_starts() -> None:
    with running_redis() as server:
        port = server.port
        client = redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=1)
        assert client.ping()
        server.kill()
        with pytest.raises(redis.ConnectionError):
            client.ping()
        server.start()
        assert server.port == port and client.ping()
        client.close()
    with pytest.raises(redis.ConnectionError):
        redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=1).ping()


# Lifetimes are durations on the server's clock; no clock frees a running claim; takeover is a compare-and-set.


def _record(key: str, owner: str, now: float, *, lease: float = 30.0, ttl: float = 270.0) -> IdempotencyRecord:
    return IdempotencyRecord(key, RecordState.IN_PROGRESS, owner, new_version(), lease, now + lease + ttl, "fp")


def _completed(key: str, owner: str, now: float, *, ttl: float) -> IdempotencyRecord:
    return IdempotencyRecord(key, RecordState.COMPLETED, owner, new_version(), 0.0, now + ttl, "fp", b"result")


def _assert_ttl(client: redis.Redis, key: str, seconds: float) -> None:
    """The key's TTL on the server is ``seconds`` (rounded up to ms), less the little time since the write."""
    intended = math.ceil(seconds * 1000)
    pttl = client.pttl(_at(key))
    assert intended - SLACK_MS < pttl <= intended, f"PTTL {pttl} ms, intended {intended} ms"


def _skewed_clock(offset: float) -> Any:
    """Patches ``time.time`` of this whole process (the server is another process): this host's clock is off."""
    real = time.time
    return mock.patch("time.time", lambda: real() + offset)


class _AbsoluteDeadlines(RedisIdempotencyStore):
    """Negative control (the layout before this one): PEXPIREAT at expires_at, a time of the writer's clock."""

    def __init__(self, client: redis.Redis) -> None:
        super().__init__(client, close_client=True)
        self._claim, self._take_over, self._complete, self._renew = (
            client.register_script(script.replace("'PEXPIRE'", "'PEXPIREAT'"))
            for script in (redis_module._CLAIM, redis_module._TAKE_OVER, redis_module._COMPLETE, redis_module._RENEW)
        )


def _absolute_ms(expires_at: float, now: float) -> int:
    return math.floor(expires_at * 1000) + 1


class _ClockJudgesClaims(RedisIdempotencyStore):
    """Negative control: a claim script that frees another owner's claim past its expires_at by the caller's now."""

    def __init__(self, client: redis.Redis) -> None:
        super().__init__(client, close_client=True)
        judged = redis_module._CLAIM.replace("free = own\n", "free = own or expires_at <= tonumber(ARGV[2])\n")
        if judged == redis_module._CLAIM:
            # Not an AssertionError: the xfail must not pass on a control that broke nothing.
            raise LookupError("the claim script changed: this control no longer breaks it")
        self._claim = client.register_script(judged)


@pytest.fixture
def lifetimes(request: pytest.FixtureRequest, url: str) -> Iterator[RedisIdempotencyStore]:
    """The store, or (``indirect`` param "absolute-deadlines") the variant writing deadlines of the writer's clock."""
    if getattr(request, "param", "durations") == "durations":
        with RedisIdempotencyStore.from_url(url) as store:
            yield store
        return
    with mock.patch.object(redis_layout, "_ttl_ms", _absolute_ms), _AbsoluteDeadlines(redis.Redis.from_url(url)) as v:
        yield v


LIFETIMES = [
    "durations",
    pytest.param("absolute-deadlines", marks=pytest.mark.xfail(strict=True, raises=AssertionError)),
]


def _renew(store: RedisIdempotencyStore, now: float, judged: IdempotencyRecord) -> Awaitable[bool]:
    return store.renew("s#k", judged.owner, version=new_version(), lease_seconds=30, expires_at=now + 400)


def _take_over(store: RedisIdempotencyStore, now: float, judged: IdempotencyRecord) -> Awaitable[bool]:
    return store.take_over(_record("s#k", "b", now, lease=30, ttl=370), judged.version)


def _complete(store: RedisIdempotencyStore, now: float, judged: IdempotencyRecord) -> Awaitable[bool]:
    return store.complete(_completed("s#k", judged.owner, now, ttl=400))


@pytest.mark.parametrize("lifetimes", LIFETIMES, indirect=True)
@pytest.mark.parametrize("offset", [SKEW, -SKEW])
def test_a_skewed_host_writes_records_for_their_intended_duration_on_the_server(
    lifetimes: RedisIdempotencyStore, url: str, offset: float
) -> None:
    """A host ten minutes ahead or behind: every record it writes lives its duration on the server's clock.

    The claim's duration is measured from its own ``now``; the other writes' from the host's clock at the write. An
    absolute deadline (PEXPIREAT, the negative control) would live ten minutes too long, or be deleted at once.
    """
    store = lifetimes
    client = redis.Redis.from_url(url)
    writes: list[Callable[[RedisIdempotencyStore, float, IdempotencyRecord], Awaitable[bool]]]
    writes = [_renew, _take_over, _complete]
    try:
        for write in writes:
            client.delete(_at("s#k"))
            with _skewed_clock(offset):
                now = time.time()
                claim = _record("s#k", "a", now)
                assert asyncio.run(store.claim(claim, now)) is None
            _assert_ttl(client, "s#k", 300)
            with _skewed_clock(offset):
                assert asyncio.run(write(store, time.time(), claim)) is True
            _assert_ttl(client, "s#k", 400)
    finally:
        client.close()


@pytest.fixture
def claims_of_a_skewed_host(request: pytest.FixtureRequest, url: str) -> Iterator[RedisIdempotencyStore]:
    """The store, or (``indirect`` param "clock-judges-claims") the variant whose claims judge leases by a clock."""
    if getattr(request, "param", "store") == "store":
        with RedisIdempotencyStore.from_url(url) as store:
            yield store
        return
    with _ClockJudgesClaims(redis.Redis.from_url(url)) as variant:
        yield variant


@pytest.mark.parametrize(
    "claims_of_a_skewed_host",
    ["store", pytest.param("clock-judges-claims", marks=pytest.mark.xfail(strict=True, raises=AssertionError))],
    indirect=True,
)
def test_a_claim_from_a_skewed_host_never_frees_a_running_claim(
    claims_of_a_skewed_host: RedisIdempotencyStore, url: str
) -> None:
    """A running claim (short lease, short expiry) blocks claims from hosts ten minutes, or a month, ahead or behind.

    The claim's owner never renews here: only a waiter watching its version for a whole lease may take it over.
    """
    skewed_store = claims_of_a_skewed_host
    client = redis.Redis.from_url(url)
    try:
        with RedisIdempotencyStore.from_url(url) as store:
            now = time.time()
            running = _record("s#k", "a", now, lease=1.0, ttl=300.0)
            assert asyncio.run(store.claim(running, now)) is None
            for offset in (SKEW, -SKEW, 30 * 86400.0):
                with _skewed_clock(offset):
                    skewed_now = time.time()
                    existing = asyncio.run(skewed_store.claim(_record("s#k", f"b{offset}", skewed_now), skewed_now))
                assert existing == running, f"a claim {offset}s off replaced a running claim"
            assert asyncio.run(store.get("s#k")) == running
            _assert_ttl(client, "s#k", 301)  # and its lifetime is its own, untouched by the failed claims
    finally:
        client.close()


class _CheckThenTakeOver(RedisIdempotencyStore):
    """Negative control: checks the version with a read, then writes unconditionally (every taker checks first)."""

    def __init__(self, client: redis.Redis, takers: int) -> None:
        super().__init__(client, max_workers=takers + 1, close_client=True)
        self._all_checked = threading.Barrier(takers)
        blind = redis_module._TAKE_OVER.replace("if stored ~= ARGV[1] then", "if false then")
        assert blind != redis_module._TAKE_OVER
        self._overwrite = client.register_script(blind)

    async def take_over(self, record: IdempotencyRecord, version: str) -> bool:
        current = await self.get(record.key)
        if current is None or current.version != version:
            return False
        self._all_checked.wait(WAIT)  # deterministic interleaving: nobody writes before every taker has checked
        head = [version, record.version]
        return bool(await self._blocking(self._write, self._overwrite, record.key, head, record))


TAKERS = 8
RENEWALS = 200


@pytest.fixture
def racing_takeovers(request: pytest.FixtureRequest, url: str) -> Iterator[RedisIdempotencyStore]:
    """The store, or (``indirect`` param "check-then-act") a take_over that reads, then writes blindly."""
    if getattr(request, "param", "store") == "store":
        with RedisIdempotencyStore.from_url(url, max_workers=TAKERS + 1) as store:
            yield store
        return
    with _CheckThenTakeOver(redis.Redis.from_url(url), TAKERS) as variant:
        yield variant


@pytest.mark.racing
@pytest.mark.parametrize(
    "racing_takeovers",
    ["store", pytest.param("check-then-act", marks=pytest.mark.xfail(strict=True, raises=AssertionError))],
    indirect=True,
)
def test_take_over_is_a_compare_and_set_against_a_renewing_owner_and_other_takers(
    racing_takeovers: RedisIdempotencyStore,
) -> None:
    """Takers read the record and take over the version they read, while its owner renews as fast as it can.

    Exactly one taker wins, with a version the owner wrote; no renewal lands after the takeover (the winner's record
    is what remains, to the byte), and every other taker, having lost, finds the winner's record.
    """
    store = racing_takeovers
    now = time.time()
    first = _record("s#race", "owner", now)
    assert asyncio.run(store.claim(first, now)) is None
    renewing = threading.Event()  # set once the owner is well into its renewals: the takers race against them
    written = [first.version]  # versions the owner wrote, in order
    wins: list[tuple[IdempotencyRecord, str]] = []  # (the winner's record, the version it judged)
    stale: list[str] = []  # takeovers refused: the version judged was gone (renewed, or taken over) by the write
    errors: list[BaseException] = []

    async def heartbeat() -> None:
        try:
            for i in range(RENEWALS):
                version = new_version()
                renewed = await store.renew(
                    "s#race", "owner", version=version, lease_seconds=30, expires_at=time.time() + 300
                )
                if not renewed:
                    return  # fenced off: taken over
                written.append(version)
                if i == RENEWALS // 10:
                    renewing.set()
        finally:
            renewing.set()

    async def take(name: str) -> None:
        assert renewing.wait(WAIT)
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            seen = await store.get("s#race")
            assert seen is not None
            if seen.owner != "owner":
                return  # another taker won: a judgement now would be of its record, not the owner's
            mine = _record("s#race", name, time.time())
            if await store.take_over(mine, seen.version):
                wins.append((mine, seen.version))
                return
            stale.append(name)
        raise AssertionError(f"{name} neither won nor saw a winner")

    def run(coroutine: Callable[[], Awaitable[None]]) -> None:
        try:
            asyncio.run(asyncio.wait_for(coroutine(), WAIT))
        except BaseException as e:  # reported on the test's thread
            errors.append(e)

    threads = [threading.Thread(target=run, args=(heartbeat,))]
    threads += [threading.Thread(target=run, args=(lambda n=f"taker-{i}": take(n),)) for i in range(TAKERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT * 2)
    assert not errors, errors
    assert len(wins) == 1, f"{len(wins)} takeovers won"
    [(winner, judged)] = wins
    assert judged in written
    assert asyncio.run(store.get("s#race")) == winner
    # A measurement: how contended the race was on this run.
    print(
        f"take_over race: the owner renewed {len(written) - 1} times, the winner took version "
        f"#{written.index(judged)}, {len(stale)} takeovers were refused"
    )


def test_a_key_of_another_type_is_a_corrupt_record_on_the_real_server(url: str) -> None:
    """Redis 7 reports WRONGTYPE from inside a script with the script's name appended: still a corrupt record."""
    client = redis.Redis.from_url(url)
    client.set(_at("s#bad"), "not a hash")
    now = time.time()
    with RedisIdempotencyStore.from_url(url) as store:
        calls = [
            store.claim(_record("s#bad", "a", now), now),
            store.take_over(_record("s#bad", "a", now), "v"),
            store.get("s#bad"),
            store.complete(_completed("s#bad", "a", now, ttl=60)),
            store.release("s#bad", "a"),
            store.renew("s#bad", "a", version="v", lease_seconds=30, expires_at=now + 60),
        ]
        for call in calls:
            with pytest.raises(IdempotencyRecordCorruptedError, match="s#bad"):
                asyncio.run(call)
    assert client.get(_at("s#bad")) == b"not a hash"
    client.close()


def test_a_record_written_past_its_expiry_lands_and_is_deleted_by_the_server(url: str) -> None:
    client = redis.Redis.from_url(url)
    now = time.time()
    with RedisIdempotencyStore.from_url(url) as store:
        assert asyncio.run(store.claim(_record("s#k", "a", now), now)) is None
        assert asyncio.run(store.complete(_completed("s#k", "a", now, ttl=-60))) is True
        assert client.pttl(_at("s#k")) in (-2, 0, 1)  # gone, or going within a millisecond
        # a claim whose expiry is past: stored (the caller owns the key), then deleted
        assert asyncio.run(store.claim(_record("s#past", "a", now - 7200), now)) is None
        assert client.pttl(_at("s#past")) in (-2, 0, 1)
    client.close()


# Lost replies. redis-py sends a command again when the connection fails before its reply arrives (from_url's store
# retries 3 times): the first copy may have run on the server. Every write must land once and report its outcome.


class _ReplyDropper:
    """A TCP proxy to a redis-server; when armed, it loses the next reply: the command ran, its connection dies.

    redis-py then reconnects (through the proxy) and sends the same command again, as after a network failure
    between the server's write and the client's read.
    """

    def __init__(self, upstream_port: int) -> None:
        self._upstream = upstream_port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._armed = threading.Event()
        self.dropped = threading.Event()
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, name="reply-dropper", daemon=True).start()

    def drop_next_reply(self) -> None:
        self.dropped.clear()
        self._armed.set()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            server = socket.create_connection(("127.0.0.1", self._upstream))
            self._sockets += [client, server]
            threading.Thread(target=self._pump, args=(client, server, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, True), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, replies: bool) -> None:
        try:
            while data := source.recv(1 << 16):
                if replies and self._armed.is_set():
                    self._armed.clear()
                    self.dropped.set()
                    break  # the reply goes nowhere: both ends of this connection close below
                sink.sendall(data)
        except OSError:
            pass
        for s in (source, sink):
            _hang_up(s)

    def close(self) -> None:
        self._listener.close()
        for s in self._sockets:
            _hang_up(s)


def _hang_up(s: socket.socket) -> None:
    """Close ``s`` now: shutdown wakes the other pump blocked in recv on it and sends the peer its end of stream."""
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # already closed, or never connected
    s.close()


# Negative controls: scripts that do not recognise a resent copy of themselves (script, text replaced, replacement).
_BLIND_TO_RESENDS = {
    "append-without-id": ("_APPEND", "== ARGV[3] then", "== false then"),
    "take-over-blind": ("_TAKE_OVER", "if stored == ARGV[2] then", "if false then"),
    "complete-blind": ("_COMPLETE", "if redis.call('HGET', KEYS[1], 'version') == ARGV[2] then", "if false then"),
}


class _BlindToResends(RedisIdempotencyStore):
    def __init__(self, url: str, variant: str) -> None:
        super().__init__(redis.Redis.from_url(url, retry=Retry(NoBackoff(), 3)), close_client=True)
        script, old, new = _BLIND_TO_RESENDS[variant]
        source = getattr(redis_module, script)
        assert old in source
        setattr(self, script.lower(), self._client.register_script(source.replace(old, new)))


@pytest.fixture
def dropper(server: RedisServer, url: str) -> Iterator[_ReplyDropper]:
    proxy = _ReplyDropper(server.port)
    yield proxy
    proxy.close()


def _lossy_store(request: pytest.FixtureRequest, dropper: _ReplyDropper) -> RedisIdempotencyStore:
    proxied = f"redis://127.0.0.1:{dropper.port}"
    variant = getattr(request, "param", "store")
    return RedisIdempotencyStore.from_url(proxied) if variant == "store" else _BlindToResends(proxied, variant)


@pytest.fixture
def lossy(request: pytest.FixtureRequest, dropper: _ReplyDropper) -> Iterator[RedisIdempotencyStore]:
    """The store through the proxy, or (``indirect`` param) a variant of ``_BLIND_TO_RESENDS``."""
    store = _lossy_store(request, dropper)
    yield store
    store.close()


@pytest.mark.parametrize(
    "lossy",
    ["store", pytest.param("append-without-id", marks=pytest.mark.xfail(strict=True, raises=AssertionError))],
    indirect=True,
)
def test_an_append_whose_reply_is_lost_lands_once(lossy: RedisIdempotencyStore, dropper: _ReplyDropper) -> None:
    now = time.time()

    async def scenario() -> None:
        assert await lossy.claim(_record("s#k", "a", now), now) is None
        assert await lossy.append("s#k", "a", b"step-0") is True  # the scripts are loaded, a connection is open
        dropper.drop_next_reply()
        assert await lossy.append("s#k", "a", b"step-1") is True
        assert dropper.dropped.is_set()
        assert await lossy.journal("s#k") == [b"step-0", b"step-1"]

    asyncio.run(scenario())


@pytest.mark.parametrize(
    "lossy",
    [
        "store",
        *(
            pytest.param(variant, marks=pytest.mark.xfail(strict=True, raises=AssertionError))
            for variant in ("take-over-blind", "complete-blind")
        ),
    ],
    indirect=True,
)
def test_writes_whose_reply_is_lost_report_what_landed(lossy: RedisIdempotencyStore, dropper: _ReplyDropper) -> None:
    """A takeover, a completion, a renewal, a truncation, a claim, a cancel and a tombstone, each resent."""
    now = time.time()

    async def lose_reply(call: Awaitable[Any]) -> Any:
        dropper.drop_next_reply()
        outcome = await call
        assert dropper.dropped.is_set()
        return outcome

    async def scenario() -> None:
        # Every script once (fenced off, on another key), so that the replies lost below are the writes' own, never
        # a NOSCRIPT answered before the script was loaded.
        await lossy.take_over(_record("s#warm", "a", now), "v")
        await lossy.complete(_completed("s#warm", "a", now, ttl=600))
        await lossy.renew("s#warm", "a", version="v", lease_seconds=60, expires_at=now + 600)
        await lossy.truncate("s#warm", "a", 0)
        await lossy.cancel("s#warm")
        first = _record("s#k", "a", now)
        assert await lossy.claim(first, now) is None
        assert await lossy.append("s#k", "a", b"step-0") is True
        retried = _record("s#k", "a", now)
        assert await lose_reply(lossy.claim(retried, now)) is None  # its own claim, again
        assert await lossy.get("s#k") == retried
        taken = _record("s#k", "b", now)
        assert await lose_reply(lossy.take_over(taken, retried.version)) is True
        assert await lossy.get("s#k") == taken
        assert await lose_reply(lossy.renew("s#k", "b", version="v-2", lease_seconds=60, expires_at=now + 600))
        assert await lossy.append("s#k", "b", b"step-1") is True
        assert await lose_reply(lossy.truncate("s#k", "b", 1)) is True
        assert await lossy.journal("s#k") == [b"step-0"]
        done = _completed("s#k", "b", now, ttl=600)
        assert await lose_reply(lossy.complete(done)) is True
        assert await lossy.get("s#k") == done
        # a cancel finds its own mark; the owner's tombstone finds itself
        running = _record("s#c", "c", now)
        assert await lossy.claim(running, now) is None
        assert await lose_reply(lossy.cancel("s#c")) == dataclasses.replace(running, cancelled=True)
        tombstone = IdempotencyRecord("s#c", RecordState.CANCELLED, "c", new_version(), 0.0, now + 600, "fp")
        assert await lose_reply(lossy.complete(tombstone)) is True
        assert await lossy.get("s#c") == tombstone

    asyncio.run(scenario())


# Cancels: a run in another process, marked from here, learns of it at its next heartbeat and leaves a tombstone.

_MARK_FENCE = "if redis.call('HEXISTS', KEYS[1], 'cancelled') == 1 then"


def test_a_cancel_keeps_the_claims_version_and_lifetime_on_the_server(url: str) -> None:
    """The mark is one field (HSET keeps a key's TTL on the real server too): version, TTL and journal stay."""
    client = redis.Redis.from_url(url)
    now = time.time()

    async def scenario(store: RedisIdempotencyStore) -> None:
        running = _record("s#k", "a", now, lease=30, ttl=370)
        assert await store.claim(running, now) is None
        assert await store.append("s#k", "a", b"step") is True
        assert await store.cancel("s#k") == dataclasses.replace(running, cancelled=True)
        _assert_ttl(client, "s#k", 400)
        journal_ttl = client.pttl(_journal_at("s#k"))
        assert 400_000 - SLACK_MS < journal_ttl <= 400_000, f"journal PTTL {journal_ttl} ms"
        assert await store.journal("s#k") == [b"step"]

    try:
        with RedisIdempotencyStore.from_url(url) as store:
            asyncio.run(scenario(store))
    finally:
        client.close()


def _owner_of_a_run_cancelled_elsewhere(
    url: str, token: str, claims: Any, gate: Any, entered: Any, lease_seconds: float, variant: str, out: Any
) -> None:
    """Runs in another process: claims ``token``, hangs in its model call (heartbeating), reports how its run ended."""
    agent, _, store = worker.make_agent(url, claims, gate, entered, lease_seconds=lease_seconds)
    if variant == "renew-ignores-the-mark":
        inner = store.inner
        assert isinstance(inner, RedisIdempotencyStore)
        inner._renew = inner._client.register_script(redis_module._RENEW.replace(_MARK_FENCE, "if false then"))
    # A model call blocked in its thread cannot be interrupted (strands-agents 1.30 stops a cancelled run only when the
    # call returns): it returns as soon as the owner learnt of the mark, which is what is tested.
    cancel = agent.cancel

    def cancelled() -> None:
        gate.set()
        cancel()

    agent.cancel = cancelled  # type: ignore[method-assign]
    try:
        agent(worker.PROMPT, idempotency_token=token)
        out.put("answered")
    except Exception as e:  # noqa: BLE001 - how the run ended is the report
        out.put(type(e).__name__)
    finally:
        worker.close(store)


@pytest.mark.racing
@pytest.mark.parametrize(
    "variant",
    ["store", pytest.param("renew-ignores-the-mark", marks=pytest.mark.xfail(strict=True, raises=AssertionError))],
)
def test_a_run_in_another_process_is_cancelled_from_here_and_its_retry_runs_afresh(url: str, variant: str) -> None:
    """The owner (another OS process, in its model call) learns of the mark within a few heartbeats, leaves a
    ``CANCELLED`` tombstone and ends with ``InvocationCancelledError``; a retry here claims over the tombstone at once
    and pays every step again. Negative control (xfail): an owner whose renewals ignore the mark never learns of it.
    """
    lease = 1.5
    token = f"order-cancel-{variant}"
    claims = SPAWN.Value("i", 0)
    gate, entered, out = SPAWN.Event(), SPAWN.Event(), SPAWN.Queue()
    owner = SPAWN.Process(
        target=_owner_of_a_run_cancelled_elsewhere,
        args=(url, token, claims, gate, entered, lease, variant, out),
    )
    owner.start()
    key = make_key(worker.SCOPE, token)
    agent, script, store = worker.make_agent(url, claims)
    try:
        _wait_for(entered.is_set, "the owner's model call")
        marked = asyncio.run(store.cancel(key))
        assert marked is not None and marked.state is RecordState.IN_PROGRESS and marked.cancelled
        # The owner renews every lease/3: ten leases is many heartbeats, even on a loaded machine.
        deadline = time.monotonic() + 10 * lease
        tombstone = asyncio.run(store.get(key))
        while tombstone is not None and tombstone.state is RecordState.IN_PROGRESS and time.monotonic() < deadline:
            time.sleep(0.05)
            tombstone = asyncio.run(store.get(key))
        assert tombstone is not None and tombstone.state is RecordState.CANCELLED, tombstone
        assert tombstone.owner == marked.owner
    finally:
        # The owner's sync call returns once its model thread, still at the gate, does (asyncio.run waits for it).
        gate.set()
    try:
        ended = out.get(timeout=WAIT)
    except queue.Empty:
        ended = "no report"
    finally:
        _stop(owner)
    assert ended == "InvocationCancelledError", ended
    result = agent(worker.PROMPT, idempotency_token=token)
    assert not isinstance(result, ReplayedAgentResult)
    assert (script.model_calls, script.tool_calls) == (2, 1)  # afresh: a cancelled run is not resumed
    worker.close(store)
