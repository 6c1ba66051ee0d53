"""Store errors and cancellations around the writes that decide ownership (claim, complete): nothing is orphaned."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from strands_py import Agent, IdempotencyStoreError, IdempotencyWaitTimeoutError
from strands_py.agent import _gate
from strands_py.idempotency import (
    IdempotencyConfig,
    IdempotencyRecord,
    IdempotencyStore,
    InMemoryIdempotencyStore,
    RecordState,
)
from strands_py.idempotency._calls import _store
from strands_py.idempotency.keys import make_key
from strands_py.testing import CountingStore, ScriptedBedrock
from strands_py.turn import _claim, _run

WAIT = 8.0


def durable_agent(script: ScriptedBedrock, store: IdempotencyStore, **config: Any) -> Agent:
    config.setdefault("scope", "s")
    return Agent(
        model=script.model(),
        tools=script.tools(),
        callback_handler=None,
        idempotency=IdempotencyConfig(store=store, **config),
    )


class _LandedThenTimedOut(CountingStore):
    """The claim's write lands, then the client gives up on the response (read timeout after its retries)."""

    def __init__(self, inner: IdempotencyStore) -> None:
        super().__init__(inner)
        self.fail_next = True

    async def claim(self, record: IdempotencyRecord, now: float) -> IdempotencyRecord | None:
        existing = await super().claim(record, now)
        if self.fail_next:
            self.fail_next = False
            raise TimeoutError("read timeout on endpoint URL (the PutItem was applied)")
        return existing

    def claim_blocking(self, record: IdempotencyRecord, now: float) -> IdempotencyRecord | None:
        existing = super().claim_blocking(record, now)
        if self.fail_next:
            self.fail_next = False
            raise TimeoutError("read timeout on endpoint URL (the PutItem was applied)")
        return existing


# Was (both tests below): a claim whose write landed but whose call raised (a read timeout after botocore's retries, a
# connection reset after the request was sent) becomes IdempotencyStoreError, documented as "nothing ran, retrying later
# is safe (HTTP: 503)". But the IN_PROGRESS record we wrote stays, with nobody renewing it and nobody releasing it: the
# claim (then in `_durable`) only hands a landed claim back when the *caller* was cancelled (`_release_when_landed`),
# not when the store call itself failed; `_gate.replay_blocking` (the sync path) does nothing at all. Every retry of the
# token then waits for a whole lease (30 s by default) for an owner that does not exist: exactly the orphaned-claim
# defect issue 8 fixed for cancellations, through the other exit.
# Expected: on a failed claim, hand our claim back (a fenced `release(key, owner)`: it deletes only our own IN_PROGRESS
# record, so it is safe whether or not the write landed), best-effort and shielded, like `_release_when_landed`; the
# retry then runs at once.


async def test_a_claim_that_landed_but_raised_does_not_block_the_retry_for_a_lease() -> None:
    inner = InMemoryIdempotencyStore()
    first = durable_agent(ScriptedBedrock(), _LandedThenTimedOut(inner))
    with pytest.raises(IdempotencyStoreError):
        await asyncio.wait_for(first.invoke_async("weather?", idempotency_token="req-1"), WAIT)
    retry_script = ScriptedBedrock()
    retry = durable_agent(retry_script, CountingStore(inner), wait_timeout_seconds=1.0)  # another process
    try:
        result = await asyncio.wait_for(retry.invoke_async("weather?", idempotency_token="req-1"), WAIT)
    except IdempotencyWaitTimeoutError as e:
        orphan = await inner.get(make_key("s", "req-1"))
        assert orphan is not None and orphan.state is RecordState.IN_PROGRESS
        raise AssertionError("the retry waits a whole lease for the failed call's orphaned claim") from e
    assert result.stop_reason == "end_turn" and retry_script.model_calls == 2


