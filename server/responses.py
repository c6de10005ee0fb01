"""Answers: JSON bodies, and the one place a `FunnelgateError` becomes an HTTP response."""

from __future__ import annotations

from typing import Any

import orjson
from starlette.responses import Response

from server.errors import FunnelgateError


def json_response(content: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(content), status_code=status, media_type="application/json")


def error_response(error: FunnelgateError) -> Response:
    response = json_response(error.body(), error.status)
    response.headers.update(error.headers())
    return response
