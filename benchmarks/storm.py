"""Scenario 7: an HTTP retry storm (issue 9): N clients retrying one Idempotency-Key against one uvicorn server.

The same service twice, one Agent per request (``storm_server.py``, each in a process of its own, so the RSS is the
server's): ``strands_py.http.AgentApp``, and a minimal Starlette endpoint on upstream ``strands.Agent``, which
cannot deduplicate across its per-request agents. N httpx clients (async, each its own client and connection) send
the same request with the same Idempotency-Key at once; a client answered 409 or 503 waits its ``Retry-After`` and
sends it again. Each model call takes a small latency on the model's worker thread, so the storm overlaps the run.

Measured per storm: model runs (two model calls per run: a tool call, then the answer), each client's latency
from its first send to its answer (p50, p99), the storm's duration (first send to last answer), and the server's
peak RSS during the storm (psutil, sampled every 5 ms) and its growth over the idle RSS before the storm, and the
server's CPU time per request (psutil; independent of how busy the machine is). Both
servers run side by side in each repetition (started together, stormed one after the other in alternating order);
figures are medians over the repetitions, ratios against upstream.
"""

from __future__ import annotations

import asyncio
import statistics
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from servers import LocalServer, start_all, uvicorn_server

SERVER = Path(__file__).with_name("storm_server.py")
IMPLS = ("strands-py", "strands")
PROMPT = "What is the weather in Paris?"
RETRY_STATUSES = frozenset({409, 503})
MAX_ATTEMPTS = 5
CLIENT_TIMEOUT = 300.0
MODEL_CALLS_PER_RUN = 2
RSS_SAMPLE_SECONDS = 0.005


@dataclass
class Storm:
    latencies: list[float]
    statuses: Counter[int]
    answers: set[str | None]
    seconds: float
    server_cpu: float
    model_calls: int
    idle_rss: int
    peak_rss: int


class _PeakRss(threading.Thread):
    """Samples a server's RSS until stopped; ``peak`` is the largest sample."""

    def __init__(self, server: LocalServer) -> None:
        super().__init__(daemon=True)
        self.server = server
        self.peak = server.rss_bytes()
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.wait(RSS_SAMPLE_SECONDS):
            self.peak = max(self.peak, self.server.rss_bytes())

    def stop(self) -> int:
        self._done.set()
        self.join()
        self.peak = max(self.peak, self.server.rss_bytes())
        return self.peak


async def _clients(port: int, n: int, key: str) -> tuple[list[tuple[float, int, str | None]], float]:
    # One client (and one connection) per retrying caller: one shared pool would make httpcore's request-to-connection
    # assignment quadratic in N, and the clients, not the servers, would be measured. Plain HTTP: no TLS context.
    clients = [
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=CLIENT_TIMEOUT, verify=False) for _ in range(n)
    ]

    async def one(client: httpx.AsyncClient) -> tuple[float, int, str | None]:
        started = time.perf_counter()
        for attempt in range(MAX_ATTEMPTS):
            response = await client.post("/invocations", json={"prompt": PROMPT}, headers={"Idempotency-Key": key})
            if response.status_code not in RETRY_STATUSES or attempt == MAX_ATTEMPTS - 1:
                break
            await asyncio.sleep(float(response.headers.get("retry-after", "1")))
        text = response.json().get("text") if response.status_code == 200 else None
        return time.perf_counter() - started, response.status_code, text

    try:
        started = time.perf_counter()
        answers = await asyncio.gather(*(one(client) for client in clients))
        return answers, time.perf_counter() - started
    finally:
        for client in clients:
            await client.aclose()


def _model_calls(server: LocalServer) -> int:
    return int(httpx.get(f"http://127.0.0.1:{server.port}/stats", timeout=30).json()["model_calls"])


def storm(server: LocalServer, n: int, key: str) -> Storm:
    before = _model_calls(server)
    sampler = _PeakRss(server)
    idle = sampler.peak
    cpu = server.cpu_seconds()
    sampler.start()
    answers, seconds = asyncio.run(_clients(server.port, n, key))
    peak = sampler.stop()
    cpu = server.cpu_seconds() - cpu
    return Storm(
        latencies=[a[0] for a in answers],
        statuses=Counter(a[1] for a in answers),
        answers={a[2] for a in answers},
        seconds=seconds,
        server_cpu=cpu,
        model_calls=_model_calls(server) - before,
        idle_rss=idle,
        peak_rss=peak,
    )


def _percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def run_http_storm(
    n: int, latency: float, reps: int, record: Callable[..., dict[str, Any]], progress: Callable[[str], None]
) -> list[dict[str, Any]]:
    measured: dict[str, list[Storm]] = {impl: [] for impl in IMPLS}
    for rep in range(reps):
        servers = {impl: uvicorn_server(SERVER, "--impl", impl, "--latency", str(latency)) for impl in IMPLS}
        start_all(*servers.values())
        try:
            for impl in IMPLS if rep % 2 == 0 else IMPLS[::-1]:
                storm(servers[impl], 1, f"warm-up-{rep}")  # first-request costs (imports, pools) are not the storm's
                result = storm(servers[impl], n, f"storm-{rep}")
                measured[impl].append(result)
                progress(
                    f"http-storm n={n} {impl}: {result.model_calls // MODEL_CALLS_PER_RUN} runs, "
                    f"p99 {_percentile(result.latencies, 99) * 1e3:.0f} ms, peak RSS {result.peak_rss / 2**20:.0f} MiB"
                )
        finally:
            for server in servers.values():
                server.stop()
    rows = []
    for impl, storms in measured.items():
        statuses: Counter[int] = Counter()
        for s in storms:
            statuses.update(s.statuses)
        rows.append(
            record(
                "http-storm",
                n,
                impl,
                seconds=statistics.median(s.seconds for s in storms),
                p50_ms=statistics.median(_percentile(s.latencies, 50) for s in storms) * 1e3,
                p99_ms=statistics.median(_percentile(s.latencies, 99) for s in storms) * 1e3,
                peak_rss_mb=statistics.median(s.peak_rss for s in storms) / 2**20,
                rss_growth_mb=statistics.median(s.peak_rss - s.idle_rss for s in storms) / 2**20,
                server_cpu_ms=statistics.median(s.server_cpu for s in storms) / n * 1e3,
                model_calls=max(s.model_calls for s in storms),
                model_runs=statistics.median(s.model_calls for s in storms) / MODEL_CALLS_PER_RUN,
                completed=all(s.statuses == Counter({200: n}) and len(s.answers) == 1 for s in storms),
                note=f"model latency {latency * 1e3:.0f} ms per call; statuses "
                + ", ".join(f"{code}: {count}" for code, count in sorted(statuses.items())),
            )
        )
    reference = rows[-1]
    for row in rows:
        row["ratio"] = row["p99_ms"] / reference["p99_ms"]
        row["reference"] = reference["impl"]
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| n | impl | model runs | p50 ms | p99 ms | storm s | server CPU ms per request | peak RSS MiB | "
        "RSS growth MiB | all 200, one answer | p99 ratio |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for r in rows:
        if r["scenario"] == "http-storm":
            lines.append(
                f"| {r['n']} | {r['impl']} | {r['model_runs']:g} | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} | "
                f"{r['seconds']:.2f} | {r['server_cpu_ms']:.2f} | {r['peak_rss_mb']:.0f} | {r['rss_growth_mb']:.1f} | "
                f"{'yes' if r['completed'] else 'no'} | {r['ratio']:.2f} |"
            )
    return "\n".join(lines)
