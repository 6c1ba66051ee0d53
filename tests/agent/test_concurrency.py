"""Unit tests of the in-process primitives. Each guarantee is paired with a broken variant that must fail it."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from typing import Any
from unittest import mock

import pytest
from strands.types.agent import ConcurrentInvocationMode

from strands_py.agent._concurrency import _BeginResult, _ConcurrencyController, _InflightInvocation
from strands_py.types.exceptions import IdempotencyAbortedError, IdempotencyTokenError

WAIT = 5.0  # bound on every await: a regression fails fast instead of hanging


def _result(text: str = "ok") -> Any:
    return mock.Mock(name=f"AgentResult({text})")


# --- broken variants (negative controls) ------------------------------------------------------------------------


class _NoSettledCheck(_InflightInvocation):
    """Appends waiters even after settling: a waiter registered late is never woken."""

    def register_waiter(self) -> asyncio.Future[None]:
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        with self._mutex:
            self._waiters_by_loop.setdefault(loop, []).append(waiter)
        return waiter


class _SharedLoopFuture(_InflightInvocation):
    """All waiters of a loop await one shared future: cancelling one waiter cancels them all."""

    def register_waiter(self) -> asyncio.Future[None]:
        loop = asyncio.get_running_loop()
        with self._mutex:
            waiters = self._waiters_by_loop.setdefault(loop, [])
            if not waiters:
                waiters.append(loop.create_future())
            return waiters[0]


class _LastSettleWins(_InflightInvocation):
    """Overwrites the outcome on every settle."""

    def settle(self, result: Any, error: BaseException | None) -> bool:
        self._settled = False
        return super().settle(result, error)


class _CheckThenAct(_ConcurrencyController):
    """Reads the slot and writes it in two critical sections: concurrent begins all see an empty slot."""

    def __init__(self, between: Callable[[], None]) -> None:
        super().__init__()
        self._between = between

    def begin(self, idempotency_token: Any, **_: Any) -> Any:
        with self._mutex:
            inflight = self._inflight
        self._between()
        if inflight is not None:
            return _BeginResult(waiting_on=inflight, registered_token=None, lock_acquired=False)
        with self._mutex:
            self._busy = False  # the broken variant trusts its stale read
            return self._acquire_locked(idempotency_token, None, None)


def _in_thread_loop(coro_fn: Callable[[], Any]) -> tuple[threading.Thread, list[Any]]:
    out: list[Any] = []

    def run() -> None:
        try:
            out.append(asyncio.run(coro_fn()))
        except BaseException as e:  # noqa: BLE001 - reported to the test thread
            out.append(e)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


# --- _InflightInvocation ----------------------------------------------------------------------------------------


@pytest.mark.racing
def test_cross_thread_settle_wakes_waiters_on_every_loop() -> None:
    inflight = _InflightInvocation()
    registered = threading.Barrier(4)
    result = _result()

    async def wait_on_own_loop() -> Any:
        waiters = [inflight.register_waiter() for _ in range(5)]
        registered.wait(WAIT)
        await asyncio.wait_for(asyncio.gather(*waiters), WAIT)
        return inflight.outcome()

    threads = [_in_thread_loop(wait_on_own_loop) for _ in range(3)]
    registered.wait(WAIT)
    assert inflight.waiter_count == 15
    # one hop per loop, not per waiter
    hops: list[Any] = []
    original = asyncio.BaseEventLoop.call_soon_threadsafe

    def counting(loop: asyncio.BaseEventLoop, callback: Any, *args: Any, **kwargs: Any) -> Any:
        hops.append(loop)
        return original(loop, callback, *args, **kwargs)

    with mock.patch.object(asyncio.BaseEventLoop, "call_soon_threadsafe", counting):
        assert inflight.settle(result, None) is True
    for thread, out in threads:
        thread.join(WAIT)
        assert out == [result]
    assert len(hops) == 3 and len(set(hops)) == 3


@pytest.mark.parametrize(
    "impl",
    [
        _InflightInvocation,
        pytest.param(_NoSettledCheck, marks=pytest.mark.xfail(raises=asyncio.TimeoutError, strict=True)),
    ],
)
async def test_register_after_settle_resolves_at_once(impl: type[_InflightInvocation]) -> None:
    inflight = impl()
    inflight.settle(_result(), None)
    await asyncio.wait_for(inflight.register_waiter(), 0.5)
    assert inflight.outcome() is inflight.result


@pytest.mark.parametrize(
    "impl",
    [
        _InflightInvocation,
        pytest.param(_SharedLoopFuture, marks=pytest.mark.xfail(raises=asyncio.CancelledError, strict=True)),
    ],
)
async def test_cancelling_one_waiter_leaves_the_others(impl: type[_InflightInvocation]) -> None:
    inflight = impl()

    async def duplicate() -> Any:
        await inflight.register_waiter()
        return inflight.outcome()

    tasks = [asyncio.create_task(duplicate()) for _ in range(3)]
    await asyncio.sleep(0)  # let the three register
    tasks[0].cancel()
    await asyncio.wait([tasks[0]], timeout=WAIT)
    result = _result()
    inflight.settle(result, None)
    assert await asyncio.wait_for(asyncio.gather(tasks[1], tasks[2]), WAIT) == [result, result]
    assert tasks[0].cancelled()


@pytest.mark.parametrize(
    "impl",
    [_InflightInvocation, pytest.param(_LastSettleWins, marks=pytest.mark.xfail(raises=AssertionError, strict=True))],
)
async def test_first_settle_wins(impl: type[_InflightInvocation]) -> None:
    inflight = impl()
    first = _result("first")
    assert inflight.settle(first, None) is True
    inflight.settle(None, ValueError("late"))
    inflight.settle(_result("late"), None)
    await asyncio.wait_for(inflight.register_waiter(), WAIT)
    assert inflight.outcome() is first


async def test_settle_with_neither_aborts_waiters() -> None:
    inflight = _InflightInvocation()
    waiter = inflight.register_waiter()
    inflight.settle(None, None)
    await asyncio.wait_for(waiter, WAIT)
    with pytest.raises(IdempotencyAbortedError):
        inflight.outcome()


async def test_error_outranks_result_and_keeps_the_primarys_traceback() -> None:
    def fail() -> None:
        raise ValueError("boom")

    try:
        fail()
    except ValueError as e:
        error = e
    depth = _tb_depth(error.__traceback__)
    inflight = _InflightInvocation()
    inflight.settle(_result(), error)
    assert inflight.result is None
    for _ in range(50):
        with pytest.raises(ValueError) as raised:
            inflight.outcome()
        assert raised.value is error
    # Re-raising the same object 50 times must not grow its traceback with every duplicate's frames.
    assert _tb_depth(error.__traceback__) <= depth + 2


def _tb_depth(tb: Any) -> int:
    depth = 0
    while tb is not None:
        depth, tb = depth + 1, tb.tb_next
    return depth


def test_outcome_before_settle_is_a_clear_error() -> None:
    with pytest.raises(RuntimeError, match="before the invocation settled"):
        _InflightInvocation().outcome()


def test_waiter_loop_closed_before_settle_is_silent(caplog: pytest.LogCaptureFixture) -> None:
    inflight = _InflightInvocation()
    loop = asyncio.new_event_loop()

    async def register() -> None:
        inflight.register_waiter()

    loop.run_until_complete(register())
    loop.close()
    with caplog.at_level(logging.INFO):
        assert inflight.settle(_result(), None) is True
    assert caplog.records == []


# --- _ConcurrencyController -------------------------------------------------------------------------------------


@pytest.mark.racing
@pytest.mark.parametrize("broken", [False, pytest.param(True, marks=pytest.mark.xfail(strict=True))])
def test_sixteen_threads_one_token_exactly_one_primary(broken: bool) -> None:
    start = threading.Barrier(16)
    between = threading.Barrier(16)
    controller = _CheckThenAct(lambda: between.wait(WAIT)) if broken else _ConcurrencyController()
    outcomes: list[Any] = []
    mutex = threading.Lock()

    def call() -> None:
        start.wait(WAIT)
        begin = controller.begin("req-1")
        with mutex:
            outcomes.append(begin)

    threads = [threading.Thread(target=call) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT)
    primaries = [b for b in outcomes if b.registered_token is not None]
    duplicates = [b for b in outcomes if b.waiting_on is not None]
    assert len(outcomes) == 16
    assert len(primaries) == 1
    assert len(duplicates) == 15
    assert all(d.waiting_on is controller.inflight for d in duplicates)


def test_complete_forgets_token_and_frees_lock_in_one_step() -> None:
    controller = _ConcurrencyController()
    begin = controller.begin("t")
    assert begin.lock_acquired and begin.registered_token == "t"
    inflight = controller.inflight
    assert inflight is not None
    assert controller.begin("other").lock_acquired is False
    assert controller.begin(None).lock_acquired is False
    controller.release_lock()  # a stray release cannot free an invocation registered under a token
    assert controller.begin(None).lock_acquired is False
    controller.complete("t", result=_result())
    assert inflight.settled and controller.inflight is None
    again = controller.begin("t")
    assert again.registered_token == "t" and again.waiting_on is None


def test_complete_is_a_no_op_for_none_and_foreign_tokens() -> None:
    controller = _ConcurrencyController()
    token = "".join(["to", "ken"])
    controller.begin(token)
    controller.complete(None)
    controller.complete("t2")
    controller.complete("".join(["tok", "en"]))  # equal but not the registered object: identity is required
    assert controller.inflight is not None and not controller.inflight.settled


def test_complete_with_neither_aborts_duplicates() -> None:
    controller = _ConcurrencyController()
    controller.begin("t")
    dup = controller.begin("t")
    assert dup.waiting_on is not None
    controller.complete("t")
    with pytest.raises(IdempotencyAbortedError):
        dup.waiting_on.outcome()


def test_publish_wakes_duplicates_but_keeps_the_slot() -> None:
    controller = _ConcurrencyController()
    token = "t"
    controller.begin(token)
    inflight = controller.inflight
    assert inflight is not None
    result = _result()
    controller.publish(token, result)
    assert inflight.settled and inflight.outcome() is result
    late = controller.begin("t")
    assert late.waiting_on is inflight  # a retry arriving now joins and gets the result at once
    controller.publish("other", _result())  # foreign token: ignored
    controller.complete(token, error=ValueError("after the result"))
    assert inflight.outcome() is result


def test_tokenless_lock_and_try_acquire() -> None:
    controller = _ConcurrencyController()
    assert controller.begin(None).lock_acquired
    assert controller.try_acquire_lock() is False
    controller.release_lock()
    assert controller.try_acquire_lock() is True
    assert controller.begin("t").lock_acquired is False
    controller.release_lock()
    controller.release_lock()  # safe to call unconditionally
    assert controller.begin("t").lock_acquired


def test_unsafe_reentrant_ignores_tokens() -> None:
    controller = _ConcurrencyController(ConcurrentInvocationMode.UNSAFE_REENTRANT)
    assert controller.mode is ConcurrentInvocationMode.UNSAFE_REENTRANT
    for token in ("t", "t", None):
        begin = controller.begin(token)
        assert begin.waiting_on is None and begin.registered_token is None and begin.lock_acquired
    assert controller.inflight is None


def test_mode_accepts_its_string_value_and_rejects_others() -> None:
    assert _ConcurrencyController("throw").mode is ConcurrentInvocationMode.THROW
    with pytest.raises(ValueError):
        _ConcurrencyController("sometimes")


class _RaisingEq:
    def __eq__(self, other: object) -> bool:
        raise RuntimeError("cannot compare")

    __hash__ = object.__hash__


class _NoTruthValue:
    def __eq__(self, other: object) -> Any:
        return self

    def __bool__(self) -> bool:
        raise ValueError("ambiguous")

    __hash__ = object.__hash__


@pytest.mark.parametrize("bad", [_RaisingEq(), _NoTruthValue()])
def test_token_whose_comparison_fails_errors_for_that_call_only(bad: Any) -> None:
    controller = _ConcurrencyController()
    controller.begin("good")
    inflight = controller.inflight
    with pytest.raises(IdempotencyTokenError) as raised:
        controller.begin(bad)
    assert raised.value.__cause__ is not None
    assert controller.inflight is inflight and not inflight.settled  # type: ignore[union-attr]
    assert controller.begin("good").waiting_on is inflight


def test_a_raising_token_runs_as_primary_and_matches_itself() -> None:
    controller = _ConcurrencyController()
    bad = _RaisingEq()
    assert controller.begin(bad).registered_token is bad
    assert controller.begin(bad).waiting_on is controller.inflight
    with pytest.raises(IdempotencyTokenError):
        controller.begin(_RaisingEq())


def test_unhashable_tokens_match_by_equality() -> None:
    controller = _ConcurrencyController()
    controller.begin({"request": [1, 2]})
    assert controller.begin({"request": [1, 2]}).waiting_on is controller.inflight
    assert controller.begin({"request": [1, 3]}).lock_acquired is False


def test_begin_decides_again_when_the_inflight_changes_during_comparison() -> None:
    controller = _ConcurrencyController()
    controller.begin("a")

    class EndsPrimaryWhileComparing:
        def __eq__(self, other: object) -> bool:
            controller.complete("a", result=_result())
            return False

    token = EndsPrimaryWhileComparing()
    begin = controller.begin(token)
    assert begin.registered_token is token and begin.lock_acquired
