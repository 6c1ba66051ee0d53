"""A store's own threads (``_workers.py``), through ``RedisIdempotencyStore`` (fakeredis): calls whose caller went
away or was cancelled before its call was taken, a ``BaseException`` raised by a call, every ``close`` waiting for the
calls in progress, threads that stop when a store is dropped or the interpreter exits, a call refused after that, and
a forked child served by threads of its own.

Each guarantee has a broken variant of the worker beside it, the negative control its test must catch.
"""

from __future__ import annotations

import asyncio
import gc
import os
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


class _Raising:
    """``hgetall`` raising ``error`` at its first call, then reading as usual; every call's Redis key recorded."""

    def __init__(self, store: RedisIdempotencyStore, error: BaseException | None = None) -> None:
        self.error = error
        self.keys: list[str] = []
        self._real = store._client.hgetall
        self.patch = mock.patch.object(store._client, "hgetall", self._call)

    def _call(self, key: str) -> Any:
        self.keys.append(key)
        error, self.error = self.error, None
        if error is not None:
            raise error
        return self._real(key)


@pytest.fixture
def store() -> Iterator[RedisIdempotencyStore]:
    with RedisIdempotencyStore(fakeredis.FakeRedis(server=fakeredis.FakeServer()), max_workers=1) as store:
        yield store


def _claim(key: str) -> IdempotencyRecord:
    return IdempotencyRecord(key, RecordState.IN_PROGRESS, "a", new_version(), 60.0, time.time() + 3600.0)


def _work_without_a_closed_loop_guard(work: queue.SimpleQueue[Any]) -> None:
    """Negative control: runs every call, hands every outcome back even to a loop that closed (and dies of it)."""
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


def _join_nothing(threads: list[threading.Thread]) -> None:
    """Negative control: the threads are told to stop, and nobody waits for them."""


@pytest.mark.xfail(strict=True, raises=AssertionError, reason="negative control")
def test_negative_control_a_close_that_does_not_wait(store: RedisIdempotencyStore) -> None:
    with mock.patch.object(workers_module, "_join", _join_nothing):
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


def _python(script: str, broken: bool) -> subprocess.CompletedProcess[str] | None:
    """``script`` run by a Python of its own; None if it never exits (a broken variant's hang is seen this way)."""
    try:
        return subprocess.run(
            [sys.executable, "-W", "ignore::DeprecationWarning", "-c", script.format(broken=broken)],
            capture_output=True,
            text=True,
            timeout=NEVER * 5 if broken else WAIT * 3,
        )
    except subprocess.TimeoutExpired:
        return None


def _exits(broken: bool) -> bool:
    done = _python(EXITS, broken)
    if done is None:
        return False
    assert done.stdout.strip() == "called", done.stderr
    return done.returncode == 0


def test_a_store_never_closed_does_not_hold_up_the_interpreters_exit() -> None:
    assert _exits(broken=False)


def test_negative_control_threads_that_hold_up_the_exit() -> None:
    assert not _exits(broken=True)


def _work_catching_exceptions_only(work: queue.SimpleQueue[Any]) -> None:
    """Negative control: a ``BaseException`` that is not an ``Exception`` ends the worker, its caller never told."""
    while (item := work.get()) is not None:
        call, loop, future = item
        try:
            outcome = call(), None
        except Exception as e:
            outcome = None, e
        loop.call_soon_threadsafe(workers_module._deliver, future, outcome)


def _check_a_base_exception_reaches_its_caller(store: RedisIdempotencyStore, error: type[BaseException]) -> None:
    raising = _Raising(store, error("raised by the call"))
    got: list[Any] = []

    def call() -> None:
        try:
            got.append(asyncio.run(asyncio.wait_for(store.get("s#k"), WAIT)))
        except BaseException as e:
            got.append(type(e))  # not the exception: its traceback would keep the failed task alive

    with raising.patch:
        caller = threading.Thread(target=call)
        caller.start()
        caller.join(WAIT * 2)
        # The task that raised it is garbage now, and asyncio logs its exception (formatting a traceback) when it is
        # collected: here, rather than inside some later parse of Python source (CPython 3.11 fails a parse that a
        # collection interrupts with another: "AST constructor recursion depth mismatch").
        gc.collect()
        assert got == [error]
        # The one worker lived on: the next call is answered.
        assert asyncio.run(asyncio.wait_for(store.get("s#k"), WAIT)) is None


@pytest.mark.parametrize("error", [KeyboardInterrupt, SystemExit])
def test_a_base_exception_raised_by_a_call_reaches_its_caller_and_the_worker_lives_on(
    store: RedisIdempotencyStore, error: type[BaseException]
) -> None:
    _check_a_base_exception_reaches_its_caller(store, error)


@pytest.mark.xfail(strict=True, raises=AssertionError, reason="negative control")
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the broken worker dies
def test_negative_control_a_worker_that_catches_exceptions_only(store: RedisIdempotencyStore) -> None:
    with mock.patch.object(workers_module, "_work", _work_catching_exceptions_only):
        _check_a_base_exception_reaches_its_caller(store, KeyboardInterrupt)


def _close_by_the_finalizer_only(self: workers_module.Workers) -> None:
    """Negative control: close waits through the finalizer, which runs once: a second close returns at once."""
    with self._lock:
        self._closed = True
    self._finalizer()


