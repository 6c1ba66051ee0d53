"""The agent ``python -m strands_py serve`` serves without ``--agent``: a scripted Bedrock model, no AWS.

Two faces. Without a conversation (``POST /invocations``) it is the weather script of the HTTP examples: one tool
call, then ``DEMO_ANSWER`` word by word. In a conversation (``POST /sessions/{id}/invocations``, what the chat page
sends) it is a small chat agent: it remembers the conversation's earlier questions, books a table with a tool that
asks for the user's approval first (a strands interrupt), and ends every answer with its model call number on this
server, so that a newcomer sees that a reload or a retry replays an answer instead of running the model again.
"""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

from starlette.requests import Request
from strands import tool
from strands.types.tools import ToolContext

from ..agent.agent import Agent
from ..testing.bedrock import ScriptedBedrock

DEMO_ANSWER = (
    "It is sunny in Paris, 21 degrees, with a light breeze from the west. "
    "This answer comes from a scripted model: strands-py ran a real Bedrock model class, its tool call and the "
    "streaming you are watching, without an AWS account."
)

# A question asking for a booking: the demo calls its approval-gated tool.
_BOOKING = re.compile(r"\b(book|reserve|reservation|table)\b", re.IGNORECASE)
_RESTAURANT = {"restaurant": "Le Procope", "guests": 2, "time": "20:00"}


class _PacedStream:
    """The scripted chunks, each text chunk released by ``pace(index)`` (called on the model's worker thread)."""

    def __init__(self, chunks: list[dict[str, Any]], pace: Callable[[int], None] | None) -> None:
        self._chunks = chunks
        self._pace = pace

    def __iter__(self) -> Iterator[dict[str, Any]]:
        index = 0
        for chunk in self._chunks:
            if self._pace is not None and "text" in chunk.get("contentBlockDelta", {}).get("delta", {}):
                self._pace(index)
                index += 1
            yield chunk

    def close(self) -> None:
        """Nothing to release."""


def words(text: str) -> list[str]:
    """``text`` as the chunks the demo streams: one word (with the spaces after it) each."""
    return re.findall(r"\S+\s*", text)


def _text_delta(text: str) -> dict[str, Any]:
    return {"contentBlockDelta": {"delta": {"text": text}, "contentBlockIndex": 0}}


class StreamingScript(ScriptedBedrock):
    """``ScriptedBedrock`` whose answer streams word by word, each word released by ``pace(index)``.

    ``pace`` runs on the model call's worker thread before each text chunk: sleep there to stream slowly, or wait on
    a semaphore to let a test release chunks one at a time.
    """

    def __init__(self, *, pace: Callable[[int], None] | None = None, **kwargs: Any) -> None:
        """A script; see ``ScriptedBedrock`` for the other arguments."""
        super().__init__(**kwargs)
        self.pace = pace

    @property
    def chunks(self) -> list[str]:
        """The answer's text chunks, in order."""
        return words(self.answer)

    def converse_stream(self, **request: Any) -> dict[str, Any]:
        """The script's response, with the answer's one text delta split into one delta per word."""
        response = super().converse_stream(**request)
        chunks: list[dict[str, Any]] = []
        for chunk in response["stream"]:
            delta = chunk.get("contentBlockDelta")
            if delta is not None and "text" in delta["delta"]:
                chunks.extend(_text_delta(text) for text in self.chunks)
            else:
                chunks.append(chunk)
        return {"stream": _PacedStream(chunks, self.pace)}


class DemoAgents:
    """The demo's agent factory, ``factory(request, session_manager=None)``, and what its agents did on this server.

    Counts are shared by every agent it builds (thread-safe): ``model_calls``, and ``tool_runs`` by tool name
    (``book_table`` counts the bookings made, after an approval). Subclass it and override ``on_model_call`` to make
    a model call fail or wait (tests do), or pass ``pace`` to hold the answers' words.
    """

    def __init__(self, seconds_per_chunk: float = 0.04, *, pace: Callable[[int], None] | None = None) -> None:
        """Agents whose answers stream a word every ``seconds_per_chunk`` (0: at once), or as ``pace(index)`` says.

        ``pace(index)`` runs on the model call's worker thread before each word of an answer.
        """
        if pace is None and seconds_per_chunk > 0:

            def pace(_: int) -> None:
                time.sleep(seconds_per_chunk)

        self.pace = pace
        self.model_calls = 0
        self.tool_runs: Counter[str] = Counter()
        self._mutex = threading.Lock()

    def __call__(self, request: Request | None, session_manager: Any = None) -> Agent:
        """An agent for one run: the weather script, or in a conversation (``session_manager``) the chat script."""
        if session_manager is None:
            script = StreamingScript(answer=DEMO_ANSWER, pace=self.pace)
            return Agent(model=script.model(), tools=script.tools(), callback_handler=None)
        chat = _ChatScript(self)
        return Agent(
            model=chat.model(),
            tools=[self._lookup_weather(), self._book_table()],
            callback_handler=None,
            session_manager=session_manager,
        )

    def on_model_call(self, number: int) -> None:
        """A hook at the start of each model call of a conversation; does nothing here.

        Called on the model's worker thread with ``number``, the count of model calls on this server, this one
        included. Raise to make the call fail; block to hold it.
        """

    def count_model_call(self) -> int:
        """Count a model call; its number on this server."""
        with self._mutex:
            self.model_calls += 1
            return self.model_calls

    def count_tool_run(self, name: str) -> int:
        """Count a run of the tool ``name``; its number on this server."""
        with self._mutex:
            self.tool_runs[name] += 1
            return self.tool_runs[name]

    def _lookup_weather(self) -> Any:
        agents = self

        @tool
        def lookup_weather(city: str) -> str:
            """Look up the weather in a city.

            Args:
                city: The city.
            """
            agents.count_tool_run("lookup_weather")
            return f"{city}: sunny, 21 degrees, with a light breeze from the west"

        return lookup_weather

    def _book_table(self) -> Any:
        agents = self

        @tool(context=True)
        def book_table(restaurant: str, guests: int, time: str, tool_context: ToolContext) -> str:
            """Book a table, once the user approved it.

            Args:
                restaurant: Where.
                guests: For how many people.
                time: At what time, today.
                tool_context: Strands' tool context (for the approval).
            """
            # The first call raises strands' interrupt (the run stops, the page shows Approve and Deny); the call
            # that resumes the run gets the user's answer here: {"approved": true} or {"approved": false}.
            reason = {"message": f"Book a table for {guests} at {restaurant}, today at {time}?", "tool": "book_table"}
            answer = tool_context.interrupt("approval", reason=reason)
            if not (isinstance(answer, dict) and answer.get("approved") is True):
                return f"Not booked: the user declined the table at {restaurant}."
            number = agents.count_tool_run("book_table")
            return f"Booked: a table for {guests} at {restaurant}, today at {time} (booking {number} on this server)."

        return book_table


