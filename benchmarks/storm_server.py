"""The HTTP retry storm's server (run by ``storm.py``, one process per implementation, so its RSS is its own).

``python benchmarks/storm_server.py --port P --impl strands-py|strands --latency SECONDS``

Both serve ``POST /invocations`` with one Agent per request, on uvicorn, and ``GET /stats`` (the model calls so far):
- ``strands-py``: ``strands_py.http.AgentApp`` with an agent factory and the in-memory store (its default); a retry
  of an Idempotency-Key joins the running invocation or gets its result.
- ``strands``: a minimal Starlette endpoint that builds a ``strands.Agent`` per request and runs it. Agents of
  different requests share nothing, so it cannot deduplicate: every retry runs the agent again.
Every agent shares one scripted Bedrock model (a real ``BedrockModel`` whose client answers from a script) whose
calls each take ``--latency`` seconds on the model's worker thread, where a real network call would wait.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import strands
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Mount, Route

from strands_py import Agent
from strands_py.http import AgentApp
from strands_py.idempotency import IdempotencyConfig
from strands_py.testing.bedrock import ScriptedBedrock


class SlowScript(ScriptedBedrock):
    """``ScriptedBedrock`` whose every model call first waits ``latency`` seconds (a network call's wait)."""

    def __init__(self, latency: float) -> None:
        super().__init__()
        self.latency = latency

    def converse_stream(self, **request: Any) -> dict[str, Any]:
        time.sleep(self.latency)
        return super().converse_stream(**request)


def build_app(impl: str, latency: float) -> Starlette:
    script = SlowScript(latency)
    model, tools = script.model(), script.tools()

    async def stats(request: Request) -> JSONResponse:
        return JSONResponse({"model_calls": script.model_calls, "tool_calls": script.tool_calls})

    if impl == "strands-py":

        async def make_agent(request: Request) -> Agent:
            return Agent(model=model, tools=tools, callback_handler=None)

        agent_app = AgentApp(make_agent, IdempotencyConfig())
        routes = [Route("/stats", stats), Mount("/", app=agent_app)]
        return Starlette(routes=routes, lifespan=agent_app.lifespan)

    async def invoke(request: Request) -> JSONResponse:
        body = await request.json()
        agent = strands.Agent(model=model, tools=tools, callback_handler=None)
        result = await agent.invoke_async(body["prompt"])
        return JSONResponse({"text": str(result)})

    return Starlette(routes=[Route("/stats", stats), Route("/invocations", invoke, methods=["POST"])])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--impl", choices=["strands-py", "strands"], required=True)
    parser.add_argument("--latency", type=float, default=0.1, help="seconds per model call")
    args = parser.parse_args()
    uvicorn.run(
        build_app(args.impl, args.latency),
        host="127.0.0.1",
        port=args.port,
        log_level="warning",
        access_log=False,
        backlog=4096,
    )


if __name__ == "__main__":
    main()
