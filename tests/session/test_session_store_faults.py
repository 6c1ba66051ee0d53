"""Session turns when a store call fails or the loop closes at the worst moment: the conversation stays one clean
turn per answered request, and nothing waits a lease for a turn that is not running."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from collections.abc import Coroutine
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import pytest
from session_kit import ONE_TURN, BlockingTool, shape
from strands.session.file_session_manager import FileSessionManager

from strands_py import Agent, IdempotencyStoreError
from strands_py._demo.storm import _until
from strands_py.idempotency import (
    IdempotencyConfig,
    IdempotencyRecord,
    IdempotencyStore,
    InMemoryIdempotencyStore,
    RecordState,
    ReplayedAgentResult,
    _heartbeat,
)
from strands_py.idempotency.keys import make_key
from strands_py.session._turn import SessionTurn
from strands_py.testing import CountingStore, ScriptedBedrock

WAIT = 8.0
SCOPE = "s"
T = TypeVar("T")

# Dead turns are real threads blocked in a tool; stores answer from threads of their own.
pytestmark = pytest.mark.racing


def _texts(directory: str) -> list[str]:
    manager = FileSessionManager(session_id="conv-1", storage_dir=directory)
    messages = [m.to_message() for m in manager.list_messages("conv-1", "default")]
    return [m["content"][0]["text"] for m in messages if m["role"] == "user" and "text" in m["content"][0]]


def _session_agent(directory: str, config: IdempotencyConfig, script: ScriptedBedrock | None = None) -> Agent:
    script = script or ScriptedBedrock()
    return Agent(
        model=script.model(),
        tools=script.tools(),
        callback_handler=None,
        session_manager=FileSessionManager(session_id="conv-1", storage_dir=directory),
        idempotency=config,
    )


class _SessionReleaseFails(CountingStore):
    """The session lock's release fails (the host dies right after storing its result, say)."""

    async def release(self, key: str, owner: str) -> bool:
        if "#session-" in key:
            raise ConnectionResetError("connection reset by peer")
        return await super().release(key, owner)


class _CheckpointRenewFails(CountingStore):
    """Writing the turn's own checkpoint into the lock record fails once (a timeout)."""

    def __init__(self, inner: IdempotencyStore) -> None:
        super().__init__(inner)
        self.failed = False

    async def renew(self, key: str, owner: str, *, checkpoint: str | None = None, **lease: Any) -> bool:
        if "#session-" in key and checkpoint is not None and not self.failed:
            self.failed = True
            raise TimeoutError("read timeout")
        return await super().renew(key, owner, checkpoint=checkpoint, **lease)


async def test_a_committed_turn_is_never_rolled_back_after_its_token_expires(tmp_path: Path) -> None:
    # Was: B took A's lock over, found A's turn committed and kept it, then failed; its lock record still named A's
    # turn as unfinished, and once A's token record expired, C rolled A's answered turn back.
    directory = str(tmp_path / "sessions")
    inner = InMemoryIdempotencyStore()
    config = IdempotencyConfig(
        store=inner, scope=SCOPE, lease_seconds=1.0, expires_after_seconds=2.0, session_invocation_mode="enqueue"
    )
    a = await asyncio.wait_for(
        _session_agent(directory, dataclasses.replace(config, store=_SessionReleaseFails(inner))).invoke_async(
            "A?", idempotency_token="tA"
        ),
        WAIT,
    )
    assert a.stop_reason == "end_turn" and _texts(directory) == ["A?"]
    b_store = _CheckpointRenewFails(inner)
    with pytest.raises(IdempotencyStoreError):
        await asyncio.wait_for(
            _session_agent(directory, dataclasses.replace(config, store=b_store)).invoke_async(
                "B?", idempotency_token="tB"
            ),
            WAIT,
        )
    assert b_store.failed and _texts(directory) == ["A?"]
    key_a = make_key(SCOPE, "tA")
    stored_a = await inner.get(key_a)
    assert stored_a is not None and stored_a.state is RecordState.COMPLETED
    await _until(lambda: stored_a.expires_at <= time.time(), WAIT, "A's record to expire")
    c = await asyncio.wait_for(
        _session_agent(directory, dataclasses.replace(config, store=CountingStore(inner))).invoke_async(
            "C?", idempotency_token="tC"
        ),
        WAIT,
    )
    assert c.stop_reason == "end_turn"
    assert _texts(directory) == ["A?", "C?"], f"A's committed, answered turn was rolled back: {_texts(directory)}"


