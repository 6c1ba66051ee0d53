"""A store's own threads (``_workers.py``), through ``RedisIdempotencyStore`` (fakeredis): calls whose caller went
away, ``close`` waiting for calls in progress, and threads that stop when a store is dropped or the interpreter exits.

Each guarantee has a broken variant of the worker beside it, the negative control its test must catch.
"""

from __future__ import annotations

import asyncio
import gc
import queue
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Iterator
from typing import Any
from unittest import mock

import fakeredis
import pytest

import strands_py.idempotency._workers as workers_module
from strands_py.idempotency import IdempotencyRecord, IdempotencyStoreError, RecordState
from strands_py.idempotency.record import new_version
from strands_py.idempotency.redis import RedisIdempotencyStore

WAIT = 10.0
# How long a negative control waits for what its broken variant never does (the real code does it at once).
NEVER = 1.0
THREADS = "strands-py-idempotency-redis"

pytestmark = pytest.mark.racing


class _Gate:
    """Holds the store's ``hgetall`` (``store.get``) on its worker thread until released."""

    def __init__(self, store: RedisIdempotencyStore) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.finished = threading.Event()
        self._real = store._client.hgetall
        self.patch = mock.patch.object(store._client, "hgetall", self._held)

    def _held(self, *args: Any) -> Any:
        self.entered.set()
        assert self.release.wait(WAIT), "the test never released the call"
        try:
            return self._real(*args)
        finally:
            self.finished.set()


@pytest.fixture
def store() -> Iterator[RedisIdempotencyStore]:
    with RedisIdempotencyStore(fakeredis.FakeRedis(server=fakeredis.FakeServer()), max_workers=1) as store:
        yield store


def _claim(key: str) -> IdempotencyRecord:
    return IdempotencyRecord(key, RecordState.IN_PROGRESS, "a", new_version(), 60.0, time.time() + 3600.0)


def _work_without_a_closed_loop_guard(work: queue.SimpleQueue[Any]) -> None:
    """Negative control: hands every outcome back, even to a loop that closed (the worker dies of it)."""
    while (item := work.get()) is not None:
        call, loop, future = item
        outcome = call(), None
        loop.call_soon_threadsafe(workers_module._deliver, future, outcome)


def _call_from_a_loop_that_ends(store: RedisIdempotencyStore, gate: _Gate) -> None:
    """Like a sync ``agent(...)`` whose caller gave up: ``asyncio.run`` ends (its loop closed) while the call runs."""

    async def give_up() -> None:
        call = asyncio.ensure_future(store.get("s#k"))
        entered = await asyncio.get_running_loop().run_in_executor(None, gate.entered.wait, WAIT)
        assert entered, "the call never reached the store"
        call.cancel()

    thread = threading.Thread(target=asyncio.run, args=(give_up(),))
    thread.start()
    thread.join(WAIT)
    assert not thread.is_alive()


def _check_a_call_outlives_its_loop(store: RedisIdempotencyStore, wait: float = WAIT) -> None:
    gate = _Gate(store)
    with gate.patch:
        _call_from_a_loop_that_ends(store, gate)
        gate.release.set()
        assert gate.finished.wait(WAIT)
    # The one worker handed the outcome to a closed loop: it must still serve the next call.
    assert asyncio.run(asyncio.wait_for(store.claim(_claim("s#next"), time.time()), wait)) is None


def test_a_call_whose_event_loop_closed_meanwhile_leaves_the_threads_serving(store: RedisIdempotencyStore) -> None:
    _check_a_call_outlives_its_loop(store)


@pytest.mark.xfail(strict=True, raises=(TimeoutError, asyncio.TimeoutError), reason="negative control")
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the broken worker dies
def test_negative_control_a_worker_that_hands_outcomes_to_closed_loops(store: RedisIdempotencyStore) -> None:
    with mock.patch.object(workers_module, "_work", _work_without_a_closed_loop_guard):
        _check_a_call_outlives_its_loop(store, NEVER)


