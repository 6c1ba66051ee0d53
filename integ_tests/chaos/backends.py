"""The store's server for one run, started fresh and stopped whatever happens.

- ``redis``: a real ``redis-server`` (``_servers.RedisServer``: 127.0.0.1, a free port, no persistence);
- ``dynamodb``: moto's server serialised as DynamoDB's per-item atomicity would be (``_moto.SerialMotoServer``), in a
  process of its own (``python -m <package>.backends PORT``), started beside the workers: it answers every worker's
  store calls one at a time, and in its own process it does not compete with the orchestrator's clients and proxy
  for one interpreter lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

INTEG_TESTS = Path(__file__).resolve().parents[1]
if str(INTEG_TESTS) not in sys.path:
    # _moto and _servers are top-level modules of integ_tests/, as pytest imports them (see the package docstring).
    sys.path.insert(0, str(INTEG_TESTS))

from .stores import DYNAMODB, REDIS  # noqa: E402

READY_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
READY = "READY"


def package_environment(library: Path) -> dict[str, str]:
    """The environment of a child process that runs ``python -m <this package>.<module>``: the library's copy
    (``library``), then the directory this package is imported from (the project root, or ``integ_tests/`` under
    pytest), lead its ``PYTHONPATH``."""
    depth = len(__package__.split("."))
    root = Path(__file__).resolve().parents[depth]
    paths = [str(library), str(root), str(INTEG_TESTS), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}


def module_command(module: str, *args: str) -> list[str]:
    """The command line that runs ``<this package>.<module>`` with ``args``."""
    return [sys.executable, "-m", f"{__package__}.{module}", *args]


class StoreServer:
    """A store's server for one run: ``endpoint`` is known at once, ``ready()`` returns once it serves."""

    def __init__(self, endpoint: str, process: asyncio.subprocess.Process | None = None, log: Path | None = None):
        self.endpoint = endpoint
        self._process = process
        self._log = log

    async def ready(self) -> None:
        """Wait (at most ``READY_TIMEOUT``) until the server serves, its table created.

        Raises:
            RuntimeError: It did not start.
        """
        if self._process is None:
            return
        assert self._process.stdout is not None
        line = await asyncio.wait_for(self._process.stdout.readline(), READY_TIMEOUT)
        if line.decode().split()[:1] != [READY]:
            raise RuntimeError(f"the moto server did not start (see {self._log})")


@contextlib.contextmanager
def _redis() -> Iterator[StoreServer]:
    from _servers import running_redis

    with running_redis() as server:
        yield StoreServer(f"127.0.0.1:{server.port}")


@contextlib.asynccontextmanager
async def _moto(log: Path, library: Path) -> AsyncIterator[StoreServer]:
    from _servers import free_port

    port = free_port()
    with log.open("ab") as output:
        process = await asyncio.create_subprocess_exec(
            *module_command("backends", str(port)),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=output,
            env=package_environment(library),
        )
    try:
        yield StoreServer(f"127.0.0.1:{port}", process, log)
    finally:
        if process.returncode is None:
            process.terminate()
            try:
                await asyncio.wait_for(process.wait(), STOP_TIMEOUT)
            except asyncio.TimeoutError:
                process.kill()
                await process.wait()


@contextlib.asynccontextmanager
async def running_store_server(kind: str, log: Path, library: Path) -> AsyncIterator[StoreServer]:
    """A fresh server for store ``kind`` (a moto server may still be starting: see ``StoreServer.ready``; it creates
    the table with the library copied to ``library``); stopped on exit."""
    if kind == REDIS:
        with _redis() as server:
            yield server
    elif kind == DYNAMODB:
        async with _moto(log, library) as server:
            yield server
    else:
        raise ValueError(f"unknown store {kind!r}")


def _serve_moto(port: int) -> None:
    """Entry point of the moto process: start on ``port``, create the table, say ``READY``, serve until stdin closes.

    The orchestrator stops it with SIGTERM (the default action ends it: it keeps nothing worth flushing); if the
    orchestrator dies first, its end of our stdin closes and we exit too.
    """
    from _moto import SerialMotoServer, dynamodb_store

    from .names import TABLE

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    server = SerialMotoServer(port).start()
    try:
        with dynamodb_store(server.url, TABLE) as store:
            store.create_table()
        print(READY, flush=True)
        sys.stdin.read()
    finally:
        server.stop()


if __name__ == "__main__":
    _serve_moto(int(sys.argv[1]))
