"""Standard Webhooks (https://www.standardwebhooks.com) on the sending side: secrets, event ids, signatures. No I/O.

A message is signed as the spec says:
``webhook-signature: v1,<base64 of HMAC-SHA256(secret, "<id>.<timestamp>.<body>")>``, where the secret is the bytes of
a ``whsec_<base64>`` string, the timestamp the ``webhook-timestamp`` header (whole seconds since the epoch) and the
body the exact bytes sent. Several secrets (a rotation) give several signatures, separated by spaces: a receiver
accepts a message when any of them is its own.

Written here rather than taken from the ``standardwebhooks`` package: signing is the few lines below, and the package
(which the tests use to verify, as a receiver would) would be one more runtime dependency of the ``http`` extra.

Event ids. ``webhook-id`` names the event, not the attempt: every attempt, and every server that sends the same event
of the same invocation (the server that ran it, the one that took it over, or replays it, or cancelled it), sends
the same id, so that a receiver that deduplicates by id handles the event once. It is a digest of the invocation's
durable key (its scope and the client's key, digested; never the key itself) and the event type.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
import struct
from collections.abc import Sequence

SECRET_PREFIX = "whsec_"
# The spec's bounds on a secret's size: at least 192 bits, at most 512.
MIN_SECRET_BYTES = 24
MAX_SECRET_BYTES = 64

_ID_LABEL = b"strands-py/webhook-id/v1"
_MARKER_SUFFIX = "#webhook-"


def new_webhook_secret() -> str:
    """A new random secret for ``AgentApp(webhook_secret=...)`` and the receiver: ``whsec_`` and 32 random bytes."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode("ascii")


def _secret_bytes(secret: object, where: str) -> bytes:
    """The bytes of one ``whsec_<base64>`` secret; the error never quotes the secret.

    Raises:
        TypeError: Not a str.
        ValueError: No ``whsec_`` prefix, not base64, or not 24 to 64 bytes.
    """
    if not isinstance(secret, str):
        raise TypeError(f"{where} must be a str like 'whsec_<base64>', got {type(secret).__name__}")
    if not secret.startswith(SECRET_PREFIX):
        raise ValueError(f"{where} must start with {SECRET_PREFIX!r} (make one with new_webhook_secret())")
    encoded = secret[len(SECRET_PREFIX) :]
    try:
        raw = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"{where} is not {SECRET_PREFIX}<base64> (make one with new_webhook_secret())") from None
    if not MIN_SECRET_BYTES <= len(raw) <= MAX_SECRET_BYTES:
        raise ValueError(
            f"{where} must hold {MIN_SECRET_BYTES} to {MAX_SECRET_BYTES} bytes, it holds {len(raw)} "
            "(make one with new_webhook_secret())"
        )
    return raw


class WebhookSigner:
    """Signs messages with one secret, or several during a rotation (the new one first). Immutable, thread-safe.

    Its ``repr`` never shows a secret.
    """

    __slots__ = ("_keys",)

    def __init__(self, secret: str | Sequence[str]) -> None:
        """Sign with ``secret`` (``whsec_<base64>``), or with each secret of a non-empty sequence.

        Raises:
            TypeError: Not a str or a sequence of str.
            ValueError: A secret is malformed (see ``new_webhook_secret``), or the sequence is empty.
        """
        if isinstance(secret, str):
            self._keys: tuple[bytes, ...] = (_secret_bytes(secret, "webhook_secret"),)
            return
        if not isinstance(secret, Sequence):
            raise TypeError(f"webhook_secret must be a str or a list of str, got {type(secret).__name__}")
        if not secret:
            raise ValueError("webhook_secret must hold at least one secret")
        self._keys = tuple(_secret_bytes(s, f"webhook_secret[{i}]") for i, s in enumerate(secret))

    def __repr__(self) -> str:
        """The number of secrets, never one of them."""
        return f"WebhookSigner(<{len(self._keys)} secret(s)>)"

    def signature(self, event_id: str, timestamp: int, body: bytes) -> str:
        """The ``webhook-signature`` value: ``v1,<base64>`` per secret, separated by spaces."""
        signed = f"{event_id}.{timestamp}.".encode() + body
        return " ".join(
            "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode("ascii")
            for key in self._keys
        )

    def headers(self, event_id: str, timestamp: int, body: bytes) -> dict[str, str]:
        """The three Standard Webhooks headers of one attempt."""
        return {
            "webhook-id": event_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": self.signature(event_id, timestamp, body),
        }


def event_id(key: str | None, event_type: str) -> str:
    """The ``webhook-id`` of the event ``event_type`` of the invocation of durable key ``key``: ``msg_<32 hex>``.

    The same on every server (a digest of the key and the type); a random one for an invocation without a key (nothing
    else can ever send its events).
    """
    if key is None:
        return "msg_" + secrets.token_hex(16)
    material = b"".join(
        struct.pack(">Q", len(part)) + part
        for part in (_ID_LABEL, key.encode("utf-8", "surrogatepass"), event_type.encode())
    )
    return "msg_" + hashlib.sha256(material).hexdigest()[:32]


def marker_key(key: str, event_type: str) -> str:
    """The store key that records the event ``event_type`` of ``key`` as delivered (beside the key's own record)."""
    return f"{key}{_MARKER_SUFFIX}{event_type}"
