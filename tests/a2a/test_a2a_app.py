"""``A2AApp`` in-process (httpx's ASGI transport): the agent card, JSON-RPC framing and errors, and each method.

The a2a-sdk client drives the happy paths (as a caller would); raw JSON-RPC requests drive the refusals the SDK
would never send. Streams here end by themselves (the ASGI transport reads a response to its end); following a run
that is still going is tested on a real server in ``integ_tests/test_a2a.py`` and on runs in ``test_a2a_tasks.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from a2a.client import Client, ClientConfig, ClientFactory
from a2a.client.errors import A2AClientJSONRPCError
from a2a.types import (
    AgentCapabilities,
    AgentCard,
    DataPart,
    Message,
    Part,
    Role,
    TaskIdParams,
    TaskQueryParams,
    TaskState,
    TextPart,
)
from starlette.exceptions import HTTPException
from starlette.requests import Request
from strands import ToolContext, tool
from strands.session.file_session_manager import FileSessionManager

from strands_py import Agent
from strands_py.a2a import AGENT_CARD_PATH, CONTEXT_BUSY, MESSAGE_ID_MISMATCH, UNAVAILABLE, A2AApp
from strands_py.a2a._errors import (
    AUTHENTICATED_EXTENDED_CARD_NOT_CONFIGURED,
    INTERRUPT_NOT_PENDING,
    INTERRUPTS_WAITING,
    INVALID_PARAMS,
    INVALID_REQUEST,
    METHOD_NOT_FOUND,
    PARSE_ERROR,
    PUSH_NOTIFICATION_NOT_SUPPORTED,
    TASK_NOT_CANCELABLE,
    TASK_NOT_FOUND,
    UNSUPPORTED_OPERATION,
)
from strands_py.a2a._ids import derived_context_id, task_id_of
from strands_py.idempotency import IdempotencyConfig, IdempotencyRecord, InMemoryIdempotencyStore, RecordState
from strands_py.idempotency.keys import make_key
from strands_py.idempotency.record import new_version
from strands_py.testing import ScriptedBedrock
from strands_py.types.exceptions import IdempotencyStoreError

WAIT = 10.0
SCOPE = "invocations"  # a single-tenant app's scope
ANSWER = "It is sunny in Paris, 21 degrees."


class _NoCancelStore(InMemoryIdempotencyStore):
    @property
    def supports_cancel(self) -> bool:
        return False


class _FlakyStore(InMemoryIdempotencyStore):
    """Reads fail while ``failing``."""

    def __init__(self) -> None:
        super().__init__()
        self.failing: BaseException | None = None

    async def get(self, key: str) -> IdempotencyRecord | None:
        if self.failing is not None:
            raise self.failing
        return await super().get(key)

    async def claim(self, record: IdempotencyRecord, now: float) -> IdempotencyRecord | None:
        if self.failing is not None:
            raise self.failing
        return await super().claim(record, now)


def _app(script: ScriptedBedrock, config: IdempotencyConfig | None = None, **options: Any) -> A2AApp:
    def make_agent(request: Request) -> Agent:
        return Agent(model=script.model(), tools=script.tools(), callback_handler=None)

    options.setdefault("single_tenant", True)
    return A2AApp(make_agent, config, **options)


@contextlib.asynccontextmanager
async def _http(app: A2AApp) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://agent", timeout=WAIT) as c:
        yield c


@contextlib.asynccontextmanager
async def _client(app: A2AApp, *, streaming: bool = False) -> AsyncIterator[Client]:
    async with _http(app) as http:
        yield await ClientFactory.connect(
            "http://agent", client_config=ClientConfig(httpx_client=http, streaming=streaming)
        )


def _message(text: str = "What is the weather in Paris?", **fields: Any) -> Message:
    fields.setdefault("message_id", str(uuid.uuid4()))
    return Message(role=Role.user, parts=[Part(root=TextPart(text=text))], **fields)


def _task_id(message: Message) -> str:
    key = make_key(SCOPE, message.message_id)
    return task_id_of(key, message.context_id or derived_context_id(key))


async def _rpc(http: httpx.AsyncClient, method: str, params: Any, **extra: Any) -> dict[str, Any]:
    body = {"jsonrpc": "2.0", "id": 7, "method": method, "params": params, **extra}
    # json.dumps escapes what is not ASCII, so that a lone surrogate travels as JSON allows (\ud800).
    response = await http.post("/", content=json.dumps(body), headers={"content-type": "application/json"})
    assert response.status_code == 200
    if response.headers["content-type"].startswith("text/event-stream"):
        [data] = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
        result: dict[str, Any] = json.loads(data)
        return result
    answer: dict[str, Any] = response.json()
    return answer


def _send_params(message: Message, **configuration: Any) -> dict[str, Any]:
    params: dict[str, Any] = {"message": message.model_dump(mode="json", exclude_none=True)}
    if configuration:
        params["configuration"] = configuration
    return params


def _code(answer: dict[str, Any]) -> int:
    assert "result" not in answer, answer
    code: int = answer["error"]["code"]
    return code


# -- the agent card ------------------------------------------------------------------------------------------------


async def test_the_card_advertises_where_it_was_fetched_and_streaming() -> None:
    app = _app(ScriptedBedrock(), name="weather", description="Weather.", version="2.0.0")
    async with _http(app) as http:
        card = AgentCard.model_validate((await http.get(AGENT_CARD_PATH)).json())
        legacy = (await http.get("/.well-known/agent.json")).json()
    assert card.url == "http://agent/" and card.name == "weather" and card.version == "2.0.0"
    assert card.capabilities.streaming and not card.capabilities.push_notifications
    assert legacy == card.model_dump(mode="json", exclude_none=True, by_alias=True)


async def test_the_card_url_and_a_whole_card_can_be_given() -> None:
    given = AgentCard(
        name="mine",
        description="d",
        url="https://agents.example/weather/",
        version="1",
        capabilities=AgentCapabilities(),
        default_input_modes=["text/plain"],
        default_output_modes=["text/plain"],
        skills=[],
    )
    async with _http(_app(ScriptedBedrock(), url="https://public.example/a2a/")) as http:
        advertised = (await http.get(AGENT_CARD_PATH)).json()["url"]
    async with _http(_app(ScriptedBedrock(), card=given)) as http:
        whole = (await http.get(AGENT_CARD_PATH)).json()
    assert advertised == "https://public.example/a2a/" and whole["url"] == "https://agents.example/weather/"


# -- JSON-RPC framing ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "headers", "code"),
    [
        (b"{not json", {"content-type": "application/json"}, PARSE_ERROR),
        (b"{}", {"content-type": "text/plain"}, PARSE_ERROR),
        (b"[1, 2]", {"content-type": "application/json"}, INVALID_REQUEST),
        (b'{"jsonrpc": "1.0", "id": 1, "method": "tasks/get"}', {"content-type": "application/json"}, INVALID_REQUEST),
        (b'{"jsonrpc": "2.0", "method": "tasks/get"}', {"content-type": "application/json"}, INVALID_REQUEST),
        (b'{"jsonrpc": "2.0", "id": 1, "method": 5}', {"content-type": "application/json"}, INVALID_REQUEST),
        (b" " * 2000, {"content-type": "application/json"}, INVALID_REQUEST),  # over max_body_bytes
    ],
    ids=["not-json", "not-json-type", "not-an-object", "old-version", "notification", "method-not-text", "too-large"],
)
async def test_malformed_requests_are_json_rpc_errors(content: bytes, headers: dict[str, str], code: int) -> None:
    async with _http(_app(ScriptedBedrock(), max_body_bytes=1000)) as http:
        response = await http.post("/", content=content, headers=headers)
    assert response.status_code == 200 and response.json()["error"]["code"] == code


@pytest.mark.parametrize(
    ("method", "params", "code"),
    [
        ("tasks/list", {}, METHOD_NOT_FOUND),
        ("tasks/get", [1], INVALID_PARAMS),
        ("tasks/get", {"historyLength": 2}, INVALID_PARAMS),
        ("tasks/pushNotificationConfig/set", {}, PUSH_NOTIFICATION_NOT_SUPPORTED),
        ("agent/getAuthenticatedExtendedCard", {}, AUTHENTICATED_EXTENDED_CARD_NOT_CONFIGURED),
        ("tasks/get", {"id": "not-one-of-ours"}, TASK_NOT_FOUND),
        ("tasks/get", {"id": "0" * 64 + "-Y3R4"}, TASK_NOT_FOUND),
        ("tasks/cancel", {"id": "0" * 64 + "-Y3R4"}, TASK_NOT_FOUND),
        ("tasks/resubscribe", {"id": "0" * 64 + "-Y3R4"}, TASK_NOT_FOUND),
    ],
)
async def test_unknown_methods_bad_params_and_unknown_tasks_are_errors(method: str, params: Any, code: int) -> None:
    async with _http(_app(ScriptedBedrock())) as http:
        answer = await _rpc(http, method, params)
    assert _code(answer) == code and answer["id"] == 7 and answer["jsonrpc"] == "2.0"


async def test_an_id_that_is_no_json_rpc_id_is_answered_with_null() -> None:
    async with _http(_app(ScriptedBedrock())) as http:
        answer = await _rpc(http, "tasks/get", {"id": "x"}, id=[1])
    assert _code(answer) == TASK_NOT_FOUND and answer["id"] is None


@pytest.mark.parametrize(
    ("change", "code"),
    [
        ({"role": Role.agent}, INVALID_PARAMS),
        ({"message_id": ""}, INVALID_PARAMS),
        ({"message_id": "x" * 1025}, INVALID_PARAMS),
        ({"message_id": "\ud800"}, INVALID_PARAMS),
        ({"context_id": ""}, INVALID_PARAMS),
        ({"context_id": "c" * 1025}, INVALID_PARAMS),
        ({"task_id": "someone-elses-task"}, UNSUPPORTED_OPERATION),
        ({"parts": [Part(root=TextPart(text=""))]}, INVALID_PARAMS),
    ],
    ids=["agent-role", "empty-id", "long-id", "surrogate-id", "empty-context", "long-context", "task-id", "empty"],
)
@pytest.mark.parametrize("method", ["message/send", "message/stream"])
async def test_messages_that_cannot_be_taken_are_errors_and_run_nothing(
    change: dict[str, Any], code: int, method: str
) -> None:
    script = ScriptedBedrock()
    message = _message().model_copy(update=change)
    async with _http(_app(script)) as http:
        answer = await _rpc(http, method, _send_params(message))
    assert _code(answer) == code and script.model_calls == 0


async def test_push_notifications_in_a_message_are_refused() -> None:
    push = {"pushNotificationConfig": {"url": "https://example.com/hook"}}
    async with _http(_app(ScriptedBedrock())) as http:
        answer = await _rpc(http, "message/send", _send_params(_message(), **push))
    assert _code(answer) == PUSH_NOTIFICATION_NOT_SUPPORTED


async def test_a_failing_scope_function_is_an_http_error() -> None:
    def scope(request: Request) -> str:
        raise HTTPException(401, "who are you")

    async with _http(_app(ScriptedBedrock(), scope=scope, single_tenant=False)) as http:
        response = await http.post(
            "/", json={"jsonrpc": "2.0", "id": 1, "method": "tasks/get", "params": {"id": "0" * 64 + "-"}}
        )
        sent = await http.post(
            "/", json={"jsonrpc": "2.0", "id": 1, "method": "message/send", "params": _send_params(_message())}
        )
    assert response.status_code == 401 and sent.status_code == 401


async def test_a_scope_function_that_returns_no_tenant_is_an_internal_error() -> None:
    async with _http(_app(ScriptedBedrock(), scope=lambda request: "", single_tenant=False)) as http:
        sent = await _rpc(http, "message/send", _send_params(_message()))
        got = await _rpc(http, "tasks/get", {"id": "0" * 64 + "-"})
    assert _code(sent) == -32603 and _code(got) == -32603


# -- message/send and message/stream -------------------------------------------------------------------------------


async def test_a_retried_message_runs_once_and_tasks_get_answers_it() -> None:
    script = ScriptedBedrock()
    message = _message()
    async with _client(_app(script)) as client:
        first = [event async for event in client.send_message(message)]
        again = [event async for event in client.send_message(message)]
        got = await client.get_task(TaskQueryParams(id=_task_id(message), history_length=1))
    task, retried = first[0][0], again[0][0]
    assert task.status.state is TaskState.completed and retried.id == task.id == _task_id(message)
    assert retried.artifacts == task.artifacts and task.artifacts[0].parts[0].root.text == ANSWER
    assert [m.role for m in task.history] == [Role.user, Role.agent] and task.metadata["strands_py"]["stop_reason"]
    assert got.status.state is TaskState.completed and [m.role for m in got.history] == [Role.agent]
    assert script.model_calls == 2


@pytest.mark.parametrize("same_message_id", [True, False], ids=["same", "new-messageId-control"])
async def test_a_storm_of_one_message_runs_once(same_message_id: bool) -> None:
    gate = threading.Event()
    script = ScriptedBedrock(gate=gate, gate_timeout=WAIT)
    message = _message()
    async with _client(_app(script)) as client:

        async def send() -> Any:
            sent = message if same_message_id else _message()
            return [event async for event in client.send_message(sent)][0][0]

        storm = [asyncio.ensure_future(send()) for _ in range(5)]
        assert await asyncio.to_thread(script.entered.wait, WAIT)
        gate.set()
        tasks = await asyncio.gather(*storm)
    assert all(task.status.state is TaskState.completed for task in tasks)
    assert script.model_calls == (2 if same_message_id else 10)


async def test_a_stream_replays_a_stored_task_on_a_server_that_kept_no_run() -> None:
    script = ScriptedBedrock()
    message = _message()
    config = IdempotencyConfig(store=InMemoryIdempotencyStore())
    app = _app(script, config, retain_finished_runs=0)
    async with _client(app, streaming=True) as client:
        first = [update for _, update in [e async for e in client.send_message(message)]]
        again = [e async for e in client.send_message(message)]
        resubscribed = [task.status.state async for task, _ in client.resubscribe(TaskIdParams(id=_task_id(message)))]
    assert first[-1].final and first[-1].status.state is TaskState.completed
    # The replay is one event: the task, completed, with the whole answer (the user's message is not known here).
    [(replayed, nothing)] = again
    assert nothing is None
    assert replayed.status.state is TaskState.completed and replayed.artifacts[0].parts[0].root.text == ANSWER
    assert resubscribed == [TaskState.completed] and script.model_calls == 2


@pytest.mark.parametrize("retain", [256, 0], ids=["run-here", "store-only"])
async def test_the_same_message_id_with_another_message_is_an_error(retain: int) -> None:
    script = ScriptedBedrock()
    message = _message()
    changed = message.model_copy(update={"parts": [Part(root=TextPart(text="And Rome?"))]})
    config = IdempotencyConfig(store=InMemoryIdempotencyStore())
    async with _client(_app(script, config, retain_finished_runs=retain)) as client:
        await _collect(client.send_message(message))
        with pytest.raises(A2AClientJSONRPCError) as raised:
            await _collect(client.send_message(changed))
    assert raised.value.error.code == MESSAGE_ID_MISMATCH and script.model_calls == 2


async def test_a_non_blocking_send_answers_once_the_task_started() -> None:
    script = ScriptedBedrock()
    async with _http(_app(script)) as http:
        answer = await _rpc(http, "message/send", _send_params(_message(), blocking=False))
    assert answer["result"]["status"]["state"] in ("working", "completed")


async def test_an_agent_that_fails_ends_its_task_failed() -> None:
    script = ScriptedBedrock(fail_with=RuntimeError("model down"))
    message = _message()
    async with _client(_app(script)) as client:
        [(task, _)] = [event async for event in client.send_message(message)]
        got = await client.get_task(TaskQueryParams(id=_task_id(message)))
    assert task.status.state is TaskState.failed and "agent failed" in task.status.message.parts[0].root.text
    assert got.status.state is TaskState.failed


async def test_a_streamed_failure_before_the_first_event_is_an_error_event() -> None:
    store = _FlakyStore()
    store.failing = IdempotencyStoreError("down")
    async with _http(_app(ScriptedBedrock(), IdempotencyConfig(store=store))) as http:
        streamed = await _rpc(http, "message/stream", _send_params(_message()))
        sent = await _rpc(http, "message/send", _send_params(_message()))
    assert _code(streamed) == UNAVAILABLE and _code(sent) == UNAVAILABLE


async def test_a_shutting_down_app_refuses_messages() -> None:
    app = _app(ScriptedBedrock())
    async with app.lifespan():
        pass
    async with _http(app) as http:
        answer = await _rpc(http, "message/send", _send_params(_message()))
    assert _code(answer) == UNAVAILABLE and app.running == 0


# -- tasks/get, tasks/cancel, tasks/resubscribe --------------------------------------------------------------------


async def test_a_running_task_is_working_then_cancelled_here() -> None:
    gate = threading.Event()
    script = ScriptedBedrock(gate=gate, gate_timeout=WAIT)
    message = _message()
    task_id = _task_id(message)
    async with _client(_app(script)) as client:
        sending = asyncio.ensure_future(_collect(client.send_message(message)))
        assert await asyncio.to_thread(script.entered.wait, WAIT)
        running = await client.get_task(TaskQueryParams(id=task_id))
        cancelled = await client.cancel_task(TaskIdParams(id=task_id))
        gate.set()
        [(task, _)] = await sending
        again = await client.cancel_task(TaskIdParams(id=task_id))
        got = await client.get_task(TaskQueryParams(id=task_id))
    assert running.status.state is TaskState.working and running.history[0].message_id == message.message_id
    assert cancelled.status.state is TaskState.canceled and task.status.state is TaskState.canceled
    assert again.status.state is TaskState.canceled and got.status.state is TaskState.canceled


async def test_a_completed_task_cannot_be_cancelled() -> None:
    message = _message()
    async with _client(_app(ScriptedBedrock())) as client:
        await _collect(client.send_message(message))
        with pytest.raises(A2AClientJSONRPCError) as raised:
            await client.cancel_task(TaskIdParams(id=_task_id(message)))
    assert raised.value.error.code == TASK_NOT_CANCELABLE


async def test_a_store_that_cannot_cancel_says_so() -> None:
    message = _message()
    async with _client(_app(ScriptedBedrock(), IdempotencyConfig(store=_NoCancelStore()))) as client:
        await _collect(client.send_message(message))
        with pytest.raises(A2AClientJSONRPCError) as raised:
            await client.cancel_task(TaskIdParams(id=_task_id(message)))
    assert raised.value.error.code == UNSUPPORTED_OPERATION


async def test_tasks_of_another_server_are_answered_from_the_store() -> None:
    store = InMemoryIdempotencyStore()
    running, cancelled, yielded = _message(), _message(), _message()
    for message, state, lease, marked in (
        (running, RecordState.IN_PROGRESS, 30.0, False),
        (cancelled, RecordState.CANCELLED, 30.0, False),
        (yielded, RecordState.IN_PROGRESS, 0.0, False),
    ):
        record = IdempotencyRecord(
            key=make_key(SCOPE, message.message_id),
            state=state,
            owner="elsewhere",
            version=new_version(),
            lease_seconds=lease,
            expires_at=4e9,
            cancelled=marked,
        )
        assert await store.claim(record, 0) is None
    async with _client(_app(ScriptedBedrock(), IdempotencyConfig(store=store)), streaming=True) as client:
        states = [
            (await client.get_task(TaskQueryParams(id=_task_id(m)))).status.state for m in (running, cancelled, yielded)
        ]
        resubscribed = [update async for _, update in client.resubscribe(TaskIdParams(id=_task_id(cancelled)))]
    assert states == [TaskState.working, TaskState.canceled, TaskState.failed]
    assert resubscribed == [None]


async def test_a_store_outage_is_unavailable_for_every_task_method() -> None:
    store = _FlakyStore()
    message = _message()
    app = _app(ScriptedBedrock(), IdempotencyConfig(store=store), retain_finished_runs=0)
    async with _client(app, streaming=True) as client:
        await _collect(client.send_message(message))
        store.failing = IdempotencyStoreError("down")
        codes = []
        for call in (
            client.get_task(TaskQueryParams(id=_task_id(message))),
            _collect(client.resubscribe(TaskIdParams(id=_task_id(message)))),
        ):
            with pytest.raises(A2AClientJSONRPCError) as raised:
                await call
            codes.append(raised.value.error.code)
        store.failing = OSError("connection reset")
        with pytest.raises(A2AClientJSONRPCError) as raised:
            await _collect(client.resubscribe(TaskIdParams(id=_task_id(message))))
    assert codes == [UNAVAILABLE, UNAVAILABLE] and raised.value.error.code == UNAVAILABLE


async def test_resubscribing_to_a_task_that_failed_here_tells_it_failed() -> None:
    script = ScriptedBedrock(fail_with=RuntimeError("model down"))
    message = _message()
    async with _client(_app(script), streaming=True) as client:
        await _collect(client.send_message(message))
        updates = [update async for _, update in client.resubscribe(TaskIdParams(id=_task_id(message)))]
    assert updates[-1].status.state is TaskState.failed


async def test_resubscribing_to_a_task_that_completed_here_follows_its_run() -> None:
    message = _message()
    async with _client(_app(ScriptedBedrock()), streaming=True) as client:
        await _collect(client.send_message(message))
        [(task, update)] = [event async for event in client.resubscribe(TaskIdParams(id=_task_id(message)))]
    assert update is None and task.status.state is TaskState.completed
    assert task.history is not None and task.history[0].message_id == message.message_id  # known here


async def _until(condition: Any) -> None:
    """Wait until ``condition()`` holds (checked every loop turn a little apart, at most ``WAIT`` seconds)."""
    deadline = asyncio.get_running_loop().time() + WAIT
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "never happened"
        await asyncio.sleep(0.01)  # the model's worker threads move on their own: the deadline bounds the wait


async def _collect(events: Any) -> list[Any]:
    return [event async for event in events]


# -- contexts as conversations -------------------------------------------------------------------------------------


def _conversations(
    tmp_path: Path, script: ScriptedBedrock, mode: str, store: Any = None, *, sync: bool = False
) -> A2AApp:
    def make_agent(request: Request, session_manager: Any = None) -> Agent:
        return Agent(model=script.model(), tools=script.tools(), callback_handler=None, session_manager=session_manager)

    async def manager(session_id: str, request: Request) -> FileSessionManager:
        return FileSessionManager(session_id=session_id, storage_dir=str(tmp_path))

    def sync_manager(session_id: str, request: Request) -> FileSessionManager:
        return FileSessionManager(session_id=session_id, storage_dir=str(tmp_path))

    store = store if store is not None else InMemoryIdempotencyStore()
    config = IdempotencyConfig(store=store, session_invocation_mode=mode)
    return A2AApp(make_agent, config, single_tenant=True, session_manager=sync_manager if sync else manager)


@pytest.mark.parametrize("mode", ["throw", "enqueue"])
async def test_a_busy_context_refuses_or_queues_the_next_message(tmp_path: Path, mode: str) -> None:
    gate = threading.Event()
    script = ScriptedBedrock(gate=gate, gate_timeout=WAIT)
    app = _conversations(tmp_path, script, mode)
    first, second, other = (
        _message(context_id="trip"),
        _message("And tomorrow?", context_id="trip"),
        _message(context_id="other"),
    )
    async with _client(app) as client, _http(app) as http:
        sending = asyncio.ensure_future(_collect(client.send_message(first)))
        assert await asyncio.to_thread(script.entered.wait, WAIT)
        next_turn = await _rpc(http, "message/send", _send_params(second, blocking=False))
        elsewhere = asyncio.ensure_future(_collect(client.send_message(other)))
        # Another context runs at once: both turns are inside the model together, while the second turn of the
        # first context waits (the negative control of the serialisation above).
        await _until(lambda: script.model_calls_in_progress == 2)
        gate.set()
        [(task, _)] = await sending
        [(parallel, _)] = await elsewhere
        if mode == "enqueue":
            [(queued, _)] = await _collect(client.send_message(second))  # joins the queued turn, to its end
    assert task.status.state is TaskState.completed and parallel.status.state is TaskState.completed
    if mode == "throw":
        assert _code(next_turn) == CONTEXT_BUSY and next_turn["error"]["data"]["retry_after"] >= 1
    else:
        assert next_turn["result"]["status"]["state"] == "submitted"
        assert queued.status.state is TaskState.completed and queued.context_id == "trip"


async def test_a_context_busy_on_another_server_is_refused(tmp_path: Path) -> None:
    from strands_py.http._scopes import session_storage_id
    from strands_py.idempotency.keys import session_lock_key

    store = InMemoryIdempotencyStore()
    lock = session_lock_key(SCOPE, session_storage_id(SCOPE, "trip", None), None)
    held = IdempotencyRecord(
        key=lock,
        state=RecordState.IN_PROGRESS,
        owner="elsewhere",
        version=new_version(),
        lease_seconds=30.0,
        expires_at=4e9,
    )
    assert await store.claim(held, 0) is None
    script = ScriptedBedrock()
    async with _http(_conversations(tmp_path, script, "throw", store)) as http:
        answer = await _rpc(http, "message/send", _send_params(_message(context_id="trip")))
    assert _code(answer) == CONTEXT_BUSY and answer["error"]["data"]["retry_after"] == 30 and script.model_calls == 0


async def test_a_store_outage_while_reading_the_context_is_unavailable(tmp_path: Path) -> None:
    store = _FlakyStore()
    store.failing = IdempotencyStoreError("down")
    async with _http(_conversations(tmp_path, ScriptedBedrock(), "throw", store)) as http:
        answer = await _rpc(http, "message/send", _send_params(_message(context_id="trip")))
    assert _code(answer) == UNAVAILABLE


def test_options_are_checked() -> None:
    with pytest.raises(ValueError, match="max_body_bytes"):
        A2AApp(lambda request: None, max_body_bytes=0)
    with pytest.raises(TypeError, match="session_manager"):
        A2AApp(lambda request: None, session_manager=lambda s, r: None)
    with pytest.raises(TypeError, match="factory"):
        A2AApp(lambda request, session_manager=None: None, session_manager="nope")  # type: ignore[arg-type]


async def test_the_http_error_of_a_route_is_a_problem() -> None:
    async with _http(_app(ScriptedBedrock())) as http:
        response = await http.get("/")
    assert response.status_code == 405 and response.headers["content-type"] == "application/problem+json"


async def test_a_context_turn_with_a_sync_session_manager_and_a_closed_app(tmp_path: Path) -> None:
    script = ScriptedBedrock()
    app = _conversations(tmp_path, script, "throw", sync=True)
    async with _http(app) as http:
        ran = await _rpc(http, "message/send", _send_params(_message(context_id="trip")))
        async with app.lifespan():
            pass
        refused = await _rpc(http, "message/send", _send_params(_message(context_id="trip")))
    assert ran["result"]["status"]["state"] == "completed" and _code(refused) == UNAVAILABLE
    assert script.model_calls == 2


async def test_a_corrupted_record_is_an_internal_error() -> None:
    store = InMemoryIdempotencyStore()
    message = _message()
    record = IdempotencyRecord(
        key=make_key(SCOPE, message.message_id),
        state=RecordState.COMPLETED,
        owner="elsewhere",
        version=new_version(),
        lease_seconds=30.0,
        expires_at=4e9,
        payload=b"not a result",
    )
    assert await store.claim(record, 0) is None
    async with _http(_app(ScriptedBedrock(), IdempotencyConfig(store=store))) as http:
        got = await _rpc(http, "tasks/get", {"id": _task_id(message)})
        resubscribed = await _rpc(http, "tasks/resubscribe", {"id": _task_id(message)})
    assert _code(got) == _code(resubscribed) == -32603
    assert resubscribed["error"]["data"]["type"].endswith("record-corrupted")


# -- humans in the loop --------------------------------------------------------------------------------------------


class _Approvals(ScriptedBedrock):
    """The script's tool asks a human for an approval (``{"approved": bool}``) before it acts."""

    def __init__(self) -> None:
        super().__init__()
        self.acted = 0

    def tools(self) -> list[Any]:
        script = self

        @tool(context=True)
        def lookup_weather(city: str, tool_context: ToolContext) -> str:
            """Look up the weather, once a human approved it.

            Args:
                city: The city.
            """
            answer = tool_context.interrupt("approval", reason={"city": city})
            if not (isinstance(answer, dict) and answer.get("approved") is True):
                return "not approved"
            script.acted += 1
            return f"{city}: sunny"

        return [lookup_weather]


