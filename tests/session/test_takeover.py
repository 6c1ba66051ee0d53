"""Takeovers of a session that must never lose or double an answered turn (each with its broken variant).

"Hosts" here are agents whose store is a wrapper of their own around one shared in-memory store: the same records,
but none of one process's in-memory sharing (registry, session lines), as another process would have.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from session_kit import BlockingTool, no_heartbeats
from strands.session.file_session_manager import FileSessionManager

from strands_py import Agent, IdempotencyLeaseLostError, IdempotencyStoreError
from strands_py._demo.storm import _until
from strands_py.idempotency import (
    IdempotencyConfig,
    IdempotencyRecord,
    IdempotencyStore,
    InMemoryIdempotencyStore,
    RecordState,
    ReplayedAgentResult,
)
from strands_py.idempotency.keys import make_key
from strands_py.session._conversation import _Conversation
from strands_py.session._lock import SessionLock
from strands_py.session._turn import SessionTurn
from strands_py.testing import CountingStore, ScriptedBedrock
from strands_py.turn import _settle

WAIT = 20.0
SCOPE = "s"

# Turns are real threads (tools, model calls) racing the takeovers of other "hosts".
pytestmark = pytest.mark.racing


class _Hosts:
    """One conversation (a FileSessionManager directory) and one shared store, served by several hosts."""

    def __init__(self, tmp_path: Path, **config: Any) -> None:
        self.dir = str(tmp_path / "sessions")
        self.inner = InMemoryIdempotencyStore()
        # Long enough that a live host keeps its lease on a loaded machine: its loop may stall up to two renewal
        # periods (2 s) and lose nothing. (CI, 1 s leases beside other load: host C lost its lease while it waited.)
        # Every dead host here is silenced (no heartbeats), not merely slow, so no outcome depends on the length.
        config.setdefault("lease_seconds", 3.0)
        config.setdefault("session_invocation_mode", "enqueue")
        self.config = IdempotencyConfig(store=self.inner, scope=SCOPE, **config)

    def agent(self, script: ScriptedBedrock | None = None, store: IdempotencyStore | None = None) -> Agent:
        script = script or ScriptedBedrock()
        return Agent(
            model=script.model(),
            tools=script.tools(),
            callback_handler=None,
            session_manager=FileSessionManager(session_id="conv-1", storage_dir=self.dir),
            idempotency=dataclasses.replace(self.config, store=store or CountingStore(self.inner)),
        )

    async def turn(self, prompt: str, token: str, store: IdempotencyStore | None = None, **kwargs: Any) -> Any:
        agent = self.agent(kwargs.pop("script", None), store)
        return await asyncio.wait_for(agent.invoke_async(prompt, idempotency_token=token), WAIT)

    def prompts(self) -> list[str]:
        """The user prompts of the persisted conversation, in order (tool results left out)."""
        manager = FileSessionManager(session_id="conv-1", storage_dir=self.dir)
        messages = [m.to_message() for m in manager.list_messages("conv-1", "default")]
        return [m["content"][0]["text"] for m in messages if m["role"] == "user" and "text" in m["content"][0]]


@asynccontextmanager
async def _host_a_dies_in_its_tool(hosts: _Hosts) -> AsyncIterator[None]:
    """Host A starts turn "A?" and hangs inside its tool with heartbeats that never beat: its token claim and its
    session lock go silent together, its turn left for the next holder. On the way out A wakes up (its writes are
    fenced) and ends with its lease lost; its thread is never left behind."""
    dead_script = BlockingTool(WAIT)
    with no_heartbeats():
        dead = asyncio.create_task(hosts.agent(dead_script).invoke_async("A?", idempotency_token="tA"))
        await _until(dead_script.tool_entered.is_set, WAIT, "host A's tool")
    try:
        yield
    finally:
        dead_script.tool_gate.set()
        await asyncio.wait([dead], timeout=WAIT)
        if dead.done() and not dead.cancelled():
            assert isinstance(dead.exception(), IdempotencyLeaseLostError)


# -- a stale takeover read -----------------------------------------------------------------------------------------


class _TakeoverHeld(CountingStore):
    """Host C: its takeover of the session lock is held back (a slow network) until ``go`` is set."""

    def __init__(self, inner: IdempotencyStore) -> None:
        super().__init__(inner)
        self.judged = asyncio.Event()
        self.go = asyncio.Event()

    async def take_over(self, record: IdempotencyRecord, version: str) -> bool:
        if "#session-" in record.key and not self.judged.is_set():
            self.judged.set()
            await self.go.wait()
        return await super().take_over(record, version)


class _BlindTakeover(_TakeoverHeld):
    """The broken variant: a takeover that lands on whatever is there, as a plain claim would (no compare-and-set)."""

    async def take_over(self, record: IdempotencyRecord, version: str) -> bool:
        await super().take_over(record, version)
        return await self.inner.claim(record, 0.0) is None


async def _stale_takeover(tmp_path: Path, host_c: type[_TakeoverHeld]) -> None:
    hosts = _Hosts(tmp_path)
    await hosts.turn("t0?", "t0")
    async with _host_a_dies_in_its_tool(hosts):  # its lock record goes silent
        # Host C reads A's record, watches it for a lease, judges A's turn void... and its takeover is delayed.
        c_store = host_c(hosts.inner)
        c_turn = asyncio.create_task(hosts.turn("C?", "tC", c_store))
        await asyncio.wait_for(c_store.judged.wait(), WAIT)
        # Meanwhile host B takes A's lock over, rolls A's turn back, answers its own turn and releases the lock.
        b = await hosts.turn("B?", "tB")
        assert b.stop_reason == "end_turn" and hosts.prompts() == ["t0?", "B?"]
        # Now C's takeover arrives: it must replace the record it judged (A's), which is gone, or nothing.
        c_store.go.set()
        c: Any = None
        try:
            c = await asyncio.wait_for(c_turn, WAIT)
        except IdempotencyLeaseLostError:
            pass  # (the broken variant: its takeover answered after a whole lease, so its lease had lapsed)
        assert "B?" in hosts.prompts(), f"B's answered turn was lost: {hosts.prompts()}"
        assert c is not None and c.stop_reason == "end_turn"
        assert hosts.prompts() == ["t0?", "B?", "C?"]


async def test_a_stale_takeover_read_never_deletes_an_answered_turn(tmp_path: Path) -> None:
    await _stale_takeover(tmp_path, _TakeoverHeld)


@pytest.mark.xfail(raises=AssertionError, strict=True, reason="negative control: a takeover without compare-and-set")
async def test_negative_control_a_blind_takeover_deletes_the_answered_turn(tmp_path: Path) -> None:
    await _stale_takeover(tmp_path, _BlindTakeover)


# -- an answered turn whose token record expired --------------------------------------------------------------------


class _DiesBeforeUnlocking(CountingStore):
    """Host A stores its result, then dies before releasing the session lock (the release never arrives)."""

    async def release(self, key: str, owner: str) -> bool:
        if "#session-" in key:
            raise ConnectionResetError("host died")
        return await super().release(key, owner)


async def test_an_answered_turn_is_never_rolled_back_after_its_result_would_have_expired(tmp_path: Path) -> None:
    # A lease (3 s) longer than the window (2 s): whoever takes the dead lock over judges it at least a lease after
    # A's last heartbeat, when a result kept for the window alone would be gone already.
    hosts = _Hosts(tmp_path, lease_seconds=3.0, expires_after_seconds=2.0)
    a = await hosts.turn("A?", "tA", _DiesBeforeUnlocking(hosts.inner))
    assert a.stop_reason == "end_turn"
    b = await hosts.turn("B?", "tB")
    assert b.stop_reason == "end_turn"
    assert hosts.prompts() == ["A?", "B?"], f"A's answered turn was rolled back: {hosts.prompts()}"


@pytest.mark.xfail(raises=AssertionError, strict=True, reason="negative control: results kept for the window only")
async def test_negative_control_a_result_kept_for_the_window_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_settle, "RESULT_MARGIN_LEASES", 0)
    await test_an_answered_turn_is_never_rolled_back_after_its_result_would_have_expired(tmp_path)


# -- a result that cannot be stored ----------------------------------------------------------------------------------


class _CompleteFails(CountingStore):
    """``complete`` of a token fails once: before the write (``landed=False``) or after it (a lost response); with
    ``unreachable`` the store stays unreachable for the token's next writes (learning what happened fails too)."""

    def __init__(self, inner: IdempotencyStore, *, landed: bool, unreachable: bool = False) -> None:
        super().__init__(inner)
        self.landed = landed
        self.unreachable = unreachable
        self.failed = False

    async def complete(self, record: IdempotencyRecord) -> bool:
        if self.failed:
            return await super().complete(record)
        self.failed = True
        if self.landed:
            await super().complete(record)
        raise ConnectionResetError("connection reset by peer")

    async def release(self, key: str, owner: str) -> bool:
        if self.failed and self.unreachable and "#session-" not in key:
            raise ConnectionResetError("still unreachable")
        return await super().release(key, owner)

    async def renew(self, key: str, owner: str, **lease: Any) -> bool:
        if self.failed and self.unreachable and "#session-" not in key:
            raise ConnectionResetError("still unreachable")
        return await super().renew(key, owner, **lease)


