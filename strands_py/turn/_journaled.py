"""The two places a journaled run touches strands: the model it calls, and the tools it runs.

``JournaledModel`` stands in for the agent's model for the length of one journaled run: each call is answered from
the journal when the journal holds a response to that very request, else made live and journaled once complete.
``JournaledTool`` stands in for a tool call's selected tool (strands lets a ``BeforeToolCallEvent`` hook replace it):
a journaled result is returned without running the tool; otherwise the call is marked started, run, and its result
journaled before strands sees it. A call marked started with no result is uncertain: its ``UncertainTool`` policy
decides.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import AsyncGenerator, Mapping
from typing import Any

from strands.types._events import ToolResultEvent
from strands.types.tools import AgentTool, ToolSpec

from ..idempotency._context import run_context_of
from ..types.exceptions import IdempotencyStoreError
from ..types.journal import UncertainTool
from ._journal import Journal, complete_response, replay_chunks, request_digest

logger = logging.getLogger(__name__)

# What the (failing) run's tool result says when its call could not be marked started; the run fails before the
# model reads it, so no conversation keeps it.
NOT_STARTED_REPORT = "Not run: the idempotency store could not record the start of this tool call."
LEASE_LOST_REPORT = "Not run: this invocation lost its idempotency lease before the tool call started."
UNCERTAIN_REPORT = (
    "The outcome of this tool call is unknown: it was started, but the process running it stopped before it "
    "finished, so its effect may or may not have happened. Do not assume either; check before doing it again."
)


class JournaledModel:
    """The agent's model, answered from the journal where it can be (see the module docstring).

    Everything but ``stream`` is the wrapped model's (attributes are looked up on it), so strands and providers see
    the model they configured. Thread-safety: as the wrapped model.
    """

    def __init__(self, model: Any, journal: Journal) -> None:
        """Wrap ``model`` for one run journaled in ``journal``."""
        self.wrapped = model
        self.journal = journal

    def __getattr__(self, name: str) -> Any:
        """The wrapped model's attribute."""
        return getattr(self.wrapped, name)

    async def stream(
        self,
        messages: Any,
        tool_specs: list[ToolSpec] | None = None,
        system_prompt: str | None = None,
        **kwargs: Any,
    ) -> AsyncGenerator[Any, None]:
        """The model's streamed response: journaled chunks for a journaled request, else the live stream.

        Raises:
            IdempotencyStoreError: A tool call of this run could not be marked started, so it did not run: the run
                fails here rather than answer without it (its retry resumes, and runs that call once).
        """
        if self.journal.broken is not None:
            raise self.journal.broken
        digest = request_digest(
            messages, tool_specs, system_prompt, kwargs.get("system_prompt_content"), kwargs.get("tool_choice")
        )
        step, chunks = await self.journal.model_step(digest)
        if chunks is not None:
            logger.debug("step=<%d> | model step answered from the journal", step)
            async for chunk in replay_chunks(chunks):
                yield chunk
            return
        got: list[Any] = []
        # Recorded here rather than through a wrapping generator: one resumption fewer for every chunk of the stream.
        async for chunk in self.wrapped.stream(messages, tool_specs, system_prompt, **kwargs):
            got.append(chunk)
            yield chunk
        # Only a whole response is journaled: a stream that failed never reaches here, and one a cancel cut short
        # without an error has no messageStop.
        if complete_response(got):
            await self.journal.record_model(step, digest, got)


