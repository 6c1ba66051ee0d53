"""strands-py benchmarks, side by side with upstream strands-agents or the peer (Powertools) in the same run.

Run with ``hatch run bench`` (full) or ``hatch run bench --quick``. Every figure is the median of 5 repetitions and
is reported as a ratio to the reference measured in the same run. Writes ``benchmarks/results/latest.json`` and
``benchmarks/results/fanout.png``, and prints markdown tables. Scenarios 1-4 run in this process; the durable layer
(``durable.py``), heartbeats (``heartbeat.py``), the HTTP retry storm (``storm.py``) and the serving comparison
(``serving.py``, 3 repetitions, into ``benchmarks/results/serving.json``; ``--profile`` profiles ``AgentApp``'s
serving too) talk to real servers on 127.0.0.1, each in a process of its own (``servers.py``): moto server,
redis-server, uvicorn.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import platform
import statistics
import sys
import threading
import time
import tracemalloc
from collections.abc import Awaitable, Callable
from concurrent.futures import Future as ThreadFuture
from concurrent.futures import wait as wait_thread_futures
from pathlib import Path
from typing import Any

import durable
import heartbeat
import journal
import serving
import storm
import strands
from strands.agent import _concurrency as upstream_concurrency

from strands_py import Agent
from strands_py._demo.storm import BlockingWaiterAgent, run_storm
from strands_py.agent._concurrency import _InflightInvocation
from strands_py.testing.bedrock import ScriptedBedrock

REPS = 5
# Heartbeats: a short lease, so a few seconds hold many renewals (scaled to the default lease in the results).
HEARTBEAT_LEASE_SECONDS = 0.9
# HTTP storm: each model call waits this long (two per run), so the run outlasts the storm's arrivals.
STORM_MODEL_LATENCY_SECONDS = 0.25
RESULTS = Path(__file__).parent / "results"
FIELDS = (
    "scenario",
    "n",
    "impl",
    "seconds",
    "us_per_waiter",
    "bytes_per_waiter",
    "threads_parked",
    "model_calls",
    "completed",
    "ratio",
    "reference",
    "store_calls",
    "client_cpu_ms",
    "server_ms",
    "lease_seconds",
    "writes_per_minute",
    "writes_per_minute_default_lease",
    "model_runs",
    "p50_ms",
    "p99_ms",
    "server_cpu_ms",
    "peak_rss_mb",
    "rss_growth_mb",
    "note",
)


def record(scenario: str, n: int, impl: str, **fields: Any) -> dict[str, Any]:
    row: dict[str, Any] = dict.fromkeys(FIELDS)
    row.update(scenario=scenario, n=n, impl=impl, **fields)
    return row


def median(values: list[float]) -> float:
    return statistics.median(values)


# --- 1 + 2: waiter fan-out on the bare primitive ---------------------------------------------------------------


class _Primitive:
    """One way of making N waiters wait for one outcome: register per waiter, settle once."""

    name: str

    def __init__(self) -> None:
        raise NotImplementedError

    def register(self) -> Awaitable[Any]:
        raise NotImplementedError

    def settle(self) -> None:
        raise NotImplementedError


class _Ours(_Primitive):
    name = "strands-py"
    inflight_cls: Any = _InflightInvocation

    def __init__(self) -> None:
        self._inflight = self.inflight_cls()

    def register(self) -> Awaitable[Any]:
        return self._inflight.register_waiter()

    def settle(self) -> None:
        self._inflight.settle(_RESULT, None)


class _Upstream(_Ours):
    """The same calls on upstream's primitive (``register_waiter`` / ``settle`` have the same shape)."""

    name = "strands"
    inflight_cls = upstream_concurrency._InflightInvocation


class _AsyncioLimit(_Primitive):
    """The practical limit: one loop-local asyncio.Future per loop, each waiter awaiting it through shield()."""

    name = "asyncio-limit"

    def __init__(self) -> None:
        self._by_loop: dict[asyncio.AbstractEventLoop, asyncio.Future[None]] = {}
        self._mutex = threading.Lock()

    def register(self) -> Awaitable[Any]:
        loop = asyncio.get_running_loop()
        with self._mutex:
            future = self._by_loop.get(loop)
            if future is None:
                future = self._by_loop[loop] = loop.create_future()
        return asyncio.shield(future)

    def settle(self) -> None:
        for loop, future in self._by_loop.items():
            loop.call_soon_threadsafe(future.set_result, None)


