"""One uvicorn worker process (multiprocessing, spawn): an AgentApp over a DynamoDB table on a moto server."""

from __future__ import annotations

import socket
import threading
from typing import Any

import boto3
import uvicorn
from starlette.types import Receive, Scope, Send

from strands_py import Agent
from strands_py.http import AgentApp, Server
from strands_py.http._demo import StreamingScript
from strands_py.idempotency import DynamoDBIdempotencyStore, IdempotencyConfig

TABLE = "agent-idempotency"
SCOPE = "http-workers"


def store_for(endpoint: str) -> DynamoDBIdempotencyStore:
    client = boto3.client(
        "dynamodb",
        region_name="us-east-1",
        endpoint_url=endpoint,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    return DynamoDBIdempotencyStore(TABLE, client=client)


def run(
    index: int,
    endpoint: str,
    answer: str,
    gate: Any,
    entered: Any,
    arrivals: Any,
    expected: int,
    all_in: Any,
    ports: Any,
    stop: Any,
    out: Any,
) -> None:
    """Serve until ``stop`` is set; report this process's model calls on ``out``.

    ``arrivals`` counts the requests of both workers; ``all_in`` is set when it reaches ``expected``.
    """
    script = StreamingScript(answer=answer, gate=gate, entered=entered, gate_timeout=120)
    agents = 0

    def make_agent(request: Any) -> Agent:
        nonlocal agents
        agents += 1
        return Agent(model=script.model(), tools=script.tools(), callback_handler=None)

    store = store_for(endpoint)
    app = AgentApp(make_agent, IdempotencyConfig(store=store, scope=SCOPE))

    async def counted(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            with arrivals.get_lock():
                arrivals.value += 1
                if arrivals.value >= expected:
                    all_in.set()
        await app(scope, receive, send)

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(1024)
    server = Server(uvicorn.Config(counted, log_level="warning"), [app])
    threading.Thread(target=lambda: (stop.wait(), setattr(server, "should_exit", True)), daemon=True).start()
    ports.put((index, sock.getsockname()[1]))
    server.run(sockets=[sock])
    store.close()
    out.put({"index": index, "model_calls": script.model_calls, "tool_calls": script.tool_calls, "agents": agents})
