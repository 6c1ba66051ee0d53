"""The orchestrator: one run of one store, recorded to a directory, then judged.

A run: write what the seed decided; open the conversations; start the store's server, the fault proxy in front of
it, and the workers (which reach the store only through the proxy); let the clients send the work turns while the
scheduler injects faults (for ``minutes``, or until the work turns are answered; then the proxy is healed and stopped
workers are continued); wait for every slot to be up, and send every conversation its closing turn; stop every
process; read back the conversations and each session lock record (from the server directly); stop the server. Every
process started here is stopped here, also on failure.

``run_store`` runs the fault-free run of a seed's workload, then its chaos run, and checks both.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.metadata
import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import boto3
import httpx
import strands
from strands.models import BedrockModel
from strands.session.file_session_manager import FileSessionManager

import strands_py

from .backends import running_store_server
from .checker import Report, Work, check, work_of
from .clients import Clients
from .cluster import Cluster, all_or_none
from .history import (
    CLIENTS,
    EVENTS,
    FAULTS,
    FINAL,
    LIBRARY,
    META,
    PHASES,
    SESSIONS,
    SETTINGS,
    WORKLOAD,
    FinalState,
    JsonLines,
    load_history,
    write_json,
)
from .names import AGENT_ID, SCOPE
from .observer import Observer
from .proxy import FaultProxy
from .scheduler import Scheduler
from .server import WorkerConfig
from .stores import close_store, lock_record, open_store
from .workload import CLOSING, WORK, Settings, Turn, Workload, make_workload

# How long every slot may take to be up again before the closing turns (a replacement takes seconds to start).
WHOLE_TIMEOUT = 120.0


def provenance() -> dict[str, object]:
    """What was tested: the interpreter, strands-agents, and the library's commit and uncommitted files (if in git)."""
    root = Path(__file__).resolve().parents[2]

    def git(*args: str) -> str:
        try:
            done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10, check=False)
        except (OSError, subprocess.TimeoutExpired):
            return ""
        return done.stdout if done.returncode == 0 else ""

    return {
        "python": sys.version.split()[0],
        "strands-agents": importlib.metadata.version("strands-agents"),
        "commit": git("rev-parse", "--short", "HEAD").strip(),
        "uncommitted": git("status", "--porcelain", "--", "strands_py").splitlines(),
    }


def snapshot_library(root: Path) -> Path:
    """Copy the library under test into ``root/library``; returns that directory (the runs' workers, and the moto
    server that creates the table, import the library from it).

    Several people edit the working tree while a run lasts (the long one, an hour): a worker forked later would import
    whatever is on disk then. One copy for the fault-free run and the chaos run of every store keeps them on one
    library, and keeps the code they judged beside their histories.
    """
    target = root / LIBRARY
    source = Path(strands_py.__file__).parent
    shutil.copytree(source, target / "strands_py", ignore=shutil.ignore_patterns("__pycache__"))
    write_json(target / "provenance.json", provenance())
    return target


def open_conversations(conversations: tuple[str, ...], directory: Path) -> None:
    """Create each session and its agent record before the processes share them.

    strands-agents 1.30's ``FileSessionManager`` writes every file through one fixed ``<file>.tmp`` path, so two
    processes creating one agent record at the same moment collide; a conversation's first request does this in a
    real deployment, once.
    """
    session = boto3.Session(region_name="us-east-1", aws_access_key_id="stub", aws_secret_access_key="stub")
    model = BedrockModel(model_id="us.anthropic.claude-sonnet-4-20250514-v1:0", boto_session=session)
    for conversation in conversations:
        manager = FileSessionManager(session_id=conversation, storage_dir=str(directory))
        strands.Agent(model=model, callback_handler=None, session_manager=manager)


async def read_final_state(
    settings: Settings, endpoint: str, conversations: tuple[str, ...], sessions: Path
) -> FinalState:
    """Each conversation's persisted messages, and its session lock record as the store's ``get`` returns it."""
    final = FinalState()
    for conversation in conversations:
        manager = FileSessionManager(session_id=conversation, storage_dir=str(sessions))
        messages = manager.session_repository.list_messages(conversation, AGENT_ID)
        final.conversations[conversation] = [m.to_message() for m in messages]
    store = open_store(settings.store, endpoint)
    try:
        for conversation in conversations:
            final.locks[conversation] = await lock_record(store, conversation)
    finally:
        close_store(store)
    return final


