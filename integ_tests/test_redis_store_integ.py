"""RedisIdempotencyStore on a real redis-server (127.0.0.1, random port): many OS processes, crashes, restarts."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import redis
import redis_worker as worker
from _servers import RedisServer, running_redis

from strands_py.idempotency import (
    IdempotencyStore,
    IdempotencyStoreError,
    IdempotencyWaitTimeoutError,
    RecordState,
    ReplayedAgentResult,
)
from strands_py.idempotency.keys import make_key
from strands_py.idempotency.redis import RedisIdempotencyStore
from strands_py.testing.bedrock import STUB_ANSWER
from strands_py.testing.store_contract import StoreContract

WAIT = 60.0
SPAWN = multiprocessing.get_context("spawn")


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
    """An ``entered`` for ScriptedBedrock that remembers when the model was first called."""

    def __init__(self) -> None:
        self.at: float | None = None
        self._event = threading.Event()

    def set(self) -> None:
        if self.at is None:
            self.at = time.time()
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
        killed_at = time.time()
    finally:
        _stop(doomed)
    assert doomed.exitcode == -signal.SIGKILL

    key = make_key(worker.SCOPE, "order-crash")
    held = asyncio.run(store.inner.get(key))
    assert held is not None and held.state is RecordState.IN_PROGRESS
    lapses_at = held.lease_expires_at  # the lease as the dead owner last left it (renewed or not)

    # A patient retry takes the claim over once the lease lapses (never before), and runs exactly once.
    stamp = _Stamp()
    script.entered = stamp
    result = agent(worker.PROMPT, idempotency_token="order-crash")
    assert not isinstance(result, ReplayedAgentResult)
    assert script.model_calls == 2 and script.tool_calls == 1 and store.calls["complete"] == 1
    assert stamp.at is not None and stamp.at >= lapses_at
    # A measurement, not an assertion (how soon after the lapse depends on the machine's load).
    print(
        f"takeover: {stamp.at - killed_at:.2f}s after SIGKILL, {stamp.at - lapses_at:.2f}s after the lease lapsed "
        f"(lease {lease}s)"
    )
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

    The primary finishes its run, but its fenced complete finds no claim, so nothing is stored: its caller gets
    ``IdempotencyLeaseLostError`` (or, with a durable layer that lets the primary keep its result, its result and a
    warning), and a retry after the restart runs again.
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
        [outcome] = report["results"]
        assert outcome == STUB_ANSWER + "\n" or outcome.startswith("IdempotencyLeaseLostError"), outcome
        assert report["store_calls"]["complete"] == 1
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
