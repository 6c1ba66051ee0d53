"""The serving comparison's server (run by ``serving.py``, one process per implementation, under uvicorn).

``python benchmarks/serving_server.py --port P --impl IMPL [--redis-url URL]``

Every implementation serves ``POST /invocations`` with a body ``{"prompt": str}``: JSON by default, Server-Sent
Events with ``Accept: text/event-stream``. Each builds an agent per request on one shared scripted Bedrock model (a
real ``strands.models.BedrockModel`` whose boto3 client answers from a script, ``strands_py.testing``):

- ``fastapi``: a bare FastAPI endpoint (a pydantic body, the result returned as a dict) on a plain ``strands.Agent``.
- ``starlette``: a bare Starlette endpoint (``request.json()``, ``JSONResponse``) on a plain ``strands.Agent``.
- ``agentapp-memory`` / ``agentapp-redis``: ``strands_py.http.AgentApp`` on ``strands_py.Agent``, with the in-memory
  store or ``RedisIdempotencyStore`` (``--redis-url``); the default scope (per ``Authorization`` header).
- ``agentcore``: ``bedrock_agentcore``'s ``BedrockAgentCoreApp`` with an async entrypoint on a plain ``strands.Agent``
  (an async generator of events for a stream: AgentCore frames it as SSE).
- ``agentcore-adapter``: ``strands_py.http.agentcore.AgentCoreEntrypoint`` installed on a ``BedrockAgentCoreApp``.

The bare endpoints answer with the same body as ``AgentApp`` (stop reason, message, text, usage) and stream the same
event vocabulary (``data`` per text chunk, ``message``, ``result``), so that every implementation encodes the same
things. A prompt containing ``long answer`` is answered with ``--events`` text chunks in one model call; any other
prompt with the script's tool-use conversation (a tool call, the tool, then the answer: two model calls).

Beside the app, a small ASGI dispatcher in front of every implementation (the same for all) serves ``GET /stats``
(model calls so far, the process's CPU time, where strands-py was imported from) and, with ``--profile``,
``POST /profile/start`` and ``POST /profile/stop?path=FILE``: cProfile of the serving loop's thread, into ``FILE``.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import strands
import uvicorn
from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.types import ASGIApp, Receive, Scope, Send

import strands_py
from strands_py import Agent
from strands_py.idempotency import IdempotencyConfig
from strands_py.testing.bedrock import ScriptedBedrock

IMPLS = ("fastapi", "starlette", "agentapp-memory", "agentapp-redis", "agentcore", "agentcore-adapter")
LONG_ANSWER = "long answer"


class _Chunks:
    """What botocore returns as ``response["stream"]``: an iterable of chunk dicts with ``close()``."""

    def __init__(self, chunks: list[dict[str, Any]]) -> None:
        self._chunks = chunks

    def __iter__(self) -> Any:
        return iter(self._chunks)

    def close(self) -> None:
        pass


class ServingScript(ScriptedBedrock):
    """The tool-use conversation of ``ScriptedBedrock``, or a long text answer in ``events`` chunks."""

    def __init__(self, events: int) -> None:
        super().__init__()
        words = [f"word{i} " for i in range(events)]
        self._long = [
            {"messageStart": {"role": "assistant"}},
            *({"contentBlockDelta": {"delta": {"text": w}, "contentBlockIndex": 0}} for w in words),
            {"contentBlockStop": {"contentBlockIndex": 0}},
            {"messageStop": {"stopReason": "end_turn"}},
            {"metadata": {"usage": {"inputTokens": 9, "outputTokens": events, "totalTokens": 9 + events}}},
        ]

    def converse_stream(self, **request: Any) -> dict[str, Any]:
        response = super().converse_stream(**request)  # counts the call
        first = request.get("messages", [{}])[0].get("content", [{}])[0].get("text", "")
        return {"stream": _Chunks(self._long)} if LONG_ANSWER in first else response


class Invocation(BaseModel):
    """The bare FastAPI endpoint's body (FastAPI reads the annotation of its endpoint at module level)."""

    prompt: str


def body_of(result: Any) -> dict[str, Any]:
    """The bare endpoints' JSON body: the fields of ``AgentApp``'s (``structured_output`` is always None here)."""
    return {
        "stop_reason": result.stop_reason,
        "message": result.message,
        "text": str(result),
        "usage": dict(result.metrics.accumulated_usage),
        "structured_output": None,
    }


def events_of(event: Any) -> list[tuple[str, dict[str, Any]]]:
    """The bare endpoints' events for one strands event: ``data``, ``message``, ``result`` (as ``AgentApp``'s)."""
    if "result" in event:
        return [("result", body_of(event["result"]))]
    out = []
    if isinstance(event.get("data"), str) and event["data"]:
        out.append(("data", {"text": event["data"]}))
    if isinstance(event.get("message"), dict):
        out.append(("message", {"message": event["message"]}))
    return out


async def sse(agent: strands.Agent, prompt: str) -> AsyncIterator[bytes]:
    async for event in agent.stream_async(prompt):
        for name, data in events_of(event):
            yield f"event: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def wants_stream(accept: str | None) -> bool:
    return "text/event-stream" in (accept or "")


