"""Past `max_in_flight` calls in progress, a call is answered 503 OVERLOADED at once, with
Retry-After; health checks are never refused; calls already in progress finish."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable

import httpx

from server.app import create_app
from server.delivery.transport import HttpxTransport
from tests.support import NOW, PROJECT, funnel_parameters


def test_calls_past_the_cap_are_refused_with_503_and_retry_after(config, sign):
    release = asyncio.Event()
    arrived = 0

    async def slow_graph(request: httpx.Request) -> httpx.Response:
        nonlocal arrived
        arrived += 1
        await release.wait()
        return httpx.Response(200, json={"events_received": 1, "fbtrace_id": "T"})

    config = dataclasses.replace(config, server=dataclasses.replace(config.server, max_in_flight=2))
    app = create_app(config, graph_transport=HttpxTransport(httpx.MockTransport(slow_graph)),
                     clock=lambda: NOW)  # fmt: skip
    headers = {"Authorization": f"Bearer {sign()}"}

    def post(client: httpx.AsyncClient, n: int) -> Awaitable[httpx.Response]:
        body = {"tool": "FACEBOOK_ADS_SEND_FUNNEL_EVENT",
                "parameters": funnel_parameters(eventId=f"order-{n}")}  # fmt: skip
        return client.post(f"/projects/{PROJECT}/tools", json=body, headers=headers)

    async def go() -> tuple[httpx.Response, httpx.Response, list[httpx.Response]]:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://fg") as client:
                first = [asyncio.ensure_future(post(client, n)) for n in range(2)]
                while arrived < 1:  # both calls are in progress (coalesced into one request)
                    await asyncio.sleep(0.01)
                refused = await post(client, 3)
                health = await client.get("/healthz")
                release.set()
                return refused, health, await asyncio.gather(*first)

    refused, health, finished = asyncio.run(go())
    assert refused.status_code == 503
    assert refused.headers["retry-after"] == "1"
    assert refused.json() == {
        "message": "funnelgate is at its limit of calls in progress; retry shortly.",
        "code": "OVERLOADED",
        "retryable": True,
    }
    assert health.status_code == 200
    assert [r.status_code for r in finished] == [200, 200]
