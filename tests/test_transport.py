"""The production Graph transport (aiohttp) over real loopback HTTP: answers, refused
connections, timeouts, a pool that survives a cancelled attempt, and the whole app on it."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import orjson
import pytest

from server.delivery.transport import AiohttpTransport, Answer, ConnectionFailed
from tests.live import serving
from tests.support import (
    PIXEL,
    PROJECT,
    PROJECT_TOKEN,
    TRACE_ID,
    FakeGraph,
    free_port,
    funnel_parameters,
    graph_error,
)


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


def test_the_app_delivers_through_the_production_transport(make_client, graph, sign):
    """The whole app on aiohttp, as `funnelgate serve` builds it, to Graph on loopback: a
    transient failure, then the same bytes again, and Meta's answer unwrapped."""
    graph.reset()
    graph.script.append(graph_error(503, 2, is_transient=True))
    client = make_client(
        graph_settings={"base_url": graph.base_url}, transport=AiohttpTransport(max_connections=4)
    )
    response = client.post(
        f"/projects/{PROJECT}/tools",
        json={"tool": "FACEBOOK_ADS_SEND_FUNNEL_EVENT", "parameters": funnel_parameters()},
        headers={"Authorization": f"Bearer {sign()}"},
    )
    assert response.status_code == 200, response.text
    assert response.json() == {"events_received": 1, "messages": [], "fbtrace_id": TRACE_ID}
    first, second = graph.received
    assert first.body == second.body
    assert (second.path, second.query) == (f"/v24.0/{PIXEL}/events", "")
    assert second.headers["content-type"] == "application/json"
    assert second.json()["access_token"] == PROJECT_TOKEN
    assert graph.sandbox.accepted[-1]["body"]["data"] == second.json()["data"]
