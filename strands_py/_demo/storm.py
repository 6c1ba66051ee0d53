"""A retry storm against one agent: one primary in flight, N duplicates of its token, a capped default executor.

Shared by ``python -m strands_py demo``, the integration tests and the benchmarks, so all three measure the same
thing. ``BlockingWaiterAgent`` is the old design (each duplicate parks an executor thread in ``event.wait``), kept
as the negative control: under a storm it must hang, which is how we know the storm detects the bug.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import strands

from ..agent._concurrency import _InflightInvocation
from ..agent.agent import Agent
from ..testing.bedrock import ScriptedBedrock

STORM_TOKEN = "retry-storm-req-42"
STORM_PROMPT = "What is the weather in Paris?"


class BlockingWaiterAgent(Agent):
    """Negative control: the old waiter, ``await asyncio.to_thread(event.wait)``. Deadlocks under a storm.

    Every duplicate occupies a default-executor worker until the primary settles; once the workers are all taken
    the primary's own ``asyncio.to_thread`` model call queues behind them and never runs. ``release_blocked()``
    frees the parked threads so that a hung storm can be torn down.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        """Create the control agent; same arguments as ``Agent``."""
        super().__init__(*args, **kwargs)
        self._blocked: list[threading.Event] = []
        self._blocked_mutex = threading.Lock()

    async def _wait_for_primary(self, inflight: _InflightInvocation) -> None:
        settled = threading.Event()
        with self._blocked_mutex:
            self._blocked.append(settled)
        inflight.register_waiter().add_done_callback(lambda _: settled.set())
        await asyncio.to_thread(settled.wait)

    def release_blocked(self) -> None:
        """Unpark every thread still blocked in a waiter (teardown of a hung storm)."""
        with self._blocked_mutex:
            for settled in self._blocked:
                settled.set()


class _CountingExecutor(ThreadPoolExecutor):
    """A default executor that knows how many of its workers are busy right now."""

    def __init__(self, max_workers: int) -> None:
        super().__init__(max_workers=max_workers, thread_name_prefix="storm-executor")
        self.busy = 0
        self._busy_mutex = threading.Lock()

    def queued(self) -> int:
        """Work items submitted but not yet picked up by a worker."""
        return self._work_queue.qsize()

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        def counted() -> Any:
            with self._busy_mutex:
                self.busy += 1
            try:
                return fn(*args, **kwargs)
            finally:
                with self._busy_mutex:
                    self.busy -= 1

        return super().submit(counted)


@dataclass
class StormReport:
    """What one storm measured."""

    impl: str
    duplicates: int
    completed: bool
    seconds: float
    model_calls: int
    tool_calls: int
    threads_parked: int
    thread_growth: int
    equal_results: int
    errors: int


async def _until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """Yield to the loop until ``predicate()`` holds; a condition wait with a deadline, not a timed sleep."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        await asyncio.sleep(0.001)


def _waiting_duplicates(agent: strands.Agent) -> int:
    """How many duplicates are waiting on the agent's in-flight invocation."""
    gate = getattr(agent, "_idempotency_gate", None)
    if gate is not None:
        inflight = gate.inflight
        return 0 if inflight is None else int(inflight.waiter_count)
    # Upstream strands.Agent (>= 1.45, the benchmarks' reference): each waiting duplicate hangs one done-callback
    # (asyncio.wrap_future) on the invocation's shared concurrent.futures.Future.
    upstream_inflight = getattr(getattr(agent, "_concurrency", None), "_inflight", None)
    done = getattr(upstream_inflight, "_done", None)
    return len(getattr(done, "_done_callbacks", ()))


def _impl_name(agent: strands.Agent) -> str:
    if isinstance(agent, BlockingWaiterAgent):
        return "blocking-waiter"
    return "strands-py" if isinstance(agent, Agent) else "strands"