class JournaledTool(AgentTool):
    """One tool call's selected tool, answered from the journal where it can be (see the module docstring)."""

    def __init__(self, tool: AgentTool, journal: Journal, policies: Mapping[str, UncertainTool], default: Any) -> None:
        """Wrap ``tool`` for the calls of one run journaled in ``journal``, with the uncertain-tool policies."""
        super().__init__()
        self.wrapped = tool
        self.journal = journal
        self.policy: UncertainTool = policies.get(tool.tool_name, default)

    @property
    def tool_name(self) -> str:
        """The wrapped tool's."""
        return self.wrapped.tool_name

    @property
    def tool_spec(self) -> ToolSpec:
        """The wrapped tool's."""
        return self.wrapped.tool_spec

    @property
    def tool_type(self) -> str:
        """The wrapped tool's."""
        return self.wrapped.tool_type

    def __getattr__(self, name: str) -> Any:
        """The wrapped tool's attribute."""
        return getattr(self.wrapped, name)

    async def stream(self, tool_use: Any, invocation_state: dict[str, Any], **kwargs: Any) -> AsyncGenerator[Any, None]:
        """The tool call: its journaled result, its uncertain outcome resolved, or a live run journaled."""
        journal = self.journal
        tool_use_id = str(tool_use.get("toolUseId", ""))
        context = run_context_of(invocation_state)
        tool_key = context.key_for(tool_use) if context is not None else None
        done = journal.tool_result(tool_use_id, tool_key)
        if done is not None:
            journal.replayed_tools += 1
            logger.debug("tool=<%s> | tool step answered from the journal", self.tool_name)
            yield ToolResultEvent(done)  # type: ignore[arg-type]
            return
        if journal.tool_started(tool_use_id, tool_key):
            settled = await self._uncertain(tool_use, tool_key)
            if settled is not None:
                await journal.record_tool(tool_use_id, settled, tool_key)
                yield ToolResultEvent(settled)  # type: ignore[arg-type]
                return
        else:
            try:
                await journal.record_started(tool_use_id, self.tool_name, tool_key)
            except IdempotencyStoreError as e:
                # Not marked, so not run (see record_started). strands turns whatever a tool raises into an error
                # result and goes on: the model must not see it, so the run fails at its next model step instead.
                journal.broken = e
                logger.warning("tool=<%s> | could not mark the tool call started: not running it", self.tool_name)
                yield ToolResultEvent(
                    {"toolUseId": tool_use_id, "status": "error", "content": [{"text": NOT_STARTED_REPORT}]}
                )
                return
        if context is not None and context.lease_lost():
            # The lease ran out while the call was marked (a slow store) or reconciled: another owner may have taken
            # the claim over by now, found the mark, and settled the call by its policy (run it again, say). Running
            # it here too could be its effect twice. The run stops at its next step, on the lost lease.
            logger.warning("tool=<%s> | the lease ran out before the tool call started: not running it", self.tool_name)
            yield ToolResultEvent(
                {"toolUseId": tool_use_id, "status": "error", "content": [{"text": LEASE_LOST_REPORT}]}
            )
            return
        last: Any = None
        async for event in self.wrapped.stream(tool_use, invocation_state, **kwargs):
            if isinstance(event, ToolResultEvent):
                # strands stops reading at the result: journal it before handing it over.
                await journal.record_tool(tool_use_id, dict(event.tool_result), tool_key)
                yield event
                return
            last = event
            yield event
        if isinstance(last, dict) and "toolUseId" in last:
            await journal.record_tool(tool_use_id, dict(last), tool_key)

    async def _uncertain(self, tool_use: Any, key: str | None) -> dict[str, Any] | None:
        """The result of a call that died mid-run, per its policy; None to run it again."""
        policy = self.policy
        tool_use_id = str(tool_use.get("toolUseId", ""))
        logger.warning(
            "tool=<%s>, policy=<%s> | a tool call died mid-run: its outcome is unknown",
            self.tool_name,
            policy if isinstance(policy, str) else "reconcile",
        )
        if policy == "retry":
            return None
        if policy == "report":
            return {"toolUseId": tool_use_id, "status": "error", "content": [{"text": UNCERTAIN_REPORT}]}
        if inspect.iscoroutinefunction(policy):
            found = await policy(key, tool_use.get("input"))
        else:
            # A reconcile function that asks a downstream system blocks: not on the event loop.
            found = await asyncio.to_thread(policy, key, tool_use.get("input"))
            if inspect.isawaitable(found):
                found = await found
        if found is None:
            return None  # the downstream system says the effect did not happen: run it
        if isinstance(found, str):
            return {"toolUseId": tool_use_id, "status": "success", "content": [{"text": found}]}
        if isinstance(found, Mapping) and "content" in found:
            return {"status": "success", **dict(found), "toolUseId": tool_use_id}
        return {"toolUseId": tool_use_id, "status": "success", "content": [{"json": found}]}