def _check_close_waits(store: RedisIdempotencyStore) -> None:
    gate = _Gate(store)
    got: list[Any] = []
    joining, closed, either = threading.Event(), threading.Event(), threading.Event()
    real_join = threading.Thread.join

    def join(thread: threading.Thread, timeout: float | None = None) -> None:
        if threading.current_thread().name == "closer":
            joining.set()
            either.set()
        real_join(thread, timeout)

    def close() -> None:
        store.close()
        closed.set()
        either.set()

    async def call() -> None:
        got.append(await store.get("s#k"))

    with gate.patch, mock.patch.object(threading.Thread, "join", join):
        caller = threading.Thread(target=asyncio.run, args=(call(),))
        caller.start()
        try:
            assert gate.entered.wait(WAIT)
            closer = threading.Thread(target=close, name="closer")
            closer.start()
            assert either.wait(WAIT)
            # close is waiting for the worker, the call still held: it cannot have returned.
            assert joining.is_set() and not closed.is_set(), "close did not wait for the call in progress"
        finally:
            gate.release.set()
        closer.join(WAIT)
        caller.join(WAIT)
    assert closed.is_set() and got == [None]  # the call in progress finished, and its caller heard back
    with pytest.raises(IdempotencyStoreError, match="closed"):
        asyncio.run(store.get("s#k"))


def test_close_waits_for_the_calls_in_progress(store: RedisIdempotencyStore) -> None:
    _check_close_waits(store)


def _stop_without_waiting(work: queue.SimpleQueue[Any], threads: list[threading.Thread]) -> None:
    """Negative control: tells the threads to stop and returns at once."""
    for _ in threads:
        work.put(None)


@pytest.mark.xfail(strict=True, raises=AssertionError, reason="negative control")
def test_negative_control_a_close_that_does_not_wait(store: RedisIdempotencyStore) -> None:
    with mock.patch.object(workers_module, "_stop", _stop_without_waiting):
        # The finalizer was made with the real _stop: a new one, as a store made now would have.
        store._workers._finalizer.detach()
        store._workers._finalizer = workers_module.weakref.finalize(
            store._workers, _stop_without_waiting, store._workers._queue, store._workers._threads
        )
        _check_close_waits(store)


def _work_holding_its_last_call(work: queue.SimpleQueue[Any]) -> None:
    """Negative control: keeps its last call (and so the store) while it waits for the next."""
    while (item := work.get()) is not None:
        call, loop, future = item
        outcome = call(), None
        try:
            loop.call_soon_threadsafe(workers_module._deliver, future, outcome)
        except RuntimeError:
            pass


def _check_a_dropped_store_stops_its_threads(wait: float = WAIT) -> None:
    before = set(threading.enumerate())
    store = RedisIdempotencyStore(fakeredis.FakeRedis(server=fakeredis.FakeServer()), max_workers=2)
    assert asyncio.run(store.get("s#k")) is None
    mine = [t for t in set(threading.enumerate()) - before if t.name.startswith(THREADS)]
    assert len(mine) == 2
    collected = threading.Event()
    weakref.finalize(store, collected.set)
    del store
    gc.collect()
    # The last reference may be the worker's, dropped just after it handed the outcome back: then it goes there.
    assert collected.wait(wait), "something still holds the store"
    for thread in mine:
        thread.join(WAIT)
    assert not any(thread.is_alive() for thread in mine)


def test_a_store_never_closed_stops_its_threads_when_it_is_collected() -> None:
    _check_a_dropped_store_stops_its_threads()


@pytest.mark.xfail(strict=True, raises=AssertionError, reason="negative control")
def test_negative_control_a_worker_that_keeps_the_store_alive() -> None:
    with mock.patch.object(workers_module, "_work", _work_holding_its_last_call):
        _check_a_dropped_store_stops_its_threads(NEVER)


EXITS = """
import asyncio, fakeredis
import strands_py.idempotency._workers as workers
from strands_py.idempotency.redis import RedisIdempotencyStore
if {broken}:
    class Thread(workers.threading.Thread):
        def __init__(self, *args, daemon=None, **kwargs):
            super().__init__(*args, daemon=False, **kwargs)
    workers.threading.Thread = Thread
store = RedisIdempotencyStore(fakeredis.FakeRedis())
assert asyncio.run(store.get("s#k")) is None
print("called")
"""


def _exits(broken: bool) -> bool:
    # The broken variant never exits: it is caught by this timeout, the only way to see a hang.
    try:
        done = subprocess.run(
            [sys.executable, "-c", EXITS.format(broken=broken)],
            capture_output=True,
            text=True,
            timeout=NEVER * 5 if broken else WAIT * 3,
        )
    except subprocess.TimeoutExpired:
        return False
    assert done.stdout.strip() == "called", done.stderr
    return done.returncode == 0


def test_a_store_never_closed_does_not_hold_up_the_interpreters_exit() -> None:
    assert _exits(broken=False)


def test_negative_control_threads_that_hold_up_the_exit() -> None:
    assert not _exits(broken=True)
