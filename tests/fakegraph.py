"""A fake Graph API on 127.0.0.1 for loopback tests: Meta's documented rules (the sandbox's),
real HTTP, every request recorded raw, and a script of failures to serve first."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections import deque
from dataclasses import dataclass
from typing import Any

import orjson
import uvicorn
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
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

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

    def start(self) -> None:
        app = Starlette(routes=[Route("/{version}/{pixel}/events", self._events, methods=["POST"])])
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [sock]}, daemon=True
        )
        self._thread.start()
        for _ in range(200):
            if self._server.started:
                return
            threading.Event().wait(0.02)
        raise RuntimeError("fake Graph did not start")

    def stop(self) -> None:
        if self._server is not None and self._thread is not None:
            self._server.should_exit = True
            self._thread.join(timeout=5)
