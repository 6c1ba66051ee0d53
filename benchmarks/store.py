"""What a store call costs the serving process: CPU per call to a local redis-server, ways of calling side by side.

``hatch run bench:store [--rounds R] [--calls N] [--gap MS] [--no-hiredis]``

A durable turn makes several store calls (a claim, the journal's appends, the result), and on a local Redis each is
a round trip of about 0.1 ms, so how a call gets from the event loop to the server and back is a good part of what
the store adds to a request. One primitive (``append``, the most frequent: one ``EVALSHA``, fenced on the claim),
called from the event loop one at a time, ``N`` calls per way and round, the ways taking turns in every round:

- ``store``: ``RedisIdempotencyStore.append`` on a loop without ``use_event_loop`` (the sync client on the store's
  own threads: a sync ``agent(...)``'s calls, each on a loop of its own);
- ``store-on-loop``: the same inside ``use_event_loop()``, as a server's lifespan serves it (redis-py's asyncio
  client, on the loop);
- ``executor``: the same sync call through ``loop.run_in_executor`` on a ``ThreadPoolExecutor`` (the store before);
- ``asyncio-client``: the same script through redis-py's asyncio client (``redis.asyncio``), on the loop;
- ``on-loop``: the sync call on the event loop's own thread. It blocks the loop for the round trip, so it is no way
  to serve; it is the floor, what the call costs without any hop.

Calls are ``--gap`` milliseconds apart (2 by default; the pause is not timed), as a turn's store calls are: threads
idle between calls cost more to wake than threads kept busy, and back to back (``--gap 0``) every way looks cheaper.
Reported per way: the process's CPU per call (all threads), the median of the rounds, and its ratio to the asyncio
client within each round (median and quartiles). Whether redis-py parses with hiredis (the ``redis`` extra installs
it) is printed first; ``--no-hiredis`` hides it from redis-py, for the same table with its pure-Python parser.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

from servers import redis_server  # noqa: E402 - the benchmarks folder is not a package

from strands_py.idempotency import IdempotencyRecord, RecordState  # noqa: E402
from strands_py.idempotency.record import new_version  # noqa: E402

WAYS = ("store", "store-on-loop", "executor", "asyncio-client", "on-loop")
PEER = "asyncio-client"
ENTRY = b"x" * 300  # about a journal entry of a tool call's start or result
WARM_UP = 50


async def _measure(url: str, rounds: int, calls: int, gap: float) -> dict[str, list[float]]:
    """CPU seconds per call, per way, one list entry per round."""
    import redis.asyncio  # here: after --no-hiredis had its say

    from strands_py.idempotency._redis_layout import _APPEND
    from strands_py.idempotency.redis import RedisIdempotencyStore

    store = RedisIdempotencyStore.from_url(url)
    bound = RedisIdempotencyStore.from_url(url)
    executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="bench-executor")
    client = redis.asyncio.Redis.from_url(url)
    try:
        key, now = f"bench#{uuid.uuid4().hex}", time.time()
        claim = IdempotencyRecord(key, RecordState.IN_PROGRESS, "owner", new_version(), 600.0, now + 3600.0)
        assert await store.claim(claim, now) is None
        keys = store.redis_keys(key)
        script = client.register_script(_APPEND)
        loop = asyncio.get_running_loop()

        def sync_append() -> Any:
            return store._execute(key, store._append, ["owner", ENTRY, new_version()])

        ways: dict[str, Callable[[], Awaitable[Any]]] = {
            "store": functools.partial(store.append, key, "owner", ENTRY),
            "store-on-loop": functools.partial(bound.append, key, "owner", ENTRY),
            "executor": lambda: loop.run_in_executor(executor, sync_append),
            "asyncio-client": lambda: script(keys=keys, args=["owner", ENTRY, new_version()]),
            "on-loop": lambda: _now(sync_append()),
        }
        async with bound.use_event_loop():
            return await _rounds(ways, store, key, rounds, calls, gap)
    finally:
        await client.aclose()
        executor.shutdown(wait=True)
        store.close()
        bound.close()


async def _rounds(
    ways: dict[str, Callable[[], Awaitable[Any]]], store: Any, key: str, rounds: int, calls: int, gap: float
) -> dict[str, list[float]]:
    for way in WAYS:
        for _ in range(WARM_UP):
            assert await ways[way]() == 1, f"{way}: the append was refused"
    per_call: dict[str, list[float]] = {way: [] for way in WAYS}
    for number in range(rounds):
        # Every way in every position over the rounds: the machine's drift is spread over all of them.
        order = WAYS[number % len(WAYS) :] + WAYS[: number % len(WAYS)]
        for way in order:
            call, spent = ways[way], 0.0
            for _ in range(calls):
                if gap:
                    await asyncio.sleep(gap)
                started = time.process_time()
                await call()
                spent += time.process_time() - started
            per_call[way].append(spent / calls)
        # The journal must not grow without end: cut it between rounds (not timed).
        assert await store.truncate(key, "owner", 0)
    return per_call


async def _now(value: Any) -> Any:
    return value


def _quartiles(values: list[float]) -> tuple[float, float, float]:
    if len(values) < 2:
        return values[0], values[0], values[0]
    low, middle, high = statistics.quantiles(values, n=4, method="inclusive")
    return low, middle, high


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--gap", type=float, default=2.0, help="milliseconds between calls (default 2)")
    parser.add_argument("--no-hiredis", action="store_true", help="redis-py without hiredis (its Python parser)")
    args = parser.parse_args()
    if args.rounds < 1 or args.calls < 1 or args.gap < 0:
        parser.error("--rounds and --calls must be at least 1, --gap not negative")
    if args.no_hiredis:
        sys.modules["hiredis"] = None  # type: ignore[assignment] # an import of it now fails, as if not installed
    from redis.utils import HIREDIS_AVAILABLE

    server = redis_server().start()
    try:
        per_call = asyncio.run(_measure(f"redis://127.0.0.1:{server.port}", args.rounds, args.calls, args.gap / 1000))
    finally:
        server.stop()
    print(f"redis-py parses replies with hiredis: {'yes' if HIREDIS_AVAILABLE else 'no'}")
    print(f"{args.rounds} rounds of {args.calls} appends per way, {args.gap:g} ms apart; CPU per call (all threads)\n")
    print(f"| way | CPU µs/call (median) | ratio to {PEER}: median (quartiles) |")
    print("|---|---:|---:|")
    for way in WAYS:
        ratios = [mine / peer for mine, peer in zip(per_call[way], per_call[PEER], strict=True)]
        low, middle, high = _quartiles(ratios)
        print(f"| {way} | {statistics.median(per_call[way]) * 1e6:.0f} | {middle:.2f} ({low:.2f}-{high:.2f}) |")


if __name__ == "__main__":
    main()
