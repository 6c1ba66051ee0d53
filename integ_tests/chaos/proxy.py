"""A loopback TCP proxy between the workers and the store's server, with faults the scheduler switches on and off.

Modes (combinable, changed at any time from the proxy's event loop):

- ``delay(ms)``: every chunk, in each direction, is held ``ms`` milliseconds before it is passed on (order kept);
- ``drop()``: every open connection is reset now (both sides);
- ``refuse(True)``: new connections are accepted and reset at once, until ``refuse(False)``.

Written for the tests (a few dozen lines of asyncio streams) rather than taken from a library: what it must do is
exactly these three faults, switched at precise moments by a seeded schedule.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from contextlib import suppress

CHUNK = 65536
# SO_LINGER on, zero seconds: close() sends a reset instead of a graceful FIN.
_RESET = struct.pack("ii", 1, 0)


def _reset(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
    writer.transport.abort()


class FaultProxy:
    """Listens on 127.0.0.1 (a free port) and forwards to ``upstream`` (``host:port``). Use from one event loop."""

    def __init__(self, upstream: str) -> None:
        host, port = upstream.rsplit(":", 1)
        self._upstream = (host, int(port))
        self._server: asyncio.AbstractServer | None = None
        self._pairs: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.delay_ms = 0.0
        self.refusing = False
        self.port = 0
        self.connections = 0

    @property
    def endpoint(self) -> str:
        """``host:port`` to give the clients."""
        return f"127.0.0.1:{self.port}"

    async def start(self) -> FaultProxy:
        """Start listening."""
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def delay(self, ms: float) -> None:
        """Hold every chunk ``ms`` milliseconds (0: pass at once)."""
        self.delay_ms = ms

    def refuse(self, refusing: bool) -> None:
        """Reset new connections at once (True) or serve them (False)."""
        self.refusing = refusing

    def drop(self) -> int:
        """Reset every open connection; returns how many."""
        pairs = list(self._pairs)
        for client, upstream in pairs:
            _reset(client)
            _reset(upstream)
        return len(pairs)

    def heal(self) -> None:
        """No more faults: no delay, accept connections."""
        self.delay_ms = 0.0
        self.refusing = False

    async def close(self) -> None:
        """Stop listening, reset every connection, and wait for the forwarding tasks to end."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        self.drop()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5.0)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.refusing:
            _reset(writer)
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self._upstream)
        except OSError:
            _reset(writer)
            return
        self.connections += 1
        pair = (writer, up_writer)
        self._pairs.add(pair)
        forward = [
            asyncio.ensure_future(self._pump(reader, up_writer)),
            asyncio.ensure_future(self._pump(up_reader, writer)),
        ]
        self._tasks.update(forward)
        try:
            # One side closing ends the connection: the other direction is cut too.
            await asyncio.wait(forward, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in forward:
                task.cancel()
            await asyncio.wait(forward)
            self._tasks.difference_update(forward)
            self._pairs.discard(pair)
            for side in pair:
                side.close()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with suppress(OSError, asyncio.IncompleteReadError):
            while True:
                chunk = await reader.read(CHUNK)
                if not chunk:
                    return
                if self.delay_ms:
                    await asyncio.sleep(self.delay_ms / 1000)  # the injected latency, not a synchronisation
                writer.write(chunk)
                await writer.drain()
