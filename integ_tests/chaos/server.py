"""One worker process: ``AgentApp`` (one per session mode) and a direct-call endpoint, under uvicorn on 127.0.0.1.

Routes:

- ``POST /enqueue/invocations`` and ``POST /throw/invocations``: ``strands_py.http.AgentApp``, the conversation named
  by the ``X-Chaos-Conversation`` header;
- ``POST /direct``: body ``{"conversation", "mode", "prompt", "key"}``; the worker builds an Agent and awaits
  ``agent.invoke_async(prompt, idempotency_token=key)`` itself; ``{"text"}`` or ``{"error"}`` with a status
  (409 for a busy session, a lost lease or a wait timeout; 503 for a store outage or an abort; 500 otherwise).

Every request builds its own Agent (a real ``BedrockModel`` with the scripted client, the recorded tool, a
``FileSessionManager`` on the run's shared directory, ``IdempotencyConfig`` with the run's short lease and the tool's
reconcile function), as a server that builds an Agent per request does. All agents of the process share one store
object and one config per mode.
"""

from __future__ import annotations

import asyncio
import dataclasses
import faulthandler
import json
import logging
import random
import signal
import socket
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route
from strands.session.file_session_manager import FileSessionManager
from strands.types.exceptions import ConcurrencyException

import strands_py
from strands_py import (
    Agent,
    IdempotencyAbortedError,
    IdempotencyLeaseLostError,
    IdempotencyStoreError,
    IdempotencyWaitTimeoutError,
)
from strands_py.http import AgentApp, Server
from strands_py.idempotency import IdempotencyConfig, IdempotencyRecord, IdempotencyStore
from strands_py.testing import CountingStore

from .names import APP_SCOPE, CONVERSATION_HEADER, SCOPE, TENANT, TOOL
from .script import ChaosScript, Recorder
from .stores import close_store, open_store
from .workload import ENQUEUE, SLOW_TAKEOVER, SLOW_TAKEOVER_PROBABILITY, THROW


@dataclass(frozen=True)
class WorkerConfig:
    """What every worker process of a run is given (as a JSON file).

    Attributes:
        store: ``redis`` or ``dynamodb``.
        endpoint: ``host:port`` of the store (the fault proxy).
        sessions_dir: The ``FileSessionManager`` directory every process shares.
        events_dir: Where each process writes its records.
        notify_port: The orchestrator's UDP port for notifications.
        seed: The run's seed (the script's latencies).
        lease_seconds: ``IdempotencyConfig.lease_seconds``.
        wait_timeout_seconds: ``IdempotencyConfig.wait_timeout_seconds``.
        expires_after_seconds: ``IdempotencyConfig.expires_after_seconds``.
        run_timeout_seconds: ``AgentApp``'s ``run_timeout_seconds``.
        direct_scope: The durable scope of direct calls: ``SCOPE``, as HTTP requests have; another one only in the
            negative control that splits them (``Settings.split_scopes``).
        slow_takeovers: Send some takeovers of session locks late (``SlowTakeovers``): on in chaos runs.
    """

    store: str
    endpoint: str
    sessions_dir: str
    events_dir: str
    notify_port: int
    seed: int
    lease_seconds: float
    wait_timeout_seconds: float
    expires_after_seconds: float
    run_timeout_seconds: float = 60.0
    direct_scope: str = SCOPE
    slow_takeovers: bool = False

    def save(self, path: Path) -> None:
        """Write the config as JSON."""
        path.write_text(json.dumps(asdict(self)), encoding="utf-8")

    @classmethod
    def load(cls, path: str) -> WorkerConfig:
        """Read a config written by ``save``."""
        return cls(**json.loads(Path(path).read_text(encoding="utf-8")))


def _reconciled(script: ChaosScript) -> dict[str, Any]:
    """The config's ``uncertain_tools``: a call of the tool that died mid-run is reconciled with the tool's own
    records, as a tool with side effects asks its downstream system (it runs again only if its first run did not
    complete). Empty for a library without a journal (an older version, run to compare)."""
    if "uncertain_tools" not in {f.name for f in dataclasses.fields(IdempotencyConfig)}:
        return {}
    return {"uncertain_tools": {TOOL: script.reconcile}}


def _tenant(request: Request) -> str:
    """Every request's tenant: one for the whole run (so HTTP requests are scoped like direct calls, ``SCOPE``)."""
    return TENANT


def status_for(error: BaseException) -> int:
    """The HTTP status of a direct call that raised ``error`` (the client retries 409 and 5xx)."""
    if isinstance(error, ConcurrencyException | IdempotencyLeaseLostError | IdempotencyWaitTimeoutError):
        return 409
    if isinstance(error, IdempotencyStoreError | IdempotencyAbortedError):
        return 503
    return 500


