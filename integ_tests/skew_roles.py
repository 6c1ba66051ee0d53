"""The agent side of test_clock_skew.py's workers: one call on any store, observed (see ``skew_worker``).

Imported by a worker process only once its clock is moved (``skew_worker.serve``), or in the test process for the
in-memory store. The model is ``session_worker``'s scripted ``BedrockModel`` (its tool request and answer name the
turn's prompt and the prompt before it, so a persisted conversation shows what the model was sent); a session is a
``FileSessionManager`` directory shared by the workers.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any
from unittest import mock

import boto3
import session_worker
import skew_worker

from strands_py import Agent, IdempotencyLeaseLostError, SessionBusyError
from strands_py.idempotency import (
    DynamoDBIdempotencyStore,
    IdempotencyConfig,
    IdempotencyRecord,
    IdempotencyStore,
    IdempotencyWaitTimeoutError,
    RecordState,
    RedisIdempotencyStore,
    ReplayedAgentResult,
)
from strands_py.idempotency._heartbeat import LeaseWatch

TABLE = "agent-idempotency-clock-skew"
# The scope of calls without a session (the test reads their records); a session's calls keep the default scope.
SCOPE = "integ-clock-skew"
EXPIRES_AFTER = 3600.0
SESSION_KEY_MARK = session_worker.SESSION_KEY_MARK


def _kind(key: str) -> str:
    return "lock" if SESSION_KEY_MARK in key else "token"


class ObservedStore(IdempotencyStore):
    """Forwards to ``inner`` and tells the probe what this worker wrote, met and took over (see ``skew_worker.Probe``).

    ``log``: every primitive (name, "token" or "lock", sent, outcome). ``takeovers``: every takeover attempt, with the
    version it judged and when this worker first read that version. ``revoked``: the other owners' claims this worker
    revoked (``{"kind", "version"}``): released them, or replaced them with a yielded claim (``version``: the one it
    replaced). A session takeover revokes the dead holder's token claim so that its result can never land.

    Journals are not forwarded (``supports_journal`` stays False): what a clock decides is the same with or without.
    """

    def __init__(self, inner: IdempotencyStore, probe: skew_worker.Probe) -> None:
        self.inner = inner
        self.max_result_bytes = inner.max_result_bytes
        self.probe = probe
        self.owners: set[str] = set()
        self.first_seen: dict[str, float] = {}  # version of another owner's claim -> when we first read it
        self.log: list[tuple[str, str, float, Any]] = []
        self.takeovers: list[dict[str, Any]] = []
        self.revoked: list[dict[str, Any]] = []

    def _met(self, record: IdempotencyRecord | None) -> None:
        if record is None or record.state is not RecordState.IN_PROGRESS or record.owner in self.owners:
            return
        self.first_seen.setdefault(record.version, time.monotonic())
        if not record.yielded:
            self.probe.blocked.set()

    def _sending(self, key: str, version: str) -> None:
        getattr(self.probe, f"{_kind(key)}_sending").value = version.encode()

    def _wrote(self, key: str, version: str, sent: float) -> None:
        kind = _kind(key)
        getattr(self.probe, f"{kind}_version").value = version.encode()
        getattr(self.probe, f"{kind}_written_at").value = sent

    async def claim(self, record: IdempotencyRecord, now: float) -> IdempotencyRecord | None:
        self.owners.add(record.owner)
        self.probe.clock_offset.value = now - skew_worker.true_time()
        self._sending(record.key, record.version)
        sent = time.monotonic()
        existing = await self.inner.claim(record, now)
        self._met(existing)
        if existing is None:
            self._wrote(record.key, record.version, sent)
        self.log.append(("claim", _kind(record.key), sent, existing is None))
        return existing

    async def take_over(self, record: IdempotencyRecord, version: str) -> bool:
        self.owners.add(record.owner)
        with self.probe.take_over_attempts.get_lock():
            self.probe.take_over_attempts.value += 1
        self._sending(record.key, record.version)
        sent = time.monotonic()
        won = await self.inner.take_over(record, version)
        if won:
            self._wrote(record.key, record.version, sent)
            if record.yielded:
                self.revoked.append({"kind": _kind(record.key), "version": version})
        self.log.append(("take_over", _kind(record.key), sent, won))
        self.takeovers.append(
            {
                "kind": _kind(record.key),
                "version": version,
                "seen": self.first_seen.get(version),
                "sent": sent,
                "won": won,
            }
        )
        return won

    async def get(self, key: str) -> IdempotencyRecord | None:
        sent = time.monotonic()
        record = await self.inner.get(key)
        self._met(record)
        self.log.append(("get", _kind(key), sent, None if record is None else record.state.value))
        return record

    async def complete(self, record: IdempotencyRecord) -> bool:
        sent = time.monotonic()
        done = await self.inner.complete(record)
        self.log.append(("complete", _kind(record.key), sent, done))
        return done

    async def release(self, key: str, owner: str) -> bool:
        sent = time.monotonic()
        done = await self.inner.release(key, owner)
        self.log.append(("release", _kind(key), sent, done))
        if done and owner not in self.owners:
            self.revoked.append({"kind": _kind(key), "version": None})
        return done

    async def renew(
        self,
        key: str,
        owner: str,
        *,
        version: str,
        lease_seconds: float,
        expires_at: float,
        checkpoint: str | None = None,
    ) -> bool:
        self._sending(key, version)
        sent = time.monotonic()
        done = await self.inner.renew(
            key, owner, version=version, lease_seconds=lease_seconds, expires_at=expires_at, checkpoint=checkpoint
        )
        self.log.append(("renew", _kind(key), sent, done))
        if done:
            kind = _kind(key)
            self._wrote(key, version, sent)
            counter = getattr(self.probe, f"{kind}_renewals")
            with counter.get_lock():
                counter.value += 1
            getattr(self.probe, f"{kind}_renewed").set()
        return done


def open_store(records: str, url: str) -> IdempotencyStore:
    """A store on the server at ``url`` (close it when done)."""
    if records == "dynamodb":
        session = boto3.Session(region_name=session_worker.REGION, **session_worker.CREDENTIALS)
        return DynamoDBIdempotencyStore(TABLE, boto3_session=session, endpoint_url=url)
    if records == "redis":
        return RedisIdempotencyStore.from_url(url)
    raise ValueError(f"no store of its own for {records!r}: the test gives it")


def close_store(store: IdempotencyStore) -> None:
    if isinstance(store, DynamoDBIdempotencyStore | RedisIdempotencyStore):
        store.close()


def _clock_judged(self: LeaseWatch, record: IdempotencyRecord, read_at: float) -> float:
    """The old judgement, for the negative controls: the holder's lease ends at the wall-clock time of its last write
    plus the lease (``expires_at`` less the collection window), compared with this host's wall clock."""
    if record.yielded:
        return 0.0
    return max(0.0, record.expires_at - EXPIRES_AFTER - time.time())