async def _storm(
    agent_cls: type[strands.Agent],
    duplicates: int,
    executor: _CountingExecutor,
    workers: int,
    timeout: float,
    progress: Callable[[str], None],
) -> StormReport:
    gate = threading.Event()
    script = ScriptedBedrock(gate=gate)
    agent = agent_cls(model=script.model(), tools=script.tools(), callback_handler=None)

    tasks = [asyncio.create_task(agent.invoke_async(STORM_PROMPT, idempotency_token=STORM_TOKEN))]
    try:
        await _until(script.entered.is_set, timeout, "the primary's first model call")
        # Counted once the primary holds its worker: from here on, no thread should appear.
        threads_at_start = threading.active_count()
        tasks += [
            asyncio.create_task(agent.invoke_async(STORM_PROMPT, idempotency_token=STORM_TOKEN))
            for _ in range(duplicates)
        ]
        await _until(lambda: _waiting_duplicates(agent) >= duplicates, timeout, "every duplicate to be waiting")
        # Let every submitted work item reach a worker, then count: the primary is held at the gate, so nothing
        # but its one model call should occupy a worker. Whatever else does is a duplicate parked on a wait.
        await _until(lambda: executor.queued() == 0 or executor.busy == workers, timeout, "the executor to settle")
        parked = executor.busy - script.calls_in_progress
        growth = threading.active_count() - threads_at_start
        progress(f"{duplicates} duplicates waiting, {parked} threads parked; releasing the primary's model call")
        started = time.perf_counter()
        gate.set()
        _, pending = await asyncio.wait(tasks, timeout=timeout)
        seconds = time.perf_counter() - started
        completed = not pending
        model_calls, tool_calls = script.model_calls, script.tool_calls
        if not completed:
            # Deadlocked: nothing moves any more, so this count is stable.
            parked = max(parked, executor.busy - script.calls_in_progress)
            growth = max(growth, threading.active_count() - threads_at_start)
            progress(f"hung: {len(pending)} of {len(tasks)} calls still waiting after {timeout:.1f}s; tearing down")
        else:
            progress(f"all {len(tasks)} calls finished in {seconds:.3f}s")
    finally:
        gate.set()
        if isinstance(agent, BlockingWaiterAgent):
            agent.release_blocked()
    outcomes = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), timeout)
    texts = [str(r) for r in outcomes if not isinstance(r, BaseException)]
    return StormReport(
        impl=_impl_name(agent),
        duplicates=duplicates,
        completed=completed,
        seconds=seconds,
        model_calls=model_calls,
        tool_calls=tool_calls,
        threads_parked=max(parked, 0),
        thread_growth=max(growth, 0),
        equal_results=texts.count(script.answer + "\n"),
        errors=len(outcomes) - len(texts),
    )


def run_storm(
    agent_cls: type[strands.Agent],
    duplicates: int,
    *,
    workers: int = 4,
    timeout: float = 5.0,
    progress: Callable[[str], None] | None = None,
) -> StormReport:
    """Run one storm on a fresh event loop, in its own thread, with the default executor capped at ``workers``.

    Args:
        agent_cls: ``Agent``, ``BlockingWaiterAgent``, or upstream ``strands.Agent`` (>= 1.45) as the reference.
        duplicates: How many duplicates of the primary's token to launch while it is in flight.
        workers: ``max_workers`` of the loop's default executor.
        timeout: How long the storm may take after the primary is released before it counts as hung.
        progress: Called with a line of progress now and then.

    Returns:
        The storm's measurements.
    """
    report: list[StormReport] = []
    failure: list[BaseException] = []

    def run() -> None:
        loop = asyncio.new_event_loop()
        executor = _CountingExecutor(workers)
        loop.set_default_executor(executor)
        try:
            report.append(
                loop.run_until_complete(_storm(agent_cls, duplicates, executor, workers, timeout, progress or _quiet))
            )
        except BaseException as e:
            failure.append(e)
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            executor.shutdown(wait=True)
            loop.close()

    thread = threading.Thread(target=run, name=f"storm-{agent_cls.__name__}", daemon=True)
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return report[0]


def _quiet(_: str) -> None:
    return None
