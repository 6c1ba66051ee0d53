"""Python function calls per request: a deterministic measure of the serving path, beside the timed comparison.

``hatch run bench:calls [--requests N] [--impls fastapi,agentapp-memory] [--source REV]``

CPU time on a shared 2-core machine varies by tens of percent between repetitions, which hides a change of a few
percent. The number of Python function calls a request makes does not vary. This drives the apps of
``serving_server.py`` in this process (no server, no socket: a minimal ASGI caller, the same for every app), one request
at a time, under cProfile, and reports calls per request on the event loop's thread (C functions included, as cProfile
counts them) for the JSON and the SSE answer. It counts work, not time: a call to ``json.dumps`` counts one, whatever
its size. Use it to compare two versions of strands-py (``--source REV`` counts strands-py as committed at REV), and
the timed comparison (``serving.py``) for what a request costs.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import pstats
import subprocess
import sys
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


async def _count(impl: str, shape: str, requests: int) -> float:
    """Calls per request of ``impl`` answering ``shape``, after a warm-up; the app's lifespan around it."""
    app = serving_server.build(impl, serving_server.ServingScript(200), None)
    startup: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    started: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    lifespan = asyncio.ensure_future(app({"type": "lifespan", "asgi": {"version": "3.0"}}, startup.get, started.put))
    await startup.put({"type": "lifespan.startup"})
    await asyncio.wait_for(started.get(), 30)
    try:
        for _ in range(WARM_UP):
            await _request(app, shape)
        profile = cProfile.Profile()
        profile.enable()
        for _ in range(requests):
            await _request(app, shape)
        profile.disable()
    finally:
        await startup.put({"type": "lifespan.shutdown"})
        await asyncio.wait_for(lifespan, 30)
    stats: dict[Any, tuple[int, int, float, float, Any]] = pstats.Stats(profile).stats  # type: ignore[attr-defined]
    return sum(calls for _, calls, _, _, _ in stats.values()) / requests


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=30, help="profiled requests per cell (after a warm-up)")
    parser.add_argument("--impls", default=",".join(IMPLS), help=f"comma-separated, of {', '.join(IMPLS)}")
    parser.add_argument("--source", help="count strands-py as committed at this git revision")
    args = parser.parse_args()
    if args.source:
        # A child process whose PYTHONPATH (set by served_from) puts the archived strands-py first.
        with served_from(args.source):
            command = [sys.executable, __file__, "--requests", str(args.requests), "--impls", args.impls]
            raise SystemExit(subprocess.run(command, check=False).returncode)
    import strands_py

    impls = args.impls.split(",")
    unknown = sorted(set(impls) - set(IMPLS))
    if unknown:
        parser.error(f"not counted here: {', '.join(unknown)} (see IMPLS)")
    print(f"strands-py from {Path(strands_py.__file__).parent}")
    print("| answer | impl | Python calls per request | ratio to fastapi |")
    print("|---|---|---:|---:|")
    for shape in ("json", "sse"):
        counts = {impl: asyncio.run(_count(impl, shape, args.requests)) for impl in impls}
        for impl, calls in counts.items():
            ratio = f"{calls / counts['fastapi']:.2f}" if "fastapi" in counts else "-"
            print(f"| {shape} | {impl} | {calls:,.0f} | {ratio} |")


if __name__ == "__main__":
    main()
