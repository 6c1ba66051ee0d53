"""A stateful model of the controller and the in-flight invocation, driven by Hypothesis across threads and loops.

Every rule runs against the real primitives: ``begin`` for primaries and duplicates, ``complete`` with a result,
an error or neither, waiters registered on three event loops in three threads, cancellation of single waiters.
Invariants: at most one primary at a time; the slot is free once the primary completed; every waiter resolves
exactly once, with the primary's outcome or cancelled; settled invocations keep no waiter.

CI runs the ``ci`` profile (fixed seed, 2000 examples); ``hatch run fuzz`` runs the long ``fuzz`` profile.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import threading
from dataclasses import dataclass
from typing import Any
from unittest import mock

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule, run_state_machine_as_test

from strands_py.agent._concurrency import _ConcurrencyController, _InflightInvocation
from strands_py.types.exceptions import IdempotencyAbortedError

WAIT = 5.0

settings.register_profile(
    "ci",
    max_examples=2000,
    stateful_step_count=12,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
# `hatch run stress` repeats this machine 200 times under CPU load: 100 random examples each, 20,000 in all.
settings.register_profile(
    "stress", max_examples=100, stateful_step_count=12, deadline=None, suppress_health_check=list(HealthCheck)
)
settings.register_profile(
    "fuzz", max_examples=100_000, stateful_step_count=40, deadline=None, suppress_health_check=list(HealthCheck)
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


class _LoopThread:
    """An event loop running forever in its own thread, shared by every example."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(WAIT)
        self.loop.close()


LOOPS: list[_LoopThread] = []


def setup_module() -> None:
    LOOPS.extend(_LoopThread() for _ in range(3))


def teardown_module() -> None:
    for loop in LOOPS:
        loop.stop()
    LOOPS.clear()


@dataclass
class _Waiter:
    future: concurrent.futures.Future[Any]
    inflight: _InflightInvocation
    resolutions: list[Any]
    cancelled: bool = False


async def _wait(inflight: _InflightInvocation, registered: threading.Event, resolutions: list[Any]) -> Any:
    waiter = inflight.register_waiter()
    registered.set()
    try:
        await waiter
        outcome: Any = inflight.outcome()
    except BaseException as e:
        outcome = e
        resolutions.append(outcome)
        raise
    resolutions.append(outcome)
    return outcome


class ControllerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.controller = _ConcurrencyController()
        self.primary: tuple[Any, Any] | None = None  # (token or None, registered token)
        self.waiters: list[_Waiter] = []
        self.settled: list[tuple[_InflightInvocation, Any]] = []  # (invocation, expected outcome)

    @rule(token=st.sampled_from(["a", "b", None]), loop=st.integers(0, 2))
    def begin(self, token: Any, loop: int) -> None:
        inflight_before = self.controller.inflight
        begin = self.controller.begin(token)
        if self.primary is None:
            assert begin.waiting_on is None and begin.lock_acquired
            assert begin.registered_token == token
            self.primary = (token, begin.registered_token)
            return
        primary_token = self.primary[0]
        if token is not None and token == primary_token:
            assert begin.waiting_on is inflight_before is not None and not begin.lock_acquired
            registered, resolutions = threading.Event(), []
            future = asyncio.run_coroutine_threadsafe(
                _wait(begin.waiting_on, registered, resolutions), LOOPS[loop].loop
            )
            assert registered.wait(WAIT)
            self.waiters.append(_Waiter(future, begin.waiting_on, resolutions))
        else:
            assert begin.waiting_on is None and not begin.lock_acquired and begin.registered_token is None

    @precondition(lambda self: self.primary is not None)
    @rule(kind=st.sampled_from(["result", "error", "neither"]))
    def complete(self, kind: str) -> None:
        assert self.primary is not None
        token, registered = self.primary
        inflight = self.controller.inflight
        result = mock.sentinel.result if kind == "result" else None
        error = RuntimeError("primary failed") if kind == "error" else None
        if registered is None:
            self.controller.release_lock()
        else:
            assert inflight is not None
            self.controller.complete(registered, result=result, error=error)
            self.settled.append((inflight, result if kind == "result" else error or IdempotencyAbortedError))
        self.primary = None

    # Preconditions read the model only (never thread timing), so that Hypothesis can replay an example.
    @precondition(lambda self: any(not w.cancelled and not w.inflight.settled for w in self.waiters))
    @rule(pick=st.integers(0, 1000))
    def cancel_one_waiter(self, pick: int) -> None:
        pending = [w for w in self.waiters if not w.cancelled and not w.inflight.settled]
        waiter = pending[pick % len(pending)]
        waiter.cancelled = waiter.future.cancel()
        assert waiter.cancelled  # its invocation has not settled, so the waiter cannot have resolved

    @invariant()
    def at_most_one_primary_and_slot_matches(self) -> None:
        if self.primary is None:
            assert self.controller.inflight is None
            assert self.controller.try_acquire_lock()
            self.controller.release_lock()
        else:
            assert (self.controller.inflight is not None) == (self.primary[1] is not None)

    @invariant()
    def settled_invocations_hold_no_waiters(self) -> None:
        for inflight, _ in self.settled:
            assert inflight.settled and not inflight._waiters_by_loop

    def teardown(self) -> None:
        if self.primary is not None:
            self.complete("neither")
        expected = {id(inflight): outcome for inflight, outcome in self.settled}
        for waiter in self.waiters:
            try:
                outcome = waiter.future.result(WAIT)
            except (concurrent.futures.CancelledError, asyncio.CancelledError):
                assert waiter.cancelled
                continue
            except BaseException as e:
                outcome = e
            want = expected[id(waiter.inflight)]
            # exactly once, and the primary's own outcome
            assert len(waiter.resolutions) == 1
            if isinstance(want, type):
                assert isinstance(outcome, want)
            else:
                assert outcome is want


@pytest.mark.racing
def test_controller_state_machine() -> None:
    run_state_machine_as_test(ControllerMachine)


class _LeakyController(_ConcurrencyController):
    """Broken variant: settles the waiters but never frees the slot's lock."""

    def complete(self, registered_token: Any, *, result: Any = None, error: BaseException | None = None) -> None:
        inflight = self._inflight
        super().complete(registered_token, result=result, error=error)
        if inflight is not None:
            self._busy = True


class LeakyControllerMachine(ControllerMachine):
    def __init__(self) -> None:
        super().__init__()
        self.controller = _LeakyController()


def test_negative_control_machine_catches_a_leaked_lock() -> None:
    run = LeakyControllerMachine.TestCase("runTest")
    run.settings = settings(max_examples=200, stateful_step_count=12, derandomize=True, deadline=None)
    try:
        run.runTest()
    except AssertionError:
        return
    raise AssertionError("the state machine did not notice a controller that never frees its lock")
