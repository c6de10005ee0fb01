"""One caller's request never fails another's: whatever can fail for one call fails before
calls share a Graph request, and a shared request that fails other than by Meta's verdict
falls back to sending each call on its own."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import orjson
import pytest

from server.config import GraphSettings
from server.delivery.coalesce import Coalescer
from server.delivery.graph import Delivery, GraphClient
from server.delivery.transport import Answer, HttpxTransport
from tools.base import EventBatch

PIXEL = "123456789012345"


def delivery(event_id: str, **extra: Any) -> Delivery:
    event = {"event_name": "Purchase", "event_id": event_id, **extra}
    return Delivery(EventBatch(pixel_id=PIXEL, events=[event]), "EAAB-1")


def test_an_event_that_cannot_become_json_fails_when_its_delivery_is_made():
    with pytest.raises(orjson.JSONEncodeError):
        delivery("big", app_data={"n": 2**70})  # beyond 64 bits: orjson cannot write it


def test_a_combined_delivery_reuses_each_callers_bytes():
    a, b = delivery("a"), delivery("b", custom_data={"value": 1.5})
    combined = Delivery.combined([a, b])
    assert orjson.loads(combined.data) == a.batch.events + b.batch.events
    assert combined.batch.event_ids == ["a", "b"]


class FailsWhenShared:
    """A transport that breaks on any request carrying more than one event (a bug, a proxy
    that chokes on a size): not an answer from Meta."""

    def __init__(self) -> None:
        self.sent: list[list[str]] = []
        self._ok = HttpxTransport(httpx.MockTransport(self._answer))

    def _answer(self, request: httpx.Request) -> httpx.Response:
        events = orjson.loads(request.content)["data"]
        return httpx.Response(200, json={"events_received": len(events), "fbtrace_id": "T"})

    async def post(self, url: str, content: bytes) -> Answer:
        ids = [e["event_id"] for e in orjson.loads(content)["data"]]
        self.sent.append(ids)
        if len(ids) > 1:
            raise RuntimeError("unexpected failure of a shared request")
        return await self._ok.post(url, content)

    async def aclose(self) -> None:
        await self._ok.aclose()


def test_a_shared_request_that_fails_unexpectedly_is_resent_one_call_at_a_time():
    transport = FailsWhenShared()

    async def go() -> list[Any]:
        graph = GraphClient(GraphSettings(base_url="https://graph.test"), transport)
        coalescer = Coalescer(graph)
        try:
            sends = (
                coalescer.submit(delivery(i), project_id="p1", budget=5) for i in ("a", "b", "c")
            )
            return list(await asyncio.gather(*sends, return_exceptions=True))
        finally:
            await graph.aclose()

    answers = asyncio.run(go())
    assert transport.sent[0] == ["a", "b", "c"]
    assert sorted(transport.sent[1:]) == [["a"], ["b"], ["c"]]
    assert [a["events_received"] for a in answers] == [1, 1, 1]
