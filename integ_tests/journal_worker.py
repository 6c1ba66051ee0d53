"""One OS process running one journaled session turn: ``python integ_tests/journal_worker.py <config.json>``.

The turn is four model calls and three tools (``pay_a``, ``pay_b``, ``pay_c``: side effects), on a real
``BedrockModel`` whose boto3 client is scripted, in a conversation persisted by a ``FileSessionManager`` directory
shared with the test, with a store on the test's server (Redis or the moto server). Every model call and every tool
run is appended to the test's ledger (one line each, flushed and fsynced, with this pid), so that the test counts what
was paid across processes, killed ones included.

``stop_at`` makes the process stop for good at one point of the turn (it writes ``<pid> stopped <point>`` to the
ledger and waits there until the test kills it):

- ``model:N``: inside the N-th model call (1-based), before its response exists;
- ``before-tool:X``: after the model asked for tool X (its response journaled), before X is marked started;
- ``tool:X``: inside tool X (marked started, its effect done, no result journaled);
- ``after-tool:X``: after X's result was journaled, before the next model call.

On success it prints one JSON line: the answer's text.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from typing import Any

import strands
from strands import tool
from strands.hooks import AfterToolCallEvent, BeforeToolCallEvent
from strands.session.file_session_manager import FileSessionManager

from strands_py import Agent
from strands_py.idempotency import IdempotencyConfig, IdempotencyStore
from strands_py.testing.bedrock import ScriptedBedrock, _ScriptedEventStream, _text_chunks

TOOLS = ("pay_a", "pay_b", "pay_c")
ANSWER = "Paid a, b and c."
FOREVER = 600.0


class Ledger:
    """The test's ledger file: one line per model call, tool run and stop, appended atomically (O_APPEND)."""

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def write(self, line: str) -> None:
        os.write(self.fd, f"{os.getpid()} {line}\n".encode())
        os.fsync(self.fd)


def _tool_use_chunks(step: int, name: str) -> list[dict[str, Any]]:
    # Deterministic ids: a model call made again after a crash asks for the very same call, as a real model
    # would be expected to when given the very same request.
    return [
        {"messageStart": {"role": "assistant"}},
        {
            "contentBlockStart": {
                "start": {"toolUse": {"toolUseId": f"call-{step}", "name": name}},
                "contentBlockIndex": 0,
            }
        },
        {
            "contentBlockDelta": {
                "delta": {"toolUse": {"input": json.dumps({"cents": 100 * step})}},
                "contentBlockIndex": 0,
            }
        },
        {"contentBlockStop": {"contentBlockIndex": 0}},
        {"messageStop": {"stopReason": "tool_use"}},
        {"metadata": {"usage": {"inputTokens": 10, "outputTokens": 5, "totalTokens": 15}, "metrics": {"latencyMs": 1}}},
    ]


class FourSteps(ScriptedBedrock):
    """Model call N asks for tool N (N = 1..3) and the fourth answers; it may stop inside one call."""

    def __init__(self, ledger: Ledger, stop_at: str | None) -> None:
        super().__init__()
        self.ledger = ledger
        self.stop_at = stop_at

    def stop(self, point: str) -> None:
        if self.stop_at == point:
            self.ledger.write(f"stopped {point}")
            threading.Event().wait(FOREVER)

    def converse_stream(self, **request: Any) -> dict[str, Any]:
        results = sum(1 for m in request["messages"] for b in m["content"] if "toolResult" in b)
        step = results + 1
        self.ledger.write(f"model {step}")
        self.stop(f"model:{step}")
        if step <= len(TOOLS):
            return {"stream": _ScriptedEventStream(_tool_use_chunks(step, TOOLS[step - 1]))}
        return {"stream": _ScriptedEventStream(_text_chunks(ANSWER))}

    def tools(self) -> list[Any]:
        script = self

        def make(name: str) -> Any:
            def pay(cents: int) -> str:
                script.ledger.write(f"tool {name}")
                script.stop(f"tool:{name}")
                return f"{name}: paid {cents} cents"

            pay.__name__ = name
            pay.__doc__ = f"Pay with {name}.\n\nArgs:\n    cents: The amount.\n"
            return tool(pay)

        return [make(name) for name in TOOLS]


def _reconcile(key: str | None, tool_input: Any) -> str:
    """What a payment service's lookup by idempotency key would answer: this payment went through."""
    return f"reconciled: paid {tool_input['cents']} cents"


def _uncertain(policy: str) -> Any:
    return _reconcile if policy == "reconcile" else policy


def _store(config: dict[str, Any]) -> IdempotencyStore:
    if config["store"] == "redis":
        from strands_py.idempotency.redis import RedisIdempotencyStore

        return RedisIdempotencyStore.from_url(config["url"])
    from _moto import dynamodb_store

    return dynamodb_store(config["url"], config["table"])


def main(path: str) -> None:
    with open(path) as f:
        config = json.load(f)
    ledger = Ledger(config["ledger"])
    script = FourSteps(ledger, config.get("stop_at"))
    if config.get("upstream"):
        # The peer: upstream's strands.Agent, no idempotency and no session (a retry simply runs the turn again).
        upstream = strands.Agent(model=script.model(), tools=script.tools(), callback_handler=None)
        upstream.hooks.add_callback(BeforeToolCallEvent, lambda e: script.stop(f"before-tool:{e.tool_use['name']}"))
        answer = upstream("Pay a, b and c.")
        print(json.dumps({"answer": "".join(b.get("text", "") for b in answer.message["content"])}), flush=True)
        return
    tools = script.tools()
    if config.get("extra_tool"):
        # The agent changed between the crash and the retry: one more tool, so every model request differs.

        @tool
        def refund(cents: int) -> str:
            """Refund a payment.

            Args:
                cents: The amount.
            """
            return f"refunded {cents} cents"

        tools.append(refund)
    agent = Agent(
        model=script.model(),
        tools=tools,
        callback_handler=None,
        session_manager=FileSessionManager(session_id="conv-1", storage_dir=config["sessions"]),
        idempotency=IdempotencyConfig(
            store=_store(config),
            scope="journal-integ",
            lease_seconds=config["lease_seconds"],
            journal=config["journal"],
            uncertain_tools=dict.fromkeys(TOOLS, _uncertain(config.get("uncertain", "retry"))),
            session_invocation_mode="enqueue",
        ),
    )
    agent.hooks.add_callback(BeforeToolCallEvent, lambda e: script.stop(f"before-tool:{e.tool_use['name']}"))
    agent.hooks.add_callback(AfterToolCallEvent, lambda e: script.stop(f"after-tool:{e.tool_use['name']}"))
    result = agent("Pay a, b and c.", idempotency_token=config["token"])
    text = "".join(block.get("text", "") for block in result.message["content"])
    print(json.dumps({"answer": text}), flush=True)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    main(sys.argv[1])
