"""Webhooks: events POSTed to a real receiver (uvicorn on 127.0.0.1) that verifies them with ``standardwebhooks``.

Deliveries run on the test's loop (the app is called in-process through httpx's ASGI transport) and reach the
receiver over TCP; retries wait no wall-clock time (zero delays end to end, or fake sleeps and clocks where the
schedule itself is tested).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import uvicorn
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError
from starlette.requests import Request
from starlette.responses import Response

from strands_py import Agent
from strands_py.http import AGENT_FAILED, CANCELLED, AgentApp, WebhookOptions, new_webhook_secret
from strands_py.http._problems import Problem, run_timeout_problem, shutting_down_problem
from strands_py.http._runs import Run
from strands_py.http._webhook_signing import WebhookSigner, event_id, marker_key
from strands_py.http._webhooks import (
    COMPLETED_EVENT,
    Webhooks,
    _Event,
    _event_type,
    parse_retry_after,
    retry_delay,
)
from strands_py.idempotency import IdempotencyConfig, InMemoryIdempotencyStore, RecordState
from strands_py.testing import ScriptedBedrock

WAIT = 30.0
SECRET = new_webhook_secret()
# No wall-clock waits: retries at once, replays checked at once.
FAST = WebhookOptions(first_retry_seconds=0, max_retry_seconds=0, replay_grace_seconds=0)
PROMPT = {"prompt": "What is the weather in Paris?"}


@dataclass
class Delivery:
    headers: dict[str, str]
    body: bytes
    status: int

    @property
    def event(self) -> dict[str, Any]:
        return json.loads(self.body)


@dataclass
class Receiver:
    """An ASGI receiver: answers each POST with the next scripted status (then 200), recording every one."""

    url: str = ""
    statuses: list[int] = field(default_factory=list)
    deliveries: list[Delivery] = field(default_factory=list)
    hold: threading.Event | None = None  # when set: each request waits for it (at most WAIT)
    arrived: threading.Event = field(default_factory=threading.Event)
    _changed: threading.Condition = field(default_factory=threading.Condition)

    def reset(self) -> None:
        with self._changed:
            self.statuses, self.deliveries, self.hold = [], [], None
            self.arrived.clear()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        request = Request(scope, receive)
        body = await request.body()
        self.arrived.set()
        if self.hold is not None:
            await asyncio.to_thread(self.hold.wait, WAIT)
        with self._changed:
            status = self.statuses.pop(0) if self.statuses else 200
            self.deliveries.append(Delivery(dict(request.headers), body, status))
            self._changed.notify_all()
        await Response(status_code=status)(scope, receive, send)

    def wait_for(self, count: int) -> list[Delivery]:
        with self._changed:
            assert self._changed.wait_for(lambda: len(self.deliveries) >= count, WAIT), self.deliveries
            return list(self.deliveries)


@pytest.fixture(scope="module")
def _receiver_server() -> Iterator[Receiver]:
    receiver = Receiver()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)  # connections wait in the backlog until uvicorn accepts them: no need to wait for its start
    receiver.url = f"http://127.0.0.1:{sock.getsockname()[1]}/hooks"
    server = uvicorn.Server(uvicorn.Config(receiver, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    yield receiver
    server.should_exit = True
    thread.join(WAIT)
    sock.close()


@pytest.fixture
def receiver(_receiver_server: Receiver) -> Iterator[Receiver]:
    _receiver_server.reset()
    yield _receiver_server
    _receiver_server.reset()


def verified(delivery: Delivery, secret: str = SECRET) -> dict[str, Any]:
    """The event, as a receiver verifying it with ``standardwebhooks`` reads it."""
    return Webhook(secret).verify(delivery.body, delivery.headers)  # type: ignore[no-any-return]


def _app(
    target: Any, store: InMemoryIdempotencyStore | None = None, **options: Any
) -> tuple[AgentApp, ScriptedBedrock]:
    script = ScriptedBedrock(**options.pop("script", {}))

    def make_agent(request: Request) -> Agent:
        return Agent(model=script.model(), tools=script.tools(), callback_handler=None)

    config = IdempotencyConfig(store=store if store is not None else InMemoryIdempotencyStore())
    app = AgentApp(
        make_agent,
        config,
        single_tenant=True,
        webhook=target,
        webhook_secret=options.pop("secret", SECRET),
        webhook_options=options.pop("webhook_options", FAST),
        **options,
    )
    return app, script


@contextlib.asynccontextmanager
async def _client(app: AgentApp) -> Any:
    async with app.lifespan(), httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://a") as c:
        yield c


def _key(token: str) -> dict[str, str]:
    return {"Idempotency-Key": json.dumps(token)}


def _durable(app: AgentApp, token: str) -> str:
    return app._service.durable_key("invocations", token)


# -- events, signed and verified ---------------------------------------------------------------------------------


async def test_a_completed_invocation_is_posted_signed_and_a_receiver_verifies_it(receiver: Receiver) -> None:
    app, _ = _app(receiver.url)
    async with _client(app) as client:
        answer = await client.post("/invocations", json=PROMPT, headers=_key("order-1"))
        assert answer.status_code == 200
        [delivery] = await asyncio.to_thread(receiver.wait_for, 1)
    event = verified(delivery)
    assert event["type"] == "invocation.completed"
    assert event["timestamp"].endswith("Z")
    assert event["data"] == {
        "key": "order-1",
        "session": None,
        "status": "completed",
        "result": answer.json(),
        "error": None,
    }
    assert delivery.headers["webhook-id"] == event_id(_durable(app, "order-1"), COMPLETED_EVENT)
    assert delivery.headers["content-type"] == "application/json"
    # Negative controls: the same message fails verification with another secret, or with one byte changed.
    with pytest.raises(WebhookVerificationError):
        verified(delivery, new_webhook_secret())
    with pytest.raises(WebhookVerificationError):
        Webhook(SECRET).verify(delivery.body.replace(b"order-1", b"order-2"), delivery.headers)


async def test_a_rotation_signs_with_every_secret(receiver: Receiver) -> None:
    old, new = new_webhook_secret(), new_webhook_secret()
    app, _ = _app(receiver.url, secret=[new, old])
    async with _client(app) as client:
        await client.post("/invocations", json=PROMPT, headers=_key("rotated"))
        [delivery] = await asyncio.to_thread(receiver.wait_for, 1)
    assert len(delivery.headers["webhook-signature"].split(" ")) == 2
    assert verified(delivery, old) == verified(delivery, new)


async def test_a_failed_invocation_is_an_event_with_its_problem(receiver: Receiver) -> None:
    app, _ = _app(receiver.url, script={"fail_with": RuntimeError("model down")})
    async with _client(app) as client:
        answer = await client.post("/invocations", json=PROMPT, headers=_key("fails"))
        assert answer.status_code == 500
        [delivery] = await asyncio.to_thread(receiver.wait_for, 1)
    event = verified(delivery)
    assert event["type"] == "invocation.failed"
    assert event["data"]["status"] == "failed" and event["data"]["result"] is None
    assert event["data"]["error"]["type"] == AGENT_FAILED == answer.json()["type"]


async def test_a_cancelled_invocation_is_an_event(receiver: Receiver) -> None:
    gate = threading.Event()
    app, script = _app(receiver.url, script={"gate": gate, "gate_timeout": WAIT})
    async with _client(app) as client:
        started = asyncio.create_task(client.post("/invocations", json=PROMPT, headers=_key("stop-me")))
        assert await asyncio.to_thread(script.entered.wait, WAIT)
        assert (await client.delete("/invocations/stop-me")).status_code in (200, 202)
        gate.set()
        assert (await started).status_code == 409
        [delivery] = await asyncio.to_thread(receiver.wait_for, 1)
    event = verified(delivery)
    assert event["type"] == "invocation.cancelled"
    assert event["data"]["error"]["type"] == CANCELLED


async def test_a_turn_of_a_conversation_names_its_session(receiver: Receiver, tmp_path: Any) -> None:
    from strands.session.file_session_manager import FileSessionManager

    script = ScriptedBedrock()

    def make_agent(request: Request, session_manager: Any = None) -> Agent:
        return Agent(model=script.model(), tools=script.tools(), callback_handler=None, session_manager=session_manager)

    app = AgentApp(
        make_agent,
        single_tenant=True,
        session_manager=lambda sid, request: FileSessionManager(session_id=sid, storage_dir=str(tmp_path)),
        webhook=receiver.url,
        webhook_secret=SECRET,
        webhook_options=FAST,
    )
    async with _client(app) as client:
        answer = await client.post("/sessions/trip-1/invocations", json=PROMPT, headers=_key("turn-1"))
        assert answer.status_code == 200
        [delivery] = await asyncio.to_thread(receiver.wait_for, 1)
    assert verified(delivery)["data"]["session"] == "trip-1"


# -- retries -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("attempts", [3, 1], ids=["retried", "control-no-retries"])
async def test_5xx_and_429_are_retried_with_the_same_id_until_delivered(receiver: Receiver, attempts: int) -> None:
    receiver.statuses = [503, 429]
    store = InMemoryIdempotencyStore()
    app, _ = _app(receiver.url, store, webhook_options=FAST.__class__(**{**_fields(FAST), "max_attempts": attempts}))
    async with _client(app) as client:
        await client.post("/invocations", json=PROMPT, headers=_key("flaky"))
        deliveries = await asyncio.to_thread(receiver.wait_for, attempts)
    assert [d.status for d in deliveries] == [503, 429, 200][:attempts]
    assert len({d.headers["webhook-id"] for d in deliveries}) == 1
    assert len({d.body for d in deliveries}) == 1
    for delivery in deliveries:
        verified(delivery)
    marker = await store.get(marker_key(_durable(app, "flaky"), COMPLETED_EVENT))
    # Recorded as delivered only when a receiver accepted it (the control gave up after its 503).
    assert (marker is not None and marker.state is RecordState.COMPLETED) is (attempts == 3)


@pytest.mark.parametrize("status", [400, 410, 302])
async def test_other_statuses_are_final(receiver: Receiver, status: int) -> None:
    receiver.statuses = [status]
    app, _ = _app(receiver.url)
    async with _client(app) as client:
        await client.post("/invocations", json=PROMPT, headers=_key(f"final-{status}"))
        await asyncio.to_thread(receiver.wait_for, 1)
    assert app.webhooks_pending == 0 and len(receiver.deliveries) == 1  # drained by the lifespan's end: no retry


def _fields(options: WebhookOptions) -> dict[str, Any]:
    return {name: getattr(options, name) for name in options.__dataclass_fields__}


async def test_timeouts_and_connection_errors_are_retried() -> None:
    hang = asyncio.Event()
    seen: list[str] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers["webhook-id"])
        if len(seen) == 1:
            raise httpx.ConnectError("refused", request=request)
        if len(seen) == 2:
            await hang.wait()  # never set: the attempt's own timeout ends it
        return httpx.Response(204)

    options = WebhookOptions(
        first_retry_seconds=0,
        max_retry_seconds=0,
        timeout_seconds=1.0,
        client_factory=lambda: httpx.AsyncClient(transport=httpx.MockTransport(handler)),
    )
    app, _ = _app("https://receiver.example/hooks", webhook_options=options)
    async with _client(app) as client:
        await client.post("/invocations", json=PROMPT, headers=_key("slow"))
    # The lifespan's end drained the delivery: refused, timed out, delivered.
    assert len(seen) == 3 and len(set(seen)) == 1
    assert app._webhooks is not None and app._webhooks.delivered == 1


def test_the_backoff_doubles_with_jitter_up_to_its_ceiling_and_honours_retry_after() -> None:
    options = WebhookOptions(first_retry_seconds=1, max_retry_seconds=8)
    assert [retry_delay(n, options, 1.0, None) for n in range(1, 7)] == [1, 2, 4, 8, 8, 8]
    assert [retry_delay(n, options, 0.0, None) for n in range(1, 5)] == [0.5, 1, 2, 4]
    assert retry_delay(1, options, 1.0, 30.0) == 30.0  # the receiver asked for longer
    assert retry_delay(3, options, 1.0, 0.5) == 4.0  # but not for shorter
    assert retry_delay(10_000, options, 1.0, None) == 8  # no overflow
    assert parse_retry_after("7", 0) == 7.0
    assert parse_retry_after("Thu, 01 Jan 1970 00:01:40 GMT", 40.0) == 60.0
    assert parse_retry_after("soon", 0) is None and parse_retry_after(None, 0) is None


@pytest.mark.parametrize("give_up", [600.0, 20.0], ids=["attempts", "give-up-time"])
async def test_retries_stop_after_max_attempts_or_the_give_up_time(give_up: float) -> None:
    """Fake clock: each sleep moves it; the schedule is what the options say, then the event is dropped."""
    now = [0.0]
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)
        now[0] += seconds

    calls: list[int] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        return httpx.Response(503, headers={"Retry-After": "3"} if len(calls) == 2 else {})

    options = WebhookOptions(
        max_attempts=6,
        first_retry_seconds=2,
        max_retry_seconds=16,
        give_up_after_seconds=give_up,
        client_factory=lambda: httpx.AsyncClient(transport=httpx.MockTransport(handler)),
    )
    hooks = Webhooks(
        "https://receiver.example/",
        SECRET,
        options,
        IdempotencyConfig(),
        sleep=sleep,
        monotonic=lambda: now[0],
        rng=random.Random(7),
    )
    hooks._bind()
    delivered = await hooks._deliver("https://receiver.example/", _Event("msg_1", COMPLETED_EVENT, b"{}", None))
    assert delivered is False
    for retry, delay in enumerate(slept, start=1):
        ceiling = min(16, 2 * 2 ** (retry - 1))
        assert ceiling / 2 <= delay <= ceiling or (retry == 2 and delay == 3)
    if give_up == 600.0:
        assert len(calls) == 6 and len(slept) == 5
    else:
        assert sum(slept) <= 20.0 and len(calls) < 6  # the next wait would have ended past the give-up time
    await hooks.aclose()


# -- at least once, across servers -------------------------------------------------------------------------------


async def test_a_replay_resends_an_undelivered_completion_once_with_the_same_id(receiver: Receiver) -> None:
    """The owner stored its result but never delivered it (the receiver refused its only attempt, as if the owner
    had died): the next server that replays the key sends the event, with the same id; one after it does not."""
    store = InMemoryIdempotencyStore()
    receiver.statuses = [503]
    owner, script = _app(receiver.url, store, webhook_options=WebhookOptions(max_attempts=1))
    async with _client(owner) as client:
        first = await client.post("/invocations", json=PROMPT, headers=_key("takeover"))
    [refused] = receiver.wait_for(1)
    replayer, _ = _app(receiver.url, store)
    async with _client(replayer) as client:
        retry = await client.post("/invocations", json=PROMPT, headers=_key("takeover"))
        assert retry.headers["Idempotent-Replayed"] == "true"
        [_, resent] = await asyncio.to_thread(receiver.wait_for, 2)
    assert resent.status == 200 and resent.headers["webhook-id"] == refused.headers["webhook-id"]
    assert verified(resent)["data"]["result"] == first.json()
    # Negative control: the delivery is recorded now, so a third server replaying the key sends nothing.
    third, _ = _app(receiver.url, store)
    async with _client(third) as client:
        await client.post("/invocations", json=PROMPT, headers=_key("takeover"))
    assert third._webhooks is not None and third._webhooks.delivered == 0
    assert len(receiver.deliveries) == 2 and script.model_calls == 2  # the agent ran once (one tool cycle)


async def test_a_replay_waits_for_its_grace_and_shutdown_ends_the_wait(receiver: Receiver) -> None:
    store = InMemoryIdempotencyStore()
    owner, _ = _app(receiver.url, store, webhook_options=WebhookOptions(max_attempts=1))
    receiver.statuses = [500]
    async with _client(owner) as client:
        await client.post("/invocations", json=PROMPT, headers=_key("graceful"))
    replayer, _ = _app(receiver.url, store, webhook_options=WebhookOptions(replay_grace_seconds=3600))
    async with _client(replayer) as client:
        await client.post("/invocations", json=PROMPT, headers=_key("graceful"))
        assert replayer.webhooks_pending == 1 and len(receiver.deliveries) == 1  # waiting for the owner to deliver
    assert [d.status for d in receiver.deliveries] == [500, 200]  # the shutdown sent it at once


# -- the callable form, construction ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_the_webhook_may_be_a_function_of_the_request(receiver: Receiver, kind: str) -> None:
    def pick(request: Request) -> str | None:
        return receiver.url + "/" + request.headers["x-tenant"] if "x-tenant" in request.headers else None

    async def apick(request: Request) -> str | None:
        return pick(request)

    app, _ = _app(pick if kind == "sync" else apick)
    async with _client(app) as client:
        await client.post("/invocations", json=PROMPT, headers={**_key("t-1"), "X-Tenant": "ada"})
        await client.post("/invocations", json=PROMPT, headers=_key("t-2"))  # None: no event
    assert [verified(d)["data"]["key"] for d in receiver.deliveries] == ["t-1"]


@pytest.mark.parametrize(
    ("options", "error"),
    [
        ({"webhook_secret": "not-a-secret"}, ValueError),
        ({"webhook_secret": "whsec_!!!not base64!!!"}, ValueError),
        ({"webhook_secret": "whsec_c2hvcnQ="}, ValueError),  # 5 bytes: under the spec's minimum
        ({"webhook_secret": b"whsec_bytes"}, TypeError),
        ({"webhook_secret": 42}, TypeError),
        ({"webhook_secret": []}, ValueError),
        ({"webhook_secret": None}, ValueError),
        ({"webhook": None}, ValueError),  # a secret without a webhook
        ({"webhook": "ftp://example.com/hook"}, ValueError),
        ({"webhook": "/hooks"}, ValueError),
        ({"webhook": 42}, TypeError),
        ({"webhook_options": {"max_attempts": 3}}, TypeError),
    ],
)
def test_a_bad_webhook_configuration_is_refused_at_construction(options: dict[str, Any], error: type) -> None:
    arguments = {"webhook": "https://example.com/hook", "webhook_secret": SECRET, **options}
    with pytest.raises(error) as raised:
        AgentApp(lambda request: None, single_tenant=True, **arguments)  # type: ignore[arg-type, return-value]
    assert SECRET[6:] not in str(raised.value)


def test_a_good_configuration_is_accepted_and_its_repr_hides_the_secret() -> None:
    AgentApp(lambda request: None, single_tenant=True, webhook="https://example.com/h", webhook_secret=SECRET)  # type: ignore[arg-type, return-value]
    signer = WebhookSigner(SECRET)
    assert SECRET[6:] not in repr(signer)
    with pytest.raises(ValueError, match=r"max_attempts"):
        WebhookOptions(max_attempts=0)
    with pytest.raises(TypeError, match=r"client_factory"):
        WebhookOptions(client_factory=42)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"timeout_seconds"):
        WebhookOptions(timeout_seconds=float("nan"))


def test_event_ids_are_stable_per_key_and_type_and_never_the_key() -> None:
    key = "invocations#0123abcd"
    assert event_id(key, COMPLETED_EVENT) == event_id(key, COMPLETED_EVENT)
    assert event_id(key, COMPLETED_EVENT) != event_id(key, "invocation.failed")
    assert event_id(key, COMPLETED_EVENT) != event_id("invocations#0123abce", COMPLETED_EVENT)
    assert "0123abcd" not in event_id(key, COMPLETED_EVENT)
    assert event_id(None, COMPLETED_EVENT) != event_id(None, COMPLETED_EVENT)  # no key: nothing else can send it


@pytest.mark.parametrize(
    ("problem", "event"),
    [
        (Problem(500, AGENT_FAILED, "t", "d"), "invocation.failed"),
        (run_timeout_problem(5), "invocation.failed"),
        (Problem(409, CANCELLED, "t", "d"), "invocation.cancelled"),
        (shutting_down_problem(1), None),  # stopped at shutdown: its claim is yielded, another server goes on
        (Problem(409, "tag:strands-py,2025:problem/lease-lost", "t", "d"), None),
    ],
)
def test_which_endings_are_events(problem: Problem, event: str | None) -> None:
    run = Run("k", None, 10)
    run.problem = problem
    assert _event_type(run) == event


# -- shutdown ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("drain", [30.0, 0.0], ids=["drained", "control-no-drain"])
async def test_shutdown_drains_deliveries_in_progress(receiver: Receiver, drain: float) -> None:
    store = InMemoryIdempotencyStore()
    receiver.hold = threading.Event()
    options = WebhookOptions(drain_seconds=drain, first_retry_seconds=0, max_retry_seconds=0)
    app, _ = _app(receiver.url, store, webhook_options=options)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://a") as client:
        await client.post("/invocations", json=PROMPT, headers=_key("at-exit"))
        assert await asyncio.to_thread(receiver.arrived.wait, WAIT)  # the delivery is in the receiver's hands
        closing = asyncio.create_task(app.aclose())
        if drain:
            receiver.hold.set()
        await asyncio.wait_for(closing, WAIT)
        receiver.hold.set()
        await asyncio.to_thread(receiver.wait_for, 1)  # the receiver is done with it (before the next test's reset)
    marker = await store.get(marker_key(_durable(app, "at-exit"), COMPLETED_EVENT))
    assert (marker is not None) is bool(drain)  # without a drain the delivery was cancelled, never recorded


# -- what never loses or blocks an event, and what drops one ---------------------------------------------------------


async def test_an_invocation_without_a_key_sends_its_event_with_a_fresh_id(receiver: Receiver) -> None:
    app, _ = _app(receiver.url, require_key=False)
    async with _client(app) as client:
        await client.post("/invocations", json=PROMPT)
        await client.post("/invocations", json=PROMPT)
        deliveries = await asyncio.to_thread(receiver.wait_for, 2)
    assert [verified(d)["data"]["key"] for d in deliveries] == [None, None]
    assert deliveries[0].headers["webhook-id"] != deliveries[1].headers["webhook-id"]


@pytest.mark.parametrize("answer", [42, "/relative", RuntimeError("no tenant")])
async def test_a_webhook_function_that_fails_drops_its_event_only(receiver: Receiver, answer: Any) -> None:
    def pick(request: Request) -> Any:
        if isinstance(answer, Exception):
            raise answer
        return answer

    app, _ = _app(pick)
    async with _client(app) as client:
        assert (await client.post("/invocations", json=PROMPT, headers=_key("k"))).status_code == 200
    assert app._webhooks is not None and app._webhooks.dropped == 1 and not receiver.deliveries


async def test_events_beyond_max_pending_are_dropped(receiver: Receiver) -> None:
    receiver.hold = threading.Event()
    app, _ = _app(receiver.url, webhook_options=WebhookOptions(max_pending=1))
    async with _client(app) as client:
        await client.post("/invocations", json=PROMPT, headers=_key("first"))
        assert await asyncio.to_thread(receiver.arrived.wait, WAIT)
        await client.post("/invocations", json=PROMPT, headers=_key("second"))
        assert app.webhooks_pending == 1
        receiver.hold.set()
    assert app._webhooks is not None and app._webhooks.dropped == 1
    assert [verified(d)["data"]["key"] for d in receiver.deliveries] == ["first"]


class _DownStore(InMemoryIdempotencyStore):
    async def get(self, key: str) -> Any:
        raise ConnectionError("store down")

    async def claim(self, record: Any, now: float) -> Any:
        raise ConnectionError("store down")


async def test_a_store_that_cannot_answer_means_send_it_again_never_lose_it() -> None:
    hooks = Webhooks("https://r.example/", SECRET, WebhookOptions(), IdempotencyConfig(store=_DownStore()))
    assert "whsec" not in repr(hooks)
    assert await hooks._recorded("invocations#k", COMPLETED_EVENT) is False  # unknown: the replay sends it
    await hooks._record(marker_key("invocations#k", COMPLETED_EVENT))  # logged, never raised
    await hooks.aclose()
