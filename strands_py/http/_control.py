"""Run control: the status of a key's invocation (``GET /invocations/{key}``) and its cancel (``DELETE``).

A status comes from this server's run registry when the run is (or was, within retention) here, else from the store
record of the key. A cancel marks the store record (``store.cancel``: the owner, on any server, learns at its next
heartbeat, stops at its next cancellation point, rolls its turn back and leaves a ``CANCELLED`` tombstone, so that a
retry runs afresh), and stops a run of this server at once, through its agent's ``cancel()``.

Statuses: ``queued`` (waiting behind other turns of its conversation on this server), ``running``, ``cancelling``
(marked, its owner not yet stopped), ``completed`` (with the result), ``failed`` (stopped without a result: a POST of
the same key resumes it), ``cancelled``.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

from starlette.requests import Request
from starlette.responses import Response

from ..idempotency.codec import decode_result
from ..idempotency.config import IdempotencyConfig
from ..idempotency.record import IdempotencyRecord, RecordState
from ..types.exceptions import IdempotencyError, IdempotencyResultTooLargeError, IdempotencyStoreError
from ._access import access_of
from ._problems import cancel_unsupported_problem, cancelled_problem, not_found_problem, problem_for
from ._protocol import ProblemError
from ._registry import RunRegistry
from ._runs import Run
from ._wire import dumps, result_body

logger = logging.getLogger(__name__)

# How long a DELETE waits for a run without an agent yet (its task cancelled) to end, so it can answer its final state.
_QUEUED_CANCEL_SECONDS = 5.0

# The statuses that still change: a DELETE or a GET of one of them has a Location to follow.
LIVE = frozenset({"queued", "running", "cancelling"})


def timestamp(seconds: float) -> str | None:
    """RFC 3339 in UTC, to the millisecond (``2025-01-02T03:04:05.678Z``); None for 0 (not known)."""
    if not seconds:
        return None
    moment = datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def status_path(root_path: str, token: str) -> str:
    """The status resource of ``token`` (its raw value, percent-encoded as one path segment)."""
    return f"{root_path}/invocations/{quote(token, safe='')}"


def run_status(run: Run, token: str, lease_seconds: float, *, marked: bool = False) -> dict[str, Any]:
    """The status body of a run of this server; ``marked``: the key's record is marked cancelled (by any server)."""
    phase = run.phase
    if marked and phase in ("queued", "running"):
        phase = "cancelling"  # its owner learns of the cancel at its next heartbeat
    body: dict[str, Any] = {"key": token, "status": phase}
    if phase in LIVE:
        body["where"] = "here"
        body["lease_seconds"] = lease_seconds
    if run.place is not None:
        body["session"] = run.place.session_id
    if phase == "queued":
        body["position"] = run.position()
    body["started_at"] = timestamp(run.started_wall)
    body["finished_at"] = timestamp(run.finished_wall) if run.finished else None
    if run.result_json is not None:
        body["result"] = json.loads(run.result_json)
    elif run.problem is not None:
        body["problem"] = run.problem.body()
    return body


def record_phase(record: IdempotencyRecord) -> str:
    """The status a stored record says (``running``, ``cancelling``, ``completed``, ``failed``, ``cancelled``)."""
    if record.state is RecordState.COMPLETED:
        return "completed"
    if record.state is RecordState.CANCELLED:
        return "cancelled"
    if record.yielded:
        # Its owner stopped without a result: the next claim resumes it, or, marked, leaves a tombstone and runs afresh.
        return "cancelled" if record.cancelled else "failed"
    return "cancelling" if record.cancelled else "running"


def record_status(record: IdempotencyRecord, token: str) -> dict[str, Any]:
    """The status body of a stored record (an invocation this server does not know).

    Raises:
        IdempotencyRecordCorruptedError: A completed record cannot be decoded.
    """
    phase = record_phase(record)
    body: dict[str, Any] = {"key": token, "status": phase}
    if phase in LIVE:
        body["where"] = "elsewhere"
        body["lease_seconds"] = record.lease_seconds
    body["started_at"] = body["finished_at"] = None  # another server's: not known here
    if phase == "completed":
        try:
            body["result"] = result_body(decode_result(record, None))
        except IdempotencyResultTooLargeError as e:
            body["problem"] = problem_for(e, 0).body()
    elif phase == "cancelled":
        body["problem"] = cancelled_problem().body()
    return body