def _check_a_second_close_waits(store: RedisIdempotencyStore) -> None:
    gate = _Gate(store)
    first_joining, second_joining, second_closed, either = (threading.Event() for _ in range(4))
    real_join = threading.Thread.join

    def join(thread: threading.Thread, timeout: float | None = None) -> None:
        name = threading.current_thread().name
        if name == "first closer":
            first_joining.set()
        elif name == "second closer":
            second_joining.set()
            either.set()
        real_join(thread, timeout)

    def second_close() -> None:
        store.close()
        second_closed.set()
        either.set()

    with gate.patch, mock.patch.object(threading.Thread, "join", join):
        caller = threading.Thread(target=asyncio.run, args=(store.get("s#k"),))
        caller.start()
        closers = [threading.Thread(target=store.close, name="first closer")]
        try:
            assert gate.entered.wait(WAIT)
            closers[0].start()
            assert first_joining.wait(WAIT)
            closers.append(threading.Thread(target=second_close, name="second closer"))
            closers[1].start()  # a close of its own: a context manager's exit after an explicit close, say
            assert either.wait(WAIT)
            assert second_joining.is_set() and not second_closed.is_set(), "the second close did not wait"
        finally:
            gate.release.set()
        for thread in [*closers, caller]:
            thread.join(WAIT)
    assert second_closed.is_set()


def test_a_second_close_waits_too(store: RedisIdempotencyStore) -> None:
    _check_a_second_close_waits(store)


@pytest.mark.xfail(strict=True, raises=AssertionError, reason="negative control")
def test_negative_control_a_second_close_that_does_not_wait(store: RedisIdempotencyStore) -> None:
    with mock.patch.object(workers_module.Workers, "close", _close_by_the_finalizer_only):
        _check_a_second_close_waits(store)


def _check_a_call_cancelled_while_queued_is_not_run(store: RedisIdempotencyStore) -> None:
    gate = _Gate(store)
    raising = _Raising(store)

    async def cancel_a_queued_call() -> None:
        held = asyncio.ensure_future(store.get("s#held"))
        assert await asyncio.get_running_loop().run_in_executor(None, gate.entered.wait, WAIT)
        queued = asyncio.ensure_future(store.get("s#queued"))
        await asyncio.sleep(0)  # the queued call reaches the queue (behind the held one: one worker)
        queued.cancel()
        gate.release.set()
        assert await asyncio.wait_for(held, WAIT) is None
        assert await asyncio.wait_for(store.get("s#after"), WAIT) is None

    with gate.patch:
        # The gate holds the first call; the recorder below it sees every call that ran.
        with mock.patch.object(gate, "_real", raising._call):
            asyncio.run(cancel_a_queued_call())
    assert [key.split("{")[1].rstrip("}") for key in raising.keys] == ["s#held", "s#after"]


def test_a_call_cancelled_before_a_worker_took_it_is_not_run(store: RedisIdempotencyStore) -> None:
    _check_a_call_cancelled_while_queued_is_not_run(store)


@pytest.mark.xfail(strict=True, raises=AssertionError, reason="negative control")
def test_negative_control_a_worker_that_runs_cancelled_calls(store: RedisIdempotencyStore) -> None:
    with mock.patch.object(workers_module, "_work", _work_without_a_closed_loop_guard):
        _check_a_call_cancelled_while_queued_is_not_run(store)


AFTER_EXIT = """
import asyncio, atexit, fakeredis
import strands_py.idempotency._workers as workers
from strands_py.idempotency.redis import RedisIdempotencyStore

def late_call():  # an application's exit hook, registered before the store: it runs after weakref's
    try:
        asyncio.run(store.get("s#k"))
        print("answered")
    except Exception as e:
        print(type(e).__name__, e)

atexit.register(late_call)
if {broken}:
    workers.Workers._refuses = lambda self: self._closed
store = RedisIdempotencyStore(fakeredis.FakeRedis())
assert asyncio.run(store.get("s#k")) is None
"""


def _late_call(broken: bool) -> str | None:
    """What a store call made by an exit hook after weakref's says; None if the interpreter never exits."""
    done = _python(AFTER_EXIT, broken)
    return None if done is None else done.stdout.strip()


def test_a_call_after_the_threads_stopped_at_exit_is_refused_not_hung() -> None:
    assert _late_call(broken=False) == "IdempotencyStoreError the Redis idempotency store is closed"


def test_negative_control_a_call_queued_for_threads_stopped_at_exit_hangs_the_exit() -> None:
    assert _late_call(broken=True) is None


FORKS = """
import asyncio, os, fakeredis
import strands_py.idempotency._workers as workers
from strands_py.idempotency.redis import RedisIdempotencyStore

store = RedisIdempotencyStore(fakeredis.FakeRedis(), max_workers=1)
assert asyncio.run(store.get("s#k")) is None  # the parent's thread runs
if {broken}:
    workers._instances.clear()  # nobody starts the child afresh
pid = os.fork()
if pid == 0:
    try:
        asyncio.run(asyncio.wait_for(store.get("s#k"), {wait}))
        os._exit(0)
    except BaseException:
        os._exit(1)
_, status = os.waitpid(pid, 0)
print("child", os.waitstatus_to_exitcode(status))
"""


def _child_served(broken: bool) -> bool:
    done = _python(FORKS.replace("{wait}", str(NEVER if broken else WAIT)), broken)
    assert done is not None and done.stdout.strip() in ("child 0", "child 1"), done and done.stdout + done.stderr
    return done.stdout.strip() == "child 0"


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_store_used_before_a_fork_serves_the_child() -> None:
    assert _child_served(broken=False)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_negative_control_a_child_left_with_the_parents_threads() -> None:
    assert not _child_served(broken=True)
