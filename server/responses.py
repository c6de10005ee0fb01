"""Answers: JSON bodies, and the one place a `FunnelgateError` becomes an HTTP response
(funnelgate's JSON error body, or the same wrapped as a JSON-RPC error for MCP)."""

from __future__ import annotations

from typing import Any

import orjson
from starlette.responses import Response

from server.errors import FunnelgateError


def json_response(
    content: Any, status: int = 200, headers: dict[str, str] | None = None
) -> Response:
    return Response(
        orjson.dumps(content), status_code=status, headers=headers, media_type="application/json"
    )


def error_response(error: FunnelgateError) -> Response:
    response = json_response(error.body(), error.status)
    response.headers.update(error.headers())
    return response


# JSON-RPC 2.0 (https://www.jsonrpc.org/specification, section 5.1).
_PARSE_ERROR = -32700
_INVALID_REQUEST = -32600


def jsonrpc_error_response(error: FunnelgateError) -> Response:
    """A refused body, as a JSON-RPC error at the error's HTTP status.

    MCP clients turn a JSON-RPC error found at a non-2xx status into the caller's exception
    (the official Python client; any other body becomes a bare "Server returned an error
    response"), so the message reaches the caller; `data` carries funnelgate's usual body
    with its stable `code`. The id is null: the body was not read as a request (JSON-RPC
    2.0, section 5).
    """
    code = _PARSE_ERROR if error.code == "INVALID_JSON" else _INVALID_REQUEST
    response = json_response(
        {
            "jsonrpc": "2.0",
            "id": None,
            "error": {"code": code, "message": error.message, "data": error.body()},
        },
        error.status,
    )
    response.headers.update(error.headers())
    return response