_RESULT: Any = object()
PRIMITIVES: list[type[_Primitive]] = [_Ours, _Upstream, _AsyncioLimit]


async def _spawn_waiters(primitive: _Primitive, n: int) -> asyncio.Future[None]:
    """Start n waiting tasks; the returned future resolves when the last one has resumed."""
    loop = asyncio.get_running_loop()
    all_resumed: asyncio.Future[None] = loop.create_future()
    remaining = [n]

    async def waiter() -> None:
        await primitive.register()
        remaining[0] -= 1
        if remaining[0] == 0:
            all_resumed.set_result(None)

    tasks = [loop.create_task(waiter()) for _ in range(n)]
    await asyncio.sleep(0)  # every task runs to its await and registers
    all_resumed.add_done_callback(lambda _: tasks.clear())
    return all_resumed


def fanout_one_loop(primitive_cls: type[_Primitive], n: int) -> float:
    async def run() -> float:
        primitive = primitive_cls()
        all_resumed = await _spawn_waiters(primitive, n)
        started = time.perf_counter()
        primitive.settle()
        await all_resumed
        return time.perf_counter() - started

    return asyncio.run(run())


def fanout_across_loops(primitive_cls: type[_Primitive], n: int, loops: int = 8) -> float:
    primitive = primitive_cls()
    ready = threading.Barrier(loops + 1)
    finished: list[ThreadFuture[None]] = [ThreadFuture() for _ in range(loops)]

    def loop_thread(index: int) -> None:
        async def run() -> None:
            all_resumed = await _spawn_waiters(primitive, n // loops)
            ready.wait()
            await all_resumed
            finished[index].set_result(None)

        asyncio.run(run())

    threads = [threading.Thread(target=loop_thread, args=(i,)) for i in range(loops)]
    for t in threads:
        t.start()
    ready.wait()
    started = time.perf_counter()
    primitive.settle()
    wait_thread_futures(finished)
    seconds = time.perf_counter() - started
    for t in threads:
        t.join()
    return seconds


def bytes_per_waiter(primitive_cls: type[_Primitive], n: int) -> float:
    """Memory held per registered waiter (the waiter's own objects, not its task), measured with tracemalloc."""

    async def run() -> float:
        primitive = primitive_cls()
        primitive.register()  # first registration on a loop may allocate per-loop bookkeeping; not per waiter
        gc.collect()
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        waiters = [primitive.register() for _ in range(n)]
        after = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        per_waiter = (after - before) / n
        primitive.settle()
        await asyncio.gather(*waiters)
        return per_waiter

    return asyncio.run(run())


def run_fanout(ns: list[int], rows: list[dict[str, Any]], progress: Callable[[str], None]) -> None:
    for scenario, measure in (("fanout-one-loop", fanout_one_loop), ("fanout-8-loops", fanout_across_loops)):
        for n in ns:
            medians: dict[str, float] = {}
            memory: dict[str, float] = {}
            for primitive_cls in PRIMITIVES:
                times = [measure(primitive_cls, n) for _ in range(REPS)]
                medians[primitive_cls.name] = median(times)
                if scenario == "fanout-one-loop":
                    memory[primitive_cls.name] = median([bytes_per_waiter(primitive_cls, n) for _ in range(REPS)])
                progress(f"{scenario} n={n} {primitive_cls.name}: {medians[primitive_cls.name] * 1e3:.2f} ms")
            for name, seconds in medians.items():
                rows.append(
                    record(
                        scenario,
                        n,
                        name,
                        seconds=seconds,
                        us_per_waiter=seconds / n * 1e6,
                        bytes_per_waiter=memory.get(name),
                        threads_parked=0,
                        completed=True,
                        ratio=seconds / medians["strands"],
                        reference="strands",
                    )
                )


# --- 3: agent storm -------------------------------------------------------------------------------------------


def run_agent_storms(
    ns: list[int], rows: list[dict[str, Any]], progress: Callable[[str], None], control_timeout: float
) -> None:
    impls: list[tuple[str, type[strands.Agent]]] = [
        ("strands-py", Agent),
        ("strands", strands.Agent),
        ("blocking-waiter", BlockingWaiterAgent),
    ]
    for n in ns:
        measured: dict[str, list[Any]] = {}
        for name, cls in impls:
            # The control hangs by design: one bounded repetition says so; repeating it would only repeat the timeout.
            reps = 1 if cls is BlockingWaiterAgent else REPS
            timeout = control_timeout if cls is BlockingWaiterAgent else 60.0
            measured[name] = []
            for _ in range(reps):
                gc.collect()  # the fan-out scenarios leave a large heap behind; do not bill its collection here
                measured[name].append(run_storm(cls, n, workers=4, timeout=timeout))
            progress(f"agent-storm n={n} {name}: completed={all(r.completed for r in measured[name])}")
        reference = median([r.seconds for r in measured["strands"]])
        for name, reports in measured.items():
            completed = all(r.completed for r in reports)
            seconds = median([r.seconds for r in reports])
            rows.append(
                record(
                    "agent-storm",
                    n,
                    name,
                    seconds=seconds if completed else None,
                    us_per_waiter=seconds / n * 1e6 if completed else None,
                    threads_parked=max(r.threads_parked for r in reports),
                    model_calls=max(r.model_calls for r in reports),
                    completed=completed,
                    ratio=seconds / reference if completed else None,
                    reference="strands",
                    note=None if completed else f"hung (no progress within {control_timeout:.0f} s)",
                )
            )


# --- 4: overhead without duplicates ----------------------------------------------------------------------------


def sequential_invocations(cls: type[strands.Agent], count: int, with_token: bool) -> float:
    script = ScriptedBedrock(with_tool=False)
    agent = cls(model=script.model(), callback_handler=None)

    async def run() -> float:
        await agent.invoke_async("warm up")
        started = time.perf_counter()
        for i in range(count):
            agent.messages.clear()  # the same work every time: history would otherwise grow with i
            if with_token:
                await agent.invoke_async("hi", idempotency_token=f"req-{i}")
            else:
                await agent.invoke_async("hi")
        return time.perf_counter() - started

    return asyncio.run(run())


def run_overhead(count: int, rows: list[dict[str, Any]], progress: Callable[[str], None]) -> None:
    for with_token in (False, True):
        scenario = "sequential-with-token" if with_token else "sequential-no-token"
        # Interleaved, so that drift of the machine hits both alike, and in alternating order: whichever runs first
        # in a pair was measured ~5% slower (it collects the previous pair's garbage), whatever the implementation.
        times: dict[str, list[float]] = {"strands-py": [], "strands": []}
        impls: list[tuple[str, type[strands.Agent]]] = [("strands-py", Agent), ("strands", strands.Agent)]
        for rep in range(REPS):
            for name, cls in impls if rep % 2 == 0 else impls[::-1]:
                gc.collect()
                times[name].append(sequential_invocations(cls, count, with_token))
        reference = median(times["strands"])
        for name, values in times.items():
            seconds = median(values)
            rows.append(
                record(
                    scenario,
                    count,
                    name,
                    seconds=seconds,
                    model_calls=count,
                    completed=True,
                    ratio=seconds / reference,
                    reference="strands",
                    note=f"{seconds / count * 1e6:.0f} us per invocation",
                )
            )
            progress(f"{scenario} {name}: {seconds / count * 1e6:.0f} us/invocation")


# --- output ----------------------------------------------------------------------------------------------------


def markdown(rows: list[dict[str, Any]]) -> str:
    header = "| scenario | n | impl | seconds | µs/waiter | bytes/waiter | threads parked | model calls | ratio |"
    lines = [header, "|---|---:|---|---:|---:|---:|---:|---:|---:|"]

    def fmt(value: Any, spec: str) -> str:
        return "—" if value is None else format(value, spec)

    for r in rows:
        if r["scenario"].startswith(("durable-", "heartbeat-", "http-")):
            continue
        seconds = fmt(r["seconds"], ".4f") if r["completed"] is not False else "hung"
        lines.append(
            f"| {r['scenario']} | {r['n']} | {r['impl']} | {seconds} | {fmt(r['us_per_waiter'], '.3f')} | "
            f"{fmt(r['bytes_per_waiter'], '.0f')} | {fmt(r['threads_parked'], 'd')} | {fmt(r['model_calls'], 'd')} | "
            f"{fmt(r['ratio'], '.2f')} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path, machine: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    styles = {"fanout-one-loop": "-", "fanout-8-loops": "--"}
    for scenario, style in styles.items():
        for impl in ("strands-py", "strands", "asyncio-limit"):
            points = sorted((r["n"], r["seconds"]) for r in rows if r["scenario"] == scenario and r["impl"] == impl)
            if points:
                ax.plot(*zip(*points, strict=True), style, marker="o", label=f"{impl} ({scenario})")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("waiting duplicates (N)")
    ax.set_ylabel("settle → all resumed (s), median of 5")
    ax.set_title(f"Waiter fan-out\n{machine}", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def machine_description() -> str:
    return (
        f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"strands-agents {_version('strands-agents')}, aws-lambda-powertools {_version('aws-lambda-powertools')}, "
        f"moto {_version('moto')}, redis-py {_version('redis')}, {_redis_server_version()}"
    )


def _redis_server_version() -> str:
    import subprocess

    try:
        output = subprocess.run(["redis-server", "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "no redis-server"
    return "redis-server " + next((w[2:] for w in output.split() if w.startswith("v=")), "?")


def _load() -> str:
    one, five, _ = os.getloadavg()
    return f"{one:.1f} (5 min: {five:.1f})"


def _version(dist: str) -> str:
    from importlib.metadata import version

    return version(dist)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller N (8 to 12 minutes on 2 busy cores)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    parser.add_argument("--profile", action="store_true", help="also profile AgentApp's serving (serving.py)")
    args = parser.parse_args(argv)

    fanout_ns = [1_000, 10_000] if args.quick else [1_000, 10_000, 100_000]
    storm_ns = [16, 1_000] if args.quick else [16, 1_000, 10_000]
    sequential = 500 if args.quick else 2_000
    durable_n = 20 if args.quick else 100
    heartbeat_hold = 2.0 if args.quick else 4.0
    storm_n = 50 if args.quick else 200
    started = time.perf_counter()

    def progress(line: str) -> None:
        print(f"[{time.perf_counter() - started:7.1f}s] {line}", file=sys.stderr, flush=True)

    rows: list[dict[str, Any]] = []
    load_at_start = _load()
    run_fanout(fanout_ns, rows, progress)
    run_agent_storms(storm_ns, rows, progress, control_timeout=2.0)
    run_overhead(sequential, rows, progress)
    rows += durable.run_durable(durable_n, REPS, record, progress)
    rows += heartbeat.run_heartbeat(HEARTBEAT_LEASE_SECONDS, heartbeat_hold, REPS, record, progress)
    rows += storm.run_http_storm(storm_n, STORM_MODEL_LATENCY_SECONDS, REPS, record, progress)
    progress("journal: a crash inside the 2nd of 3 tools, and the cost of journaling a turn")
    journal_rows = journal.run_journal(quick=args.quick)
    serving_report = serving.run_serving(progress, quick=args.quick, profile=args.profile)
    serving_report["storm"] = [r for r in rows if r["scenario"] == "http-storm"]

    machine = machine_description()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "latest.json").write_text(json.dumps(rows, indent=2) + "\n")
    (args.out / "journal.json").write_text(json.dumps(journal_rows, indent=2) + "\n")
    serving.write(serving_report, args.out)
    plot(rows, args.out / "fanout.png", machine)
    print(f"Measured on {machine}; {'quick' if args.quick else 'full'} run, median of {REPS} repetitions.")
    print(f"Load average at the start: {load_at_start}; at the end: {_load()}.\n")
    print(markdown(rows))
    for family in (durable, heartbeat, storm):
        print()
        print(family.markdown(rows))
    print()
    print(journal.markdown(journal_rows))
    print(f"\nServing (strands-py from the {serving_report['served']}):\n")
    print(serving.markdown(serving_report))
    print(f"\nwrote {args.out / 'latest.json'} and {args.out / 'fanout.png'} in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
