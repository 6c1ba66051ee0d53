"""Scenario 6: what heartbeats cost (issue 10): store writes per minute per running invocation.

A primary is held open (its model call waits at a gate) for a few seconds with a short lease, on each shared store
(DynamoDB on a moto server, Redis on redis-server), and the renewals it sends meanwhile are timed and counted: the
store's ``renew`` calls, and the round trips they cost on the wire (``UpdateItem``; ``EVALSHA``). The heartbeat
sleeps ``lease_seconds / 3`` between the end of one renewal and the start of the next, so its period is that
interval plus the renewal's own latency (the round trip), which does not depend on the lease: the rate at the
default lease (30 s) is 60 / (10 s + that latency). Both figures are printed, the measured one and the one at the
default lease. Powertools has no heartbeat (a running record is not written until it completes): its figure is 0,
and a crashed owner blocks its key until the record expires.
"""

from __future__ import annotations

import contextlib
import statistics
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import redis
from durable import PROMPT, commandstats, counting_session, create_table
from servers import moto_server, redis_server

from strands_py import Agent
from strands_py.idempotency import DynamoDBIdempotencyStore, IdempotencyConfig, IdempotencyStore
from strands_py.idempotency.redis import RedisIdempotencyStore
from strands_py.testing.bedrock import ScriptedBedrock
from strands_py.testing.counting import CountingStore

DEFAULT_LEASE_SECONDS = IdempotencyConfig().lease_seconds
START_TIMEOUT = 30.0


@contextlib.contextmanager
def dynamodb_store() -> Iterator[tuple[IdempotencyStore, Callable[[], Counter[str]]]]:
    with moto_server() as server:
        calls: Counter[str] = Counter()
        endpoint = create_table(server)
        with DynamoDBIdempotencyStore(
            "idempotency", boto3_session=counting_session(calls), endpoint_url=endpoint
        ) as store:
            yield store, lambda: Counter(calls)


@contextlib.contextmanager
def redis_store() -> Iterator[tuple[IdempotencyStore, Callable[[], Counter[str]]]]:
    with redis_server() as server:
        url = f"redis://127.0.0.1:{server.port}"
        admin = redis.Redis.from_url(url)
        with RedisIdempotencyStore.from_url(url) as store:
            yield store, commandstats(admin, "strands-py", "calls")
        admin.close()


class _TimedStore(CountingStore):
    """Counts like ``CountingStore`` and notes when each renewal was sent."""

    def __init__(self, inner: IdempotencyStore) -> None:
        super().__init__(inner)
        self.renewed_at: list[float] = []

    async def renew(
        self,
        key: str,
        owner: str,
        *,
        version: str,
        lease_seconds: float,
        expires_at: float,
        checkpoint: str | None = None,
    ) -> bool:
        self.renewed_at.append(time.monotonic())
        return await super().renew(
            key, owner, version=version, lease_seconds=lease_seconds, expires_at=expires_at, checkpoint=checkpoint
        )


def held_run(
    store: IdempotencyStore, wire_calls: Callable[[], Counter[str]], lease: float, hold: float, token: str
) -> tuple[float, dict[str, float]]:
    """Hold one primary open for ``hold`` seconds: its renewal period, and the round trips per renewal."""
    counting = _TimedStore(store)
    gate = threading.Event()
    script = ScriptedBedrock(gate=gate, gate_timeout=hold + START_TIMEOUT)
    agent = Agent(
        model=script.model(),
        tools=script.tools(),
        callback_handler=None,
        idempotency=IdempotencyConfig(store=counting, lease_seconds=lease),
    )
    runner = threading.Thread(target=agent, args=(PROMPT,), kwargs={"idempotency_token": token})
    runner.start()
    try:
        # The model call has started: the claim is taken and the heartbeat runs.
        if not script.entered.wait(START_TIMEOUT):
            raise RuntimeError("the held invocation did not start")
        wire, opened = wire_calls(), time.monotonic()
        time.sleep(hold)  # the measurement window: renewals happen on their own schedule meanwhile
        wire, closed = wire_calls() - wire, time.monotonic()
    finally:
        gate.set()
        runner.join(START_TIMEOUT)
    times = counting.renewed_at
    if len(times) < 3:
        raise RuntimeError(f"only {len(times)} renewals in {hold} s at a {lease} s lease")
    period = (times[-1] - times[0]) / (len(times) - 1)
    # Round trips per renewal, over the window (the claim came before it, the completion after it).
    renewals = sum(1 for t in times if opened <= t <= closed)
    return period, {op: n / renewals for op, n in sorted(wire.items()) if n}


def run_heartbeat(
    lease: float, hold: float, reps: int, record: Callable[..., dict[str, Any]], progress: Callable[[str], None]
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for name, stores in (("dynamodb", dynamodb_store), ("redis", redis_store)):
        with stores() as (store, wire_calls):
            measured = [held_run(store, wire_calls, lease, hold, f"heartbeat-{rep}") for rep in range(reps)]
        period = statistics.median(m[0] for m in measured)
        per_minute = 60 / period
        scaled = 60 / (DEFAULT_LEASE_SECONDS / 3 + period - lease / 3)
        rows.append(
            record(
                f"heartbeat-{name}",
                reps,
                "strands-py",
                seconds=hold,
                completed=True,
                lease_seconds=lease,
                writes_per_minute=per_minute,
                writes_per_minute_default_lease=scaled,
                store_calls=measured[-1][1],
                note=f"a renewal every {period * 1e3:.0f} ms (interval {lease / 3 * 1e3:.0f} ms + the renewal's "
                f"latency); at the default {DEFAULT_LEASE_SECONDS:g} s lease: {scaled:.2f} writes per minute",
            )
        )
        progress(f"heartbeat {name}: {per_minute:.1f} writes/min at lease {lease:g} s, {scaled:.2f} at 30 s")
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| store | lease (s) | held (s) | renewals per minute (measured) | at the 30 s default lease | round trips per "
        "renewal | Powertools |",
        "|---|---:|---:|---:|---:|---|---:|",
    ]
    for r in rows:
        if r["scenario"].startswith("heartbeat-"):
            calls = ", ".join(f"{op} {v:g}" for op, v in (r["store_calls"] or {}).items())
            lines.append(
                f"| {r['scenario'].removeprefix('heartbeat-')} | {r['lease_seconds']:g} | {r['seconds']:g} | "
                f"{r['writes_per_minute']:.1f} | {r['writes_per_minute_default_lease']:.2f} | {calls} | 0 |"
            )
    return "\n".join(lines)