class _ChatScript(ScriptedBedrock):
    """The model of a conversation's agent: a tool call for each question, then an answer from the tool's result."""

    def __init__(self, agents: DemoAgents) -> None:
        super().__init__(with_tool=False)
        self._agents = agents

    def converse_stream(self, **request: Any) -> dict[str, Any]:
        """Stand-in for ``bedrock-runtime.converse_stream``: runs on an executor worker, like the real one."""
        number = self._agents.count_model_call()
        self.model_calls += 1
        self._agents.on_model_call(number)
        messages: list[dict[str, Any]] = request.get("messages", [])
        results = [block["toolResult"] for block in messages[-1].get("content", []) if "toolResult" in block]
        if not results:
            question = _text_of(messages[-1])
            if _BOOKING.search(question):
                return _tool_call("book_table", dict(_RESTAURANT))
            city = re.search(r"\bin ([A-Z][\w-]+)", question)
            return _tool_call("lookup_weather", {"city": city.group(1) if city else "Paris"})
        outcome = " ".join(_text_of({"content": result.get("content", [])}) for result in results)
        questions = [_text_of(m) for m in messages if m.get("role") == "user" and _text_of(m)]
        answer = _answer(outcome, questions[:-1], number)
        chunks: list[dict[str, Any]] = [{"messageStart": {"role": "assistant"}}]
        chunks += [_text_delta(text) for text in words(answer)]
        chunks += [
            {"contentBlockStop": {"contentBlockIndex": 0}},
            {"messageStop": {"stopReason": "end_turn"}},
            {"metadata": {"usage": {"inputTokens": 60, "outputTokens": 40, "totalTokens": 100}, "metrics": {}}},
        ]
        return {"stream": _PacedStream(chunks, self._agents.pace)}


def _text_of(message: dict[str, Any]) -> str:
    return " ".join(block["text"] for block in message.get("content", []) if isinstance(block.get("text"), str))


def _tool_call(name: str, arguments: dict[str, Any]) -> dict[str, Any]:
    # A fresh id per call: strands derives interrupt ids from it, so two bookings of one conversation never meet.
    start = {"toolUse": {"toolUseId": f"tooluse-{uuid.uuid4().hex[:12]}", "name": name}}
    chunks: list[dict[str, Any]] = [
        {"messageStart": {"role": "assistant"}},
        {"contentBlockStart": {"start": start, "contentBlockIndex": 0}},
        {"contentBlockDelta": {"delta": {"toolUse": {"input": json.dumps(arguments)}}, "contentBlockIndex": 0}},
        {"contentBlockStop": {"contentBlockIndex": 0}},
        {"messageStop": {"stopReason": "tool_use"}},
        {"metadata": {"usage": {"inputTokens": 40, "outputTokens": 10, "totalTokens": 50}, "metrics": {}}},
    ]
    return {"stream": _PacedStream(chunks, None)}


def _answer(outcome: str, earlier: list[str], number: int) -> str:
    """The answer to a tool's ``outcome``, after the ``earlier`` questions of the conversation."""
    if outcome.startswith("Booked"):
        said = f"Done. {outcome} Reload the page or retry: the booking is not made twice."
    elif outcome.startswith("Not booked"):
        said = "All right, I booked nothing."
    else:
        city, _, weather = outcome.partition(": ")
        said = f"In {city} it is {weather or 'sunny'}."
        if not earlier:
            said += (
                " This answer comes from a scripted model: strands-py ran a real Bedrock model class, its tool call"
                " and the streaming you are watching, without an AWS account. Ask me to book a table to see a tool"
                " that waits for your approval."
            )
    if earlier:
        plural = "" if len(earlier) == 1 else "s"
        said += f' I remember this conversation: {len(earlier)} question{plural} before this one, first "{earlier[0]}".'
    return f"{said} (Model call {number} on this server.)"


def demo_agent_factory(seconds_per_chunk: float = 0.04) -> DemoAgents:
    """The demo's agent factory (see ``DemoAgents``): answers stream a word every ``seconds_per_chunk``."""
    return DemoAgents(seconds_per_chunk)
