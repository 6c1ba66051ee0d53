"""The worker processes of a run: started, watched, killed, stopped and continued, replaced, and stopped at the end.

Each of ``settings.workers`` slots holds one worker process at a time. A process that exits (killed by the
scheduler, or crashed) is replaced after a seeded pause by the slot's next *generation*, whose wall clock gets the
seed's offset for that slot and generation (``workload.clock_offset``). Processes are forked by multiprocessing's
fork server with the heavy third-party modules already imported (see ``worker``), so a replacement is up in about
half a second; each one sends its port on a pipe once it listens.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from .history import JsonLines
from .observer import Observer
from .worker import worker_main
from .workload import CLOCK_SKEW, Settings, clock_offset, respawn_delay

READY_TIMEOUT = 60.0
STOP_TIMEOUT = 10.0
_FORKSERVER = multiprocessing.get_context("forkserver")
# What the fork server imports once, before it forks any worker: the heavy third-party modules, never the library (see
# ``worker``: state the library makes at import must be each process's own).
PRELOAD = (
    "boto3",
    "botocore.session",
    "redis",
    "starlette.applications",
    "strands",
    "strands.agent",
    "strands.models.bedrock",
    "strands.session.file_session_manager",
    "uvicorn",
)


def _forkserver() -> Any:
    """The fork server context, its server set to import ``PRELOAD`` (before it starts)."""
    _FORKSERVER.set_forkserver_preload(list(PRELOAD))
    return _FORKSERVER


async def all_or_none(*awaitables: Awaitable[Any]) -> None:
    """Await every one of ``awaitables`` at once; if one fails (or this is cancelled), cancel the others first."""
    tasks = [asyncio.ensure_future(a) for a in awaitables]
    try:
        await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.wait(tasks)
        raise


async def readable(fd: int, timeout: float | None) -> bool:
    """Wait until ``fd`` is readable (data, end of file, or a process's exit on its sentinel); False on timeout."""
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()
    loop.add_reader(fd, lambda: ready.done() or ready.set_result(None))
    try:
        done, _ = await asyncio.wait([ready], timeout=timeout)
        return bool(done)
    finally:
        loop.remove_reader(fd)


@dataclass
class WorkerProcess:
    """One worker process: its slot, generation, process, port and wall-clock offset; ``stopped`` while SIGSTOPped."""

    slot: int
    generation: int
    process: Any  # multiprocessing's Process of the fork server context
    port: int
    offset: float
    stopped: bool = False
    watcher: asyncio.Future[None] | None = field(default=None, repr=False)

    @property
    def pid(self) -> int:
        """The process id."""
        return int(self.process.pid)

    @property
    def alive(self) -> bool:
        """Whether the process has not exited."""
        return self.process.exitcode is None

    def signal(self, number: int) -> None:
        """Send signal ``number`` if the process is alive."""
        if self.alive:
            os.kill(self.pid, number)


class Cluster:
    """The run's worker slots. Use from the orchestrator's event loop."""

    def __init__(
        self, settings: Settings, config: Path, library: Path, logs: Path, faults: JsonLines, observer: Observer
    ) -> None:
        self.settings = settings
        self._config = config
        self._library = library
        self._logs = logs
        self._faults = faults
        self._observer = observer
        self._generations = [0] * settings.workers
        self.workers: dict[int, WorkerProcess] = {}
        self._respawns: set[asyncio.Future[None]] = set()
        self._changed = asyncio.Event()
        self._closing = False
        self.crashes: list[str] = []

    async def start(self) -> None:
        """Start a process in every slot; returns once all of them listen."""
        await all_or_none(*(self._spawn(slot) for slot in range(self.settings.workers)))

    def up(self) -> list[WorkerProcess]:
        """The processes that are running and not stopped."""
        return [w for w in self.workers.values() if w.alive and not w.stopped]

    def by_pid(self, pid: int) -> WorkerProcess | None:
        """The running process with id ``pid``."""
        return next((w for w in self.workers.values() if w.pid == pid and w.alive), None)

    async def _spawn(self, slot: int) -> None:
        generation = self._generations[slot]
        self._generations[slot] += 1
        offset = clock_offset(self.settings, slot, generation)
        context = _forkserver()
        port_out, port_in = context.Pipe(duplex=False)
        log = self._logs / f"worker-{slot}-{generation}.log"
        arguments = (str(self._config), str(self._library), slot, generation, offset, str(log), port_in)
        process = context.Process(target=worker_main, args=arguments, name=f"chaos-worker-{slot}-{generation}")
        try:
            # The first start waits for the fork server to import the worker's modules: off the event loop.
            await asyncio.to_thread(process.start)
            port_in.close()
            port = await self._ready(port_out, slot, generation)
        except BaseException:
            # Cancelled (the run is closing) or failed: a half-started process is not left behind.
            if process.pid is not None and process.exitcode is None:
                process.kill()
                await asyncio.to_thread(process.join, STOP_TIMEOUT)
            raise
        finally:
            port_out.close()
        worker = WorkerProcess(slot, generation, process, port, offset)
        worker.watcher = asyncio.ensure_future(self._watch(worker))
        self.workers[slot] = worker
        if offset:
            self._record(CLOCK_SKEW, worker, offset=offset)
        self._notify()

    async def _ready(self, port_out: Connection, slot: int, generation: int) -> int:
        """The port the new process listens on, once it says so."""
        if not await readable(port_out.fileno(), READY_TIMEOUT):
            raise RuntimeError(f"worker {slot}/{generation} did not start in {READY_TIMEOUT:g}s")
        try:
            return int(port_out.recv())
        except EOFError:
            raise RuntimeError(f"worker {slot}/{generation} exited before it listened (see {self._logs})") from None

    async def _watch(self, worker: WorkerProcess) -> None:
        """Wait for the process to exit (bounded by the run: ``close`` ends it), then have it replaced."""
        await readable(worker.process.sentinel, None)
        await asyncio.to_thread(worker.process.join, STOP_TIMEOUT)  # its exit status is there already
        code = worker.process.exitcode
        self._observer.forget(worker.pid)
        self._notify()
        if self._closing:
            return
        if code != -signal.SIGKILL:
            self.crashes.append(f"worker {worker.slot}/{worker.generation} (pid {worker.pid}) exited with {code}")
        respawn = asyncio.ensure_future(self._respawn(worker))
        self._respawns.add(respawn)
        respawn.add_done_callback(self._respawns.discard)

    async def _respawn(self, worker: WorkerProcess) -> None:
        await asyncio.sleep(respawn_delay(self.settings, worker.slot, worker.generation))  # seeded downtime
        try:
            await self._spawn(worker.slot)
        except RuntimeError as e:
            self.crashes.append(str(e))
            self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def _record(self, kind: str, worker: WorkerProcess, **detail: Any) -> None:
        record = {"ev": "fault", "kind": kind, "slot": worker.slot, "pid": worker.pid, "mono": time.monotonic()}
        self._faults.write({**record, **detail})

    def kill(self, worker: WorkerProcess, kind: str, **detail: Any) -> None:
        """SIGKILL ``worker`` (recorded as a fault of ``kind``)."""
        if worker.alive:
            worker.signal(signal.SIGKILL)
            self._record(kind, worker, **detail)

    def stop(self, worker: WorkerProcess, kind: str, **detail: Any) -> None:
        """SIGSTOP ``worker`` (recorded as a fault of ``kind``)."""
        if worker.alive and not worker.stopped:
            worker.signal(signal.SIGSTOP)
            worker.stopped = True
            self._record(kind, worker, **detail)

    def cont(self, worker: WorkerProcess) -> None:
        """SIGCONT ``worker`` if it is stopped."""
        if worker.stopped:
            worker.stopped = False
            worker.signal(signal.SIGCONT)
            self._notify()

    def cont_all(self) -> None:
        """SIGCONT every stopped worker."""
        for worker in list(self.workers.values()):
            self.cont(worker)

    async def whole(self, timeout: float) -> bool:
        """Wait until every slot's process is up (at most ``timeout`` seconds); whether they are."""
        deadline = time.monotonic() + timeout
        while len(self.up()) < self.settings.workers:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            await self.changed(left)
        return True

    async def changed(self, timeout: float) -> None:
        """Wait until a worker starts, exits or is continued (at most ``timeout`` seconds)."""
        waiter = asyncio.ensure_future(self._changed.wait())
        try:
            await asyncio.wait([waiter], timeout=timeout)
        finally:
            waiter.cancel()

    async def close(self) -> None:
        """Stop every process: no more replacements, SIGCONT, SIGTERM, then SIGKILL after ``STOP_TIMEOUT`` (with a
        stack dump to its log first)."""
        self._closing = True
        respawns = list(self._respawns)
        for respawn in respawns:
            respawn.cancel()
        if respawns:
            await asyncio.wait(respawns, timeout=STOP_TIMEOUT)
        self.cont_all()
        workers = [w for w in self.workers.values() if w.alive]
        for worker in workers:
            worker.signal(signal.SIGTERM)
        watchers = [w.watcher for w in self.workers.values() if w.watcher is not None]
        if not watchers:
            return
        _, pending = await asyncio.wait(watchers, timeout=STOP_TIMEOUT)
        stuck = [w for w in workers if w.alive]
        for worker in stuck:
            self.crashes.append(f"worker {worker.slot}/{worker.generation} did not stop on SIGTERM (stacks in its log)")
            worker.signal(signal.SIGUSR1)
        if stuck:
            await asyncio.sleep(0.5)  # faulthandler writes the stacks to the log before the kill
        for worker in stuck:
            worker.signal(signal.SIGKILL)
        if pending:
            await asyncio.wait(pending, timeout=STOP_TIMEOUT)
