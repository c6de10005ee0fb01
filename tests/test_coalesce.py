"""Coalescing: concurrent deliveries share Graph requests, yet every caller gets its own answer
and one caller's bad event never fails another's."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import pytest

from server.app import create_app
from server.config import GraphSettings
from server.delivery.coalesce import Coalescer
from server.delivery.graph import Delivery, GraphClient
from server.delivery.transport import HttpxTransport
from server.errors import UpstreamAuth, UpstreamRejected
from tests.conftest import NOW, PROJECT, funnel_parameters, make_config
from tools.base import EventBatch

PIXEL = "123456789012345"  # the same as conftest's
Handler = Callable[[list[dict[str, Any]]], httpx.Response]


def accept(events: list[dict[str, Any]]) -> httpx.Response:
    return httpx.Response(200, json={"events_received": len(events), "messages": [],
                                     "fbtrace_id": f"trace-{len(events)}"})  # fmt: skip


def refuse_bad(events: list[dict[str, Any]]) -> httpx.Response:
    """Like Meta: one bad event refuses the whole request."""
    if any(e["event_name"] == "Bad" for e in events):
        return httpx.Response(400, json={"error": {"message": "Invalid parameter", "code": 100}})
    return accept(events)


def delivery(event_id: str, *, token: str = "EAAB-1", pixel: str = PIXEL, name: str = "Purchase",
             events: int = 1) -> Delivery:  # fmt: skip
    batch = EventBatch(
        pixel_id=pixel,
        events=[{"event_name": name, "event_id": f"{event_id}-{n}"} for n in range(events)],
    )
    return Delivery(batch, token)


class Graph:
    def __init__(self, *answers: Handler) -> None:
        self.answers = list(answers)
        self.requests: list[dict[str, Any]] = []

    def handler(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        self.requests.append(body)
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        return answer(body["data"])

    def event_ids(self) -> list[list[str]]:
        return [[e["event_id"] for e in body["data"]] for body in self.requests]


def run(graph: Graph, calls: Callable[[Coalescer], Awaitable[Any]]) -> Any:
    async def go() -> Any:
        settings = GraphSettings(base_url="https://graph.test", retry_deadline_seconds=5)
        client = GraphClient(
            settings, HttpxTransport(httpx.MockTransport(graph.handler)), sleep=_no_sleep
        )
        try:
            return await calls(Coalescer(client))
        finally:
            await client.aclose()

    return asyncio.run(go())


async def _no_sleep(_: float) -> None:
    return None


def send_all(*deliveries: Delivery) -> Callable[[Coalescer], Awaitable[list[Any]]]:
    async def calls(coalescer: Coalescer) -> list[Any]:
        sends = (coalescer.send(d, project_id="p1") for d in deliveries)
        return await asyncio.gather(*sends, return_exceptions=True)

    return calls


def test_calls_in_one_loop_turn_share_one_request_and_each_gets_its_own_answer():
    graph = Graph(accept)
    answers = run(graph, send_all(delivery("a"), delivery("b", events=2), delivery("c")))
    assert graph.event_ids() == [["a-0", "b-0", "b-1", "c-0"]]
    assert [a["events_received"] for a in answers] == [1, 2, 1]
    assert {a["fbtrace_id"] for a in answers} == {"trace-4"}


def test_a_lone_call_is_sent_as_it_is():
    graph = Graph(accept)
    [answer] = run(graph, send_all(delivery("a")))
    assert graph.event_ids() == [["a-0"]]
    assert answer == {"events_received": 1, "messages": [], "fbtrace_id": "trace-1"}


def test_different_tokens_pixels_or_test_codes_never_share_a_request():
    graph = Graph(accept)
    tested = delivery("d")
    tested = Delivery(EventBatch(PIXEL, tested.batch.events, test_event_code="TEST1"), "EAAB-1")
    run(graph, send_all(delivery("a"), delivery("b", token="EAAB-2"),
                        delivery("c", pixel="999"), tested, delivery("e")))  # fmt: skip
    assert sorted(graph.event_ids()) == [["a-0", "e-0"], ["b-0"], ["c-0"], ["d-0"]]
    assert {b["access_token"] for b in graph.requests} == {"EAAB-1", "EAAB-2"}
    assert [b.get("test_event_code") for b in graph.requests].count("TEST1") == 1


def test_a_refused_group_is_resent_one_call_at_a_time():
    graph = Graph(refuse_bad)
    good, bad, other = delivery("good"), delivery("bad", name="Bad"), delivery("other")
    answers = run(graph, send_all(good, bad, other))
    assert graph.event_ids()[0] == ["good-0", "bad-0", "other-0"]
    assert sorted(graph.event_ids()[1:]) == [["bad-0"], ["good-0"], ["other-0"]]
    assert answers[0]["events_received"] == 1 and answers[2]["events_received"] == 1
    assert isinstance(answers[1], UpstreamRejected)


def test_a_transient_failure_retries_the_group_with_the_same_event_ids():
    transient = httpx.Response(500, json={"error": {"code": 2, "is_transient": True}})
    graph = Graph(lambda _: transient, accept)
    answers = run(graph, send_all(delivery("a"), delivery("b")))
    assert graph.event_ids() == [["a-0", "b-0"], ["a-0", "b-0"]]
    assert [a["events_received"] for a in answers] == [1, 1]


def test_a_credential_failure_reaches_every_caller_as_its_own_error():
    expired = httpx.Response(400, json={"error": {"message": "Session expired", "code": 190}})
    graph = Graph(lambda _: expired)
    answers = run(graph, send_all(delivery("a"), delivery("b")))
    assert len(graph.requests) == 1  # the same token fails alike for all: no resending
    assert all(isinstance(a, UpstreamAuth) for a in answers)
    assert answers[0] is not answers[1]  # each caller's error carries its own event ids
    assert answers[0].upstream == answers[1].upstream


def test_groups_hold_at_most_1000_events():
    graph = Graph(accept)
    answers = run(graph, send_all(*(delivery(f"d{n}", events=300) for n in range(5))))
    assert [len(ids) for ids in graph.event_ids()] == [900, 600]
    assert [a["events_received"] for a in answers] == [300] * 5


def test_a_caller_that_went_away_is_left_out():
    graph = Graph(accept)

    async def calls(coalescer: Coalescer) -> list[Any]:
        leaving = asyncio.ensure_future(coalescer.send(delivery("gone"), project_id="p1"))
        staying = asyncio.ensure_future(coalescer.send(delivery("stays"), project_id="p1"))
        await asyncio.sleep(0)  # both are waiting for the loop's turn
        leaving.cancel()
        return [await staying]

    [answer] = run(graph, calls)
    assert graph.event_ids() == [["stays-0"]]
    assert answer["events_received"] == 1


@pytest.mark.parametrize("coalesce", [True, False])
def test_the_switch_in_the_app(coalesce, tmp_path, rsa_key, sign):
    """Through the whole app: concurrent Run Tool calls share requests unless
    `graph.coalesce = false`; either way each is answered for its own event."""
    graph = Graph(accept)
    config = make_config(tmp_path, rsa_key, facebook_access_token="EAAB-project-token")
    config = dataclasses.replace(config, graph=dataclasses.replace(config.graph, coalesce=coalesce))
    app = create_app(
        config,
        graph_transport=HttpxTransport(httpx.MockTransport(graph.handler)),
        clock=lambda: NOW,
    )
    headers = {"Authorization": f"Bearer {sign()}"}

    def post(client: httpx.AsyncClient, n: int) -> Awaitable[httpx.Response]:
        body = {"tool": "FACEBOOK_ADS_SEND_FUNNEL_EVENT",
                "parameters": funnel_parameters(eventId=f"order-{n}")}  # fmt: skip
        return client.post(f"/projects/{PROJECT}/tools", json=body, headers=headers)

    async def go() -> list[httpx.Response]:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://fg") as client:
                return await asyncio.gather(*(post(client, n) for n in range(4)))

    responses = asyncio.run(go())
    assert [(r.status_code, r.json()["events_received"]) for r in responses] == [(200, 1)] * 4
    assert sorted(i for ids in graph.event_ids() for i in ids) == [f"order-{n}" for n in range(4)]
    assert len(graph.requests) == (1 if coalesce else 4)
