"""``python -m strands_py serve`` as a newcomer runs it: a real process, the scripted demo agent, curl-like clients."""

from __future__ import annotations

import contextlib
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator

import httpx
from http_support import WAIT, parse_sse, text_of

from strands_py.http._demo import DEMO_ANSWER


@contextlib.contextmanager
def _serve(*args: str) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    """Start ``serve`` on a free port; yields its URL once it listens; SIGTERM and wait on exit."""
    process = subprocess.Popen(
        [sys.executable, "-m", "strands_py", "serve", "--port", "0", "--log-level", "warning", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    lines: queue.Queue[str] = queue.Queue()
    assert process.stdout is not None
    reader = threading.Thread(target=lambda: [lines.put(line) for line in process.stdout], daemon=True)  # type: ignore[union-attr]
    reader.start()
    try:
        while True:
            line = lines.get(timeout=WAIT)
            found = re.search(r"serving on (http://\S+)", line)
            if found:
                break
        yield found.group(1), process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        try:
            process.wait(WAIT)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait(WAIT)


def test_serve_answers_json_sse_a_retry_a_resume_and_the_page_then_drains_on_sigterm() -> None:
    with _serve() as (url, process), httpx.Client(base_url=url, timeout=WAIT) as http:
        key = f'"{uuid.uuid4()}"'
        first = http.post("/invocations", json={"prompt": "Weather in Paris?"}, headers={"Idempotency-Key": key})
        retry = http.post(
            "/invocations",
            json={"prompt": "Weather in Paris?"},
            headers={"Idempotency-Key": key, "Accept": "text/event-stream"},
        )
        events = parse_sse(retry.text)
        resumed = http.get(f"/invocations/{key.strip(chr(34))}/events", headers={"Last-Event-ID": events[-3].id})
        page = http.get("/")

        # A run in flight when SIGTERM arrives finishes within the grace period and reaches its client.
        with http.stream(
            "POST",
            "/invocations",
            json={"prompt": "Again?"},
            headers={"Idempotency-Key": str(uuid.uuid4()), "Accept": "text/event-stream"},
        ) as streaming:
            body = ""
            chunks = streaming.iter_text()
            while "event: data" not in body:
                body += next(chunks)
            process.send_signal(signal.SIGTERM)
            body += "".join(chunks)
        # uvicorn re-raises the signal it caught once its (draining) shutdown is done.
        assert process.wait(WAIT) == -signal.SIGTERM

    assert first.status_code == 200 and first.json()["text"] == DEMO_ANSWER + "\n"
    assert retry.headers["idempotent-replayed"] == "true" and text_of(events) == DEMO_ANSWER
    assert [e.event for e in parse_sse(resumed.text)] == ["message", "result"]
    assert page.status_code == 200 and "EventSource" in page.text
    drained = parse_sse(body)
    assert drained[-1].event == "result" and text_of(drained) == DEMO_ANSWER
