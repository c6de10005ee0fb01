"""Request bodies: JSON only, bounded in size before they are parsed."""

from __future__ import annotations

from typing import Any

import orjson
from starlette.requests import Request

from server.errors import BadRequest, InvalidParameters, PayloadTooLarge, UnsupportedMediaType
from tools.base import Violation

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
    if b"\\u0000" in body:  # rare: only then is anything walked
        _refuse_nul(parsed)
    return parsed


NUL_MESSAGE = "holds a NUL character (\\u0000): send text without it"


def _refuse_nul(parsed: Any) -> None:
    """A tool's parameters (Run Tool's `parameters`, MCP's `params.arguments`) may hold no
    U+0000: no stored text may (PostgreSQL's text refuses it,
    https://www.postgresql.org/docs/current/datatype-character.html), and no event field means
    it. Elsewhere in a body it is left to the checks that read those fields."""
    if not isinstance(parsed, dict):
        return
    for holder, name in ((parsed, "parameters"), (parsed.get("params"), "arguments")):
        if isinstance(holder, dict) and name in holder:
            where = nul_path(holder[name])
            if where is not None:
                raise InvalidParameters([Violation("parameters" + where, NUL_MESSAGE)])


def nul_path(value: Any) -> str | None:
    """Where in `value` a string holds U+0000, as the rest of a violation's path (`.pixel`,
    `.events[0].event_name`; a key that holds one is reported as its object, never echoed);
    None when none does. Iterative: a deep body cannot exhaust the stack."""
    stack: list[tuple[str, Any]] = [("", value)]
    while stack:
        where, item = stack.pop()
        if isinstance(item, str):
            if "\x00" in item:
                return where
        elif isinstance(item, dict):
            for key, child in item.items():
                if "\x00" in key:
                    return where
                stack.append((f"{where}.{key}", child))
        elif isinstance(item, list):
            stack.extend((f"{where}[{index}]", child) for index, child in enumerate(item))
    return None
