"""Soak: 100k invocations from 8 threads (each its own event loop and agent), exactly half of them duplicates.

In every round a thread calls its agent twice at once with a fresh token: one call runs the agent, the other joins
it as a duplicate (every other round through ``stream_async``, reading the buffered events). Checked at the end:
every registry is empty and every agent free, not one ``_InflightInvocation`` is still alive, no thread was left
behind, and the memory that strands-py's library code allocated and still holds is below a stated bound.

Memory is traced (tracemalloc, filtered to strands_py's files, the demo stub excluded) over the last
``TRACED`` invocations only: tracing makes every allocation about 4x slower, and a leak per invocation shows in
any window. The bound: 16 KiB held after 8,000 traced invocations, i.e. 2 bytes per invocation, where leaking any
one object per invocation (an in-flight record, a waiter future, a buffered event) would cost 50 bytes or more.
strands-agents itself keeps per-invocation metrics (``EventLoopMetrics.agent_invocations``) and our stub's
responses in the conversation window, so the total traced growth is reported, not bounded.
"""

import asyncio
import gc
import os
import threading
import time
import tracemalloc
from typing import Any

import pytest

from strands_py import Agent
from strands_py.agent._concurrency import _InflightInvocation
from strands_py.testing.bedrock import ScriptedBedrock

pytestmark = pytest.mark.soak

INVOCATIONS = int(os.environ.get("STRANDS_PY_SOAK_INVOCATIONS", "100000"))
TRACED = min(8_000, INVOCATIONS // 2)
THREADS = 8
STRANDS_PY_BOUND_BYTES = 16 * 1024


def _strands_py_bytes(snapshot: tracemalloc.Snapshot) -> int:
    ours = snapshot.filter_traces(
        [
            tracemalloc.Filter(True, f"*{os.sep}strands_py{os.sep}*"),
            tracemalloc.Filter(False, f"*{os.sep}strands_py{os.sep}_demo{os.sep}*"),
            # The scripted model's responses (a test double that ships in the package) are not the library's.
            tracemalloc.Filter(False, f"*{os.sep}strands_py{os.sep}testing{os.sep}*"),
        ]
    )
    return sum(stat.size for stat in ours.statistics("filename"))


def _run_phase(agents: list[Agent], rounds: int, first_round: int) -> list[tuple[int, int]]:
    """Every thread runs ``rounds`` rounds against its own agent on its own event loop."""
    outcomes: list[tuple[int, int]] = []
    mutex = threading.Lock()

    def worker(index: int) -> None:
        agent = agents[index]

        async def streamed(token: str) -> Any:
            events = [event async for event in agent.stream_async("hi", idempotency_token=token)]
            return events[-1]["result"]

        async def run() -> tuple[int, int]:
            same, errors = 0, 0
            for r in range(first_round, first_round + rounds):
                token = f"{index}-{r}"
                duplicate = streamed(token) if r % 2 else agent.invoke_async("hi", idempotency_token=token)
                pair = await asyncio.gather(
                    agent.invoke_async("hi", idempotency_token=token), duplicate, return_exceptions=True
                )
                errors += sum(isinstance(p, BaseException) for p in pair)
                same += 2 * (pair[0] is pair[1])
            return same, errors

        outcome = asyncio.run(run())
        with mutex:
            outcomes.append(outcome)

    workers = [threading.Thread(target=worker, args=(i,), name=f"soak-{i}") for i in range(len(agents))]
    for w in workers:
        w.start()
    for w in workers:
        w.join(900)
    return outcomes


def test_soak_no_leaks_no_thread_growth() -> None:
    traced_rounds = TRACED // THREADS // 2
    untraced_rounds = INVOCATIONS // THREADS // 2 - traced_rounds
    scripts = [ScriptedBedrock(with_tool=False) for _ in range(THREADS)]
    agents = [Agent(model=s.model(), callback_handler=None) for s in scripts]

    gc.collect()
    threads_before = threading.active_count()
    started = time.perf_counter()
    outcomes = _run_phase(agents, untraced_rounds, 0)
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    outcomes += _run_phase(agents, traced_rounds, untraced_rounds)
    gc.collect()
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    seconds = time.perf_counter() - started

    total_calls = (untraced_rounds + traced_rounds) * THREADS * 2
    primaries = sum(s.model_calls for s in scripts)
    duplicates = total_calls - primaries
    assert sum(e for _, e in outcomes) == 0
    assert sum(ok for ok, _ in outcomes) == total_calls  # every duplicate got its primary's very result
    assert primaries == duplicates == total_calls // 2
    for agent in agents:
        assert agent._idempotency_gate.inflight is None
        assert agent._idempotency_gate.try_acquire_lock()
        agent._idempotency_gate.release_lock()
    alive = [o for o in gc.get_objects() if isinstance(o, _InflightInvocation)]
    assert alive == []
    threads_after = threading.active_count()
    assert threads_after == threads_before
    ours = _strands_py_bytes(after) - _strands_py_bytes(before)
    total = sum(s.size for s in after.statistics("filename")) - sum(s.size for s in before.statistics("filename"))
    print(
        f"soak: {total_calls} invocations ({duplicates} duplicates, {primaries} primaries) from {THREADS} threads "
        f"in {seconds:.1f}s; threads before/after {threads_before}/{threads_after}; live in-flight records "
        f"{len(alive)}; over the last {traced_rounds * THREADS * 2} invocations strands_py code holds {ours} B "
        f"more (bound {STRANDS_PY_BOUND_BYTES} B), all traced memory {total / 1024:.0f} KiB more"
    )
    assert ours < STRANDS_PY_BOUND_BYTES
