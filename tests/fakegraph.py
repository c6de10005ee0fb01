"""A fake Graph API on 127.0.0.1 for loopback tests: Meta's documented rules (the sandbox's),
real HTTP, every request recorded raw, and a script of failures to serve first."""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from server.sandbox import SandboxGraph


@dataclass(frozen=True)
class Received:
    path: str
    query: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return orjson.loads(self.body)


class FakeGraphServer:
    def __init__(self) -> None:
        self.sandbox = SandboxGraph()
        self.received: list[Received] = []
        # Each entry: {"status": int, "error": {...}} or {"delay": seconds}; served in order.
        self.script: deque[dict[str, Any]] = deque()
        self.base_url = ""

    def reset(self) -> None:
        self.received.clear()
        self.script.clear()

    async def _events(self, request: Request) -> Response:
        body = await request.body()
        self.received.append(
            Received(request.url.path, request.url.query, dict(request.headers), body)
        )
        if self.script:
            step = self.script.popleft()
            if "delay" in step:
                await asyncio.sleep(step["delay"])
            else:
                payload = orjson.dumps({"error": step["error"]}) if "error" in step else b"oops"
                return Response(payload, status_code=step["status"], media_type="application/json")
        try:
            parsed = orjson.loads(body)
        except orjson.JSONDecodeError:
            parsed = None
        version, pixel = request.path_params["version"], request.path_params["pixel"]
        status, answer = self.sandbox.handle(version, pixel, parsed)
        return Response(orjson.dumps(answer), status_code=status, media_type="application/json")

    def app(self) -> Starlette:
        return Starlette(
            routes=[Route("/{version}/{pixel}/events", self._events, methods=["POST"])]
        )
