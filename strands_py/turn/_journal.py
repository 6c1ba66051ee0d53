"""The step journal: a durable invocation's completed model calls and tool results, so a takeover resumes.

Every completed step of a journaled invocation is appended to the journal of its durable key, fenced on the owner's
claim: a model call's whole streamed response (its chunks: text, tool uses, usage, stop reason) under the digest of
its request, and a tool call's result, with a "started" mark written before the tool runs. The owner that takes the
claim over (after a crash, a pause, a lost lease) runs the turn again from its beginning with the journal served:
a journaled model step is answered from the journal (no model call) and a journaled tool result is returned without
running the tool; the run goes live at the first step the journal lacks. Because the same chunks go through strands'
own event loop, the rebuilt conversation is the one the dead owner was building.

Divergence is detected, never guessed: a model step is served only if the request now made (messages, system
prompt, tool specs, tool choice) has the digest it was recorded under. A step recorded for another request (the
agent's code, prompt or tools changed between the crash and the resume) stops the replay: the journal is cut there
and the run goes live.

A tool with a "started" mark and no result died mid-call: its effect is unknown. What happens then is the tool's
``UncertainTool`` policy (``retry``, ``report``, or a reconcile function).

Tool steps are also found by their tool-call idempotency key (the invocation's key, the tool, its input and its
occurrence: ``tool_idempotency_key``), not only by the ids a replayed model step reproduces: a run that goes live
before a tool (its request changed: another turn of the conversation ran in between, say) and asks for the very same
call again gets the result of the call that already happened, instead of running its effect a second time.

Nothing journaled is ever deleted while the claim lives: a model step is served only for a request with its digest
(the last one recorded for a step number wins), and a tool result only for its own call, so a dead owner's entries
past the point where a resumed run went live can never be misread.

Bounds: a step is split over several entries when it is larger than the store's entry limit, and not journaled at
all past ``journal_max_step_bytes`` (it runs live again on a resume). A store fault while appending is logged and the
step simply is not journaled; a fenced-off append means the claim was lost, and the run stops.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
from collections.abc import AsyncGenerator
from typing import Any

from opentelemetry.trace import Span

from .. import telemetry
from ..idempotency._calls import _store
from ..idempotency._heartbeat import lost_claim, was_cancelled
from ..idempotency.base import IdempotencyStore
from ..idempotency.codec import decode_value, encode_value
from ..types.exceptions import IdempotencyRecordCorruptedError, IdempotencyStoreError

logger = logging.getLogger(__name__)

# Framing of stored entries: one byte before each part says whether more parts of the same step follow.
_MORE = b"+"
_LAST = b"."

_MODEL = "model"
_STARTED = "started"
_TOOL = "tool"


def request_digest(
    messages: Any, tool_specs: Any, system_prompt: Any, system_prompt_content: Any, tool_choice: Any
) -> str:
    """The digest of one model request: what must be equal for a journaled response to answer it."""

    def default(item: Any) -> Any:
        if isinstance(item, bytes | bytearray):
            return {"$sha256": hashlib.sha256(item).hexdigest()}
        return repr(item)

    document = json.dumps(
        [messages, tool_specs, system_prompt, system_prompt_content, tool_choice],
        sort_keys=True,
        separators=(",", ":"),
        default=default,
        ensure_ascii=False,
    )
    return hashlib.sha256(document.encode("utf-8", "surrogatepass")).hexdigest()


class Journal:
    """One owner's view of one durable invocation's journal: what it may replay, and where it appends.

    Built from the stored entries when a claim is taken over (``load``), empty otherwise. Model steps are served in
    the order the run asks for them, until the first one the journal lacks or that was recorded for another
    request; from then on the run is live and only appends. Tool steps are found by their ``toolUseId`` (which a
    replayed model step reproduces, and a live one never does).

    Thread-safety: one run's, on its event loop (tools running concurrently are tasks of that loop).
    """

    def __init__(
        self,
        store: IdempotencyStore,
        key: str,
        owner: str,
        *,
        max_step_bytes: int,
        entries: list[tuple[int, dict[str, Any]]] | None = None,
        stored: int = 0,
    ) -> None:
        """A journal of ``key`` owned by ``owner``, holding the decoded ``entries`` (``stored`` entries as stored)."""
        self.store = store
        self.key = key
        self.owner = owner
        self.max_step_bytes = max_step_bytes
        self.replayed_models = 0
        self.replayed_tools = 0
        # Set when a tool call could not be marked started (a store error): the call did not run, and the run must
        # not go on as if it had answered; its next model step raises this (see ``JournaledModel``).
        self.broken: IdempotencyStoreError | None = None
        self.diverged_at: int | None = None
        self._length = stored  # entries as stored (parts counted), where the next append lands
        # Where an undecodable entry sits: cut there before the first append, so nothing lands after garbage.
        self._cut_at: int | None = None
        self._span: Span | None = None
        self._models: dict[int, tuple[int, dict[str, Any]]] = {}  # model step -> (stored position, entry)
        self._results: dict[str, Any] = {}  # by toolUseId, and by tool-call key
        self._started: set[str] = set()  # the same
        self._calls = 0  # model steps this run asked for
        self._live = False
        # Names the run's event sequence across owners (an HTTP stream's event ids): the first owner's, kept in the
        # first model step's entry, so that a client re-attached to the next owner resumes the very same sequence.
        self.run_tag = secrets.token_hex(4)
        # Tool calls asked for by model steps this run replayed: only these may be answered from the journal (a
        # live step's tool calls are new, whatever ids a provider happens to give them).
        self._replayed_tool_uses: set[str] = set()
        for position, entry in entries or ():
            self._index(position, entry)

    @classmethod
    async def load(cls, store: IdempotencyStore, key: str, owner: str, *, max_step_bytes: int) -> Journal:
        """Read the journal of ``key`` (after a takeover). Entries that cannot be decoded end what is replayed.

        Raises:
            IdempotencyStoreError: The store failed.
        """
        try:
            raw = await _store(store.journal(key))
        except IdempotencyRecordCorruptedError:
            # Unreadable (an entry missing, say): nothing is replayed, and the journal is cut before the first append.
            logger.warning("key=<%s> | the journal cannot be read: the resumed run goes live from its start", key)
            journal = cls(store, key, owner, max_step_bytes=max_step_bytes)
            journal._cut_at = 0
            return journal
        entries: list[tuple[int, dict[str, Any]]] = []
        parts: list[bytes] = []
        start = 0
        for position, stored in enumerate(raw):
            if not parts:
                start = position
            flag, body = stored[:1], stored[1:]
            parts.append(body)
            if flag == _MORE:
                continue
            try:
                if flag != _LAST:
                    raise ValueError(f"unknown framing {flag!r}")
                entry = decode_value(b"".join(parts))
                if not isinstance(entry, dict):
                    raise ValueError("a journal entry is not an object")
            except ValueError:
                # Whatever follows a corrupted entry is not trusted either: it is replayed up to here, then live.
                logger.warning("key=<%s>, position=<%d> | undecodable journal entry, resuming live from it", key, start)
                break
            entries.append((start, entry))
            parts = []
        else:
            start = len(raw) if not parts else start  # a step whose last part never landed is not trusted
        journal = cls(store, key, owner, max_step_bytes=max_step_bytes, entries=entries, stored=len(raw))
        if start < len(raw):
            journal._cut_at = start
        journal._span = telemetry.start_span(telemetry.SPAN_RESUME, {"key": key, "journal_entries": len(entries)})
        logger.debug("key=<%s>, entries=<%d> | journal loaded for a resumed run", key, len(entries))
        return journal

    def finish(self) -> None:
        """End the resume span (if this run resumed): what was replayed, and where it diverged."""
        span, self._span = self._span, None
        if span is not None:
            attributes = {
                "replayed_model_steps": self.replayed_models,
                "replayed_tool_steps": self.replayed_tools,
                "diverged_at_step": -1 if self.diverged_at is None else self.diverged_at,
            }
            telemetry.end_span(span, attributes)

    def _index(self, position: int, entry: dict[str, Any]) -> None:
        kind = entry.get("k")
        if kind == _MODEL and isinstance(entry.get("n"), int) and isinstance(entry.get("c"), list):
            self._models[entry["n"]] = (position, entry)
            if entry["n"] == 0 and isinstance(entry.get("t"), str):
                self.run_tag = entry["t"]
        elif kind == _STARTED and isinstance(entry.get("id"), str):
            self._started.add(entry["id"])
            if isinstance(entry.get("key"), str):
                self._started.add(_by_key(entry["key"]))
        elif kind == _TOOL and isinstance(entry.get("id"), str) and isinstance(entry.get("r"), dict):
            self._results[entry["id"]] = entry["r"]
            if isinstance(entry.get("key"), str):
                self._results[_by_key(entry["key"])] = entry["r"]

    @property
    def resuming(self) -> bool:
        """Whether this run has anything to replay."""
        return bool(self._models or self._results or self._started)

    @property
    def live(self) -> bool:
        """Whether the run has gone live: everything it produces from here on was not journaled before."""
        return self._live

    # -- model steps ---------------------------------------------------------------------------------------------

    async def model_step(self, digest: str) -> tuple[int, list[Any] | None]:
        """The next model step of this run: its number, and its journaled chunks if it may be replayed."""
        step = self._calls
        self._calls += 1
        if self._live:
            return step, None
        found = self._models.get(step)
        if found is not None and found[1].get("d") == digest:
            self.replayed_models += 1
            chunks: list[Any] = found[1]["c"]
            self._replayed_tool_uses.update(_tool_use_ids(chunks))
            return step, chunks
        if found is not None:
            self.diverged_at = step
            logger.warning(
                "key=<%s>, step=<%d> | the request differs from the journaled one: the replay stops, the run goes live",
                self.key,
                step,
            )
            if self._span is not None:
                telemetry.add_event(self._span, telemetry.EVENT_JOURNAL_DIVERGED, {"step": step})
        self._live = True
        return step, None

    async def record_model(self, step: int, digest: str, chunks: list[Any]) -> None:
        """Journal a completed model step."""
        entry: dict[str, Any] = {"k": _MODEL, "n": step, "d": digest, "c": chunks}
        if step == 0:
            entry["t"] = self.run_tag
        await self._append(entry, f"model step {step}")

    # -- tool steps ----------------------------------------------------------------------------------------------

    def tool_result(self, tool_use_id: str, tool_key: str | None) -> dict[str, Any] | None:
        """The journaled result of this tool call, or None.

        Found by its id when a replayed model step asked for it, else by its tool-call key (the same call, asked for
        again by a live step); the result then carries this call's id.
        """
        if tool_use_id in self._replayed_tool_uses and tool_use_id in self._results:
            return dict(self._results[tool_use_id])
        found = self._results.get(_by_key(tool_key)) if tool_key is not None else None
        return None if found is None else {**found, "toolUseId": tool_use_id}

    def tool_started(self, tool_use_id: str, tool_key: str | None) -> bool:
        """Whether this tool call was marked started (without a result: it died mid-call), by its id or its key."""
        if tool_use_id in self._replayed_tool_uses and tool_use_id in self._started:
            return True
        return tool_key is not None and _by_key(tool_key) in self._started

    async def record_started(self, tool_use_id: str, name: str, tool_key: str | None) -> None:
        """Mark a tool call started, before it runs.

        Raises:
            IdempotencyStoreError: The mark could not be written: the tool must not run. A tool run without its mark
                would leave nothing to say it had started, and a resumed run would run it again: its side effect
                twice. (A mark that was written although the store said otherwise makes the call uncertain on a
                resume, which its policy settles.)
        """
        entry: dict[str, Any] = {"k": _STARTED, "id": tool_use_id, "name": name}
        if tool_key is not None:
            entry["key"] = tool_key
        await self._append(entry, f"start of tool {name}", required=True)

    async def record_tool(self, tool_use_id: str, result: dict[str, Any], tool_key: str | None) -> None:
        """Journal a tool call's result."""
        entry: dict[str, Any] = {"k": _TOOL, "id": tool_use_id, "r": result}
        if tool_key is not None:
            entry["key"] = tool_key
        await self._append(entry, "tool result")

    # -- storage -------------------------------------------------------------------------------------------------

    async def _refused(self, reason: str) -> None:
        """A write was refused: the claim is lost, or cancelled. Raises the matching error."""
        raise lost_claim(self.key, await was_cancelled(self.store, self.key, self.owner), reason)

    async def _cut(self, length: int) -> None:
        try:
            if not await _store(self.store.truncate(self.key, self.owner, length)):
                await self._refused("the journal was fenced off: another owner took the claim")
        except IdempotencyStoreError:
            # Nothing more is appended after a failed cut: an append after stale entries could be misread later.
            logger.warning("key=<%s> | could not cut the journal; this run journals nothing more", self.key)
            self.max_step_bytes = -1
            return
        self._length = length
        self._models = {n: found for n, found in self._models.items() if found[0] < length}

    async def _append(self, entry: dict[str, Any], what: str, *, required: bool = False) -> None:
        """Journal ``entry``; a step that cannot be journaled runs again on a resume, unless it is ``required``.

        Raises:
            IdempotencyStoreError: A ``required`` entry could not be written (the store failed, or this run journals
                nothing more after a failed cut).
        """
        if self._cut_at is not None:
            cut_at, self._cut_at = self._cut_at, None
            await self._cut(cut_at)
        if self.max_step_bytes < 0:
            if required:
                raise IdempotencyStoreError(f"{what} could not be journaled: this run journals nothing more")
            return
        try:
            data = encode_value(entry)
        except TypeError:
            logger.warning(
                "key=<%s> | %s cannot be journaled (not storable): it runs again on a resume", self.key, what
            )
            return
        if len(data) > self.max_step_bytes:
            logger.warning(
                "key=<%s>, bytes=<%d> | %s is larger than journal_max_step_bytes: it runs again on a resume",
                self.key,
                len(data),
                what,
            )
            return
        limit = self.store.max_journal_entry_bytes
        size = len(data) if limit is None else max(1, limit - 1)
        parts = [data[i : i + size] for i in range(0, len(data), size)] or [b""]
        try:
            for index, part in enumerate(parts):
                flag = _LAST if index == len(parts) - 1 else _MORE
                if not await _store(self.store.append(self.key, self.owner, flag + part)):
                    await self._refused("a journal append was fenced off: the claim was lost")
                self._length += 1
        except IdempotencyStoreError:
            if required:
                raise
            # Not journaled: on a resume the step runs again, as it would without a journal. A step split over
            # parts of which some landed ends in a part marked "more": the reader stops there.
            logger.warning(
                "key=<%s> | %s could not be journaled (store error): it runs again on a resume", self.key, what
            )


