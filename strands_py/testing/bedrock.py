"""A real ``strands.models.BedrockModel`` whose boto3 client answers from a script instead of AWS.

Only ``converse_stream`` is replaced, on the real boto3 ``bedrock-runtime`` client instance, so everything else
(request formatting, the ``asyncio.to_thread`` hop that runs the call on the loop's default executor, event
parsing, the tool-use cycle) is strands' own code. The script is a two-cycle conversation: the first call asks for
the ``lookup_weather`` tool, the call after the tool result answers with text.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from typing import Any

import boto3
from strands import tool
from strands.models import BedrockModel

STUB_ANSWER = "It is sunny in Paris, 21 degrees."


class _ScriptedEventStream:
    """What botocore returns as ``response["stream"]``: an iterable of chunk dicts with ``close()``."""

    def __init__(self, chunks: list[dict[str, Any]]) -> None:
        self._chunks = chunks

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self._chunks)

    def close(self) -> None:
        """Nothing to release: the chunks are in memory."""


def _tool_use_chunks(call_number: int) -> list[dict[str, Any]]:
    tool_input = json.dumps({"city": "Paris"})
    return [
        {"messageStart": {"role": "assistant"}},
        {
            "contentBlockStart": {
                "start": {"toolUse": {"toolUseId": f"tooluse-{call_number}", "name": "lookup_weather"}},
                "contentBlockIndex": 0,
            }
        },
        {"contentBlockDelta": {"delta": {"toolUse": {"input": tool_input}}, "contentBlockIndex": 0}},
        {"contentBlockStop": {"contentBlockIndex": 0}},
        {"messageStop": {"stopReason": "tool_use"}},
        {"metadata": {"usage": {"inputTokens": 20, "outputTokens": 8, "totalTokens": 28}, "metrics": {"latencyMs": 1}}},
    ]


def _text_chunks(text: str) -> list[dict[str, Any]]:
    return [
        {"messageStart": {"role": "assistant"}},
        {"contentBlockDelta": {"delta": {"text": text}, "contentBlockIndex": 0}},
        {"contentBlockStop": {"contentBlockIndex": 0}},
        {"messageStop": {"stopReason": "end_turn"}},
        {"metadata": {"usage": {"inputTokens": 40, "outputTokens": 9, "totalTokens": 49}, "metrics": {"latencyMs": 1}}},
    ]


def _last_turn_has_tool_result(messages: list[dict[str, Any]]) -> bool:
    return bool(messages) and any("toolResult" in block for block in messages[-1].get("content", []))


class ScriptedBedrock:
    """Counts model and tool calls, and can hold model calls at a gate to keep a primary in flight.

    ``gate``: when given, every model call waits for it (at most ``gate_timeout`` seconds) inside the executor
    worker, exactly where a real network call would sit. ``fail_with``: when given, every model call raises it.
    ``answer``: the final text.
    """

    def __init__(
        self,
        *,
        gate: threading.Event | None = None,
        fail_with: BaseException | None = None,
        answer: str = STUB_ANSWER,
        with_tool: bool = True,
        gate_timeout: float = 60.0,
        entered: Any = None,
    ) -> None:
        """Create a script; ``model()`` builds a ``BedrockModel`` wired to it."""
        self.gate = gate
        self.fail_with = fail_with
        self.answer = answer
        self.with_tool = with_tool
        self.gate_timeout = gate_timeout
        self.model_calls = 0
        self.tool_calls = 0
        self.model_calls_in_progress = 0
        self.tool_calls_in_progress = 0
        # Any object with set()/is_set(): a multiprocessing.Event lets another process see the model call start.
        self.entered = entered if entered is not None else threading.Event()
        self._mutex = threading.Lock()

    @property
    def calls_in_progress(self) -> int:
        """Model and tool calls running right now (each on an executor worker)."""
        return self.model_calls_in_progress + self.tool_calls_in_progress

    def model(self) -> BedrockModel:
        """A real ``BedrockModel`` whose boto3 client's ``converse_stream`` is this script."""
        # Dummy credentials: the client is real, but the only operation the agent uses is answered locally.
        session = boto3.Session(region_name="us-east-1", aws_access_key_id="stub", aws_secret_access_key="stub")
        model = BedrockModel(model_id="us.anthropic.claude-sonnet-4-20250514-v1:0", boto_session=session)
        model.client.converse_stream = self.converse_stream
        return model

    def tools(self) -> list[Any]:
        """The tool the script asks for, counting its executions (a side effect that must not repeat)."""

        @tool
        def lookup_weather(city: str) -> str:
            """Look up the weather in a city.

            Args:
                city: The city.
            """
            with self._mutex:
                self.tool_calls += 1
                self.tool_calls_in_progress += 1
            try:
                return f"{city}: sunny, 21 degrees"
            finally:
                with self._mutex:
                    self.tool_calls_in_progress -= 1

        return [lookup_weather]

    def converse_stream(self, **request: Any) -> dict[str, Any]:
        """Stand-in for ``bedrock-runtime.converse_stream``; runs on an executor worker, like the real one."""
        with self._mutex:
            self.model_calls += 1
            self.model_calls_in_progress += 1
            call_number = self.model_calls
        try:
            self.entered.set()
            # Bounded, so that a test that forgets to open the gate fails instead of hanging its event loop's exit.
            if self.gate is not None and not self.gate.wait(self.gate_timeout):
                raise TimeoutError(f"stub model gate stayed closed for {self.gate_timeout}s")
            if self.fail_with is not None:
                raise self.fail_with
            if self.with_tool and not _last_turn_has_tool_result(request.get("messages", [])):
                return {"stream": _ScriptedEventStream(_tool_use_chunks(call_number))}
            return {"stream": _ScriptedEventStream(_text_chunks(self.answer))}
        finally:
            with self._mutex:
                self.model_calls_in_progress -= 1