class SlowTakeovers(CountingStore):
    """The worker's store under faults: some takeovers of a session lock are sent a while after the holder was judged.

    With ``SLOW_TAKEOVER_PROBABILITY``, a takeover waits a seeded 1.3 to 2.5 leases before it is sent (recorded as a
    ``slow_takeover`` fault in the worker's records): long enough for another host to judge the same holder, take the
    lock over, run its turn and release it. A takeover that replaces exactly the record it judged is refused then; one
    that lands on whatever is there rolls back the other host's answered turn, which the checker sees.
    """

    def __init__(self, inner: IdempotencyStore, recorder: Recorder, rng: random.Random, lease_seconds: float) -> None:
        super().__init__(inner)
        self._recorder = recorder
        self._rng = rng
        self._lease_seconds = lease_seconds

    async def take_over(self, record: IdempotencyRecord, version: str) -> bool:
        if "#session-" in record.key and self._rng.random() < SLOW_TAKEOVER_PROBABILITY:
            seconds = self._lease_seconds * self._rng.uniform(1.3, 2.5)
            self._recorder.emit({"ev": "fault", "kind": SLOW_TAKEOVER, "seconds": round(seconds, 3)})
            await asyncio.sleep(seconds)  # the fault's seeded length
        return await super().take_over(record, version)


class Worker:
    """The agents, the apps and the direct endpoint of this process."""

    def __init__(self, config: WorkerConfig, slot: int, generation: int) -> None:
        events = Path(config.events_dir) / f"worker-{slot}-{generation}.jsonl"
        self.config = config
        self.recorder = Recorder(events, config.notify_port, slot)
        self.store = open_store(config.store, config.endpoint)
        store: IdempotencyStore = self.store
        if config.slow_takeovers:
            rng = random.Random(f"{config.seed}/slow-takeovers/{slot}/{generation}")
            store = SlowTakeovers(self.store, self.recorder, rng, config.lease_seconds)
        script = ChaosScript(self.recorder, Path(config.events_dir), config.seed, slot, generation)
        # One model (one boto3 client) and one tool for the process, as a server shares them between requests.
        self._model, self._tools = script.model(), script.tools()
        self.configs = {
            mode: IdempotencyConfig(
                store=store,
                scope=config.direct_scope,
                lease_seconds=config.lease_seconds,
                wait_timeout_seconds=config.wait_timeout_seconds,
                expires_after_seconds=config.expires_after_seconds,
                session_invocation_mode=mode,
                **_reconciled(script),
            )
            for mode in (ENQUEUE, THROW)
        }
        self.apps = {
            mode: AgentApp(
                self._factory(mode),
                dataclasses.replace(self.configs[mode], scope=APP_SCOPE),  # and the tenant: SCOPE
                scope=_tenant,
                run_timeout_seconds=config.run_timeout_seconds,
                shutdown_grace_seconds=2.0,
            )
            for mode in (ENQUEUE, THROW)
        }

    def agent(self, conversation: str, mode: str) -> Agent:
        """A new Agent for one request in ``conversation`` (the conversation is restored now, before any lock)."""
        manager = FileSessionManager(session_id=conversation, storage_dir=self.config.sessions_dir)
        return Agent(
            model=self._model,
            tools=self._tools,
            callback_handler=None,
            session_manager=manager,
            idempotency=self.configs[mode],
        )

    def _factory(self, mode: str) -> Any:
        def factory(request: Request) -> Agent:
            return self.agent(request.headers[CONVERSATION_HEADER], mode)

        return factory

    async def direct(self, request: Request) -> Response:
        """``POST /direct``: the worker calls ``agent.invoke_async`` itself."""
        body = await request.json()
        agent = await run_in_threadpool(self.agent, body["conversation"], body["mode"])
        try:
            result = await agent.invoke_async(body["prompt"], idempotency_token=body["key"])
        except Exception as e:
            return JSONResponse({"error": type(e).__name__}, status_code=status_for(e))
        return JSONResponse({"text": str(result).strip()})

    def asgi(self) -> Starlette:
        """The process's ASGI app (the agent apps are drained by the server at shutdown: mounted apps get no
        lifespan)."""
        return Starlette(
            routes=[
                Route("/direct", self.direct, methods=["POST"]),
                Mount(f"/{ENQUEUE}", app=self.apps[ENQUEUE]),
                Mount(f"/{THROW}", app=self.apps[THROW]),
            ]
        )

    def close(self) -> None:
        """Close the store and the records."""
        close_store(self.store)
        self.recorder.close()


def serve(config: WorkerConfig, slot: int, generation: int, offset: float, ready: Callable[[int], None]) -> None:
    """Serve until SIGTERM; ``ready(port)`` is called once the socket listens.

    SIGUSR1 writes every thread's stack to stderr (the orchestrator asks a worker that does not stop in time).
    """
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(created).3f %(name)s %(message)s")
    logging.getLogger("strands_py").setLevel(logging.INFO)
    worker = Worker(config, slot, generation)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(256)
    port = sock.getsockname()[1]
    server = Server(
        uvicorn.Config(worker.asgi(), log_level="warning", timeout_graceful_shutdown=3), list(worker.apps.values())
    )
    ready_record = {"port": port, "offset": offset, "generation": generation, "library": strands_py.__file__}
    worker.recorder.emit({"ev": "ready", **ready_record})
    ready(port)
    try:
        server.run(sockets=[sock])
    finally:
        worker.close()
