"""Request bodies: JSON only, bounded in size before they are parsed."""

from __future__ import annotations

from typing import Any

import orjson
from starlette.requests import Request

from server.errors import BadRequest, PayloadTooLarge, UnsupportedMediaType

MAX_BODY_BYTES = 1024 * 1024


async def read_json_body(request: Request) -> Any:
    """The parsed body: JSON only, at most 1 MiB (checked while reading, not just by header)."""
    content_type = request.headers.get("content-type")
    if content_type is not None:
        media_type = content_type.split(";", 1)[0].strip().lower()
        if media_type != "application/json" and not media_type.endswith("+json"):
            raise UnsupportedMediaType("Send the body as JSON with Content-Type: application/json.")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise PayloadTooLarge("The request body is larger than 1 MiB.")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise PayloadTooLarge("The request body is larger than 1 MiB.")
        chunks.append(chunk)
    body = b"".join(chunks)
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise BadRequest("The request body is not valid JSON.") from None
    if b"\\u0000" in body and _holds_nul(parsed):  # rare: only then is the value walked
        raise BadRequest(
            "The request body holds a NUL character (\\u0000) in a string: send text without it.",
            code="INVALID_REQUEST",
        )
    return parsed


def _holds_nul(value: Any) -> bool:
    """Whether a string in `value` (keys included) holds U+0000, which no stored text may:
    PostgreSQL's text refuses it (https://www.postgresql.org/docs/current/datatype-character.html),
    and no event field means it. Iterative: a deep body cannot exhaust the stack."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if "\x00" in item:
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False
