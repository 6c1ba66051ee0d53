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
from pathlib import Path

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


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@contextlib.contextmanager
def _started(command: list[str], stderr: Path) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    """Start a server process whose stderr goes to the file ``stderr``; yields its URL once it listens."""
    with stderr.open("w") as err:
        process = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            # A test run started in the background of a shell ignores SIGINT, and its children inherit that: the
            # server must see the Ctrl+C these tests send, as it would in a terminal.
            preexec_fn=_default_sigint,
        )
    lines: queue.Queue[str] = queue.Queue()
    assert process.stdout is not None
    reader = threading.Thread(target=lambda: [lines.put(line) for line in process.stdout], daemon=True)  # type: ignore[union-attr]
    reader.start()
    try:
        while (found := re.search(r"serving on (http://\S+)", lines.get(timeout=WAIT))) is None:
            pass
        yield found.group(1), process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(WAIT)


def test_ctrl_c_ends_serve_with_one_line_not_a_traceback_and_every_invocation_logged_its_line(tmp_path: Path) -> None:
    stderr = tmp_path / "stderr"
    command = [sys.executable, "-m", "strands_py", "serve", "--port", "0"]
    with _started(command, stderr) as (url, process), httpx.Client(base_url=url, timeout=WAIT) as http:
        key = str(uuid.uuid4())
        prompt = {"prompt": "a prompt that stays private"}
        first = http.post("/invocations", json=prompt, headers={"Idempotency-Key": key})
        retry = http.post("/invocations", json=prompt, headers={"Idempotency-Key": key})
        process.send_signal(signal.SIGINT)
        assert process.wait(WAIT) == 130
    assert first.status_code == retry.status_code == 200
    err = stderr.read_text()
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert err.endswith("strands-py: stopped (interrupted)\n")
    lines = re.findall(r"INFO:strands_py.http:method=<POST>, key=<([0-9a-f]{16})>, status=<200>, outcome=<(\w+)>", err)
    assert [outcome for _, outcome in lines] == ["ran", "joined"] and lines[0][0] == lines[1][0]
    assert key not in err and "private" not in err


def test_negative_control_uvicorn_alone_ends_ctrl_c_with_a_traceback(tmp_path: Path) -> None:
    stderr = tmp_path / "stderr"
    plain = (
        "import uvicorn\n"
        "from strands_py.http import AgentApp\n"
        "from strands_py.http._cli import _AnnouncingServer\n"
        "from strands_py.http._demo import demo_agent_factory\n"
        "app = AgentApp(demo_agent_factory(), single_tenant=True)\n"
        "_AnnouncingServer(uvicorn.Config(app, port=0, log_level='warning'), [app]).run()\n"
    )
    with _started([sys.executable, "-c", plain], stderr) as (_, process):
        process.send_signal(signal.SIGINT)
        process.wait(WAIT)
    err = stderr.read_text()
    assert "Traceback" in err and "KeyboardInterrupt" in err