async def _checkpoint_timeout_is_a_store_error(tmp_path: Path) -> None:
    script = ScriptedBedrock()
    agent = _session_agent(
        str(tmp_path / "sessions"),
        IdempotencyConfig(store=_CheckpointRenewFails(InMemoryIdempotencyStore()), scope=SCOPE),
        script,
    )
    try:
        await asyncio.wait_for(agent.invoke_async("hi", idempotency_token="t1"), WAIT)
    except IdempotencyStoreError:
        pass
    except (TimeoutError, asyncio.TimeoutError) as e:  # the store's own, or wait_for's (another class on 3.10)
        raise AssertionError(f"the store's raw error reached the caller: {e!r}") from e
    assert script.model_calls == 0


async def test_a_store_timeout_writing_the_turn_checkpoint_is_an_idempotency_store_error(tmp_path: Path) -> None:
    await _checkpoint_timeout_is_a_store_error(tmp_path)


async def _passthrough(call: Any) -> Any:
    return await call


@pytest.mark.xfail(raises=AssertionError, strict=True, reason="negative control: renew_now unwrapped")
async def test_negative_control_raw_checkpoint_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_heartbeat, "_store", _passthrough)
    await _checkpoint_timeout_is_a_store_error(tmp_path)


class _SessionReleaseFailsOnce(CountingStore):
    def __init__(self, inner: IdempotencyStore) -> None:
        super().__init__(inner)
        self.failed = False

    async def release(self, key: str, owner: str) -> bool:
        if "#session-" in key and not self.failed:
            self.failed = True
            raise ConnectionResetError("connection reset by peer")
        return await super().release(key, owner)


async def test_an_answered_tokenless_turn_is_kept_whatever_its_lock_write_meets(tmp_path: Path) -> None:
    # Was: a turn without a token ended by deleting its lock record; when that delete failed, the record kept the
    # turn's checkpoint, and the next holder (finding no token) rolled back a turn whose caller had its answer.
    directory = str(tmp_path / "sessions")
    inner = InMemoryIdempotencyStore()
    config = IdempotencyConfig(
        store=_SessionReleaseFailsOnce(inner), scope=SCOPE, lease_seconds=1.0, session_invocation_mode="enqueue"
    )
    first = await asyncio.wait_for(_session_agent(directory, config).invoke_async("first?"), WAIT)
    assert first.stop_reason == "end_turn" and _texts(directory) == ["first?"]
    second = await asyncio.wait_for(_session_agent(directory, config).invoke_async("second?"), WAIT)
    assert second.stop_reason == "end_turn"
    assert _texts(directory) == ["first?", "second?"], f"the answered turn was rolled back: {_texts(directory)}"