def test_a_sync_claim_that_landed_but_raised_does_not_block_the_retry_for_a_lease() -> None:
    inner = InMemoryIdempotencyStore()
    first = durable_agent(ScriptedBedrock(), _LandedThenTimedOut(inner))
    with pytest.raises(IdempotencyStoreError):
        first("weather?", idempotency_token="req-1")  # the claim is sent on this thread (claim_blocking)
    retry_script = ScriptedBedrock()
    retry = durable_agent(retry_script, CountingStore(inner), wait_timeout_seconds=1.0)
    try:
        result = retry("weather?", idempotency_token="req-1")
    except IdempotencyWaitTimeoutError as e:
        raise AssertionError("the retry waits a whole lease for the failed call's orphaned claim") from e
    assert result.stop_reason == "end_turn" and retry_script.model_calls == 2


class _SlowComplete(CountingStore):
    """``complete`` waits for ``answer``; with ``lands_first`` the write is applied before the wait (only the
    response is late), else it is only applied once answered (the request is still queued)."""

    def __init__(self, inner: IdempotencyStore, *, lands_first: bool) -> None:
        super().__init__(inner)
        self.lands_first = lands_first
        self.entered = asyncio.Event()
        self.answer = asyncio.Event()

    async def complete(self, record: IdempotencyRecord) -> bool:
        if self.lands_first:
            done = await super().complete(record)
            self.entered.set()
            await self.answer.wait()
            return done
        self.entered.set()
        await self.answer.wait()
        return await super().complete(record)


async def test_a_primary_cancelled_while_storing_its_result_does_not_block_the_retry_for_a_lease() -> None:
    # Was: `durable_stream` (then in `_durable`) sets `settled = True` *before* `await _complete(...)`. A caller
    # cancelled while the result is being written (asyncio.wait_for around invoke_async, a server task cancelled on
    # shutdown) leaves the `finally` believing the claim was settled: it neither completes nor releases it. The
    # heartbeat was already stopped, so an IN_PROGRESS record that nobody owns blocks every retry for a whole lease
    # (30 s by default). Expected: the complete is shielded and finished (the claim is then COMPLETED and the retry
    # replays), or the claim is handed back (fenced release) when the complete did not happen; either way the retry does
    # not wait for a dead owner.
    inner = InMemoryIdempotencyStore()
    store = _SlowComplete(inner, lands_first=False)
    primary = asyncio.create_task(
        durable_agent(ScriptedBedrock(), store).invoke_async("weather?", idempotency_token="t")
    )
    await asyncio.wait_for(store.entered.wait(), WAIT)
    primary.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(primary, WAIT)
    store.answer.set()  # the store answers now (a shielded complete may land)
    retry = durable_agent(ScriptedBedrock(), CountingStore(inner), wait_timeout_seconds=1.0)  # another process
    try:
        result = await asyncio.wait_for(retry.invoke_async("weather?", idempotency_token="t"), WAIT)
    except IdempotencyWaitTimeoutError as e:
        raise AssertionError("the retry waits a whole lease for a claim nobody holds any more") from e
    assert result.stop_reason == "end_turn"


async def _claim_without_hand_back(attempt: Any, landed: Any, hand_back: Any) -> Any:
    return await _store(attempt)


@pytest.mark.xfail(raises=AssertionError, strict=True, reason="negative control: a failed claim is not handed back")
async def test_negative_control_failed_claim_not_handed_back(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_claim, "claim_or_hand_back", _claim_without_hand_back)
    await test_a_claim_that_landed_but_raised_does_not_block_the_retry_for_a_lease()


@pytest.mark.xfail(raises=AssertionError, strict=True, reason="negative control: a failed sync claim is kept")
def test_negative_control_failed_sync_claim_not_handed_back(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_gate, "_release_blocking", lambda call: None)
    test_a_sync_claim_that_landed_but_raised_does_not_block_the_retry_for_a_lease()


async def _unshielded(work: Any) -> Any:
    return await work


@pytest.mark.xfail(raises=AssertionError, strict=True, reason="negative control: storing the result is not shielded")
async def test_negative_control_unshielded_complete(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_run, "shielded", _unshielded)
    await test_a_primary_cancelled_while_storing_its_result_does_not_block_the_retry_for_a_lease()
