"""The worker's model and tool: a real ``BedrockModel`` whose boto3 client answers from a script, and a tool whose
side effect is recorded before and after it happens (and a reconcile function that reads those records).

A turn is three model steps: text and a call of the ``act`` tool (step 1), a second ``act`` call (step 2), the
answer. Each model call and each tool run takes a little while (seeded latency), standing where a network call or a
side effect would: that is where the scheduler's SIGKILLs and SIGSTOPs land. Before it starts and after it ends, the
call writes a record (fsync'ed) and tells the orchestrator over UDP (so the scheduler can aim at it). The answer names
the turn, the previous turn the model was sent, and this process and call (``names.answer_for``): two runs of one
turn give two different answers.
"""

from __future__ import annotations

import json
import os
import random
import socket
import threading
import time
from pathlib import Path
from typing import Any

import boto3
from strands import ToolContext, tool
from strands.models import BedrockModel

from strands_py import tool_idempotency_key

from .history import JsonLines
from .names import TOOL, answer_for, thinking_for, tool_result_for, turn_of_prompt

MODEL_LATENCY = (0.08, 0.3)
TOOL_LATENCY = (0.08, 0.3)
_USAGE = {"metadata": {"usage": {"inputTokens": 10, "outputTokens": 5, "totalTokens": 15}, "metrics": {"latencyMs": 1}}}


class Recorder:
    """Writes this process's records (fsync'ed) and sends each one to the orchestrator (UDP, best effort).

    Thread-safe: model calls and tools run on executor threads.
    """

    def __init__(self, path: Path, notify_port: int, slot: int) -> None:
        self._lines = JsonLines(path, durable=True)
        self._address = ("127.0.0.1", notify_port)
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._socket.setblocking(False)
        self._stamp = {"pid": os.getpid(), "slot": slot}

    def emit(self, record: dict[str, Any]) -> None:
        """Record ``record`` durably, then tell the orchestrator."""
        line = self._lines.write({**record, **self._stamp, "mono": time.monotonic()})
        try:
            self._socket.sendto(line.encode(), self._address)
        except OSError:
            pass  # the file is the history; a lost notification only makes the scheduler miss one target

    def close(self) -> None:
        """Close the file and the socket."""
        self._lines.close()
        self._socket.close()


class _EventStream:
    """What botocore returns as ``response["stream"]``: chunks to iterate, and ``close()``."""

    def __init__(self, chunks: list[dict[str, Any]]) -> None:
        self._chunks = chunks

    def __iter__(self) -> Any:
        return iter(self._chunks)

    def close(self) -> None:
        """Nothing to release."""


def _tool_use_chunks(text: str | None, tool_use_id: str, tool_input: dict[str, Any]) -> list[dict[str, Any]]:
    chunks: list[dict[str, Any]] = [{"messageStart": {"role": "assistant"}}]
    index = 0
    if text is not None:
        chunks += [
            {"contentBlockDelta": {"delta": {"text": text}, "contentBlockIndex": 0}},
            {"contentBlockStop": {"contentBlockIndex": 0}},
        ]
        index = 1
    start = {"toolUse": {"toolUseId": tool_use_id, "name": TOOL}}
    chunks += [
        {"contentBlockStart": {"start": start, "contentBlockIndex": index}},
        {"contentBlockDelta": {"delta": {"toolUse": {"input": json.dumps(tool_input)}}, "contentBlockIndex": index}},
        {"contentBlockStop": {"contentBlockIndex": index}},
        {"messageStop": {"stopReason": "tool_use"}},
        _USAGE,
    ]
    return chunks


def _text_chunks(text: str) -> list[dict[str, Any]]:
    return [
        {"messageStart": {"role": "assistant"}},
        {"contentBlockDelta": {"delta": {"text": text}, "contentBlockIndex": 0}},
        {"contentBlockStop": {"contentBlockIndex": 0}},
        {"messageStop": {"stopReason": "end_turn"}},
        _USAGE,
    ]


