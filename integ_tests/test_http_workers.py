"""Two uvicorn worker processes sharing one DynamoDB table (moto server on 127.0.0.1): one run per key, in all."""

from __future__ import annotations

import asyncio
import multiprocessing
from collections.abc import Iterator
from typing import Any

import http_worker as worker
import pytest
from http_support import ANSWER, WAIT, SerialMotoServer, client, headers, new_key, parse_sse, text_of

SPAWN = multiprocessing.get_context("spawn")
PROMPT = {"prompt": "What is the weather in Paris?"}


@pytest.fixture(scope="module")
def endpoint() -> Iterator[str]:
    with SerialMotoServer() as moto:
        store = worker.store_for(moto.url)
        store.create_table()
        store.close()
        yield moto.url


@pytest.mark.racing
async def test_two_worker_processes_run_a_key_once_between_them(endpoint: str) -> None:
    gate, entered, stop, all_in = SPAWN.Event(), SPAWN.Event(), SPAWN.Event(), SPAWN.Event()
    arrivals = SPAWN.Value("i", 0)
    ports, out = SPAWN.Queue(), SPAWN.Queue()
    key, per_worker = new_key(), 20
    processes = [
        SPAWN.Process(
            target=worker.run,
            args=(i, endpoint, ANSWER, gate, entered, arrivals, 2 * per_worker, all_in, ports, stop, out),
        )
        for i in range(2)
    ]
    for process in processes:
        process.start()
    try:
        urls = dict(await asyncio.to_thread(lambda: [ports.get(timeout=WAIT) for _ in processes]))

        async def call(index: int, streaming: bool) -> tuple[int, bool, Any]:
            async with client(f"http://127.0.0.1:{urls[index]}") as http:
                response = await http.post("/invocations", json=PROMPT, headers=headers(key, sse=streaming))
                return index, streaming, response

        calls = [asyncio.ensure_future(call(i % 2, i % 4 >= 2)) for i in range(2 * per_worker)]

        def ready() -> bool:  # every request reached a worker, and one worker's run is in its model call
            return bool(all_in.wait(WAIT) and entered.wait(WAIT))

        assert await asyncio.wait_for(asyncio.to_thread(ready), WAIT + 5)
        gate.set()
        responses = await asyncio.wait_for(asyncio.gather(*calls), WAIT * 2)
        stop.set()
        reports = sorted(await asyncio.to_thread(lambda: [out.get(timeout=WAIT) for _ in processes]), key=str)
    finally:
        gate.set()
        stop.set()
        for process in processes:
            process.join(WAIT)
            if process.is_alive():
                process.kill()

    assert sum(r["model_calls"] for r in reports) == 2 and sum(r["tool_calls"] for r in reports) == 1
    (primary,) = [r["index"] for r in reports if r["model_calls"]]
    assert all(r.status_code == 200 for _, _, r in responses)
    results = [parse_sse(r.text)[-1].data if streaming else r.json() for _, streaming, r in responses]
    assert all(result == results[0] for result in results) and results[0]["text"] == ANSWER + "\n"
    for index, streaming, response in responses:
        if index != primary:  # the other worker waited on the store, then replayed
            assert response.headers["idempotent-replayed"] == "true"
            if streaming:
                assert [e.id for e in parse_sse(response.text)] == ["r:1", "r:2"]
        elif streaming:
            assert text_of(parse_sse(response.text)) == ANSWER
    assert sum(r.headers.get("idempotent-replayed") != "true" for _, _, r in responses) == 1
