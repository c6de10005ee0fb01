"""Coalescing: concurrent deliveries share Graph requests, yet every caller gets its own answer
and one caller's bad event never fails another's."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import pytest

from server.config import GraphSettings
from server.delivery.coalesce import Coalescer
from server.delivery.graph import Delivery, GraphClient
from server.errors import UpstreamAuth, UpstreamRejected
from tests.support import NOW, PIXEL, PROJECT, FakeGraph, Step, counter, funnel_parameters
from tools.base import EventBatch

HASHED_EMAIL = hashlib.sha256(b"ada@example.com").hexdigest()


def delivery(event_id: str, *, token: str = "EAAB-1", pixel: str = PIXEL, bad: bool = False,
             events: int = 1) -> Delivery:  # fmt: skip
    """Events Meta accepts; `bad` ones carry an unhashed email, which Meta refuses."""
    email = "ada@example.com" if bad else HASHED_EMAIL
    batch = EventBatch(
        pixel_id=pixel,
        events=[{"event_name": "Purchase", "event_time": int(NOW), "action_source": "chat",
                 "event_id": f"{event_id}-{n}", "user_data": {"em": [email]}}
                for n in range(events)],
    )  # fmt: skip
    return Delivery(batch, token)


def fake_graph() -> FakeGraph:
    return FakeGraph(trace_id=counter("trace-"))


def event_ids(graph: FakeGraph) -> list[list[str]]:
    return [[e["event_id"] for e in body["data"]] for body in graph.bodies()]


def run(graph: FakeGraph, calls: Callable[[Coalescer], Awaitable[Any]]) -> Any:
    async def go() -> Any:
        settings = GraphSettings(base_url="https://graph.test")
        client = GraphClient(settings, graph.transport(), sleep=_no_sleep)
        try:
            return await calls(Coalescer(client))
        finally:
            await client.aclose()

    return asyncio.run(go())


async def _no_sleep(_: float) -> None:
    return None


def send_all(*deliveries: Delivery) -> Callable[[Coalescer], Awaitable[list[Any]]]:
    async def calls(coalescer: Coalescer) -> list[Any]:
        sends = (coalescer.submit(d, project_id="p1", budget=5) for d in deliveries)
        return list(await asyncio.gather(*sends, return_exceptions=True))

    return calls


def test_calls_in_one_loop_turn_share_one_request_and_each_gets_its_own_answer():
    graph = fake_graph()
    answers = run(graph, send_all(delivery("a"), delivery("b", events=2), delivery("c")))
    assert event_ids(graph) == [["a-0", "b-0", "b-1", "c-0"]]
    assert [a["events_received"] for a in answers] == [1, 2, 1]
    assert {a["fbtrace_id"] for a in answers} == {"trace-1"}  # the shared request's


def test_a_lone_call_is_sent_as_it_is():
    graph = fake_graph()
    [answer] = run(graph, send_all(delivery("a")))
    assert event_ids(graph) == [["a-0"]]
    assert answer == {"events_received": 1, "messages": [], "fbtrace_id": "trace-1"}


def test_different_tokens_pixels_or_test_codes_never_share_a_request():
    graph = fake_graph()
    tested = delivery("d")
    tested = Delivery(EventBatch(PIXEL, tested.batch.events, test_event_code="TEST1"), "EAAB-1")
    run(graph, send_all(delivery("a"), delivery("b", token="EAAB-2"),
                        delivery("c", pixel="999"), tested, delivery("e")))  # fmt: skip
    assert sorted(event_ids(graph)) == [["a-0", "e-0"], ["b-0"], ["c-0"], ["d-0"]]
    assert {b["access_token"] for b in graph.bodies()} == {"EAAB-1", "EAAB-2"}
    assert [b.get("test_event_code") for b in graph.bodies()].count("TEST1") == 1


def test_a_refused_group_is_resent_one_call_at_a_time():
    graph = fake_graph()
    good, bad, other = delivery("good"), delivery("bad", bad=True), delivery("other")
    answers = run(graph, send_all(good, bad, other))
    assert event_ids(graph)[0] == ["good-0", "bad-0", "other-0"]
    assert sorted(event_ids(graph)[1:]) == [["bad-0"], ["good-0"], ["other-0"]]
    assert answers[0]["events_received"] == 1 and answers[2]["events_received"] == 1
    assert isinstance(answers[1], UpstreamRejected)


def test_a_transient_failure_retries_the_group_with_the_same_event_ids():
    graph = fake_graph()
    graph.script.append(Step(500, error={"code": 2, "is_transient": True}))
    answers = run(graph, send_all(delivery("a"), delivery("b")))
    assert event_ids(graph) == [["a-0", "b-0"], ["a-0", "b-0"]]
    assert [a["events_received"] for a in answers] == [1, 1]


def test_a_credential_failure_reaches_every_caller_as_its_own_error():
    graph = fake_graph()
    graph.script.append(Step(400, error={"message": "Session expired", "code": 190}))
    answers = run(graph, send_all(delivery("a"), delivery("b")))
    assert len(graph.received) == 1  # the same token fails alike for all: no resending
    assert all(isinstance(a, UpstreamAuth) for a in answers)
    assert answers[0] is not answers[1]  # each caller's error carries its own event ids
    assert answers[0].upstream == answers[1].upstream


def test_groups_hold_at_most_1000_events():
    graph = fake_graph()
    answers = run(graph, send_all(*(delivery(f"d{n}", events=300) for n in range(5))))
    assert [len(ids) for ids in event_ids(graph)] == [900, 600]
    assert [a["events_received"] for a in answers] == [300] * 5


def test_a_caller_that_went_away_is_left_out():
    graph = fake_graph()

    async def calls(coalescer: Coalescer) -> list[Any]:
        leaving = coalescer.submit(delivery("gone"), project_id="p1", budget=5)
        staying = coalescer.submit(delivery("stays"), project_id="p1", budget=5)
        leaving.cancel()  # both are waiting for the loop's turn
        return [await staying]

    [answer] = run(graph, calls)
    assert event_ids(graph) == [["stays-0"]]
    assert answer["events_received"] == 1


@pytest.mark.parametrize("coalesce", [True, False])
def test_the_switch_in_the_app(coalesce, make_client, graph, sign):
    """Through the whole app: concurrent Run Tool calls share requests unless
    `graph.coalesce = false`; either way each is answered for its own event."""
    client = make_client(graph_settings={"coalesce": coalesce})
    headers = {"Authorization": f"Bearer {sign()}"}

    def post(http: httpx.AsyncClient, n: int) -> Awaitable[httpx.Response]:
        body = {"tool": "FACEBOOK_ADS_SEND_FUNNEL_EVENT",
                "parameters": funnel_parameters(eventId=f"order-{n}")}  # fmt: skip
        return http.post(f"/projects/{PROJECT}/tools", json=body, headers=headers)

    async def go() -> list[httpx.Response]:
        # In the app's own loop, where its lifespan runs: the calls arrive in one loop turn.
        transport = httpx.ASGITransport(app=client.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://fg") as http:
            return list(await asyncio.gather(*(post(http, n) for n in range(4))))

    assert client.portal is not None
    responses = client.portal.call(go)
    assert [(r.status_code, r.json()["events_received"]) for r in responses] == [(200, 1)] * 4
    assert sorted(i for ids in event_ids(graph) for i in ids) == [f"order-{n}" for n in range(4)]
    assert len(graph.received) == (1 if coalesce else 4)
