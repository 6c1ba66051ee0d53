"""Scopes, agent factories, options, and clients that give up: ``AgentApp`` on a real uvicorn."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from http_support import WAIT, Observer, client, headers, new_key, scripted, serve
from starlette.exceptions import HTTPException

from strands_py import Agent
from strands_py.http import AGENT_FAILED, NOT_FOUND, SCOPE_INVALID, AgentApp
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


# Any string a scope function returns is a tenant id (escaped; a very long one digested); lookalikes never meet.
TENANTS = [
    "a#b",
    "a%23b",
    "#",
    "a/b",
    "a%2Fb",
    "%",
    b"\xff".decode("utf-8", "surrogateescape"),
    "line\nbreak",
    "é",
    "x" * 10_000,
    "x" * 9_999 + "y",
]


async def _tenant_of(request: Any) -> Any:
    return TENANTS[int(request.headers["x-tenant"])]


async def test_any_tenant_id_a_scope_function_returns_works_and_lookalikes_never_meet() -> None:
    with scripted() as script:
        async with _served(AgentApp(script.factory(), scope=_tenant_of)) as http:
            key = new_key()  # one key for every tenant: each has its own invocation of it
            firsts, retries, reads = [], [], []
            for index in range(len(TENANTS)):
                tenant = {"X-Tenant": str(index)}
                firsts.append(await http.post("/invocations", json=PROMPT, headers={**headers(key), **tenant}))
                retries.append(await http.post("/invocations", json=PROMPT, headers={**headers(key), **tenant}))
                reads.append(await http.get(f"/invocations/{key}/events", headers=tenant))
    for first, retry, read in zip(firsts, retries, reads, strict=True):
        assert first.status_code == retry.status_code == read.status_code == 200, first.text
        assert "idempotent-replayed" not in first.headers  # no other tenant's invocation of this key was met
        assert retry.headers["idempotent-replayed"] == "true" and retry.json() == first.json()
    assert script.model_calls == 2 * len(TENANTS)


@pytest.mark.parametrize("tenant", ["", None, 42, b"bytes"])
async def test_a_scope_function_returning_no_tenant_id_is_a_documented_500(tenant: Any) -> None:
    with scripted() as script:
        async with _served(AgentApp(script.factory(), scope=lambda request: tenant)) as http:
            key = new_key()
            posted = await http.post("/invocations", json=PROMPT, headers=headers(key))
            followed = await http.get(f"/invocations/{key}/events")
    for response in (posted, followed):
        _problem(response, 500, SCOPE_INVALID)
    assert script.model_calls == 0


# -- the default: one scope per caller ----------------------------------------------------------------------------

ALICE = {"Authorization": "Bearer alice-secret-token"}
ALICE_AGAIN = {"Authorization": "bearer   alice-secret-token"}  # the scheme is case-insensitive
BOB = {"Authorization": "Bearer bob-secret-token"}


@pytest.mark.parametrize("single_tenant", [False, True], ids=["default", "single-tenant"])
async def test_by_default_keys_are_scoped_per_caller_and_callers_without_credentials_share_one(
    single_tenant: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """``single_tenant=True`` is the negative control: the old default, where anyone holding a key reads it."""
    caplog.set_level(logging.DEBUG, logger="strands_py")
    with scripted() as script:
        async with _served(AgentApp(script.factory(), single_tenant=single_tenant)) as http:
            key, anonymous_key = new_key(), new_key()
            alice = await http.post("/invocations", json=PROMPT, headers={**headers(key), **ALICE})
            alice_again = await http.post("/invocations", json=PROMPT, headers={**headers(key), **ALICE_AGAIN})
            read_by_alice = await http.get(f"/invocations/{key}/events", headers=ALICE)
            read_by_bob = await http.get(f"/invocations/{key}/events", headers=BOB)
            read_by_anonymous = await http.get(f"/invocations/{key}/events")
            bob = await http.post("/invocations", json=PROMPT, headers={**headers(key), **BOB})
            anonymous = await http.post("/invocations", json=PROMPT, headers=headers(anonymous_key))
            anonymous_again = await http.post("/invocations", json=PROMPT, headers=headers(anonymous_key))
            read_anonymously = await http.get(f"/invocations/{anonymous_key}/events")
            read_by_alice_too = await http.get(f"/invocations/{anonymous_key}/events", headers=ALICE)

    assert alice.status_code == alice_again.status_code == anonymous.status_code == 200
    assert alice_again.headers["idempotent-replayed"] == "true" and alice_again.json() == alice.json()
    assert anonymous_again.headers["idempotent-replayed"] == "true"  # anonymous retries dedupe
    assert read_by_alice.status_code == read_anonymously.status_code == 200
    foreign = [read_by_bob, read_by_anonymous, read_by_alice_too]
    if single_tenant:
        assert [r.status_code for r in foreign] == [200, 200, 200]  # anyone holding a key reads the answer
        assert bob.headers["idempotent-replayed"] == "true"
        assert script.model_calls == 4
        return
    for response in foreign:
        _problem(response, 404, NOT_FOUND)
    assert bob.status_code == 200 and "idempotent-replayed" not in bob.headers  # Bob's own invocation of the key
    assert script.model_calls == 6
    assert "secret" not in caplog.text and "caller-" in caplog.text  # keys carry a digest, never the credentials


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
