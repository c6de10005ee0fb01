"""The Graph client's waits between a sync call's attempts: exponential, fully jittered,
capped at 2 s, and cut short by the shared breaker (README, Delivery and retries)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from server.config import GraphSettings
from server.delivery.graph import Delivery, GraphClient
from server.delivery.policy import backoff_seconds
from server.delivery.throttle import THRESHOLD
from server.errors import UpstreamUnavailable
from tests.support import NOW, PIXEL, FakeGraph, graph_error
from tools.base import EventBatch

EVENT = {"event_name": "Lead", "event_time": int(NOW), "action_source": "chat",
         "event_id": "e-1", "user_data": {"external_id": ["0" * 64]}}  # fmt: skip


def waits(graph: FakeGraph, rand: Callable[[], float]) -> list[float]:
    """The delays the client asked to sleep for while delivering one event to `graph`."""
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    async def go() -> None:
        settings = GraphSettings(base_url="https://graph.test")
        client = GraphClient(settings, graph.transport(), sleep=sleep, rand=rand)
        try:
            await client.send(
                Delivery(EventBatch(PIXEL, [EVENT]), "EAAB-1"), project_id="p1", budget=60
            )
        finally:
            await client.aclose()

    asyncio.run(go())
    return slept


def test_waits_double_between_attempts():
    graph = FakeGraph()
    graph.script.extend([graph_error(503, 2, is_transient=True)] * 2)
    assert waits(graph, rand=lambda: 1.0) == [0.2, 0.4]
    assert len(graph.received) == 3  # the third attempt is delivered


def test_three_failures_in_a_row_open_the_breaker_for_every_caller():
    """The shared breaker (server/delivery/throttle.py): after THRESHOLD failures the call
    gives up, and the next call for the same token and pixel sends nothing."""
    graph = FakeGraph()
    graph.script.extend([graph_error(503, 2, is_transient=True)] * 10)

    async def go() -> list[str]:
        client = GraphClient(GraphSettings(base_url="https://graph.test"), graph.transport(),
                             sleep=_no_sleep)  # fmt: skip
        outcomes = []
        try:
            for _ in range(2):
                with pytest.raises(UpstreamUnavailable) as caught:
                    await client.send(Delivery(EventBatch(PIXEL, [EVENT]), "EAAB-1"),
                                      project_id="p1", budget=60)  # fmt: skip
                outcomes.append(str(caught.value.upstream.get("breaker", "attempts")))
        finally:
            await client.aclose()
        return outcomes

    assert asyncio.run(go()) == ["attempts", "open"]
    assert len(graph.received) == THRESHOLD


async def _no_sleep(_seconds: float) -> None:
    return None


@pytest.mark.parametrize("attempt", [1, 4, 5, 30])
def test_the_jitter_draws_below_the_capped_exponential(attempt):
    ceiling = min(2.0, 0.2 * 2 ** (attempt - 1))
    assert backoff_seconds(attempt, rand=lambda: 0.0) == 0.0
    assert backoff_seconds(attempt, rand=lambda: 0.5) == pytest.approx(ceiling / 2)
