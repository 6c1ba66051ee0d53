"""JSON-RPC 2.0 over HTTP, as A2A frames it: one JSON response, or Server-Sent Events whose data are responses."""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing
from typing import Any

from pydantic import BaseModel
from starlette.responses import Response

from ..http._responses import EventStreamResponse
from ..http._wire import dumps
from ._errors import RpcError

RequestId = str | int | None


def _dump(value: Any) -> Any:
    return value.model_dump(mode="json", exclude_none=True) if isinstance(value, BaseModel) else value


def result_body(request_id: RequestId, result: Any) -> str:
    """A success response's JSON text (``result``: an ``a2a.types`` model, or plain JSON)."""
    return dumps({"id": request_id, "jsonrpc": "2.0", "result": _dump(result)})


def error_body(request_id: RequestId, error: RpcError) -> str:
    """An error response's JSON text."""
    return dumps({"error": error.body(), "id": request_id, "jsonrpc": "2.0"})


def json_result(request_id: RequestId, result: Any) -> Response:
    """A JSON response with ``result``."""
    return Response(result_body(request_id, result), media_type="application/json")


def json_error(request_id: RequestId, error: RpcError) -> Response:
    """A JSON response with ``error`` (HTTP 200, as JSON-RPC over HTTP answers every error it understood)."""
    return Response(error_body(request_id, error), media_type="application/json")


def event(request_id: RequestId, result: Any) -> bytes:
    """One Server-Sent Event carrying a success response (``None``: a keepalive comment)."""
    if result is None:
        return b": keepalive\n\n"
    return f"data: {result_body(request_id, result)}\n\n".encode()


def error_event(request_id: RequestId, error: RpcError) -> bytes:
    """One Server-Sent Event carrying an error response."""
    return f"data: {error_body(request_id, error)}\n\n".encode()


def event_stream(request_id: RequestId, events: AsyncGenerator[Any, None]) -> Response:
    """An event stream of ``events`` (``None``: keepalive); an ``RpcError`` they raise is the stream's last event.

    The stream stops when the client goes away (``events`` is closed then); what it follows carries on.
    """

    async def frames() -> AsyncIterator[bytes]:
        async with aclosing(events):
            try:
                async for item in events:
                    yield event(request_id, item)
            except RpcError as e:
                yield error_event(request_id, e)

    return EventStreamResponse(frames(), {})


def error_stream(request_id: RequestId, error: RpcError) -> Response:
    """An event stream of one error (what a streaming method answers when it cannot start)."""

    async def frames() -> AsyncIterator[bytes]:
        yield error_event(request_id, error)

    return EventStreamResponse(frames(), {})