def build(impl: str, script: ServingScript, redis_url: str | None) -> ASGIApp:
    model, tools = script.model(), script.tools()

    def plain_agent() -> strands.Agent:
        return strands.Agent(model=model, tools=tools, callback_handler=None)

    def our_agent(request: Request) -> Agent:
        return Agent(model=model, tools=tools, callback_handler=None)

    if impl == "fastapi":
        from fastapi import FastAPI

        fastapi_app = FastAPI()

        @fastapi_app.post("/invocations")
        async def invoke_fastapi(invocation: Invocation, request: Request) -> Any:
            agent = plain_agent()
            if wants_stream(request.headers.get("accept")):
                return StreamingResponse(sse(agent, invocation.prompt), media_type="text/event-stream")
            return body_of(await agent.invoke_async(invocation.prompt))

        return fastapi_app

    if impl == "starlette":
        from starlette.applications import Starlette
        from starlette.routing import Route

        async def invoke_starlette(request: Request) -> Response:
            prompt = (await request.json())["prompt"]
            agent = plain_agent()
            if wants_stream(request.headers.get("accept")):
                return StreamingResponse(sse(agent, prompt), media_type="text/event-stream")
            return JSONResponse(body_of(await agent.invoke_async(prompt)))

        return Starlette(routes=[Route("/invocations", invoke_starlette, methods=["POST"])])

    if impl in ("agentapp-memory", "agentapp-redis"):
        from strands_py.http import AgentApp

        config = IdempotencyConfig()
        if impl == "agentapp-redis":
            from strands_py.idempotency.redis import RedisIdempotencyStore

            assert redis_url, "--redis-url is required for agentapp-redis"
            config = IdempotencyConfig(store=RedisIdempotencyStore.from_url(redis_url))
        return AgentApp(our_agent, config)

    from bedrock_agentcore.runtime import BedrockAgentCoreApp

    if impl == "agentcore":
        agentcore_app = BedrockAgentCoreApp()

        async def events(agent: strands.Agent, prompt: str) -> AsyncIterator[dict[str, Any]]:
            async for event in agent.stream_async(prompt):
                for name, data in events_of(event):
                    yield {"event": name, **data}

        @agentcore_app.entrypoint
        async def invoke_agentcore(payload: dict[str, Any], context: Any) -> Any:
            agent = plain_agent()
            if wants_stream(context.request.headers.get("accept")):
                return events(agent, payload["prompt"])
            return body_of(await agent.invoke_async(payload["prompt"]))

        return agentcore_app

    if impl == "agentcore-adapter":
        from strands_py.http.agentcore import AgentCoreEntrypoint

        entrypoint = AgentCoreEntrypoint(our_agent, IdempotencyConfig())
        adapted = BedrockAgentCoreApp(lifespan=entrypoint.lifespan)
        entrypoint.install(adapted)
        return adapted

    raise ValueError(f"unknown implementation {impl!r}")


class Dispatcher:
    """``GET /stats`` and the profiler's switches; everything else (lifespan included) goes to the app."""

    def __init__(self, app: ASGIApp, script: ServingScript, profiling: bool) -> None:
        self.app = app
        self.script = script
        self.profiling = profiling
        self.profiler: cProfile.Profile | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path")
        if path == "/stats":
            # The process's CPU time (all its threads, those that ended too) to the nanosecond, where psutil's
            # figure counts in clock ticks (10 ms).
            stats = {
                "model_calls": self.script.model_calls,
                "cpu_seconds": time.process_time(),
                "strands_py": str(Path(strands_py.__file__).parent),
            }
            await JSONResponse(stats)(scope, receive, send)
        elif self.profiling and path == "/profile/start":
            # The serving loop's thread only (not the model's worker threads), on cProfile's own wall clock: a CPU
            # clock (time.thread_time) is a system call per call event, which multiplied the profiled costs by ten.
            # The loop's waits all fall in its selector's select(), which the summary leaves out.
            assert threading.current_thread() is threading.main_thread()
            self.profiler = cProfile.Profile()
            self.profiler.enable()
            await Response(status_code=204)(scope, receive, send)
        elif self.profiling and path == "/profile/stop":
            assert self.profiler is not None
            self.profiler.disable()
            self.profiler.dump_stats(parse_qs(scope["query_string"].decode())["path"][0])
            self.profiler = None
            await Response(status_code=204)(scope, receive, send)
        else:
            await self.app(scope, receive, send)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--impl", choices=IMPLS, required=True)
    parser.add_argument("--redis-url", help="redis://127.0.0.1:PORT (agentapp-redis)")
    parser.add_argument("--events", type=int, default=200, help="text chunks of the long answer")
    parser.add_argument("--profile", action="store_true", help="serve /profile/start and /profile/stop")
    args = parser.parse_args()
    script = ServingScript(args.events)
    app = Dispatcher(build(args.impl, script, args.redis_url), script, args.profile)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False, backlog=4096)


if __name__ == "__main__":
    main()
