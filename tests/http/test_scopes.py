"""Scope segments: any tenant id works and no two share a segment; callers are told apart by their credentials.

Negative control: ``_old_segment``, the escaping before the fix (``%`` and ``/`` only), makes a scope that the
config refuses (``#``) or that cannot make keys (a lone surrogate): every request of such a tenant was a 500.
"""

from __future__ import annotations

import logging

import pytest
from hypothesis import given
from hypothesis import strategies as st

from strands_py import Agent
from strands_py.http import AgentApp
from strands_py.http._scopes import ANONYMOUS, MAX_TENANT_BYTES, caller_segment, escape_tenant
from strands_py.idempotency import IdempotencyConfig
from strands_py.idempotency.keys import make_key

SURROGATE = b"\xff".decode("utf-8", "surrogateescape")
TRICKY = [
    "a#b",
    "a%23b",
    "#",
    "%",
    "%%",
    "%25",
    "a/b",
    "a%2Fb",
    "a%2fb",
    SURROGATE,
    "%ED%B3%BF",
    "\ud83d\ude00",  # a surrogate pair as two code points
    "😀",
    "tab\there",
    "line\nbreak",
    "\x85",
    "é",
    " ",
    "x" * 10_000,
    "x" * 9_999 + "y",
    "é" * 200,
    "é" * 300,
    SURROGATE * 200,
]


def _old_segment(tenant: str) -> str:
    return tenant.replace("%", "%25").replace("/", "%2F")


def _usable(segment: str) -> None:
    """A segment the config accepts and that makes keys, within the stores' limits."""
    scope = f"invocations/{segment}"
    IdempotencyConfig(scope=scope)
    make_key(scope, "token")
    assert len(segment.encode("utf-8")) <= MAX_TENANT_BYTES + 2


@pytest.mark.parametrize("tenant", TRICKY)
def test_every_tenant_id_makes_a_usable_segment(tenant: str) -> None:
    segment = escape_tenant(tenant)
    _usable(segment)
    assert not any(char in segment for char in "#/\n\t\x85") and segment.isprintable()


def test_no_two_tenant_ids_share_a_segment() -> None:
    assert len({escape_tenant(tenant) for tenant in TRICKY}) == len(TRICKY)


@given(st.text(st.characters() | st.characters(categories=["Cs"]), min_size=1), st.text(min_size=1))
def test_escaping_is_injective(one: str, other: str) -> None:
    _usable(escape_tenant(one))
    assert (escape_tenant(one) == escape_tenant(other)) is (one == other)
    assert (escape_tenant(one) == escape_tenant(one + "#")) is False


def test_plain_ids_keep_the_segment_of_earlier_versions() -> None:
    for tenant in ["tenant-42", "a%b/c", "é", "x" * 512, "Ω" * 256]:
        assert escape_tenant(tenant) == _old_segment(tenant)
    assert escape_tenant("x" * 513).startswith("%%")  # digested: "%%" is never part of an escaped id


@pytest.mark.parametrize("tenant", ["a#b", SURROGATE])
def test_negative_control_the_old_escaping_makes_scopes_that_fail(tenant: str) -> None:
    scope = f"invocations/{_old_segment(tenant)}"
    with pytest.raises(ValueError):
        IdempotencyConfig(scope=scope)
        make_key(scope, "token")


def test_negative_control_the_old_escaping_makes_keys_over_dynamodbs_limit() -> None:
    key = make_key(f"invocations/{_old_segment('x' * 10_000)}", "token")
    assert len(key.encode()) > 2048  # DynamoDB refuses a partition key over 2 KB: every request of the tenant
    assert len(make_key(f"invocations/{escape_tenant('x' * 10_000)}", "token").encode()) < 2048


def test_callers_are_told_apart_by_their_credentials_only() -> None:
    alice = caller_segment(["Bearer alice-token"], None)
    assert alice.startswith("caller-") and len(alice) == len("caller-") + 32
    assert "alice" not in alice
    assert caller_segment(["bearer   alice-token "], None) == alice  # the scheme is case-insensitive
    assert caller_segment(["Bearer ALICE-TOKEN"], None) != alice  # the credentials are not
    assert caller_segment(["Bearer bob-token"], None) != alice
    assert caller_segment(["abc"], None) != caller_segment(["ABC"], None)  # no scheme: compared exactly
    assert caller_segment(["Bearer a", "Basic b"], None) not in (alice, caller_segment(["Bearer a"], None))
    assert caller_segment(["Bearer alice-token"], b"k" * 32) != alice  # keyed with the config's hmac_key
    assert caller_segment([], None) == caller_segment(["", " "], None) == ANONYMOUS


def _app(**options: object) -> AgentApp:
    return AgentApp(lambda request: Agent(callback_handler=None), **options)  # type: ignore[arg-type]


def test_an_app_neither_scoped_nor_single_tenant_says_so_at_construction(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="strands_py.http"):
        _app()
        (warning,) = caplog.records
        assert warning.levelno == logging.WARNING and "single_tenant=True" in warning.getMessage()
        caplog.clear()
        _app(single_tenant=True)
        _app(scope=lambda request: "tenant")
    assert caplog.records == []
    with pytest.raises(ValueError):
        _app(scope=lambda request: "tenant", single_tenant=True)
