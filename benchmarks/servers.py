"""Servers the benchmarks run on 127.0.0.1, each in a process of its own: redis-server, moto server, uvicorn.

A server in its own process keeps its CPU time, its heap and its garbage collections out of the measured process,
and lets the benchmark read what the server itself spent (``cpu_seconds``), as a real store on another host would.
Every server gets a random free port, is waited for until it answers, and is stopped (then killed) on exit.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

import psutil

# Generous: six servers importing strands, boto3 and friends at once on 2 cores shared with other work took over 30 s.
READY_TIMEOUT = 120.0
STOP_TIMEOUT = 10.0


def free_port() -> int:
    """A TCP port of 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LocalServer:
    """One server process; ``ready`` is polled until it returns True (or the process exits, or time runs out)."""

    def __init__(self, name: str, args: list[str], port: int, ready: Callable[[], bool] | None = None) -> None:
        self.name = name
        self.port = port
        self._args = args
        self._ready = ready or self._accepts_connections
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self._process is not None
        return self._process.pid

    def start(self) -> LocalServer:
        return self.launch().wait_ready()

    def launch(self) -> LocalServer:
        self._process = subprocess.Popen(self._args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return self

    def wait_ready(self) -> LocalServer:
        assert self._process is not None
        deadline = time.monotonic() + READY_TIMEOUT
        while not self._ready():
            if self._process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self._process.returncode} before it was ready")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{self.name} was not ready within {READY_TIMEOUT:.0f} s")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def cpu_seconds(self) -> float:
        """User + system CPU time the server process has used so far."""
        times = psutil.Process(self.pid).cpu_times()
        return float(times.user + times.system)

    def rss_bytes(self) -> int:
        return int(psutil.Process(self.pid).memory_info().rss)

    def _accepts_connections(self) -> bool:
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
            return True
        except OSError:
            return False

    def __enter__(self) -> LocalServer:
        return self.start()

    def __exit__(self, *_: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.stop()


def start_all(*servers: LocalServer) -> None:
    """Launch every server, then wait for each (their start-ups overlap); on failure, stop them all."""
    try:
        for server in servers:
            server.launch()
        for server in servers:
            server.wait_ready()
    except BaseException:
        for server in servers:
            server.stop()
        raise


def moto_server() -> LocalServer:
    """moto's DynamoDB (and every other service) as ``python -m moto.server``; endpoint ``http://127.0.0.1:<port>``."""
    port = free_port()
    return LocalServer("moto server", [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], port)


def redis_server() -> LocalServer:
    """Debian's redis-server without persistence (``--save '' --appendonly no``); ``redis://127.0.0.1:<port>``."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
    port = free_port()
    args = [binary, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no"]
    args += ["--dir", tempfile.gettempdir(), "--daemonize", "no", "--logfile", ""]
    return LocalServer("redis-server", args, port, ready=lambda: _redis_pings(port))


def _redis_pings(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def uvicorn_server(module: Path, *args: str) -> LocalServer:
    """``python <module> --port <port> <args>``, a script that serves an ASGI app; ready when ``GET /stats`` answers."""
    port = free_port()
    return LocalServer(
        f"{module.name} {' '.join(args)}",
        [sys.executable, str(module), "--port", str(port), *args],
        port,
        ready=lambda: _http_ok(port, "/stats"),
    )


def _http_ok(port: int, path: str) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
            return s.recv(16).startswith(b"HTTP/1.1 200")
    except OSError:
        return False