def phase_limit(settings: Settings, turns: int) -> float:
    """The longest a phase may take: every client's turns one after the other, each to its deadline, bounded."""
    per_client = -(-turns // settings.clients)
    return min(per_client * settings.turn_deadline_seconds, 4 * settings.minutes * 60 + 300)


async def _send(clients: Clients, turns: list[Turn], settings: Settings) -> None:
    """Send a phase's turns, giving up (cancelling the clients) past ``phase_limit``."""
    if not turns:
        return
    # Under faults, turns arrive at their seeded times (faults land on a busy system all along); the fault-free run
    # sends the same turns back to back: it measures what the workload costs, not how long it takes.
    task = asyncio.ensure_future(clients.run(turns, paced=settings.faults))
    done, _ = await asyncio.wait([task], timeout=phase_limit(settings, len(turns)))
    if not done:
        task.cancel()
        await asyncio.wait([task])
    else:
        task.result()  # raises what the clients raised


@dataclass
class _Rig:
    """What a run has running once its processes are up, and the records it keeps."""

    settings: Settings
    workload: Workload
    cluster: Cluster
    proxy: FaultProxy
    observer: Observer
    faults: JsonLines
    attempts: JsonLines
    phases: JsonLines
    troubles: list[str]

    async def drive(self) -> None:
        """The work turns under faults, then (faults healed, every slot up) the closing turns."""
        settings = self.settings
        limits = httpx.Limits(max_connections=200, max_keepalive_connections=50)
        async with httpx.AsyncClient(limits=limits) as http:
            clients = Clients(settings, self.cluster, self.attempts, http)
            scheduler = Scheduler(settings, self.cluster, self.proxy, self.observer, self.faults)
            # Faults for ``minutes``, or until the work turns are done; whatever is still in effect is then undone.
            injecting = asyncio.ensure_future(scheduler.run(settings.minutes * 60 if settings.faults else 0.0))
            try:
                await _send(clients, self.workload.of_phase(WORK), settings)
            finally:
                injecting.cancel()
                await asyncio.wait([injecting])
            phase(self.phases, "worked")
            if not await self.cluster.whole(WHOLE_TIMEOUT):
                self.troubles.append(f"not every worker slot was up {WHOLE_TIMEOUT:g}s after the faults stopped")
            await _send(clients, self.workload.of_phase(CLOSING), settings)
            phase(self.phases, "closed")


def phase(phases: JsonLines, name: str) -> None:
    """Record that the run reached phase ``name``."""
    phases.write({"ev": "phase", "name": name, "mono": time.monotonic()})


def _worker_config(settings: Settings, directory: Path, proxy: FaultProxy, observer: Observer) -> Path:
    """Write what every worker process is given; returns its path."""
    path = directory / "worker.json"
    WorkerConfig(
        store=settings.store,
        endpoint=proxy.endpoint,
        sessions_dir=str(directory / SESSIONS),
        events_dir=str(directory / EVENTS),
        notify_port=observer.port,
        seed=settings.seed,
        lease_seconds=settings.lease_seconds,
        wait_timeout_seconds=settings.wait_timeout_seconds,
        expires_after_seconds=settings.expires_after_seconds,
        direct_scope=f"{SCOPE}-direct" if settings.split_scopes else SCOPE,
        slow_takeovers=settings.faults,
    ).save(path)
    return path


async def execute(settings: Settings, directory: Path, library: Path) -> list[str]:
    """One run of ``settings`` recorded in ``directory`` (see the module docstring), on the library copied to
    ``library`` (``snapshot_library``); returns the harness's own troubles (worker crashes, slots that did not come
    back), which are not the library's violations."""
    workload = make_workload(settings)
    directory.mkdir(parents=True, exist_ok=False)
    write_json(directory / SETTINGS, settings.as_dict())
    write_json(directory / WORKLOAD, workload.as_dict())
    write_json(directory / META, {**json.loads((library / "provenance.json").read_text()), "library": str(library)})
    logs = directory / "logs"
    logs.mkdir()
    faults, attempts, phases = (JsonLines(directory / name) for name in (FAULTS, CLIENTS, PHASES))
    phase(phases, "begun")
    await asyncio.to_thread(open_conversations, workload.conversations, directory / SESSIONS)
    troubles: list[str] = []
    try:
        async with running_store_server(settings.store, logs / "store.log", library) as server:
            phase(phases, "store server started")
            proxy = await FaultProxy(server.endpoint).start()
            observer = await Observer.listen()
            config = _worker_config(settings, directory, proxy, observer)
            cluster = Cluster(settings, config, library, logs, faults, observer)
            try:
                # The workers start while the store's server does: they reach it only when requests arrive.
                await all_or_none(server.ready(), cluster.start())
                phase(phases, "started")
                rig = _Rig(settings, workload, cluster, proxy, observer, faults, attempts, phases, troubles)
                await rig.drive()
            finally:
                await cluster.close()
                await proxy.close()
                observer.close()
                troubles.extend(cluster.crashes)
                phase(phases, "stopped")
            final = await read_final_state(settings, server.endpoint, workload.conversations, directory / SESSIONS)
            write_json(directory / FINAL, final.as_dict())
    finally:
        for lines in (faults, attempts, phases):
            lines.close()
    return troubles


@dataclass
class RunOutcome:
    """A judged run: its settings, where its history is, its report, how long it took, and the harness's troubles."""

    settings: Settings
    directory: Path
    report: Report
    seconds: float
    troubles: list[str]

    @property
    def failed(self) -> bool:
        """Whether the run found violations (or the harness itself had trouble)."""
        return bool(self.report.violations or self.troubles)


def judged_run(settings: Settings, directory: Path, library: Path, baseline: Work | None = None) -> RunOutcome:
    """Execute one run on the library copied to ``library`` and check its history."""
    started = time.monotonic()
    troubles = asyncio.run(execute(settings, directory, library))
    report = check(load_history(directory), baseline)
    return RunOutcome(settings, directory, report, time.monotonic() - started, troubles)


def run_store(
    settings: Settings, root: Path, *, baseline: bool = True, library: Path | None = None
) -> list[RunOutcome]:
    """The fault-free run of ``settings``' workload (unless ``baseline`` is off), then its chaos run, both judged, on
    one copy of the library (``library``, or a new one in ``root``)."""
    library = library or snapshot_library(root)
    outcomes = []
    base_work = None
    if baseline:
        fault_free_settings = dataclasses.replace(settings, faults=False)
        fault_free = judged_run(fault_free_settings, root / f"{settings.store}-fault-free", library)
        outcomes.append(fault_free)
        base_work = work_of(load_history(fault_free.directory))
    outcomes.append(judged_run(settings, root / f"{settings.store}-chaos", library, base_work))
    return outcomes
