"""Scopes, agent factories, options, and clients that give up: ``AgentApp`` on a real uvicorn."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from http_support import WAIT, Observer, client, headers, new_key, scripted, serve
from starlette.exceptions import HTTPException

from strands_py import Agent
from strands_py.http import AGENT_FAILED, AgentApp
from strands_py.idempotency import IdempotencyConfig

PROMPT = {"prompt": "What is the weather in Paris?"}


def _problem(response: httpx.Response, status: int, problem_type: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body: dict[str, Any] = response.json()
    assert body["type"] == problem_type and body["status"] == status and body["title"] and body["detail"]
    return body


@contextlib.asynccontextmanager
async def _served(app: Any) -> AsyncIterator[httpx.AsyncClient]:
    with serve(app) as server:
        async with client(server.url) as http:
            yield http


# -- scope --------------------------------------------------------------------------------------------------------


def _tenant(request: Any) -> str:
    tenant = request.headers.get("x-tenant")
    if tenant is None:
        raise HTTPException(401, "who are you?")
    return str(tenant)


async def test_keys_of_different_scopes_never_meet() -> None:
    with scripted() as script:
        async with _served(AgentApp(script.factory(), scope=_tenant)) as http:
            key = new_key()
            a = await http.post("/invocations", json=PROMPT, headers={**headers(key), "X-Tenant": "a/b"})
            b = await http.post("/invocations", json={"prompt": "other"}, headers={**headers(key), "X-Tenant": "a"})
            again = await http.post("/invocations", json=PROMPT, headers={**headers(key), "X-Tenant": "a/b"})
            foreign = await http.get(f"/invocations/{key}/events", headers={"X-Tenant": "c"})
            anonymous = await http.post("/invocations", json=PROMPT, headers=headers(key))
    assert a.status_code == b.status_code == 200 and "idempotent-replayed" not in b.headers
    assert again.headers["idempotent-replayed"] == "true"
    assert foreign.status_code == 404
    _problem(anonymous, 401, "about:blank")
    assert script.model_calls == 4


async def test_scope_function_failing_is_500() -> None:
    async def broken(request: Any) -> str:
        return "has#hash"

    with scripted() as script:
        async with _served(AgentApp(script.factory(), scope=broken)) as http:
            response = await http.post("/invocations", json=PROMPT, headers=headers(new_key()))
    assert response.status_code == 500 and response.headers["content-type"] == "application/problem+json"


# -- factories, scope functions and options -----------------------------------------------------------------------


async def test_async_factories_awaitable_factories_and_factories_returning_something_else() -> None:
    with scripted() as script:
        make = script.factory()

        async def async_factory(request: Any) -> Agent:
            return make(request)

        class AsyncCallable:
            async def __call__(self, request: Any) -> Agent:
                return make(request)

        def awaitable_factory(request: Any) -> Any:
            return async_factory(request)

        for factory in (async_factory, AsyncCallable(), awaitable_factory):
            async with _served(AgentApp(factory)) as http:
                assert (await http.post("/invocations", json=PROMPT, headers=headers(new_key()))).status_code == 200
        async with _served(AgentApp(lambda request: "not an agent")) as http:
            wrong = await http.post("/invocations", json=PROMPT, headers=headers(new_key()))
    _problem(wrong, 500, AGENT_FAILED)
    assert script.model_calls == 6


async def test_a_scope_function_that_raises_is_500_and_payload_validation_can_be_off() -> None:
    def raising(request: Any) -> str:
        raise LookupError("no tenant")

    with scripted() as script:
        async with _served(AgentApp(script.factory(), scope=raising)) as http:
            failed = await http.post("/invocations", json=PROMPT, headers=headers(new_key()))
        unchecked = AgentApp(script.factory(), IdempotencyConfig(validate_payload=False))
        async with _served(unchecked) as http:
            key = new_key()
            first = await http.post("/invocations", json=PROMPT, headers=headers(key))
            other = await http.post("/invocations", json={"prompt": "different"}, headers=headers(key))
    _problem(failed, 500, AGENT_FAILED)
    assert "no tenant" not in failed.text
    assert other.status_code == 200 and other.json() == first.json()  # same key, no fingerprint: a replay


def test_options_are_validated() -> None:
    with pytest.raises(ValueError):
        AgentApp(lambda request: None, max_body_bytes=0)  # type: ignore[arg-type,return-value]
    with pytest.raises(TypeError):
        AgentApp(lambda request: None, idempotency="memory")  # type: ignore[arg-type,return-value]


async def test_a_json_client_that_gives_up_does_not_cancel_the_run() -> None:
    with scripted(gated=True) as script:
        app = AgentApp(script.factory())
        observer = Observer(app)
        with serve(observer, drain=[app]) as server:
            key = new_key()
            async with httpx.AsyncClient(base_url=server.url, timeout=httpx.Timeout(WAIT, read=0.2)) as impatient:
                with pytest.raises(httpx.ReadTimeout):
                    await impatient.post("/invocations", json=PROMPT, headers=headers(key))
            assert await asyncio.wait_for(asyncio.to_thread(observer.disconnected.wait, WAIT), WAIT + 5)
            assert app.running == 1
            script.script.gate.set()
            async with client(server.url) as http:
                retry = await http.post("/invocations", json=PROMPT, headers=headers(key))
    assert retry.status_code == 200 and retry.headers["idempotent-replayed"] == "true"
    assert script.model_calls == 2
    assert observer.errors == []  # the abandoned response ended quietly
