"""Helpers of the run-control and conversation tests: server processes (``control_server.py``), statuses, polls.

``Processes`` starts ``control_server.py`` processes sharing one redis-server and one sessions directory, reads their
ledger (what each paid, where each is held) and stops them. ``poll`` waits for a condition on a server's answers with
a deadline (each try is a request: no sleep decides the outcome, the deadline only bounds the wait).
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import httpx
from _servers import free_port
from http_support import WAIT

SERVER = str(Path(__file__).with_name("control_server.py"))
PROMPT = {"prompt": "What is the weather in Paris?"}

T = TypeVar("T")


async def poll(attempt: Callable[[], Awaitable[T]], done: Callable[[T], bool], what: str, timeout: float = WAIT) -> T:
    """Call ``attempt`` until ``done(result)``, at most ``timeout`` seconds; the last result.

    Raises:
        AssertionError: The condition never held.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = await attempt()
        if done(result):
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"never {what}: last {result!r}")
        await asyncio.sleep(0.02)  # between two requests: the deadline bounds the wait, the answers decide


async def status_of(http: httpx.AsyncClient, key: str) -> dict[str, Any]:
    """``GET /invocations/{key}``'s body (``{"status": 404}`` for an unknown key)."""
    response = await http.get(f"/invocations/{key}")
    if response.status_code == 404:
        return {"status": 404}
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def status_becomes(http: httpx.AsyncClient, key: str, status: str | int) -> dict[str, Any]:
    """Wait until the key's status is ``status``; its body."""
    return await poll(lambda: status_of(http, key), lambda body: body["status"] == status, f"{status}")


class Processes:
    """``control_server.py`` processes on free ports, one redis-server, one ledger, one sessions directory."""

    def __init__(self, tmp_path: Path, redis_url: str, lease_seconds: float) -> None:
        """Nothing started yet."""
        self.tmp = tmp_path
        self.redis_url = redis_url
        self.lease_seconds = lease_seconds
        self.ledger = str(tmp_path / "ledger")
        self.go = str(tmp_path / "go")
        self.sessions = str(tmp_path / "sessions")
        self.ports: dict[str, int] = {}
        self.processes: dict[str, subprocess.Popen[str]] = {}

    def start(self, name: str, **options: Any) -> str:
        """Start server ``name`` (``hold_at_word``, ``mode``); its URL once it accepts connections."""
        port = self.ports[name] = free_port()
        config = {
            "redis": self.redis_url,
            "ledger": self.ledger,
            "port": port,
            "lease_seconds": self.lease_seconds,
            "sessions": self.sessions,
            "go": self.go,
            **options,
        }
        path = self.tmp / f"{name}.json"
        path.write_text(json.dumps(config))
        process = self.processes[name] = subprocess.Popen(
            [sys.executable, SERVER, str(path)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        deadline = time.monotonic() + WAIT
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return self.url(name)
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    exited = process.poll() is not None and process.stderr is not None
                    output = process.stderr.read() if exited and process.stderr is not None else ""
                    raise AssertionError(f"server {name} did not start: {output}") from None
                time.sleep(0.05)  # polling a port: bounded above, not a synchronisation

    def url(self, name: str) -> str:
        """The server's base URL."""
        return f"http://127.0.0.1:{self.ports[name]}"

    def lines(self) -> list[tuple[int, str]]:
        """The ledger: (pid, what) per line."""
        try:
            with open(self.ledger) as f:
                return [(int(pid), what.strip()) for pid, what in (line.split(" ", 1) for line in f)]
        except FileNotFoundError:
            return []

    def paid_by(self, name: str) -> dict[str, int]:
        """Model calls and tool runs of server ``name``."""
        pid = self.processes[name].pid
        mine = [what for who, what in self.lines() if who == pid]
        return {"model": mine.count("model"), "tool": mine.count("tool")}

    def count(self, name: str, what: str) -> int:
        """How many ``what`` lines server ``name`` wrote."""
        pid = self.processes[name].pid
        return sum(1 for who, line in self.lines() if who == pid and line == what)

    async def until(self, name: str, what: str, times: int = 1) -> None:
        """Wait until server ``name`` wrote ``what`` to the ledger ``times`` times."""
        await poll(lambda: _now(self.count(name, what)), lambda n: n >= times, f"{name} {what} x{times}")

    def release(self) -> None:
        """Let every held answer go on (the ``go`` file)."""
        Path(self.go).touch()

    def stop_all(self) -> None:
        """Terminate every process (kill it if it does not exit)."""
        for process in self.processes.values():
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(WAIT)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(WAIT)


async def _now(value: T) -> T:
    return value
