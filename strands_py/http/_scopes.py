"""Whose keys a request's are: a tenant from the app's scope function, or the caller its credentials name.

Keys of different scopes never meet: a key of one caller can neither join, replay nor read another's invocation.
A scope is ``<config scope>/<segment>``, and the segment is one of:

- a tenant id, as the app's ``scope(request)`` returns it, escaped so that any non-empty string works and no two
  tenants share a segment: ``%``, ``/``, ``#``, control characters and lone surrogates are percent-encoded (UTF-8,
  surrogates as ``surrogatepass`` gives them), and a segment that would be longer than 512 bytes is
  ``%%<sha256 of the tenant id>`` instead (``%%`` never occurs in an escaped id), so that keys stay within every
  store's limits (DynamoDB's 2 KB);
- by default, ``caller-<digest>``: a digest of the request's ``Authorization`` header fields (HMAC-SHA256 with the
  config's ``hmac_key`` when it has one, so that a guessed credential cannot be confirmed from a key at rest;
  SHA-256 otherwise), 128 bits of it. The header itself is never stored or logged. Its scheme is compared
  case-insensitively (``Bearer`` and ``bearer`` name one caller); the credentials exactly;
- ``anonymous`` for every request without credentials: anonymous callers dedupe their retries and can read each
  other's keys (use unguessable keys), and never a credentialed caller's.
"""

from __future__ import annotations

import hashlib
import hmac
import inspect
import logging
import re
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import Request

from ..idempotency.config import IdempotencyConfig
from ..idempotency.keys import make_key
from ._problems import problem_for, scope_invalid_problem
from ._protocol import ProblemError

logger = logging.getLogger(__name__)

ScopeFunction = Callable[[Request], "str | Awaitable[str]"]

DEFAULT_SCOPE = "invocations"
ANONYMOUS = "anonymous"
CALLER_PREFIX = "caller-"
_CALLER_LABEL = b"strands-py/http-caller/v1\x00"
_CALLER_DIGEST_CHARS = 32  # 128 bits: finding a credential with another caller's digest is a 2^128 search
MAX_TENANT_BYTES = 512

# What may not appear in a scope segment as it is: the escape character itself, the separators of scopes ("/") and
# of keys ("#", which IdempotencyConfig refuses), control characters (keys appear in logs), and lone surrogates
# (not Unicode: UTF-8 cannot encode them, and neither can the stores).
_UNSAFE = re.compile("[%/#\x00-\x1f\x7f-\x9f\ud800-\udfff]")


def _percent(match: re.Match[str]) -> str:
    return "".join(f"%{byte:02X}" for byte in match.group().encode("utf-8", "surrogatepass"))


def escape_tenant(tenant: str) -> str:
    """The scope segment of a tenant id (see the module's documentation): one segment per tenant id, never two.

    Ids without any of ``% / #``, control characters or lone surrogates, and at most 512 bytes, are kept as they
    are (so their keys are those of earlier versions, which escaped ``%`` and ``/`` only).
    """
    escaped = _UNSAFE.sub(_percent, tenant)
    if len(escaped) * 4 > MAX_TENANT_BYTES and len(escaped.encode("utf-8")) > MAX_TENANT_BYTES:
        return "%%" + hashlib.sha256(tenant.encode("utf-8", "surrogatepass")).hexdigest()
    return escaped


def _credential(value: str) -> str:
    """One ``Authorization`` field as compared: the scheme in lower case, then the credentials exactly."""
    value = value.strip(" \t")
    scheme, space, credentials = value.partition(" ")
    if not space:
        return value  # no scheme (or no credentials): nothing that may be compared case-insensitively
    return f"{scheme.lower()} {credentials.lstrip(' ')}"


def caller_segment(authorization: Sequence[str], hmac_key: bytes | None) -> str:
    """The scope segment of the caller whose ``Authorization`` fields are ``authorization``.

    Args:
        authorization: The request's ``Authorization`` field values (``request.headers.getlist``).
        hmac_key: The config's key; with it the digest is HMAC-SHA256, without it SHA-256.

    Returns:
        ``caller-<32 hex digits>``, or ``anonymous`` when there are no (non-empty) credentials.
    """
    credentials = [_credential(value) for value in authorization]
    credentials = [value for value in credentials if value]
    if not credentials:
        return ANONYMOUS
    # Fields are joined by a NUL, which no header value holds: two lists of fields never give one material.
    material = _CALLER_LABEL + "\x00".join(credentials).encode("utf-8", "surrogatepass")
    if hmac_key is None:
        digest = hashlib.sha256(material).hexdigest()
    else:
        digest = hmac.new(hmac_key, material, hashlib.sha256).hexdigest()
    return CALLER_PREFIX + digest[:_CALLER_DIGEST_CHARS]