def position(messages: list[dict[str, Any]]) -> tuple[str, str | None, int]:
    """Where a model request stands: its turn, the turn before it in what the model was sent, and the step (tool
    results since the turn's prompt)."""
    prompts = [
        (index, turn)
        for index, message in enumerate(messages)
        if message.get("role") == "user"
        for turn in [next((turn_of_prompt(b["text"]) for b in message.get("content", []) if "text" in b), None)]
        if turn is not None
    ]
    if not prompts:
        raise ValueError("the model was sent no prompt of this run")
    index, turn = prompts[-1]
    previous = prompts[-2][1] if len(prompts) > 1 else None
    step = sum(1 for m in messages[index + 1 :] if any("toolResult" in b for b in m.get("content", [])))
    return turn, previous, step


def completed_in(events: Path, tool_key: str) -> bool:
    """Whether any worker's records say the tool call with ``tool_key`` completed (its ``done`` record)."""
    for path in events.glob("*.jsonl"):
        with path.open(encoding="utf-8") as lines:
            for line in lines:
                if tool_key in line and '"done"' in line and '"ev":"tool"' in line:
                    return True
    return False


class ChaosScript:
    """The scripted model and the recorded tool of one worker process. Thread-safe."""

    def __init__(self, recorder: Recorder, events: Path, seed: int, slot: int, generation: int) -> None:
        self._recorder = recorder
        self._events = events
        self._rng = random.Random(f"{seed}/latency/{slot}/{generation}")
        self._mutex = threading.Lock()
        self._calls = 0

    def _next(self, bounds: tuple[float, float]) -> tuple[int, float]:
        with self._mutex:
            self._calls += 1
            return self._calls, self._rng.uniform(*bounds)

    def model(self) -> BedrockModel:
        """A real ``BedrockModel`` whose boto3 client's ``converse_stream`` is this script."""
        session = boto3.Session(region_name="us-east-1", aws_access_key_id="stub", aws_secret_access_key="stub")
        model = BedrockModel(model_id="us.anthropic.claude-sonnet-4-20250514-v1:0", boto_session=session)
        model.client.converse_stream = self.converse_stream
        return model

    def converse_stream(self, **request: Any) -> dict[str, Any]:
        """Stand-in for ``bedrock-runtime.converse_stream`` (on an executor thread, like the real one)."""
        turn, previous, step = position(request.get("messages", []))
        call, latency = self._next(MODEL_LATENCY)
        where = {"turn": turn, "step": step, "call": call}
        self._recorder.emit({"ev": "model", "phase": "start", **where})
        time.sleep(latency)  # the model's network round trip: a kill or a stop aimed at this call lands here
        self._recorder.emit({"ev": "model", "phase": "end", **where})
        tool_use_id = f"tooluse-{os.getpid()}-{call}"
        if step == 0:
            chunks = _tool_use_chunks(thinking_for(turn), tool_use_id, {"turn": turn, "step": 1})
        elif step == 1:
            chunks = _tool_use_chunks(None, tool_use_id, {"turn": turn, "step": 2})
        else:
            chunks = _text_chunks(answer_for(turn, previous, os.getpid(), call))
        return {"stream": _EventStream(chunks)}

    def reconcile(self, tool_key: str | None, tool_input: dict[str, Any]) -> str | None:
        """The ``act`` tool's reconcile function (the library calls it for a call that died mid-run): asks the
        "downstream system", which is every worker's durable tool records, whether the call completed; its result if
        it did, None (run it) if it did not."""
        turn, step = str(tool_input.get("turn")), int(tool_input.get("step", 0))
        found = tool_key is not None and completed_in(self._events, tool_key)
        self._recorder.emit({"ev": "reconcile", "turn": turn, "step": step, "key": tool_key, "found": found})
        return tool_result_for(turn, step) if found else None

    def tools(self) -> list[Any]:
        """The ``act`` tool: a side effect recorded before and after, with its tool-call idempotency key."""
        script = self

        @tool(name=TOOL, context=True)
        def act(turn: str, step: int, tool_context: ToolContext) -> str:
            """Carry out one step of a turn (a side effect that must happen once).

            Args:
                turn: The turn.
                step: The step of the turn.
            """
            key = tool_idempotency_key(tool_context)
            _, latency = script._next(TOOL_LATENCY)
            where = {"turn": turn, "step": step, "key": key}
            script._recorder.emit({"ev": "tool", "phase": "start", **where})
            time.sleep(latency)  # the side effect itself: a kill or a stop aimed at this tool lands here
            script._recorder.emit({"ev": "tool", "phase": "done", **where})
            return tool_result_for(turn, step)

        return [act]
