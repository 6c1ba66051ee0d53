"""Webhooks: when an invocation completes, fails or is cancelled, a signed POST to the app's receiver.

Events: ``invocation.completed`` (a run of this server stored its result), ``invocation.failed`` (the agent raised,
or the run timed out: nothing stored, a POST of the key runs it again), ``invocation.cancelled`` (a ``DELETE`` stopped
it). A run stopped at shutdown (its claim yielded to another server), a request refused (busy, key reused, store
down) or a lost lease is no event: the invocation goes on elsewhere, and that server sends its event.

Signed per Standard Webhooks (``_webhook_signing.py``); ``webhook-id`` names the event (a digest of the durable key
and the event type), so every attempt and every server sends the same id and a receiver deduplicates by it.

At least once across a takeover. A completed event is delivered by the server whose run stored the result; on a 2xx
that server records the delivery in the idempotency store, beside the key's record (``marker_key``: a ``COMPLETED``
record of its own, as long-lived as the key's result). The owner may die between storing the result and delivering
it: then the next retry of the key, on any server, is a replay, and that server waits ``replay_grace_seconds`` (the
owner may still be delivering), reads the record, and sends the event itself unless it is recorded. So a completed
event is lost only if its owner died undelivered and the client never retries; failed and cancelled events are sent
by the server where they happen, retried while it lives, and drained at its shutdown (``drain_seconds``).
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import email.utils
import inspect
import json
import logging
import random
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any
from urllib.parse import urlsplit

import httpx
from starlette.requests import Request

from ..idempotency.config import IdempotencyConfig
from ..idempotency.record import IdempotencyRecord, RecordState, new_version
from ._control import timestamp
from ._options import WebhookOptions
from ._problems import AGENT_FAILED, CANCELLED, RUN_TIMEOUT
from ._protocol import ProblemError, parse_idempotency_key
from ._runs import Run
from ._webhook_signing import WebhookSigner, event_id, marker_key

logger = logging.getLogger(__name__)

COMPLETED_EVENT = "invocation.completed"
FAILED_EVENT = "invocation.failed"
CANCELLED_EVENT = "invocation.cancelled"

WebhookTarget = str | Callable[[Request], str | None | Awaitable[str | None]]
"""Where events go: a URL, or ``target(request) -> URL | None`` (sync or async; None: no events for that request)."""

# The request that is starting a run, for the run's target: InvocationService tells ``on_run`` only the run, and the
# run starts synchronously inside the route handler's task, where the handler set this.
CURRENT_REQUEST: contextvars.ContextVar[Request | None] = contextvars.ContextVar("webhook_request", default=None)

_FAILED_TYPES = frozenset({AGENT_FAILED, RUN_TIMEOUT})
_USER_AGENT = "strands-py-webhooks"


def check_url(url: object, where: str) -> str:
    """``url`` if it is an absolute ``http`` or ``https`` URL.

    Raises:
        TypeError: Not a str.
        ValueError: Not an absolute http(s) URL.
    """
    if not isinstance(url, str):
        raise TypeError(f"{where} must be a URL (str), got {type(url).__name__}")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"{where} must be an absolute http:// or https:// URL")
    return url


def retry_delay(retry: int, options: WebhookOptions, draw: float, retry_after: float | None) -> float:
    """The wait before retry number ``retry`` (1: the first): the doubling, ``draw`` (0 to 1) of its upper half.

    A ``Retry-After`` longer than that wins (the receiver knows when it will be back).
    """
    ceiling = min(options.max_retry_seconds, options.first_retry_seconds * 2.0 ** min(retry - 1, 60))
    delay = ceiling * (0.5 + 0.5 * draw)
    return max(delay, retry_after) if retry_after is not None else delay


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or an HTTP date), or None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        moment = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, moment.timestamp() - now)


@dataclasses.dataclass(frozen=True)
class _Event:
    """One event to deliver: its id (the same for every attempt), type and body."""

    id: str
    type: str
    body: bytes
    marker: str | None  # the store key recording its delivery (completed events of keyed invocations)


class Webhooks:
    """Sends the events of one app's runs; see the module's documentation.

    ``on_run(run, started)`` is the ``InvocationService``'s hook; ``aclose`` drains at shutdown. ``sleep``,
    ``monotonic``, ``wall_clock`` and ``rng`` are the waits, clocks and randomness of the retries (tests pass fakes).

    Thread-safety: the app's event loop only. Deliveries are tasks on it, each bounded by its attempts and
    ``give_up_after_seconds``.
    """

    def __init__(
        self,
        target: WebhookTarget,
        secret: str | Sequence[str],
        options: WebhookOptions,
        config: IdempotencyConfig,
        *,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
        monotonic: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        """Deliver to ``target``, signed with ``secret``.

        Raises:
            TypeError: ``target`` is neither a str nor callable; ``secret`` is not a str or a list of str;
                ``options`` is not a ``WebhookOptions``.
            ValueError: ``target`` is not an absolute http(s) URL; ``secret`` is malformed.
        """
        if isinstance(target, str):
            check_url(target, "webhook")
        elif not callable(target):
            raise TypeError(f"webhook must be a URL or a callable, got {type(target).__name__}")
        if not isinstance(options, WebhookOptions):
            raise TypeError(f"webhook_options must be a WebhookOptions, got {type(options).__name__}")
        self._target = target
        self._signer = WebhookSigner(secret)
        self.options = options
        self._config = config
        self._sleep = sleep
        self._monotonic = monotonic
        self._wall_clock = wall_clock
        self._rng = rng or random.Random()
        self._requests: dict[Run, Request | None] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client: Any = None
        self._slots: asyncio.Semaphore | None = None
        self._closing: asyncio.Event | None = None
        self.delivered = 0  # events a receiver accepted (2xx), for tests and metrics
        self.dropped = 0  # events given up on, refused, or over max_pending

    def __repr__(self) -> str:
        """Never the target (a URL may carry a token) nor the secret."""
        return f"Webhooks(pending={len(self._tasks)})"

    @property
    def pending(self) -> int:
        """Events waiting or being delivered."""
        return len(self._tasks)

    # -- events --------------------------------------------------------------------------------------------------

    def on_run(self, run: Run, started: bool) -> None:
        """A run started (remember its request, for its target) or ended (send its event, if it has one)."""
        if started:
            self._requests[run] = CURRENT_REQUEST.get()
            return
        request = self._requests.pop(run, None)
        kind = _event_type(run)
        if kind is None:
            return
        loop = self._bind()
        if len(self._tasks) >= self.options.max_pending:
            self.dropped += 1
            logger.warning("pending=<%d> | too many webhook events pending, dropping one", len(self._tasks))
            return
        # A replayed result (a retry of a key that completed, here or elsewhere): its owner may have died before
        # delivering it, or be delivering it now. Wait, then send unless a server recorded its delivery.
        task = loop.create_task(self._send(run, kind, request, replayed=run.replayed and kind == COMPLETED_EVENT))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _event(self, run: Run, kind: str, request: Request | None, moment: float) -> _Event:
        token = None
        if request is not None:
            try:
                token = parse_idempotency_key(request.headers.getlist("idempotency-key"))
            except ProblemError:  # not possible for a request that started a run, but never fatal
                token = None
        data: dict[str, Any] = {
            "key": token,
            "session": run.place.session_id if run.place is not None else None,
            "status": kind.rsplit(".", 1)[1],
            "result": json.loads(run.result_json) if run.result_json is not None else None,
            "error": run.problem.body() if run.problem is not None and run.result_json is None else None,
        }
        body = {"type": kind, "timestamp": timestamp(moment), "data": data}
        marker = marker_key(run.key, kind) if run.key is not None and kind == COMPLETED_EVENT else None
        encoded = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode("utf-8", "surrogatepass")
        return _Event(event_id(run.key, kind), kind, encoded, marker)

    async def _send(self, run: Run, kind: str, request: Request | None, *, replayed: bool) -> None:
        try:
            if replayed:
                await self._grace()
                if await self._recorded(run.key, kind):
                    logger.debug("key=<%s> | replayed completion already delivered", run.key)
                    return
            url = await self._url(request)
            if url is None:
                return
            moment = self._wall_clock() if replayed else (run.finished_wall or self._wall_clock())
            event = self._event(run, kind, request, moment)
            if await self._deliver(url, event):
                self.delivered += 1
                if event.marker is not None:
                    await self._record(event.marker)
            else:
                self.dropped += 1
        except asyncio.CancelledError:
            logger.warning("key=<%s>, type=<%s> | webhook delivery cancelled at shutdown", run.key, kind)
            raise
        except Exception:
            self.dropped += 1
            logger.exception("key=<%s>, type=<%s> | webhook event failed", run.key, kind)

    async def _url(self, request: Request | None) -> str | None:
        target = self._target
        if isinstance(target, str):
            return target
        if request is None:
            return None  # a run started without a request (never, from AgentApp): no one to ask
        url = target(request)
        if inspect.isawaitable(url):
            url = await url
        return None if url is None else check_url(url, "the webhook function's URL")

    async def _grace(self) -> None:
        """Wait ``replay_grace_seconds``, or until shutdown (then the event is sent at once, within the drain)."""
        closing = self._closing
        if closing is None or closing.is_set() or self.options.replay_grace_seconds <= 0:
            return
        waits = [
            asyncio.ensure_future(self._sleep(self.options.replay_grace_seconds)),
            asyncio.ensure_future(closing.wait()),
        ]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for wait in waits:
                wait.cancel()

    # -- delivery ------------------------------------------------------------------------------------------------

    async def _deliver(self, url: str, event: _Event) -> bool:
        """POST ``event`` until a 2xx, a final status, ``max_attempts`` or ``give_up_after_seconds``."""
        options = self.options
        first = self._monotonic()
        for attempt in range(1, options.max_attempts + 1):
            final, retry_after = await self._attempt(url, event)
            if final is not None:
                return final
            if attempt == options.max_attempts:
                break
            delay = retry_delay(attempt, options, self._rng.random(), retry_after)
            if self._monotonic() - first + delay > options.give_up_after_seconds:
                break
            await self._sleep(delay)
        logger.warning("webhook_id=<%s>, type=<%s> | webhook not delivered, giving up", event.id, event.type)
        return False

    async def _attempt(self, url: str, event: _Event) -> tuple[bool | None, float | None]:
        """One POST: (True, _) delivered, (False, _) refused for good, (None, Retry-After) to retry."""
        assert self._slots is not None
        async with self._slots:
            stamp = int(self._wall_clock())
            headers = {"content-type": "application/json", "user-agent": _USER_AGENT}
            headers.update(self._signer.headers(event.id, stamp, event.body))
            post = asyncio.ensure_future(
                self._http().post(
                    url,
                    content=event.body,
                    headers=headers,
                    timeout=self.options.timeout_seconds,
                    follow_redirects=False,
                )
            )
            try:
                # The whole attempt is bounded, not only each read: a receiver trickling its answer is a timeout too.
                # Losing this attempt's completion is fine: an attempt that landed unseen is retried, same id.
                await asyncio.wait([post], timeout=self.options.timeout_seconds)
            finally:
                if not post.done():
                    post.cancel()
            if not post.done() or post.cancelled():
                logger.debug("webhook_id=<%s> | webhook attempt timed out", event.id)
                return None, None
            try:
                response = post.result()
            except httpx.TransportError as e:
                logger.debug("webhook_id=<%s>, error=<%s> | webhook attempt failed", event.id, type(e).__name__)
                return None, None
        status = response.status_code
        if 200 <= status < 300:
            logger.debug("webhook_id=<%s>, status=<%d> | webhook delivered", event.id, status)
            return True, None
        if status == 429 or status >= 500:
            logger.debug("webhook_id=<%s>, status=<%d> | webhook attempt refused, retrying", event.id, status)
            return None, parse_retry_after(response.headers.get("retry-after"), self._wall_clock())
        logger.warning("webhook_id=<%s>, status=<%d> | webhook refused by the receiver", event.id, status)
        return False, None

    # -- where delivery is recorded ------------------------------------------------------------------------------

    async def _recorded(self, key: str | None, kind: str) -> bool:
        """Whether a server recorded the delivery of the event (a store that cannot answer: not recorded)."""
        if key is None or kind != COMPLETED_EVENT:
            return False
        try:
            record = await self._config.store.get(marker_key(key, kind))
        except Exception as e:  # at least once: when in doubt, send
            logger.debug("key=<%s>, error=<%s> | delivery record unreadable", key, type(e).__name__)
            return False
        return record is not None and record.state is RecordState.COMPLETED and not record.expired(time.time())

    async def _record(self, marker: str) -> None:
        """Record a delivery: a ``COMPLETED`` record under ``marker``, as long-lived as a result (claim, complete)."""
        config = self._config
        now = time.time()
        claim = IdempotencyRecord(
            key=marker,
            state=RecordState.IN_PROGRESS,
            owner="webhook-" + secrets.token_hex(8),
            version=new_version(),
            lease_seconds=config.lease_seconds,
            expires_at=now + config.expires_after_seconds,
        )
        try:
            if await config.store.claim(claim, now) is None:
                done = dataclasses.replace(claim, state=RecordState.COMPLETED, version=new_version())
                await config.store.complete(done)
            # A record in the way: another server recorded it (or is recording it) already.
        except Exception as e:  # unrecorded, a replay may send it again: a duplicate with the same id, never a loss
            logger.debug("error=<%s> | webhook delivery not recorded", type(e).__name__)

    # -- the loop's resources ------------------------------------------------------------------------------------

    def _bind(self) -> asyncio.AbstractEventLoop:
        """The running loop, with this app's client, slots and shutdown event for it (new ones for a new loop)."""
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            self._loop = loop
            self._client = None  # a client of another loop cannot be used here (nor closed: its loop may be gone)
            self._slots = asyncio.Semaphore(self.options.max_concurrent)
            self._closing = asyncio.Event()
        return loop

    def _http(self) -> Any:
        if self._client is None:
            factory = self.options.client_factory
            self._client = factory() if factory is not None else httpx.AsyncClient()
        return self._client

    def reopen(self) -> None:
        """Accept events again after a shutdown (a lifespan restarted)."""
        if self._closing is not None:
            self._closing.clear()

    async def aclose(self) -> None:
        """Drain: deliveries go on for at most ``drain_seconds``, then are cancelled; the client is closed.

        Replays waiting for their grace are sent at once. Idempotent. Cancellation: cancelling ``aclose`` stops
        waiting; deliveries go on until they end or the loop closes.
        """
        if self._closing is not None:
            self._closing.set()
        tasks = set(self._tasks)
        if tasks:
            logger.debug("pending=<%d> | draining webhook deliveries", len(tasks))
            _, late = await asyncio.wait(tasks, timeout=self.options.drain_seconds)
            for task in late:
                task.cancel()
            if late:
                await asyncio.wait(late)
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()


def _event_type(run: Run) -> str | None:
    """The event a finished run sends, if any (see the module's documentation)."""
    if run.succeeded:
        return COMPLETED_EVENT
    problem = run.problem
    if problem is None:
        return None
    if problem.type == CANCELLED:
        return CANCELLED_EVENT
    if problem.type in _FAILED_TYPES:
        return FAILED_EVENT
    return None