@pytest.mark.xfail(raises=AssertionError, strict=True, reason="negative control: a tokenless commit deletes its lock")
async def test_negative_control_tokenless_commit_by_release(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async def commit_by_release(self: SessionTurn) -> None:
        await self._finish(rollback=False)

    monkeypatch.setattr(SessionTurn, "commit", commit_by_release)
    await test_an_answered_tokenless_turn_is_kept_whatever_its_lock_write_meets(tmp_path)


class _MarkFails(CountingStore):
    """The write that ends a tokenless turn (a renew carrying a checkpoint, lease ended) fails."""

    async def renew(self, key: str, owner: str, *, checkpoint: str | None = None, **lease: Any) -> bool:
        if "#session-" in key and checkpoint is not None and '"committed"' in checkpoint:
            raise ConnectionResetError("connection reset by peer")
        return await super().renew(key, owner, checkpoint=checkpoint, **lease)


async def test_a_tokenless_turn_that_cannot_be_marked_counted_is_an_error_and_is_undone(tmp_path: Path) -> None:
    directory = str(tmp_path / "sessions")
    inner = InMemoryIdempotencyStore()
    config = IdempotencyConfig(store=_MarkFails(inner), scope=SCOPE, lease_seconds=1.0)
    with pytest.raises(IdempotencyStoreError):
        await asyncio.wait_for(_session_agent(directory, config).invoke_async("lost?"), WAIT)
    assert _texts(directory) == []  # the caller got an error, and the turn is not in the conversation
    assert len(inner) == 0  # nor is the lock held
    healthy = dataclasses.replace(config, store=inner)
    after = await asyncio.wait_for(_session_agent(directory, healthy).invoke_async("next?"), WAIT)
    assert after.stop_reason == "end_turn" and _texts(directory) == ["next?"]


class _HeartbeatsFail(CountingStore):
    """While ``failing``, heartbeats of the session lock fail (the store is unreachable for a while)."""

    def __init__(self, inner: IdempotencyStore) -> None:
        super().__init__(inner)
        self.failing = False

    async def renew(self, key: str, owner: str, *, checkpoint: str | None = None, **lease: Any) -> bool:
        if self.failing and "#session-" in key and checkpoint is None:
            raise ConnectionError("store unreachable")
        return await super().renew(key, owner, checkpoint=checkpoint, **lease)


def _shape(directory: str) -> list[tuple[str, tuple[str, ...]]]:
    manager = FileSessionManager(session_id="conv-1", storage_dir=directory)
    return shape([m.to_message() for m in manager.list_messages("conv-1", "default")])


async def test_a_turn_that_lost_its_lease_locally_is_rolled_back_by_the_next_holder(tmp_path: Path) -> None:
    # Was: a turn whose heartbeats failed for a whole lease (no takeover) skipped its rollback (the lock might not
    # be its own any more) and then deleted the lock record with its checkpoint: its partial messages stayed.
    directory = str(tmp_path / "sessions")
    inner = InMemoryIdempotencyStore()
    store = _HeartbeatsFail(inner)
    config = IdempotencyConfig(store=store, scope="s", lease_seconds=1.0)
    lost = asyncio.Event()

    def agent(script: ScriptedBedrock) -> Agent:
        a = Agent(
            model=script.model(),
            tools=script.tools(),
            callback_handler=None,
            session_manager=FileSessionManager(session_id="conv-1", storage_dir=directory),
            idempotency=config,
        )
        original = a._on_lease_lost

        def on_lost(error: Any) -> None:
            lost.set()
            original(error)

        a._on_lease_lost = on_lost  # type: ignore[method-assign]
        return a

    script = BlockingTool(WAIT)
    first = asyncio.create_task(agent(script).invoke_async("weather in Rome?", idempotency_token="t1"))
    try:
        await _until(script.tool_entered.is_set, WAIT, "the tool")
        store.failing = True  # a store blip longer than a lease: the turn's heartbeats fail
        await asyncio.wait_for(lost.wait(), WAIT)
        store.failing = False  # the store is back; nobody took the session over
    finally:
        script.tool_gate.set()
        await asyncio.wait([first], timeout=WAIT)
    assert first.done()
    if not first.cancelled():
        first.exception()  # IdempotencyLeaseLostError: the turn did not count
    # the turn did not count: the next turn must find the conversation as it was before it
    second = await asyncio.wait_for(
        agent(ScriptedBedrock()).invoke_async("weather in Oslo?", idempotency_token="t2"), WAIT
    )
    assert second.stop_reason == "end_turn"
    assert _shape(directory) == ONE_TURN, f"the aborted turn's partial messages stayed: {_shape(directory)}"


def _run(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine that never suspends (the in-memory store's primitives) on this thread."""
    try:
        coro.send(None)
    except StopIteration as e:
        return e.value  # type: ignore[no-any-return]
    raise AssertionError("the inner store suspended")


class _ThreadedStore(IdempotencyStore):
    """Each primitive runs on the store's own executor. ``hold`` names primitives (and a key fragment) whose write
    is applied at once but whose answer is held until ``answer`` is set (a slow response)."""

    supports_blocking_claims = False

    def __init__(self, inner: IdempotencyStore, hold: dict[str, str] | None = None) -> None:
        self.inner = inner
        self.max_result_bytes = inner.max_result_bytes
        self.pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="hostile-store")
        self.hold = dict(hold or {})
        self.landed = threading.Event()
        self.answer = threading.Event()
        self.answered = threading.Event()

    async def _call(self, name: str, key: str, work: Any) -> Any:
        def blocking() -> Any:
            value = _run(work())
            fragment = self.hold.get(name)
            if fragment is not None and fragment in key:
                self.hold.pop(name)
                self.landed.set()
                self.answer.wait(WAIT)
                self.answered.set()
            return value

        return await asyncio.get_running_loop().run_in_executor(self.pool, blocking)

    async def claim(self, record: IdempotencyRecord, now: float) -> IdempotencyRecord | None:
        return await self._call("claim", record.key, lambda: self.inner.claim(record, now))

    async def take_over(self, record: IdempotencyRecord, version: str) -> bool:
        return await self._call("take_over", record.key, lambda: self.inner.take_over(record, version))

    async def get(self, key: str) -> IdempotencyRecord | None:
        return await self._call("get", key, lambda: self.inner.get(key))

    async def complete(self, record: IdempotencyRecord) -> bool:
        return await self._call("complete", record.key, lambda: self.inner.complete(record))

    async def release(self, key: str, owner: str) -> bool:
        return await self._call("release", key, lambda: self.inner.release(key, owner))

    async def renew(self, key: str, owner: str, *, checkpoint: str | None = None, **lease: Any) -> bool:
        return await self._call("renew", key, lambda: self.inner.renew(key, owner, checkpoint=checkpoint, **lease))

    def close(self) -> None:
        self.answer.set()
        self.pool.shutdown(wait=True)


def test_a_loop_closed_while_a_result_is_stored_keeps_the_turn(tmp_path: Path) -> None:
    # Was: when the loop closed (asyncio.run returning, a server shutting down) while the result's write was on the
    # store's thread, the settling task was cancelled and rolled the turn back; the write landed, so the token
    # replayed an answer missing from the conversation. Now the turn is left for the next holder to judge.
    directory = str(tmp_path / "sessions")
    inner = InMemoryIdempotencyStore()
    store = _ThreadedStore(inner, hold={"complete": "s#"})
    config = IdempotencyConfig(store=store, scope=SCOPE, lease_seconds=30.0)
    try:

        async def handler() -> None:
            task = asyncio.create_task(
                _session_agent(directory, config).invoke_async("weather in Paris?", idempotency_token="t1")
            )
            await _until(store.landed.is_set, WAIT, "the complete to land")
            task.cancel()
            await asyncio.wait([task], timeout=WAIT)

        asyncio.run(handler())
        store.answer.set()
        assert store.answered.wait(WAIT)
        store.pool.shutdown(wait=True)
        record = asyncio.run(inner.get(make_key(SCOPE, "t1")))
        assert record is not None and record.state is RecordState.COMPLETED  # the token's result is stored

        async def retry() -> Any:
            again = dataclasses.replace(config, store=inner)
            replay = await asyncio.wait_for(
                _session_agent(directory, again).invoke_async("weather in Paris?", idempotency_token="t1"), WAIT
            )
            follow_up = await asyncio.wait_for(
                _session_agent(directory, again).invoke_async("and Rome?", idempotency_token="t2"), WAIT
            )
            return replay, follow_up

        replay, follow_up = asyncio.run(retry())
        assert isinstance(replay, ReplayedAgentResult) and follow_up.stop_reason == "end_turn"
        assert _texts(directory) == ["weather in Paris?", "and Rome?"], f"the stored turn was lost: {_texts(directory)}"
    finally:
        store.close()


@pytest.mark.xfail(raises=AssertionError, strict=True, reason="negative control: torn down mid-write, rolled back")
def test_negative_control_teardown_rolls_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(SessionTurn, "suspend", SessionTurn.abort)
    test_a_loop_closed_while_a_result_is_stored_keeps_the_turn(tmp_path)