_SESSION_LABEL = b"strands-py/http-session/v1\x00"
SESSION_PREFIX = "conv-"


def session_storage_id(scope: str, session_id: str, hmac_key: bytes | None) -> str:
    """The id a conversation ``session_id`` of the caller ``scope`` is stored under (what the session manager gets).

    ``conv-<32 hex digits>``: 128 bits of a keyed digest (HMAC-SHA256 with the config's ``hmac_key`` when it has one,
    SHA-256 otherwise) of the scope and the id, so that two callers' ``conv-1`` never share storage, and an id that is
    no file name or S3 key (``../x``) never reaches the storage as it is.
    """
    scope_bytes = scope.encode("utf-8", "surrogatepass")
    material = _SESSION_LABEL + len(scope_bytes).to_bytes(8, "big") + scope_bytes + session_id.encode("utf-8")
    if hmac_key is None:
        digest = hashlib.sha256(material).hexdigest()
    else:
        digest = hmac.new(hmac_key, material, hashlib.sha256).hexdigest()
    return SESSION_PREFIX + digest[:_CALLER_DIGEST_CHARS]


class Scopes:
    """The scope of each request of one app: its scope function's tenant, its caller, or the app's one scope.

    Thread-safety: ``of`` may be called from any loop; it keeps no state.
    """

    def __init__(
        self,
        config: IdempotencyConfig,
        function: ScopeFunction | None,
        single_tenant: bool,
        hmac_key: bytes | None,
        retry_after: int,
    ) -> None:
        """Scopes under the config's scope; a warning when neither ``function`` nor ``single_tenant`` says whose.

        Raises:
            ValueError: Both ``function`` and ``single_tenant``, or the config's scope is not valid Unicode text.
        """
        if function is not None and single_tenant:
            raise ValueError("pass either scope= (keys per tenant) or single_tenant=True (one scope for all), not both")
        self.base = config.scope or DEFAULT_SCOPE
        make_key(self.base, "")  # a scope that cannot make keys fails here, not on every request
        if function is None and not single_tenant:
            logger.warning(
                "no scope function and not single-tenant | keys are scoped per caller by their Authorization header,"
                " and requests without one share an anonymous scope; pass scope=<function of the request> to scope"
                " them by tenant, or single_tenant=True to declare that every caller may read every key's answer"
            )
        self.single_tenant = single_tenant
        self._function = function
        self._function_is_async = function is not None and is_async_callable(function)
        self._hmac_key = hmac_key
        self._retry_after = retry_after

    async def of(self, request: Request) -> str:
        """The request's scope: the config's scope (default ``invocations``), then ``/`` and the caller's segment.

        The segment is the scope function's tenant id (escaped: any non-empty str works, and two tenants never
        share a segment), else the caller its ``Authorization`` header names (``anonymous`` without one); a
        single-tenant app has no segment.

        Raises:
            HTTPException: As raised by the scope function (401, 403, ...).
            ProblemError: 500, the scope function failed (``agent-failed``) or returned no usable tenant id, an
                empty string or not a str (``scope-invalid``).
        """
        if self._function is None:
            if self.single_tenant:
                return self.base
            return f"{self.base}/{caller_segment(request.headers.getlist('authorization'), self._hmac_key)}"
        try:
            tenant: Any = self._function(request)
            if self._function_is_async or inspect.isawaitable(tenant):
                tenant = await tenant
        except HTTPException:
            raise
        except Exception as e:
            logger.exception("scope function failed")
            raise ProblemError(problem_for(e, self._retry_after)) from e
        if not isinstance(tenant, str) or not tenant:
            logger.error(
                "type=<%s> | scope function returned no tenant id: a non-empty str is needed", type(tenant).__name__
            )
            raise ProblemError(scope_invalid_problem())
        return f"{self.base}/{escape_tenant(tenant)}"


def is_async_callable(function: Any) -> bool:
    """Whether calling ``function`` gives a coroutine (an async function, or an object with an async ``__call__``)."""
    call = type(function).__call__ if callable(function) else None
    return inspect.iscoroutinefunction(function) or inspect.iscoroutinefunction(call)
