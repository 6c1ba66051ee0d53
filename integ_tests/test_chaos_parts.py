"""The chaos run's parts that can be tested alone: the fault proxy (on a loopback echo server), the worker's clock
skew, the scripted model's reading of a request, the prompts and answers the checker parses, and the worker's slow
session-lock takeovers. Fast; no worker."""

from __future__ import annotations

import asyncio
import dataclasses
import random
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from chaos.history import read_lines
from chaos.names import answer_for, parse_answer, prompt_for, turn_of_prompt
from chaos.proxy import FaultProxy
from chaos.script import Recorder, position
from chaos.server import SlowTakeovers
from chaos.worker import skew_clock
from chaos.workload import SLOW_TAKEOVER

from strands_py.idempotency import IdempotencyRecord, InMemoryIdempotencyStore, RecordState

WAIT = 10.0


@pytest.fixture
async def echo() -> AsyncIterator[tuple[str, list[bytes]]]:
    """A loopback server that echoes what it receives; yields its ``host:port`` and everything it received."""
    received: list[bytes] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(1024):
            received.append(data)
            writer.write(data)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield f"127.0.0.1:{server.sockets[0].getsockname()[1]}", received
    finally:
        server.close()
        await server.wait_closed()


@pytest.fixture
async def proxy(echo: tuple[str, list[bytes]]) -> AsyncIterator[FaultProxy]:
    running = await FaultProxy(echo[0]).start()
    try:
        yield running
    finally:
        await running.close()


async def _connect(proxy: FaultProxy) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.wait_for(asyncio.open_connection("127.0.0.1", proxy.port), WAIT)


async def _round_trip(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, data: bytes) -> bytes:
    writer.write(data)
    await writer.drain()
    return await asyncio.wait_for(reader.readexactly(len(data)), WAIT)


async def _closed_by_peer(reader: asyncio.StreamReader) -> bool:
    try:
        return await asyncio.wait_for(reader.read(1), WAIT) == b""
    except ConnectionResetError:
        return True


async def test_the_proxy_passes_bytes_both_ways(proxy: FaultProxy) -> None:
    reader, writer = await _connect(proxy)

    assert await _round_trip(reader, writer, b"PING") == b"PING"
    writer.close()


async def test_a_delayed_proxy_still_delivers_every_chunk_in_order(proxy: FaultProxy) -> None:
    reader, writer = await _connect(proxy)
    proxy.delay(5)
    for chunk in (b"one ", b"two ", b"three"):
        writer.write(chunk)
        await writer.drain()

    assert await asyncio.wait_for(reader.readexactly(13), WAIT) == b"one two three"
    writer.close()


async def test_drop_resets_every_open_connection(proxy: FaultProxy) -> None:
    reader, writer = await _connect(proxy)
    assert await _round_trip(reader, writer, b"x") == b"x"

    assert proxy.drop() == 1
    assert await _closed_by_peer(reader)
    writer.close()


async def test_a_refusing_proxy_resets_new_connections_until_it_accepts_again(
    proxy: FaultProxy, echo: tuple[str, list[bytes]]
) -> None:
    proxy.refuse(True)
    reader, writer = await _connect(proxy)
    assert await _closed_by_peer(reader)
    writer.close()
    assert echo[1] == []  # the refused connection never reached the server

    proxy.refuse(False)
    reader, writer = await _connect(proxy)
    assert await _round_trip(reader, writer, b"back") == b"back"
    writer.close()


def test_a_skewed_clock_runs_ahead_or_behind(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(time, "time", lambda: 1000.0)
    monkeypatch.setattr(time, "time_ns", lambda: 1000 * 10**9)

    skew_clock(-600.0)

    assert time.time() == 400.0
    assert time.time_ns() == 400 * 10**9


def test_the_scripted_model_reads_the_turn_the_previous_turn_and_the_step() -> None:
    result = {"role": "user", "content": [{"toolResult": {"toolUseId": "u1", "status": "success", "content": []}}]}
    messages = [
        {"role": "user", "content": [{"text": prompt_for("t1")}]},
        {"role": "assistant", "content": [{"text": answer_for("t1", None, 1, 3)}]},
        {"role": "user", "content": [{"text": prompt_for("t2")}]},
        {"role": "assistant", "content": [{"toolUse": {"toolUseId": "u1", "name": "act", "input": {}}}]},
        result,
    ]

    assert position(messages[:1]) == ("t1", None, 0)
    assert position(messages[:3]) == ("t2", "t1", 0)
    assert position(messages) == ("t2", "t1", 1)


def test_prompts_and_answers_name_their_turns() -> None:
    answer = parse_answer(answer_for("t7", "t6", 4242, 17))

    assert turn_of_prompt(prompt_for("t7")) == "t7"
    assert turn_of_prompt("hello") is None
    assert answer is not None and (answer.turn, answer.previous, answer.pid, answer.call) == ("t7", "t6", 4242, 17)
    assert parse_answer(answer_for("t1", None, 1, 1)).previous is None  # type: ignore[union-attr]
    assert parse_answer("It is sunny.") is None


class _Always(random.Random):
    """A draw that always lands: every takeover is a slow one."""

    def random(self) -> float:
        return 0.0


async def test_a_slow_takeover_delays_session_lock_takeovers_only_and_is_recorded(tmp_path: Path) -> None:
    inner = InMemoryIdempotencyStore()
    recorder = Recorder(tmp_path / "worker.jsonl", notify_port=9, slot=0)  # the discard port: nobody listens
    store = SlowTakeovers(inner, recorder, _Always(), lease_seconds=0.01)
    now = time.time()
    taken = []
    for key in ("chaos#token", "chaos#session-conv"):
        held = IdempotencyRecord(
            key, RecordState.IN_PROGRESS, "a", version="v1", lease_seconds=0.01, expires_at=now + 60
        )
        assert await inner.claim(held, now) is None
        taker = dataclasses.replace(held, owner="b", version="v2")
        taken.append(await asyncio.wait_for(store.take_over(taker, "v1"), WAIT))
    recorder.close()

    faults = [r for r in read_lines(tmp_path / "worker.jsonl") if r["ev"] == "fault"]
    assert taken == [True, True]  # late, not lost
    assert [f["kind"] for f in faults] == [SLOW_TAKEOVER]  # the session lock's only
    assert 0.013 <= faults[0]["seconds"] <= 0.025  # 1.3 to 2.5 leases
