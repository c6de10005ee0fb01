"""How Graph requests leave the process: one POST of JSON bytes, one status and body back.

Production sends with aiohttp directly. Through httpx, even on its aiohttp transport, a call
cost ~240 µs more CPU (bench/hotpath.py: 650 µs against 177 for a bare aiohttp forwarder;
BENCHMARKS.md). httpx stays the adapter for
in-process transports: the sandbox (ASGITransport) and tests (MockTransport).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import aiohttp
import httpx

HEADERS = {"content-type": "application/json", "user-agent": "funnelgate"}


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    body: bytes


class ConnectionFailed(Exception):
    """No answer: refused, reset or closed mid-answer. Timeouts raise TimeoutError."""


class GraphTransport(Protocol):
    async def post(self, url: str, content: bytes) -> Answer: ...

    async def aclose(self) -> None: ...


class AiohttpTransport:
    """One keep-alive pool for the process. The caller bounds each attempt with a timeout."""

    def __init__(self, max_connections: int) -> None:
        self._max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None

    def _open(self) -> aiohttp.ClientSession:
        # Created on first use, inside the running loop, as aiohttp requires.
        connector = aiohttp.TCPConnector(limit=self._max_connections, keepalive_timeout=30)
        self._session = aiohttp.ClientSession(
            connector=connector, headers=HEADERS, timeout=aiohttp.ClientTimeout(total=None)
        )
        return self._session

    async def post(self, url: str, content: bytes) -> Answer:
        session = self._session or self._open()
        try:
            async with session.post(url, data=content) as response:
                return Answer(response.status, await response.read())
        except aiohttp.ClientError as exc:
            raise ConnectionFailed(type(exc).__name__) from None

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()


class HttpxTransport:
    """Any httpx transport: the sandbox's ASGITransport, tests' MockTransport."""

    def __init__(self, transport: httpx.AsyncBaseTransport) -> None:
        self._client = httpx.AsyncClient(transport=transport, headers=HEADERS)

    async def post(self, url: str, content: bytes) -> Answer:
        try:
            response = await self._client.post(url, content=content)
        except httpx.TimeoutException:
            raise TimeoutError from None
        except httpx.TransportError as exc:
            raise ConnectionFailed(type(exc).__name__) from None
        return Answer(response.status_code, response.content)

    async def aclose(self) -> None:
        await self._client.aclose()