def _by_key(tool_key: str) -> str:
    """Where a tool call is indexed by its tool-call key (kept apart from toolUseIds)."""
    return "key:" + tool_key


def complete_response(chunks: list[Any]) -> bool:
    """Whether a model's streamed chunks make a whole response (it ended with ``messageStop``).

    A stream a cancel cut short may end without an error (a provider that stops reading when the cancel signal is
    set): it must never be journaled as the step's response.
    """
    # From the end: a whole response ends with messageStop and its metadata, so this takes a step or two.
    return any(isinstance(chunk, dict) and "messageStop" in chunk for chunk in reversed(chunks))


def _tool_use_ids(chunks: list[Any]) -> set[str]:
    """The ids of the tool calls a streamed model response asks for."""
    found = set()
    for chunk in chunks:
        start = chunk.get("contentBlockStart", {}).get("start", {}) if isinstance(chunk, dict) else {}
        tool_use = start.get("toolUse") if isinstance(start, dict) else None
        if isinstance(tool_use, dict) and isinstance(tool_use.get("toolUseId"), str):
            found.add(tool_use["toolUseId"])
    return found


async def replay_chunks(chunks: list[Any]) -> AsyncGenerator[Any, None]:
    """A journaled model response, as the stream the model gave."""
    for chunk in chunks:
        yield chunk
