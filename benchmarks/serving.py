"""Serving a unique request: what ``AgentApp`` and our AgentCore adapter cost beside bare endpoints (issue 21).

``hatch run bench:serving [--quick] [--profile | --profile-only] [--source REV] [--out DIR]`` (``hatch run bench``
runs it too, after the other scenarios). Six servers, each a process of its own under uvicorn on a free port of
127.0.0.1 (``serving_server.py``), each building an agent per request on the same scripted Bedrock model:
``fastapi`` and ``starlette`` (bare endpoints on a plain ``strands.Agent``), ``agentapp-memory`` and
``agentapp-redis`` (``AgentApp``, in-memory store / ``RedisIdempotencyStore`` on a local redis-server started and
stopped here), ``agentcore`` (a plain ``BedrockAgentCoreApp`` entrypoint on a plain ``strands.Agent``) and
``agentcore-adapter`` (``AgentCoreEntrypoint``).

Every request has a key of its own (nothing to deduplicate: the cost of the guarantees when they are not needed),
sent by 1, 16 or 64 concurrent clients (one keep-alive connection each; ``--quick``: 1 and 16, fewer requests),
in two shapes:
- ``json``: the tool-use conversation (two model calls and a tool), answered as one JSON body;
- ``sse``: a long answer streamed as Server-Sent Events (200 text chunks in one model call, 202 events).

Measured per cell (shape x clients x implementation): the server process's CPU time per request (user + system,
all its threads: on a machine shared with other work, the steadiest figure; read by the server itself with
``time.process_time()``, to the nanosecond, with psutil's figure, which counts 10 ms clock ticks, kept beside it in
``serving.json`` as a check), throughput (requests per
second of wall time), the median latency and, for streams, the median time to the first event. Each repetition
starts fresh servers and measures every implementation back to back for each cell, in an order rotated every
repetition; ratios are taken against ``fastapi`` within a repetition, then the median over repetitions is reported
beside each repetition's ratio. Every answer is checked (status 200, the answer's text or all its events, and the
model calls the server made), so an implementation that failed is never reported as fast.

The client is a minimal HTTP/1.1 client on asyncio streams, written here rather than httpx: it shares the machine's
two cores with the servers, and httpx's per-request cost would be most of what a request costs, throttling every
server alike and flattening the throughput ratios.

``--profile`` then runs cProfile in an ``agentapp-memory`` server's serving thread (the event loop's; its waits in
``select()`` left out) over the JSON cell at 16 clients and the SSE cell at 1 client, and names the top costs in
strands-py's own code (self time and inclusive time per request, each the median of three profiled segments;
cProfile inflates every Python call, and its clock is the wall clock, so compare shares, not absolute figures). The
standard library's and builtins' time is charged to the packages that called them.

``--source REV`` serves strands-py as committed at REV (``git archive`` into a temporary folder, first on the
servers' ``PYTHONPATH``) instead of the working tree, for a baseline that other people's uncommitted edits do not
touch. The retry storm (many clients, one key) is ``storm.py``'s, run (not by ``--quick``) and reported beside this.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import pstats
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from servers import LocalServer, redis_server, start_all, uvicorn_server

ROOT = Path(__file__).resolve().parent.parent
SERVER = Path(__file__).with_name("serving_server.py")
RESULTS = Path(__file__).parent / "results"
IMPLS = ("fastapi", "starlette", "agentapp-memory", "agentapp-redis", "agentcore", "agentcore-adapter")
REFERENCE = "fastapi"
SHAPES = ("json", "sse")
EVENTS = 200  # text chunks of the streamed answer
PROMPTS = {"json": "What is the weather in Paris?", "sse": "Give me a long answer."}
MODEL_CALLS = {"json": 2, "sse": 1}
ANSWER = b"It is sunny in Paris, 21 degrees."
PROFILED = "agentapp-memory"
PROFILE_CELLS = (("json", 16), ("sse", 1))
TOP = 15
PROFILE_SEGMENTS = 3  # profiled segments per cell; every profile figure is their median
# The retry storm, as bench.py runs it: 200 clients on one key, each model call waiting 0.25 s.
STORM_CLIENTS = 200
STORM_MODEL_LATENCY_SECONDS = 0.25
# Markers of a function's package in its file name, the more specific first (builtins go to their caller's).
PACKAGES = (
    ("/strands_py/", "strands-py"),
    ("/strands/", "strands"),
    ("/bedrock_agentcore/", "bedrock-agentcore"),
    ("/fastapi/", "fastapi"),
    ("/starlette/", "starlette"),
    ("/uvicorn/", "uvicorn"),
    ("/h11/", "h11"),
    ("/pydantic", "pydantic"),
    ("/opentelemetry/", "opentelemetry"),
    ("/botocore/", "botocore"),
    ("/asyncio/", "asyncio"),
    ("/json/", "json"),
)


@dataclass(frozen=True)
class Plan:
    """How much is measured: repetitions, client counts, requests per cell."""

    reps: int
    clients: tuple[int, ...]
    requests: dict[str, int]
    warm_up: dict[str, int]
    profile_requests: dict[str, int]


FULL = Plan(3, (1, 16, 64), {"json": 400, "sse": 80}, {"json": 40, "sse": 8}, {"json": 400, "sse": 60})
# Quick keeps the three repetitions (one repetition's ratios on this shared machine wander by 0.3) and drops 64 clients.
QUICK = Plan(3, (1, 16), {"json": 80, "sse": 24}, {"json": 16, "sse": 4}, {"json": 100, "sse": 15})


# -- the client ----------------------------------------------------------------------------------------------------


class BadAnswer(RuntimeError):
    """A server answered something else than a complete, correct answer."""


@dataclass
class Answer:
    status: int
    seconds: float
    first_event: float | None
    events: int
    body: bytes


class Connection:
    """One keep-alive HTTP/1.1 connection to 127.0.0.1 (Content-Length or chunked answers; SSE frames counted)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def open(self) -> Connection:
        self._reader, self._writer = await asyncio.open_connection("127.0.0.1", self.port)
        return self

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(OSError):
                await self._writer.wait_closed()
            self._reader = self._writer = None

    async def post(self, shape: str, key: str) -> Answer:
        if self._writer is None:
            await self.open()
        assert self._reader is not None and self._writer is not None
        body = json.dumps({"prompt": PROMPTS[shape]}).encode()
        accept = "text/event-stream" if shape == "sse" else "application/json"
        request = (
            f"POST /invocations HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\nContent-Type: application/json\r\n"
            f"Accept: {accept}\r\nIdempotency-Key: {key}\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode() + body
        started = time.perf_counter()
        self._writer.write(request)
        head = await self._reader.readuntil(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split(b" ", 2)[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        frames = _Frames(started)
        if b"content-length" in headers:
            content = await self._reader.readexactly(int(headers[b"content-length"]))
            frames.feed(content)
        elif headers.get(b"transfer-encoding") == b"chunked":
            parts = []
            while True:
                size = int((await self._reader.readuntil(b"\r\n")).split(b";")[0], 16)
                if size == 0:
                    await self._reader.readuntil(b"\r\n")  # no trailers
                    break
                chunk = (await self._reader.readexactly(size + 2))[:-2]
                frames.feed(chunk)
                parts.append(chunk)
            content = b"".join(parts)
        else:
            raise BadAnswer(f"an answer without a length: {head!r}")
        seconds = time.perf_counter() - started
        if headers.get(b"connection") == b"close":
            await self.close()
        return Answer(status, seconds, frames.first, frames.events, content)


class _Frames:
    """Counts the SSE frames that carry data as they arrive, and when the first one arrived."""

    def __init__(self, started: float) -> None:
        self.started = started
        self.first: float | None = None
        self.events = 0
        self._pending = b""

    def feed(self, chunk: bytes) -> None:
        *frames, self._pending = (self._pending + chunk).split(b"\n\n")
        for frame in frames:
            if frame.startswith(b"data:") or b"\ndata:" in frame:
                self.events += 1
                if self.first is None:
                    self.first = time.perf_counter() - self.started


@dataclass
class Cell:
    """One implementation's measurement of one cell in one repetition."""

    impl: str
    shape: str
    clients: int
    rep: int
    requests: int
    server_cpu: float
    seconds: float
    latencies: list[float]
    first_events: list[float]
    psutil_cpu: float
    redis_cpu: float | None = None

    @property
    def cpu_per_request(self) -> float:
        return self.server_cpu / self.requests

    @property
    def throughput(self) -> float:
        return self.requests / self.seconds


async def _load(port: int, shape: str, clients: int, requests: int, measure: Callable[[], Any]) -> tuple[Any, ...]:
    """Send ``requests`` requests with unique keys from ``clients`` connections; check every answer.

    ``measure()`` is called once the connections are open and again once every answer is in.
    """
    connections = [await Connection(port).open() for _ in range(clients)]
    keys = iter([uuid.uuid4().hex for _ in range(requests)])
    answers: list[Answer] = []

    async def client(connection: Connection) -> None:
        for key in keys:
            answers.append(await connection.post(shape, key))

    try:
        before = measure()
        started = time.perf_counter()
        await asyncio.gather(*(client(c) for c in connections))
        seconds = time.perf_counter() - started
        after = measure()
    finally:
        for connection in connections:
            await connection.close()
    for answer in answers:
        _check(shape, answer)
    return answers, seconds, before, after


def _check(shape: str, answer: Answer) -> None:
    if answer.status != 200:
        raise BadAnswer(f"status {answer.status}: {answer.body[:300]!r}")
    if shape == "json" and ANSWER not in answer.body:
        raise BadAnswer(f"no answer in {answer.body[:300]!r}")
    if shape == "sse" and answer.events < EVENTS + 2:
        raise BadAnswer(f"{answer.events} events, expected {EVENTS + 2}: {answer.body[-300:]!r}")


@dataclass(frozen=True)
class Snapshot:
    """What a server has done so far: its model calls, its CPU time (its own clock, and psutil's)."""

    model_calls: int
    cpu: float
    psutil_cpu: float

    @classmethod
    def of(cls, server: LocalServer) -> Snapshot:
        stats = json.loads(_get(server.port, "/stats"))
        return cls(int(stats["model_calls"]), float(stats["cpu_seconds"]), server.cpu_seconds())


def _get(port: int, path: str, method: str = "GET") -> bytes:
    import urllib.request

    with urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method)) as r:
        return bytes(r.read())


def measure_cell(
    server: LocalServer, impl: str, shape: str, clients: int, requests: int, rep: int, redis: LocalServer | None
) -> Cell:
    redis_before = redis.cpu_seconds() if redis is not None else 0.0
    answers, seconds, before, after = asyncio.run(
        _load(server.port, shape, clients, requests, lambda: Snapshot.of(server))
    )
    redis_cpu = redis.cpu_seconds() - redis_before if redis is not None else None
    made = after.model_calls - before.model_calls
    if made != requests * MODEL_CALLS[shape]:
        raise BadAnswer(f"{impl}: {made} model calls for {requests} {shape} requests")
    return Cell(
        impl,
        shape,
        clients,
        rep,
        requests,
        after.cpu - before.cpu,
        seconds,
        [a.seconds for a in answers],
        [a.first_event for a in answers if a.first_event is not None] if shape == "sse" else [],
        after.psutil_cpu - before.psutil_cpu,
        redis_cpu,
    )


def warm_up(server: LocalServer, plan: Plan) -> None:
    """First-request costs (imports, thread pools, connection pools) are no request's."""
    imported = Path(json.loads(_get(server.port, "/stats"))["strands_py"]).resolve()
    if imported != _served[0]:
        raise RuntimeError(f"{server.name} serves strands-py from {imported}, not from {_served[0]}")
    for shape in SHAPES:
        asyncio.run(_load(server.port, shape, 4, plan.warm_up[shape], lambda: None))


# -- the comparison ------------------------------------------------------------------------------------------------


# The strands_py package the servers must import (checked by warm_up): the working tree's, or an archive's.
_served = [ROOT / "strands_py"]


@contextlib.contextmanager
def served_from(source: str | None) -> Iterator[str]:
    """Serve strands-py from the working tree, or as committed at ``source``; yields a description of it."""
    _served[0] = ROOT / "strands_py"
    if source is None:
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "strands_py"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        yield f"working tree at {_commit('HEAD')}" + (" (with uncommitted changes in strands_py)" if dirty else "")
        return
    commit = _commit(source)
    with tempfile.TemporaryDirectory(prefix="strands-py-serving-") as folder:
        archive = subprocess.run(["git", "archive", commit, "strands_py"], cwd=ROOT, capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", folder], input=archive.stdout, check=True)
        previous = os.environ.get("PYTHONPATH")
        os.environ["PYTHONPATH"] = folder + (os.pathsep + previous if previous else "")
        _served[0] = Path(folder, "strands_py").resolve()
        try:
            yield f"commit {commit}"
        finally:
            _served[0] = ROOT / "strands_py"
            if previous is None:
                del os.environ["PYTHONPATH"]
            else:
                os.environ["PYTHONPATH"] = previous


def _commit(rev: str) -> str:
    return subprocess.run(
        ["git", "rev-parse", "--short=12", rev], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()


def _order(rep: int) -> list[str]:
    """Every implementation in every position across repetitions: rotated by two, reversed every other one."""
    shift = (2 * rep) % len(IMPLS)
    order = list(IMPLS[shift:] + IMPLS[:shift])
    return order[::-1] if rep % 2 else order


def run_comparison(plan: Plan, redis: LocalServer, progress: Callable[[str], None]) -> list[Cell]:
    cells: list[Cell] = []
    url = f"redis://127.0.0.1:{redis.port}"
    for rep in range(plan.reps):
        servers = {impl: uvicorn_server(SERVER, "--impl", impl, "--redis-url", url) for impl in IMPLS}
        start_all(*servers.values())
        try:
            for impl in IMPLS:
                warm_up(servers[impl], plan)
            for shape in SHAPES:
                for clients in plan.clients:
                    for impl in _order(rep):
                        cell = measure_cell(
                            servers[impl],
                            impl,
                            shape,
                            clients,
                            plan.requests[shape],
                            rep,
                            redis if impl == "agentapp-redis" else None,
                        )
                        cells.append(cell)
                        progress(
                            f"serving rep {rep + 1} {shape} clients={clients} {impl}: "
                            f"{cell.cpu_per_request * 1e3:.2f} ms CPU/request, {cell.throughput:.0f} requests/s"
                        )
        finally:
            for server in servers.values():
                server.stop()
    return cells


def cell_record(cell: Cell) -> dict[str, Any]:
    """A cell for ``serving.json``: its figures, with its latencies as quantiles rather than one per request."""
    record = {k: v for k, v in vars(cell).items() if k not in ("latencies", "first_events")}
    for name, values in (("latency", cell.latencies), ("first_event", cell.first_events)):
        if len(values) > 1:
            cuts = statistics.quantiles(values, n=100)
            record.update({f"{name}_p50_ms": cuts[49] * 1e3, f"{name}_p90_ms": cuts[89] * 1e3})
            record[f"{name}_p99_ms"] = cuts[98] * 1e3
    return record


def summarise(cells: list[Cell], plan: Plan) -> list[dict[str, Any]]:
    """One row per shape, client count and implementation: medians, and each repetition's ratios."""
    by: dict[tuple[str, int, str, int], Cell] = {(c.shape, c.clients, c.impl, c.rep): c for c in cells}
    rows = []
    for shape in SHAPES:
        for clients in plan.clients:
            for impl in IMPLS:
                mine = [by[shape, clients, impl, rep] for rep in range(plan.reps)]
                ref = [by[shape, clients, REFERENCE, rep] for rep in range(plan.reps)]
                core = [by[shape, clients, "agentcore", rep] for rep in range(plan.reps)]
                cpu_ratios = [m.cpu_per_request / r.cpu_per_request for m, r in zip(mine, ref, strict=True)]
                throughput_ratios = [m.throughput / r.throughput for m, r in zip(mine, ref, strict=True)]
                row: dict[str, Any] = {
                    "scenario": f"serving-{shape}",
                    "n": clients,
                    "impl": impl,
                    "requests": plan.requests[shape],
                    "server_cpu_ms": statistics.median(m.cpu_per_request for m in mine) * 1e3,
                    "psutil_cpu_ms": statistics.median(m.psutil_cpu / m.requests for m in mine) * 1e3,
                    "cpu_ratios": cpu_ratios,
                    "cpu_ratio": statistics.median(cpu_ratios),
                    "throughput": statistics.median(m.throughput for m in mine),
                    "throughput_ratios": throughput_ratios,
                    "throughput_ratio": statistics.median(throughput_ratios),
                    "p50_ms": statistics.median(statistics.median(m.latencies) for m in mine) * 1e3,
                    "reference": REFERENCE,
                }
                if impl == "agentcore-adapter":
                    ratios = [m.cpu_per_request / c.cpu_per_request for m, c in zip(mine, core, strict=True)]
                    row["cpu_ratios_to_agentcore"] = ratios
                    row["cpu_ratio_to_agentcore"] = statistics.median(ratios)
                if impl == "agentapp-redis":
                    row["redis_cpu_ms"] = statistics.median((m.redis_cpu or 0.0) / m.requests for m in mine) * 1e3
                if shape == "sse":
                    firsts = [statistics.median(m.first_events) for m in mine]
                    first_ratios = [f / statistics.median(r.first_events) for f, r in zip(firsts, ref, strict=True)]
                    extra = [(m.cpu_per_request - r.cpu_per_request) / EVENTS for m, r in zip(mine, ref, strict=True)]
                    row.update(
                        first_event_ms=statistics.median(firsts) * 1e3,
                        first_event_ratios=first_ratios,
                        first_event_ratio=statistics.median(first_ratios),
                        extra_us_per_event=statistics.median(extra) * 1e6,
                    )
                rows.append(row)
    return rows


# -- the profile ---------------------------------------------------------------------------------------------------


def _package(filename: str) -> str | None:
    for marker, package in PACKAGES:
        if marker in filename:
            return package
    return None


def _where(key: tuple[str, int, str]) -> str:
    filename, line, function = key
    return f"{filename.split('/strands_py/')[-1]}:{line} {function}"


def _is_wait(key: tuple[str, int, str]) -> bool:
    """The event loop's selector call (``select.epoll.poll``, ``select.select``): where the loop waits."""
    return key[0] == "~" and ("of 'select." in key[2] or "select.select" in key[2])


def _owners(raw: dict[Any, Any]) -> Callable[[tuple[str, int, str]], Counter[str]]:
    """Who a function's time belongs to: its package, or (the standard library, builtins) its callers' by calls.

    A function of no package (``copy.deepcopy``, ``uuid.uuid4``, a builtin) is charged to its callers in proportion
    to their calls, through callers of no package in turn (recursion and cycles left out), so that its time lands on
    the package that asked for it (``copy.deepcopy`` on strands); ``other`` when no caller has a package.
    """
    memo: dict[tuple[str, int, str], Counter[str]] = {}

    def owners(key: tuple[str, int, str], visiting: frozenset[tuple[str, int, str]] = frozenset()) -> Counter[str]:
        if key in memo:
            return memo[key]
        package = _package(key[0])
        if package is not None:
            return Counter({package: 1.0})
        callers = {c: v[0] for c, v in raw.get(key, (0, 0, 0, 0, {}))[4].items() if c not in visiting and c != key}
        total = sum(callers.values())
        if not total:
            return Counter({"other": 1.0})
        shares: Counter[str] = Counter()
        for caller, calls in callers.items():
            for name, share in owners(caller, visiting | {key}).items():
                shares[name] += share * calls / total
        # Kept even when a cycle's caller was left out: a near figure, and the walk stays linear.
        memo[key] = shares
        return shares

    return owners


def _segment(stats: pstats.Stats, requests: int) -> dict[str, Counter[Any]]:
    """One profiled segment, per request: self, inclusive and calls of every function; by package; in total."""
    # The loop's waits (its selector's poll) are no request's cost: cProfile's clock is the wall clock.
    raw = {key: value for key, value in stats.stats.items() if not _is_wait(key)}  # type: ignore[attr-defined]
    owners = _owners(raw)
    out: dict[str, Counter[Any]] = {name: Counter() for name in ("self", "inclusive", "calls", "packages", "modules")}
    for key, (_, calls, tottime, cumtime, _) in raw.items():
        for name, share in owners(key).items():
            out["packages"][name] += tottime * share / requests
        if "/strands_py/" in key[0]:
            out["self"][key] = tottime / requests
            out["inclusive"][key] = cumtime / requests
            out["calls"][key] = calls / requests
            out["modules"][key[0].split("/strands_py/")[-1]] += tottime / requests
    out["total"] = Counter({"": sum(v[2] for v in raw.values()) / requests})
    return out


def _median_of(segments: list[dict[str, Counter[Any]]], part: str) -> Counter[Any]:
    """Per key, the median over segments (0 where a segment has none): one preempted segment moves no figure."""
    keys = {key for segment in segments for key in segment[part]}
    return Counter({key: statistics.median(segment[part][key] for segment in segments) for key in keys})


def profile_summary(segments: list[pstats.Stats], requests: int, top: int = TOP) -> dict[str, Any]:
    """Per request, medians over the segments: the profiled thread by package, strands-py's top functions.

    ``requests``: per segment. A wall-clock profile of one thread on a shared machine charges whatever function was
    running when the thread lost the CPU (to other processes, or to the model's worker threads holding the GIL): one
    segment's figure for one function can be ten times its usual, so each figure is the median of several segments.
    """
    per = [_segment(stats, requests) for stats in segments]
    own, inclusive, calls = _median_of(per, "self"), _median_of(per, "inclusive"), _median_of(per, "calls")
    total = _median_of(per, "total")[""]

    def listed(by: Counter[Any]) -> list[dict[str, Any]]:
        return [
            {
                "function": _where(key),
                "self_us": own[key] * 1e6,
                "self_share": own[key] / total,
                "inclusive_us": inclusive[key] * 1e6,
                "calls": calls[key],
            }
            for key, _ in by.most_common(top)
        ]

    return {
        "requests": requests,
        "segments": len(segments),
        "thread_cpu_us": total * 1e6,
        "packages_us": {k: v * 1e6 for k, v in _median_of(per, "packages").most_common()},
        "modules_us": {k: v * 1e6 for k, v in _median_of(per, "modules").most_common(top)},
        "by_self": listed(own),
        "by_inclusive": listed(inclusive),
    }


def run_profile(plan: Plan, progress: Callable[[str], None], impl: str = PROFILED) -> dict[str, Any]:
    server = uvicorn_server(SERVER, "--impl", impl, "--profile").start()
    profiles = {}
    try:
        warm_up(server, plan)
        with tempfile.TemporaryDirectory(prefix="strands-py-serving-profile-") as folder:
            for shape, clients in PROFILE_CELLS:
                requests = plan.profile_requests[shape]
                # The same cell unprofiled first: the process's CPU per request, to scale the profile's figures by.
                unprofiled = measure_cell(server, impl, shape, clients, requests, 0, None)
                segments = []
                for segment in range(PROFILE_SEGMENTS):
                    path = Path(folder, f"{shape}-{segment}.prof")
                    _get(server.port, "/profile/start", "POST")
                    asyncio.run(_load(server.port, shape, clients, requests, lambda: None))
                    _get(server.port, f"/profile/stop?path={path}", "POST")
                    segments.append(pstats.Stats(str(path)))
                summary = profile_summary(segments, requests)
                summary["unprofiled_cpu_us"] = unprofiled.cpu_per_request * 1e6
                profiles[f"{shape}, {clients} client{'s' if clients > 1 else ''}"] = summary
                progress(f"serving profile {impl} {shape} clients={clients}: {summary['thread_cpu_us']:.0f} µs/request")
    finally:
        server.stop()
    return {"impl": impl, "cells": profiles}


# -- the report ----------------------------------------------------------------------------------------------------


def _ratios(values: list[float]) -> str:
    return " / ".join(f"{v:.2f}" for v in values)


def markdown(report: dict[str, Any]) -> str:
    rows = report.get("rows", [])
    out: list[str] = []
    if rows:
        out += [
            "| answer | clients | impl | server CPU ms/request | CPU ratio per rep | CPU ratio | requests/s | "
            "throughput ratio per rep | throughput ratio | p50 ms |",
            "|---|---:|---|---:|---|---:|---:|---|---:|---:|",
        ]
        for r in rows:
            if r["scenario"] == "serving-json":
                out.append(
                    f"| json | {r['n']} | {r['impl']} | {r['server_cpu_ms']:.2f} | {_ratios(r['cpu_ratios'])} | "
                    f"{r['cpu_ratio']:.2f} | {r['throughput']:.0f} | {_ratios(r['throughput_ratios'])} | "
                    f"{r['throughput_ratio']:.2f} | {r['p50_ms']:.1f} |"
                )
        out += [
            "",
            f"| answer | clients | impl | server CPU ms/request | CPU ratio per rep | CPU ratio | µs/event over "
            f"{REFERENCE} | requests/s | throughput ratio | first event ms | first-event ratio per rep | "
            "first-event ratio |",
            "|---|---:|---|---:|---|---:|---:|---:|---:|---:|---|---:|",
        ]
        for r in rows:
            if r["scenario"] == "serving-sse":
                out.append(
                    f"| sse ({EVENTS + 2} events) | {r['n']} | {r['impl']} | {r['server_cpu_ms']:.2f} | "
                    f"{_ratios(r['cpu_ratios'])} | {r['cpu_ratio']:.2f} | {r['extra_us_per_event']:.1f} | "
                    f"{r['throughput']:.0f} | {r['throughput_ratio']:.2f} | {r['first_event_ms']:.1f} | "
                    f"{_ratios(r['first_event_ratios'])} | {r['first_event_ratio']:.2f} |"
                )
        adapter = [r for r in rows if r["impl"] == "agentcore-adapter"]
        if adapter:
            out += ["", "| answer | clients | agentcore-adapter CPU ratio to plain agentcore, per rep | median |"]
            out += ["|---|---:|---|---:|"]
            for r in adapter:
                out.append(
                    f"| {r['scenario'].removeprefix('serving-')} | {r['n']} | "
                    f"{_ratios(r['cpu_ratios_to_agentcore'])} | {r['cpu_ratio_to_agentcore']:.2f} |"
                )
        redis_rows = [r for r in rows if r["impl"] == "agentapp-redis"]
        if redis_rows:
            out += ["", "redis-server's own CPU per request (agentapp-redis, not in the ratios): "]
            out[-1] += ", ".join(
                f"{r['scenario'].removeprefix('serving-')} x{r['n']} {r['redis_cpu_ms']:.2f} ms" for r in redis_rows
            )
    storm_rows = report.get("storm") or []
    if storm_rows:
        out += ["", "Retry storm (storm.py: many clients, one key; kept beside the unique keys above):"]
    for r in storm_rows:
        out.append(
            f"- {r['impl']}: {r['n']} clients, {r['model_runs']:g} model run(s), p50 {r['p50_ms']:.0f} ms, "
            f"p99 {r['p99_ms']:.0f} ms (p99 ratio {r['ratio']:.2f} to {r['reference']}), "
            f"server CPU {r['server_cpu_ms']:.2f} ms/request"
        )
    profile = report.get("profile")
    if profile:
        for cell, summary in profile["cells"].items():
            out += [
                "",
                f"Profile of {profile['impl']}, {cell} (median of {summary.get('segments', 1)} segments of "
                f"{summary['requests']} requests): the serving thread's time under cProfile "
                f"{summary['thread_cpu_us']:.0f} µs/request (the process's CPU unprofiled: "
                f"{summary['unprofiled_cpu_us']:.0f} µs/request). By package: "
                + ", ".join(f"{k} {v:.0f}" for k, v in list(summary["packages_us"].items())[:8])
                + " µs/request. strands-py by module: "
                + ", ".join(f"{k} {v:.0f}" for k, v in list(summary["modules_us"].items())[:8])
                + " µs/request.",
                "",
                "| strands-py function (by self time) | self µs/request | share of the thread | inclusive µs/request "
                "| calls/request |",
                "|---|---:|---:|---:|---:|",
            ]
            out += [
                f"| `{f['function']}` | {f['self_us']:.1f} | {f['self_share']:.1%} | {f['inclusive_us']:.1f} | "
                f"{f['calls']:.1f} |"
                for f in summary["by_self"]
            ]
    return "\n".join(out)


def _machine() -> str:
    from importlib.metadata import version

    return f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, " + ", ".join(
        f"{dist} {version(dist)}"
        for dist in ("strands-agents", "bedrock-agentcore", "fastapi", "starlette", "uvicorn", "h11", "redis")
    )


def _load_average() -> str:
    one, five, _ = os.getloadavg()
    return f"{one:.1f} (5 min: {five:.1f})"


def _record(scenario: str, n: int, impl: str, **fields: Any) -> dict[str, Any]:
    return {"scenario": scenario, "n": n, "impl": impl, **fields}


def run_serving(
    progress: Callable[[str], None],
    *,
    quick: bool = False,
    compare: bool = True,
    profile: bool = False,
    storm: bool = False,
    source: str | None = None,
) -> dict[str, Any]:
    """Measure (and/or profile) as ``serving.py`` does; returns the report written to ``serving.json``.

    ``storm``: run ``storm.py``'s retry storm too (``bench.py`` runs it itself, and adds its rows to the report).
    """
    plan = QUICK if quick else FULL
    report: dict[str, Any] = {
        "mode": "quick" if quick else "full",
        "machine": _machine(),
        "load_at_start": _load_average(),
        "reps": plan.reps,
        "events": EVENTS,
        "requests_per_cell": plan.requests,
    }
    with served_from(source) as served:
        report["served"] = served
        progress(f"serving: strands-py from the {served}")
        if compare:
            redis = redis_server().start()
            try:
                cells = run_comparison(plan, redis, progress)
            finally:
                redis.stop()
            report["rows"] = summarise(cells, plan)
            report["cells"] = [cell_record(c) for c in cells]
        if profile:
            report["profile"] = run_profile(plan, progress)
        if storm:
            import storm as storm_benchmark

            report["storm"] = storm_benchmark.run_http_storm(
                STORM_CLIENTS, STORM_MODEL_LATENCY_SECONDS, plan.reps, _record, progress
            )
    report["load_at_end"] = _load_average()
    return report


def write(report: dict[str, Any], out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    name = "serving.json" if "rows" in report else "serving-profile.json"
    path = out / name
    path.write_text(json.dumps(report, indent=2) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 and 16 clients, fewer requests (about two minutes)")
    parser.add_argument("--profile", action="store_true", help="then profile the AgentApp server (cProfile)")
    parser.add_argument("--profile-only", action="store_true", help="only the profile")
    parser.add_argument("--no-storm", action="store_true", help="without the retry storm (full runs only)")
    parser.add_argument("--source", help="serve strands-py as committed at this git revision")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    args = parser.parse_args(argv)
    started = time.perf_counter()

    def progress(line: str) -> None:
        print(f"[{time.perf_counter() - started:7.1f}s] {line}", file=sys.stderr, flush=True)

    report = run_serving(
        progress,
        quick=args.quick,
        compare=not args.profile_only,
        profile=args.profile or args.profile_only,
        storm=not (args.quick or args.profile_only or args.no_storm),
        source=args.source,
    )
    path = write(report, args.out)
    print(f"Measured on {report['machine']}; strands-py from the {report['served']}.")
    print(
        f"{report['mode']} run, {report['reps']} repetition(s); load average at the start {report['load_at_start']}, "
        f"at the end {report['load_at_end']}.\n"
    )
    print(markdown(report))
    print(f"\nwrote {path} in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
