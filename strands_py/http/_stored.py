"""A key's invocation as the store knows it, for a follower on a server that does not run it."""

from __future__ import annotations

import asyncio
import random
import time

from ..idempotency._heartbeat import LeaseWatch
from ..idempotency.codec import decode_result
from ..idempotency.config import IdempotencyConfig
from ..idempotency.record import RecordState
from ..types.exceptions import IdempotencyError, IdempotencyStoreError, IdempotencyWaitTimeoutError
from ._problems import cancelled_problem, not_found_problem, problem_for
from ._protocol import ProblemError
from ._registry import RunRegistry
from ._runs import Run

_POLL_FIRST_SECONDS = 0.05
_POLL_MAX_SECONDS = 1.0


async def stored_run(config: IdempotencyConfig, registry: RunRegistry, key: str, retry_after: int) -> Run:
    """The key's run from the store: its replay when completed; while another server runs it, wait.

    Polls the store (capped backoff with jitter) while another owner holds the key's claim, until it completes, is
    cancelled, is judged gone (the same version for a whole lease on our clock), or this app starts a run of it.
    Cancellation: stops polling, nothing is held.

    Raises:
        ProblemError: 404 unknown (or ended without a result), 409 still running past the wait deadline,
            410 not replayable, 500 corrupted, 503 store unavailable.
    """
    started = time.monotonic()
    delay = _POLL_FIRST_SECONDS
    # An owner that stopped renewing its claim for a whole lease (on our clock) is gone: its run has no result.
    watch = LeaseWatch()
    while True:
        try:
            record = await config.store.get(key)
            if record is not None and record.state is RecordState.COMPLETED and not record.expired(time.time()):
                return Run.replay(key, decode_result(record, None))
            if record is not None and record.state is RecordState.CANCELLED and not record.expired(time.time()):
                raise ProblemError(cancelled_problem())
            abandoned_in = 0.0
            if record is not None and record.state is RecordState.IN_PROGRESS:
                abandoned_in = watch.remaining(record, time.monotonic())
            if abandoned_in <= 0:
                raise ProblemError(not_found_problem())
        except IdempotencyError as e:
            raise ProblemError(problem_for(e, retry_after)) from e
        except ProblemError:
            raise
        except Exception as e:  # a store that raises something else is a store outage too
            raise ProblemError(problem_for(IdempotencyStoreError(str(key)), retry_after)) from e
        live = registry.find(key)
        if live is not None:  # a request to this app started it meanwhile
            return live
        waited = time.monotonic() - started
        timeout = config.wait_timeout_seconds
        if timeout is not None and waited >= timeout:
            raise ProblemError(problem_for(IdempotencyWaitTimeoutError(key, waited), retry_after))
        pause = random.uniform(delay / 2, delay)
        if timeout is not None:
            pause = min(pause, timeout - waited)
        await asyncio.sleep(min(pause, abandoned_in + 0.01))
        delay = min(delay * 2, _POLL_MAX_SECONDS)