def _answers(interrupt_id: str, **context: Any) -> Message:
    data = {"interrupt_responses": [{"interrupt_id": interrupt_id, "response": {"approved": True}}]}
    return Message(role=Role.user, parts=[Part(root=DataPart(data=data))], message_id=str(uuid.uuid4()), **context)


async def test_a_task_that_waits_for_a_human_is_input_required_and_answered_by_the_next_message(
    tmp_path: Path,
) -> None:
    script = _Approvals()
    app = _conversations(tmp_path, script, "throw")
    async with _client(app) as client, _http(app) as http:
        [(asked, _)] = await _collect(client.send_message(_message(context_id="trip")))
        [interrupt] = asked.metadata["strands_py"]["interrupts"]
        pending = await _rpc(http, "message/send", _send_params(_message("Other question", context_id="trip")))
        stale = await _rpc(http, "message/send", _send_params(_answers("not-an-interrupt", context_id="trip")))
        answer = _answers(interrupt["id"], context_id="trip")
        [(done, _)] = await _collect(client.send_message(answer))
        [(again, _)] = await _collect(client.send_message(answer))  # a retry of the answer: replayed
        answered_twice = await _rpc(http, "message/send", _send_params(_answers(interrupt["id"], context_id="trip")))
        elsewhere = await _rpc(http, "message/send", _send_params(_answers(interrupt["id"])))
        malformed = await _rpc(
            http,
            "message/send",
            {
                "message": {
                    **_answers("x").model_dump(mode="json"),
                    "parts": [{"kind": "data", "data": {"interrupt_responses": []}}],
                }
            },
        )
    assert asked.status.state is TaskState.input_required and interrupt["name"] == "approval"
    assert _code(pending) == INTERRUPTS_WAITING and pending["error"]["data"]["pending"][0]["id"] == interrupt["id"]
    assert _code(stale) == INTERRUPT_NOT_PENDING and _code(answered_twice) == INTERRUPT_NOT_PENDING
    assert done.status.state is TaskState.completed and again.id == done.id and script.acted == 1
    assert _code(elsewhere) == INTERRUPT_NOT_PENDING  # another context (a new one) waits for nothing
    assert _code(malformed) == INVALID_PARAMS


async def test_answers_need_conversations() -> None:
    async with _http(_app(ScriptedBedrock())) as http:
        answer = await _rpc(http, "message/send", _send_params(_answers("i-1")))
    assert _code(answer) == INVALID_PARAMS and "session_manager" in answer["error"]["data"]["detail"]