def _json(body: dict[str, Any], status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(dumps(body), status_code=status, media_type="application/json", headers=headers)


class RunControl:
    """Status and cancel of the caller's keys, for one app; see the module's documentation.

    Thread-safety: the app's event loop only.
    """

    def __init__(
        self,
        config: IdempotencyConfig,
        registry: RunRegistry,
        key_of: Callable[[Request, str], Any],
        retry_after: int,
    ) -> None:
        """Control the runs of ``registry`` and the records of ``config.store``.

        ``key_of(request, token)`` is a coroutine giving the durable key of ``token`` in the request's scope.
        """
        self._config = config
        self._registry = registry
        self._key_of = key_of
        self._retry_after = retry_after

    async def status(self, request: Request, token: str) -> Response:
        """``GET /invocations/{key}``: 200 with the status body, or a problem (404 unknown, 503 store unavailable).

        Raises:
            HTTPException: From the scope function.
            ProblemError: 404, 500 (corrupted record or scope), 503.
        """
        key = await self._key_of(request, token)
        _note(request, key)
        run = self._registry.find(key)
        if run is not None and run.succeeded:
            return _json(run_status(run, token, self._config.lease_seconds))
        record = await self._read(self._config.store.get(key))
        if run is not None and not run.finished:
            # Running here, but maybe marked cancelled by another server: the store says so before the owner does.
            marked = record is not None and record.state is RecordState.IN_PROGRESS and record.cancelled
            return _json(run_status(run, token, self._config.lease_seconds, marked=marked))
        return _json(self._resolve(run, record, token))

    async def cancel(self, request: Request, token: str) -> Response:
        """``DELETE /invocations/{key}``: 202 ``cancelling`` (with ``Location``), 200 final state, or a problem.

        Marks the store record first, so that a result racing the cancel can no longer be stored, then stops a run
        of this server through its agent. Idempotent: a second DELETE answers the current state.

        Raises:
            HTTPException: From the scope function.
            ProblemError: 404 unknown, 501 the store cannot cancel, 503 store unavailable, 500.
        """
        store = self._config.store
        if not store.supports_cancel:
            raise ProblemError(cancel_unsupported_problem(store))
        key = await self._key_of(request, token)
        _note(request, key)
        run = self._registry.find(key)
        record = await self._read(store.cancel(key))
        if run is not None and not run.finished:
            run.request_cancel(cancelled_problem())
            if run.agent is None:
                # Queued, or its agent still being built: it claimed nothing, and its task ends at once.
                waiting = asyncio.ensure_future(run.wait(lambda r: r.finished))
                try:
                    await asyncio.wait([waiting], timeout=_QUEUED_CANCEL_SECONDS)
                finally:
                    waiting.cancel()
            logger.debug("key=<%s>, phase=<%s> | cancel requested for a run of this server", key, run.phase)
            body = run_status(run, token, self._config.lease_seconds)
        else:
            body = self._resolve(run, record, token)
            logger.debug("key=<%s>, status=<%s> | cancel requested", key, body["status"])
        if body["status"] in LIVE:
            location = status_path(request.scope.get("root_path", ""), token)
            return _json(body, 202, {"Location": location})
        return _json(body)

    def _resolve(self, run: Run | None, record: IdempotencyRecord | None, token: str) -> dict[str, Any]:
        """The status of a key this server has no live run of: its finished run here, or its record, or 404.

        Raises:
            ProblemError: 404 neither; 500 a corrupted record.
        """
        phase = None if record is None else record_phase(record)
        if run is not None:
            # This server's run ended without a result. The store knows better when the key was run again since
            # (completed, or running again elsewhere), or when a DELETE turned its yielded claim into a cancel.
            newer = phase in ("completed", "running") or (
                phase in ("cancelled", "cancelling") and run.phase == "failed"
            )
            if not newer:
                return run_status(run, token, self._config.lease_seconds)
        if record is None:
            raise ProblemError(not_found_problem())
        try:
            return record_status(record, token)
        except IdempotencyError as e:
            raise ProblemError(problem_for(e, self._retry_after)) from e

    async def _read(self, call: Any) -> IdempotencyRecord | None:
        """Await a store read (``get`` or ``cancel``), expired records dropped; store errors as 503 problems.

        Raises:
            ProblemError: 503 store unavailable, 500 corrupted.
        """
        try:
            record: IdempotencyRecord | None = await call
        except IdempotencyError as e:
            raise ProblemError(problem_for(e, self._retry_after)) from e
        except Exception as e:  # a store that raises something else is a store outage too
            raise ProblemError(problem_for(IdempotencyStoreError(type(e).__name__), self._retry_after)) from e
        return None if record is not None and record.expired(time.time()) else record


def _note(request: Request, key: str) -> None:
    access = access_of(request)
    if access is not None:
        access.key = key
