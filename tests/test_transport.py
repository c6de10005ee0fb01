"""The production Graph transport (aiohttp) over real loopback HTTP: answers, refused
connections, timeouts, and a pool that survives a cancelled attempt."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import orjson
import pytest

from server.delivery.transport import AiohttpTransport, Answer, ConnectionFailed
from tests.live import serving
from tests.support import PIXEL, FakeGraph, free_port


@pytest.fixture(scope="module")
def graph() -> Iterator[FakeGraph]:
    fake = FakeGraph()
    with serving(fake.app(), lifespan="off") as base_url:
        fake.base_url = base_url
        yield fake


def test_answer_carries_status_and_body_and_json_headers(graph):
    graph.reset()
    graph.script.append({"status": 500, "error": {"code": 2, "is_transient": True}})

    async def go() -> Answer:
        transport = AiohttpTransport(max_connections=4)
        try:
            return await transport.post(f"{graph.base_url}/v24.0/{PIXEL}/events", b"{}")
        finally:
            await transport.aclose()

    answer = asyncio.run(go())
    assert answer.status == 500
    assert orjson.loads(answer.body)["error"]["code"] == 2
    assert graph.received[0].headers["content-type"] == "application/json"
    assert graph.received[0].headers["user-agent"] == "funnelgate"
    assert graph.received[0].body == b"{}"


def test_refused_connection_is_connection_failed():
    async def go() -> None:
        transport = AiohttpTransport(max_connections=4)
        try:
            await transport.post(f"http://127.0.0.1:{free_port()}/v24.0/1/events", b"{}")
        finally:
            await transport.aclose()

    with pytest.raises(ConnectionFailed):
        asyncio.run(go())


def test_pool_keeps_working_after_an_attempt_is_cancelled_by_its_timeout(graph):
    graph.reset()
    graph.script.append({"delay": 1.0})
    url = f"{graph.base_url}/v24.0/{PIXEL}/events"

    async def go() -> Answer:
        transport = AiohttpTransport(max_connections=1)  # one connection: it must come back
        try:
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.1):
                    await transport.post(url, b"{}")
            async with asyncio.timeout(5):
                return await transport.post(url, b'{"data": []}')
        finally:
            await transport.aclose()

    answer = asyncio.run(go())
    assert answer.status == 400  # the sandbox's rules answer the second, real request
    assert len(graph.received) == 2
