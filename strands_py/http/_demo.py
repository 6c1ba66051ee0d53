"""The agent ``python -m strands_py serve`` serves without ``--agent``: a scripted Bedrock model, no AWS."""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from typing import Any

from starlette.requests import Request

from ..agent.agent import Agent
from ..testing.bedrock import ScriptedBedrock

DEMO_ANSWER = (
    "It is sunny in Paris, 21 degrees, with a light breeze from the west. "
    "This answer comes from a scripted model: strands-py ran a real Bedrock model class, its tool call and the "
    "streaming you are watching, without an AWS account."
)


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
        return re.findall(r"\S+\s*", self.answer)

    def converse_stream(self, **request: Any) -> dict[str, Any]:
        """The script's response, with the answer's one text delta split into one delta per word."""
        response = super().converse_stream(**request)
        chunks: list[dict[str, Any]] = []
        for chunk in response["stream"]:
            delta = chunk.get("contentBlockDelta")
            if delta is not None and "text" in delta["delta"]:
                for text in self.chunks:
                    chunks.append(
                        {
                            "contentBlockDelta": {
                                "delta": {"text": text},
                                "contentBlockIndex": delta["contentBlockIndex"],
                            }
                        }
                    )
            else:
                chunks.append(chunk)
        return {"stream": _PacedStream(chunks, self.pace)}


def demo_agent_factory(seconds_per_chunk: float = 0.04) -> Callable[[Request], Agent]:
    """A factory of agents answering from ``StreamingScript`` (one tool call, then the answer word by word)."""

    def pace(_: int) -> None:
        time.sleep(seconds_per_chunk)

    def make_agent(request: Request) -> Agent:
        script = StreamingScript(answer=DEMO_ANSWER, pace=pace if seconds_per_chunk > 0 else None)
        return Agent(model=script.model(), tools=script.tools(), callback_handler=None)

    return make_agent
