"""Real servers on 127.0.0.1 for integration tests: started by the test that needs them, stopped by it too."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import redis

READY_TIMEOUT = 10.0
STOP_TIMEOUT = 10.0
PORT_ATTEMPTS = 5


def free_port() -> int:
    """A TCP port of 127.0.0.1 that was free a moment ago (the server retries another if it was taken since)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def redis_server_binary() -> str:
    """``redis-server`` (the Debian package); skips the test where it is missing, fails on CI."""
    binary = shutil.which("redis-server")
    if binary is None:
        message = "redis-server is not installed (apt-get install redis-server)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return binary


class RedisServer:
    """One ``redis-server`` process on 127.0.0.1 and a random free port, without persistence by default.

    ``start()`` returns once the server logged that it accepts connections and answered PING (bounded by
    ``READY_TIMEOUT``); ``stop()`` terminates it (then kills it if it does not exit). ``persistent=True`` gives it an
    append-only file in a directory of its own that outlives ``stop()``, so a restart on the same port finds the
    data again (the directory is removed by ``cleanup()``).
    """

    def __init__(self, *, persistent: bool = False) -> None:
        self.binary = redis_server_binary()
        self.port = 0
        self.persistent = persistent
        self._dir = tempfile.mkdtemp(prefix="strands-py-redis-")
        self._process: subprocess.Popen[str] | None = None
        self._output: list[str] = []

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def start(self) -> RedisServer:
        """Start on ``self.port`` (a restart keeps it), or on a random free port the first time."""
        for _ in range(PORT_ATTEMPTS):
            port = self.port or free_port()
            if self._launch(port):
                self.port = port
                return self
            if self.port:
                break  # a restart must keep its port
        raise RuntimeError(f"redis-server did not start: {''.join(self._output[-20:])}")

    def _launch(self, port: int) -> bool:
        args = [self.binary, "--bind", "127.0.0.1", "--port", str(port), "--dir", self._dir, "--save", ""]
        args += ["--appendonly", "yes" if self.persistent else "no", "--logfile", "", "--daemonize", "no"]
        process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        ready = threading.Event()
        self._output = []

        def drain() -> None:
            # Reads the log to the end (so the pipe never fills), and tells when the server is ready or has exited.
            assert process.stdout is not None
            for line in process.stdout:
                self._output.append(line)
                if "Ready to accept connections" in line:
                    ready.set()
            ready.set()

        threading.Thread(target=drain, name=f"redis-server-{port}-log", daemon=True).start()
        if not ready.wait(READY_TIMEOUT) or process.poll() is not None:
            self._terminate(process)
            return False
        client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=READY_TIMEOUT)
        try:
            assert client.ping()
        finally:
            client.close()
        self._process = process
        return True

    def stop(self) -> None:
        """Terminate the server (SIGTERM: it exits cleanly, flushing its append-only file when persistent)."""
        if self._process is not None:
            self._terminate(self._process)
            self._process = None

    def kill(self) -> None:
        """Kill the server (SIGKILL): a crash."""
        if self._process is not None:
            self._process.kill()
            self._process.wait(STOP_TIMEOUT)
            self._process = None

    def cleanup(self) -> None:
        """Stop the server and remove its directory."""
        self.stop()
        shutil.rmtree(self._dir, ignore_errors=True)

    @staticmethod
    def _terminate(process: subprocess.Popen[str]) -> None:
        process.terminate()
        try:
            process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(STOP_TIMEOUT)


@contextmanager
def running_redis(*, persistent: bool = False) -> Iterator[RedisServer]:
    """A started ``RedisServer``, stopped (and its directory removed) on exit, whatever happens."""
    server = RedisServer(persistent=persistent)
    try:
        yield server.start()
    finally:
        server.cleanup()


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    """A redis-server for the module's tests (no persistence); stopped after the module."""
    with running_redis() as server:
        yield server
