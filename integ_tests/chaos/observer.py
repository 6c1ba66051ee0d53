"""The orchestrator's ears: every record a worker writes is also sent to it over UDP (best effort), so that it knows
which model calls and tool runs are in progress in which process, and the scheduler can aim at them."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

# A call in progress: (``model`` or ``tool``, turn, step).
_Key = tuple[str, str, int]


class Observer(asyncio.DatagramProtocol):
    """Follows the workers' records (UDP): which model calls and tool runs are in progress, in which process.

    Use from the orchestrator's event loop.
    """

    def __init__(self) -> None:
        self.port = 0
        self._transport: asyncio.DatagramTransport | None = None
        self._open: dict[int, dict[_Key, dict[str, Any]]] = {}
        self._waiters: list[tuple[Callable[[dict[str, Any]], bool], asyncio.Future[dict[str, Any]]]] = []

    @classmethod
    async def listen(cls) -> Observer:
        """An observer listening on a free UDP port of 127.0.0.1."""
        loop = asyncio.get_running_loop()
        transport, observer = await loop.create_datagram_endpoint(cls, local_addr=("127.0.0.1", 0))
        observer._transport = transport
        observer.port = transport.get_extra_info("sockname")[1]
        return observer

    def datagram_received(self, data: bytes, addr: Any) -> None:
        """One record from a worker."""
        try:
            record = json.loads(data)
        except ValueError:
            return
        kind, phase = record.get("ev"), record.get("phase")
        if kind not in ("model", "tool"):
            return
        key: _Key = (kind, str(record.get("turn")), int(record.get("step", 0)))
        calls = self._open.setdefault(int(record["pid"]), {})
        if phase == "start":
            calls[key] = record
            self._tell(record)
        else:
            calls.pop(key, None)

    def _tell(self, record: dict[str, Any]) -> None:
        for waiter in list(self._waiters):
            wanted, future = waiter
            if not future.done() and wanted(record):
                future.set_result(record)
                self._waiters.remove(waiter)
                return

    async def next_start(self, wanted: Callable[[dict[str, Any]], bool], timeout: float) -> dict[str, Any] | None:
        """The next model call or tool run to start that ``wanted`` accepts, or None after ``timeout`` seconds."""
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        waiter = (wanted, future)
        self._waiters.append(waiter)
        try:
            done, _ = await asyncio.wait([future], timeout=timeout)
            return future.result() if done else None
        finally:
            if waiter in self._waiters:
                self._waiters.remove(waiter)

    def in_progress(self, record: dict[str, Any]) -> bool:
        """Whether the call or run ``record`` started is still in progress (its end was not heard)."""
        key: _Key = (record["ev"], str(record.get("turn")), int(record.get("step", 0)))
        return key in self._open.get(int(record["pid"]), {})

    def forget(self, pid: int) -> None:
        """A process is gone: nothing of it is in progress any more."""
        self._open.pop(pid, None)

    def close(self) -> None:
        """Stop listening."""
        if self._transport is not None:
            self._transport.close()