async def _a_store_fault_then_the_retry(tmp_path: Path, unreachable: bool) -> BaseException | None:
    """The first call's result cannot be stored; the client retries. Returns what the first call raised."""
    hosts = _Hosts(tmp_path)
    await hosts.turn("t0?", "t0")
    failing = _CompleteFails(hosts.inner, landed=False, unreachable=unreachable)
    first: BaseException | None = None
    try:
        await hosts.turn("t1?", "t1", failing)
    except IdempotencyStoreError as e:
        first = e
    assert failing.failed
    # The client retries: nothing was stored, so the turn runs again on the conversation as it was, exactly once,
    # rebuilt from the first run's journal (the claim was yielded, or is taken over once silent): nothing paid twice.
    script = ScriptedBedrock()
    retry = await hosts.turn("t1?", "t1", script=script)
    assert retry.stop_reason == "end_turn" and not isinstance(retry, ReplayedAgentResult)
    assert hosts.prompts() == ["t0?", "t1?"], f"the turn is not there exactly once: {hosts.prompts()}"
    assert (script.model_calls, script.tool_calls) == (0, 0), "the retry paid for steps the journal holds"
    return first


@pytest.mark.parametrize("unreachable", [False, True], ids=["yielded", "outcome-unknown"])
async def test_an_answer_that_could_not_be_stored_is_not_acknowledged_and_its_turn_is_kept_once(
    tmp_path: Path, unreachable: bool
) -> None:
    first = await _a_store_fault_then_the_retry(tmp_path, unreachable)
    assert isinstance(first, IdempotencyStoreError), "an answer that is not kept was acknowledged"


