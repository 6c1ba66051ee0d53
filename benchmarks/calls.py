"""Python function calls per request: a deterministic measure of the serving path, beside the timed comparison.

``hatch run bench:calls [--requests N] [--impls fastapi,agentapp-memory] [--source REV] [--cpu REPS]``

CPU time on a shared 2-core machine varies by tens of percent between repetitions, which hides a change of a few
percent. The number of Python function calls a request makes does not vary. This drives the apps of
``serving_server.py`` in this process (no server, no socket: a minimal ASGI caller, the same for every app), one request
at a time, under cProfile, and reports calls per request on the event loop's thread (C functions included, as cProfile
counts them) for the JSON and the SSE answer. It counts work, not time: a call to ``json.dumps`` counts one, whatever
its size. Use it to compare two versions of strands-py (``--source REV`` counts strands-py as committed at REV), and
the timed comparison (``serving.py``) for what a request costs.

``--cpu REPS`` times the same in-process requests instead: the process's CPU time per request (all its threads: the
model's worker threads and a sync factory's too), in ``REPS`` rounds of ``--requests`` requests per app, the apps
taking turns within each round. Each round's ratio to FastAPI is taken within the round, and the table gives their
median and quartiles: no server, socket or client, so steadier than ``serving.py``, though still a timing.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import json
import pstats
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

import serving_server  # noqa: E402 - the benchmarks folder is not a package
from serving import served_from  # noqa: E402

# The apps that serve on the event loop's thread, the only one cProfile sees here (the model's worker threads are the
# same for all). BedrockAgentCoreApp runs its invocations on threads and tasks of its own: not comparable this way.
IMPLS = ("fastapi", "starlette", "agentapp-memory")
WARM_UP = 10


async def _request(app: Any, shape: str) -> None:
    """One POST /invocations with a key of its own, its whole answer read; fails on anything but a 200."""
    body = json.dumps({"prompt": serving_server.LONG_ANSWER if shape == "sse" else "What is the weather?"}).encode()
    headers = [
        (b"host", b"127.0.0.1"),
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"idempotency-key", uuid.uuid4().hex.encode()),
    ]
    if shape == "sse":
        headers.append((b"accept", b"text/event-stream"))
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/invocations",
        "raw_path": b"/invocations",
        "query_string": b"",
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8080),
        "state": {},
    }
    answered = asyncio.Event()
    sent_body = False
    status: list[int] = []

    async def receive() -> dict[str, Any]:
        nonlocal sent_body
        if not sent_body:
            sent_body = True
            return {"type": "http.request", "body": body, "more_body": False}
        await answered.wait()  # the client stays until its answer is complete
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            status.append(message["status"])
        elif message["type"] == "http.response.body" and not message.get("more_body", False):
            answered.set()

    await app(scope, receive, send)
    answered.set()
    if status != [200]:
        raise RuntimeError(f"{shape} request answered {status}")


class _Served:
    """One app of ``serving_server.py`` in its lifespan, warmed up with ``WARM_UP`` requests of ``shape``."""

    def __init__(self, impl: str, shape: str) -> None:
        self.app = serving_server.build(impl, serving_server.ServingScript(200), None)
        self.shape = shape
        self._startup: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._started: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._lifespan: asyncio.Future[None] | None = None

    async def __aenter__(self) -> _Served:
        scope = {"type": "lifespan", "asgi": {"version": "3.0"}}
        self._lifespan = asyncio.ensure_future(self.app(scope, self._startup.get, self._started.put))
        await self._startup.put({"type": "lifespan.startup"})
        await asyncio.wait_for(self._started.get(), 30)
        for _ in range(WARM_UP):
            await _request(self.app, self.shape)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._startup.put({"type": "lifespan.shutdown"})
        assert self._lifespan is not None
        await asyncio.wait_for(self._lifespan, 30)


async def _count(impl: str, shape: str, requests: int) -> float:
    """Calls per request of ``impl`` answering ``shape``, after a warm-up; the app's lifespan around it."""
    async with _Served(impl, shape) as served:
        profile = cProfile.Profile()
        profile.enable()
        for _ in range(requests):
            await _request(served.app, shape)
        profile.disable()
    stats: dict[Any, tuple[int, int, float, float, Any]] = pstats.Stats(profile).stats  # type: ignore[attr-defined]
    return sum(calls for _, calls, _, _, _ in stats.values()) / requests


async def _cpu(impls: list[str], shape: str, requests: int, rounds: int) -> dict[str, list[float]]:
    """Process CPU milliseconds per request of each app, one figure per round; the apps take turns in each round."""
    per_round: dict[str, list[float]] = {impl: [] for impl in impls}
    async with contextlib.AsyncExitStack() as stack:  # every app started is shut down, even if a later one fails
        served = [await stack.enter_async_context(_Served(impl, shape)) for impl in impls]
        for _ in range(rounds):
            for impl, app in zip(impls, served, strict=True):
                started = time.process_time()
                for _ in range(requests):
                    await _request(app.app, shape)
                per_round[impl].append((time.process_time() - started) / requests * 1000)
    return per_round


def _print_cpu(impls: list[str], requests: int, rounds: int) -> None:
    print("| answer | impl | CPU ms per request (median) | ratio to fastapi: median | quartiles |")
    print("|---|---|---:|---:|---|")
    for shape in ("json", "sse"):
        per_round = asyncio.run(_cpu(impls, shape, requests, rounds))
        for impl in impls:
            ratios = sorted(mine / bare for mine, bare in zip(per_round[impl], per_round["fastapi"], strict=True))
            quartiles = statistics.quantiles(ratios, n=4)
            print(
                f"| {shape} | {impl} | {statistics.median(per_round[impl]):.2f} | {statistics.median(ratios):.2f} "
                f"| {quartiles[0]:.2f}-{quartiles[2]:.2f} |"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=30, help="profiled requests per cell (after a warm-up)")
    parser.add_argument("--impls", default=",".join(IMPLS), help=f"comma-separated, of {', '.join(IMPLS)}")
    parser.add_argument("--source", help="count strands-py as committed at this git revision")
    parser.add_argument("--cpu", type=int, metavar="ROUNDS", help="time CPU per request in ROUNDS rounds instead")
    args = parser.parse_args()
    if args.source:
        # A child process whose PYTHONPATH (set by served_from) puts the archived strands-py first.
        with served_from(args.source):
            command = [sys.executable, __file__, "--requests", str(args.requests), "--impls", args.impls]
            command += ["--cpu", str(args.cpu)] if args.cpu else []
            raise SystemExit(subprocess.run(command, check=False).returncode)
    import strands_py

    impls = args.impls.split(",")
    unknown = sorted(set(impls) - set(IMPLS))
    if unknown:
        parser.error(f"not counted here: {', '.join(unknown)} (see IMPLS)")
    print(f"strands-py from {Path(strands_py.__file__).parent}")
    if args.cpu:
        if "fastapi" not in impls:
            parser.error("--cpu gives ratios to fastapi: include it in --impls")
        _print_cpu(impls, args.requests, args.cpu)
        return
    print("| answer | impl | Python calls per request | ratio to fastapi |")
    print("|---|---|---:|---:|")
    for shape in ("json", "sse"):
        counts = {impl: asyncio.run(_count(impl, shape, args.requests)) for impl in impls}
        for impl, calls in counts.items():
            ratio = f"{calls / counts['fastapi']:.2f}" if "fastapi" in counts else "-"
            print(f"| {shape} | {impl} | {calls:,.0f} | {ratio} |")


if __name__ == "__main__":
    main()