@contextlib.contextmanager
def broken(breakage: str | None) -> Iterator[None]:
    """A negative control's defect, for the duration of the call."""
    if breakage is None:
        yield
        return
    assert breakage == "clock-judged", breakage
    with mock.patch.object(LeaseWatch, "remaining", _clock_judged):
        yield


def run_role(
    role: skew_worker.Role,
    probe: skew_worker.Probe,
    records: IdempotencyStore | None = None,
    on_loop: Callable[[asyncio.AbstractEventLoop], None] | None = None,
) -> dict[str, Any]:
    """Build the agent, say ready, wait for ``go``, make the call on an event loop of this thread; return the report.

    ``records``: the store to use (left open), instead of one of the role's own on its server (closed).
    ``on_loop``: told the event loop the call runs on (the in-memory test freezes it to play a dead process).
    """
    store = records if records is not None else open_store(role.records, role.url)
    observed = ObservedStore(store, probe)
    job = session_worker.Job(
        backend=session_worker.Backend("file", role.url, role.session_dir or ""),
        session_id=role.session_id or "",
        turns=((role.prompt, role.token),),
        gated=role.gated,
        crash_in_tool=role.crash_in_tool,
    )
    script = session_worker.TurnScript(job, probe)  # type: ignore[arg-type]  # it reads gate, entered, in_tool, model_started_at
    try:
        agent = Agent(
            model=script.model(),
            tools=script.tools(),
            callback_handler=None,
            session_manager=job.backend.manager(role.session_id) if role.session_id else None,
            idempotency=IdempotencyConfig(
                store=observed,
                scope=None if role.session_id else SCOPE,
                lease_seconds=role.lease_seconds,
                expires_after_seconds=EXPIRES_AFTER,
                wait_timeout_seconds=role.wait_timeout_seconds,
                session_invocation_mode=role.mode,
            ),
        )
        probe.ready.set()
        if not probe.go.wait(skew_worker.WAIT):
            raise TimeoutError("the test never said go")

        async def call() -> dict[str, Any]:
            if on_loop is not None:
                on_loop(asyncio.get_running_loop())
            try:
                result = await asyncio.wait_for(
                    agent.invoke_async(role.prompt, idempotency_token=role.token), skew_worker.WAIT
                )
            except SessionBusyError as e:
                return {"outcome": "busy", "error": repr(e)}
            except IdempotencyWaitTimeoutError as e:
                return {"outcome": "timeout", "error": repr(e)}
            except IdempotencyLeaseLostError as e:
                return {"outcome": "lease_lost", "error": repr(e)}
            except Exception as e:  # noqa: BLE001 - reported to the test, which fails on it
                return {"outcome": "error", "error": f"{type(e).__name__}: {e}"}
            return {
                "outcome": "ok",
                "text": str(result).strip(),
                "replayed": isinstance(result, ReplayedAgentResult),
            }

        with broken(role.broken):
            outcome = asyncio.run(call())
    finally:
        if records is None:
            close_store(store)
    return {
        "label": role.label,
        **outcome,
        "model_calls": script.model_calls,
        "tool_calls": script.tool_calls,
        "log": observed.log,
        "takeovers": observed.takeovers,
        "revoked": observed.revoked,
        "clock_offset": probe.clock_offset.value,
    }
