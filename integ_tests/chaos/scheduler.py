"""The fault scheduler: takes the seed's faults in order (``workload.fault_schedule``) and applies them.

Kills and stops are aimed: the scheduler waits for the next model call (or tool run) to start in a worker that is
up, lets ``aim_seconds`` pass (less than any scripted call lasts), and signals that process if the call is still in
progress. A stop lasts longer than the lease, then the process is continued. Store faults switch the proxy's mode for
a while. Every fault applied is recorded in ``faults.jsonl``; an aim that found no target in time is recorded as
``missed`` (and is not a fault).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from .cluster import Cluster, WorkerProcess
from .history import JsonLines
from .observer import Observer
from .proxy import FaultProxy
from .workload import (
    KILL_MODEL,
    KILL_TOOL,
    PAUSE,
    STORE_DELAY,
    STORE_DROP,
    STORE_REFUSE,
    Fault,
    Settings,
    fault_schedule,
)

# How long an aimed fault waits for a model call or tool run to start before it gives up.
AIM_TIMEOUT = 10.0


class Scheduler:
    """Applies the seed's faults for a while, then undoes whatever is still in effect (``heal``)."""

    def __init__(
        self, settings: Settings, cluster: Cluster, proxy: FaultProxy, observer: Observer, faults: JsonLines
    ) -> None:
        self.settings = settings
        self._cluster = cluster
        self._proxy = proxy
        self._observer = observer
        self._faults = faults
        self._continues: set[asyncio.Future[None]] = set()

    async def run(self, seconds: float) -> None:
        """Apply faults, one after the other, for ``seconds`` (or until cancelled); then heal."""
        end = time.monotonic() + seconds
        try:
            for fault in fault_schedule(self.settings):
                if time.monotonic() + fault.gap_seconds >= end:
                    break
                await asyncio.sleep(fault.gap_seconds)  # the seeded calm between faults
                await self._apply(fault, end)
        finally:
            self.heal()

    def heal(self) -> None:
        """End every fault in effect: the proxy passes everything, stopped workers are continued."""
        for task in list(self._continues):
            task.cancel()
        self._proxy.heal()
        self._cluster.cont_all()
        self._faults.write({"ev": "healed", "mono": time.monotonic()})

    def _record(self, kind: str, **detail: Any) -> None:
        self._faults.write({"ev": "fault", "kind": kind, "mono": time.monotonic(), **detail})

    async def _apply(self, fault: Fault, end: float) -> None:
        if fault.kind in (KILL_MODEL, KILL_TOOL, PAUSE):
            await self._aimed(fault, max(0.0, min(AIM_TIMEOUT, end - time.monotonic())))
        elif fault.kind == STORE_DELAY:
            self._proxy.delay(fault.delay_ms)
            self._record(fault.kind, delay_ms=fault.delay_ms, seconds=fault.seconds)
            await asyncio.sleep(fault.seconds)  # the fault's seeded duration
            self._proxy.delay(0.0)
        elif fault.kind == STORE_REFUSE:
            self._proxy.refuse(True)
            self._record(fault.kind, seconds=fault.seconds)
            await asyncio.sleep(fault.seconds)  # the fault's seeded duration
            self._proxy.refuse(False)
        elif fault.kind == STORE_DROP:
            self._record(fault.kind, connections=self._proxy.drop())

    async def _aimed(self, fault: Fault, timeout: float) -> None:
        wanted_kinds = {KILL_MODEL: ("model",), KILL_TOOL: ("tool",), PAUSE: ("model", "tool")}[fault.kind]

        def wanted(record: dict[str, Any]) -> bool:
            worker = self._cluster.by_pid(int(record["pid"]))
            return record["ev"] in wanted_kinds and worker is not None and not worker.stopped

        target = await self._observer.next_start(wanted, timeout)
        if target is not None:
            await asyncio.sleep(fault.aim_seconds)  # lands inside the call: every scripted call lasts longer
        worker = self._cluster.by_pid(int(target["pid"])) if target is not None else None
        if target is None or worker is None or not self._observer.in_progress(target):
            self._faults.write({"ev": "missed", "kind": fault.kind, "mono": time.monotonic()})
            return
        where = {"turn": target.get("turn"), "step": target.get("step"), "call": target["ev"]}
        if fault.kind == PAUSE:
            self._cluster.stop(worker, fault.kind, seconds=fault.seconds, **where)
            task = asyncio.ensure_future(self._continue_later(worker, fault.seconds))
            self._continues.add(task)
            task.add_done_callback(self._continues.discard)
        else:
            self._cluster.kill(worker, fault.kind, **where)

    async def _continue_later(self, worker: WorkerProcess, seconds: float) -> None:
        await asyncio.sleep(seconds)  # the stop's seeded length, past the lease
        self._cluster.cont(worker)