async def test_an_answer_whose_write_landed_despite_the_error_counts(tmp_path: Path) -> None:
    hosts = _Hosts(tmp_path)
    failing = _CompleteFails(hosts.inner, landed=True)
    answered = await hosts.turn("t1?", "t1", failing)
    assert failing.failed and answered.stop_reason == "end_turn"
    record = await hosts.inner.get(make_key(SCOPE, "t1"))
    assert record is not None and record.state is RecordState.COMPLETED
    assert isinstance(await hosts.turn("t1?", "t1"), ReplayedAgentResult)
    assert hosts.prompts() == ["t1?"]


@pytest.mark.xfail(raises=AssertionError, strict=True, reason="negative control: the turn kept, the claim released")
async def test_negative_control_a_failed_store_keeps_the_turn_and_releases_the_claim(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def release_and_pretend(call: Any) -> Any:
        # The old behaviour: the claim is handed back, the turn committed all the same, the caller answered.
        await call.release()
        return _settle._Stored.STORED

    monkeypatch.setattr(_settle, "_learn_outcome", release_and_pretend)
    await _a_store_fault_then_the_retry(tmp_path, False)


# -- a dead turn's token and lock are judged together ---------------------------------------------------------------


class _Ops(CountingStore):
    """Records this host's reads and takeovers, in order."""

    def __init__(self, inner: IdempotencyStore) -> None:
        super().__init__(inner)
        self.ops: list[tuple[str, str]] = []

    async def get(self, key: str) -> IdempotencyRecord | None:
        self.ops.append(("get", "lock" if "#session-" in key else "token"))
        return await super().get(key)

    async def take_over(self, record: IdempotencyRecord, version: str) -> bool:
        self.ops.append(("take_over", "lock" if "#session-" in record.key else "token"))
        return await super().take_over(record, version)


async def _retry_of_a_dead_turn(tmp_path: Path) -> list[tuple[str, str]]:
    hosts = _Hosts(tmp_path)
    async with _host_a_dies_in_its_tool(hosts):
        retry = _Ops(hosts.inner)
        again = await hosts.turn("A?", "tA", retry)
        assert again.stop_reason == "end_turn" and hosts.prompts() == ["A?"]
        return retry.ops


async def test_a_retry_watches_the_dead_turns_lock_while_it_waits_for_its_token(tmp_path: Path) -> None:
    # The retry started watching the lock before it took the token over: both are judged in the same lease.
    ops = await _retry_of_a_dead_turn(tmp_path)
    assert ops.index(("get", "lock")) < ops.index(("take_over", "token")), ops


@pytest.mark.xfail(raises=AssertionError, strict=True, reason="negative control: the lock is watched only afterwards")
async def test_negative_control_the_lock_watched_only_after_the_token(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def not_watching(self: Any) -> None:
        return None

    monkeypatch.setattr(SessionTurn, "watch_lock", not_watching)
    await test_a_retry_watches_the_dead_turns_lock_while_it_waits_for_its_token(tmp_path)


# -- a holder that resumes its rollback after losing the lock -------------------------------------------------------


class _PausedAfterTakeover(CountingStore):
    """Host C: its takeover of the session lock lands, and then C stalls until ``go`` is set (a stopped VM, a store
    answer slower than the lease), longer than the lease.

    ``heard``: ``"won"``: C then hears it won. ``"refused"``: C hears otherwise (the connection dropped after the
    write was applied, the client sent it again and the retry met the write itself), so C reads the lock again: it
    finds its own record, and that read too answers only once ``go`` is set.
    """

    def __init__(self, inner: IdempotencyStore, heard: str) -> None:
        super().__init__(inner)
        self.heard = heard
        self.landed = asyncio.Event()
        self.go = asyncio.Event()
        self.reading_own = False

    async def take_over(self, record: IdempotencyRecord, version: str) -> bool:
        won = await super().take_over(record, version)
        if "#session-" not in record.key or not won or self.landed.is_set():
            return won
        self.landed.set()
        if self.heard == "refused":
            self.reading_own = True
            return False
        await asyncio.wait_for(self.go.wait(), WAIT)
        return True

    async def get(self, key: str) -> IdempotencyRecord | None:
        record = await super().get(key)
        if self.reading_own and "#session-" in key:
            self.reading_own = False
            await asyncio.wait_for(self.go.wait(), WAIT)
        return record


async def _a_rollback_resumed_after_the_lock_was_lost(tmp_path: Path, heard: str) -> None:
    hosts = _Hosts(tmp_path)
    await hosts.turn("t0?", "t0")
    async with _host_a_dies_in_its_tool(hosts):  # its turn is left for the next holder to roll back
        # Host C takes A's lock over, judging A's turn void, and stalls before it rolls that turn back.
        c_store = _PausedAfterTakeover(hosts.inner, heard)
        c_turn = asyncio.create_task(hosts.turn("C?", "tC", c_store))
        await asyncio.wait_for(c_store.landed.wait(), WAIT)
        # C's record goes silent for a lease: host B takes it over (with the verdict it carries), rolls A's turn
        # back, answers its own turn and releases the lock.
        b = await hosts.turn("B?", "tB")
        assert b.stop_reason == "end_turn" and hosts.prompts() == ["t0?", "B?"]
        # C resumes, a lease too late: it must not roll back (delete) what is now B's answered turn.
        c_store.go.set()
        with pytest.raises(IdempotencyLeaseLostError):
            await asyncio.wait_for(c_turn, WAIT)
        assert hosts.prompts() == ["t0?", "B?"], f"B's answered turn was deleted: {hosts.prompts()}"
        # C's client retries: its turn runs once, after B's.
        assert (await hosts.turn("C?", "tC")).stop_reason == "end_turn"
        assert hosts.prompts() == ["t0?", "B?", "C?"]


@pytest.mark.parametrize("heard", ["won", "refused"])
async def test_a_holder_that_lost_the_lock_before_rolling_back_deletes_nothing(tmp_path: Path, heard: str) -> None:
    # Was (the Redis chaos run, seed 1207): a process stopped between taking a session lock over and rolling the dead
    # turn back resumed after the next holder had rolled the same turn back and answered its own, and deleted that
    # answered turn's messages (the rollback checked no lease). And a holder whose takeover was answered "refused"
    # (a redis-py retry met the write itself) and then found its own record counted its lease from that read, not
    # from its write, so it judged a lease that had run out still its own.
    await _a_rollback_resumed_after_the_lock_was_lost(tmp_path, heard)


@pytest.mark.xfail(raises=AssertionError, strict=True, reason="negative control: a rollback that checks no lease")
async def test_negative_control_a_rollback_that_checks_no_lease(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = _Conversation.rollback

    def unchecked(self: _Conversation, checkpoint: str, still_ours: Any) -> None:
        real(self, checkpoint, lambda: None)

    monkeypatch.setattr(_Conversation, "rollback", unchecked)
    await _a_rollback_resumed_after_the_lock_was_lost(tmp_path, "won")


@pytest.mark.xfail(raises=AssertionError, strict=True, reason="negative control: our own record held from its read")
async def test_negative_control_our_own_record_held_from_when_it_was_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The old lease of a record of ours met again: counted from when it was read, as if it had just been written.
    class HeldFromTheRead(dict[str, float]):
        def get(self, version: str, default: Any = None) -> float:  # type: ignore[override]
            return time.monotonic()

    real_init = SessionLock.__init__

    def init(self: SessionLock, *args: Any, **kwargs: Any) -> None:
        real_init(self, *args, **kwargs)
        self._sent = HeldFromTheRead()

    monkeypatch.setattr(SessionLock, "__init__", init)
    await _a_rollback_resumed_after_the_lock_was_lost(tmp_path, "refused")
